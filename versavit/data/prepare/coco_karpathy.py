"""COCO captions in Karpathy's splits (the image-text retrieval benchmark: 5k test images, about 5 captions each): the
`coco-karpathy` prepare source, the split-file parser the published-layout reader (versavit.eval.datasets.
coco_karpathy) shares, and a tiny stand-in.

The layout: Karpathy's split file from caption_datasets.zip (cs.stanford.edu/people/karpathy/deepimagesent/
caption_datasets.zip, which also holds the Flickr files) beside the COCO 2014 images as their zips unzip
(images.cocodataset.org/zips/train2014.zip, val2014.zip):

    <root>/dataset_coco.json        (or <root>/karpathy/dataset_coco.json, <root>/caption_datasets/...)
    <root>/train2014/COCO_train2014_<12-digit id>.jpg
    <root>/val2014/COCO_val2014_<12-digit id>.jpg

dataset_coco.json is {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
"split": "test" | "val" | "train" | "restval", "cocoid": 391895, "imgid": ..., "sentids": [...],
"sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], "imgid": ..., "sentid": ...}, ...]}, ...]}.
What this relies on, as readers of the file use it: an image's path is <root>/<filepath>/<filename>, its captions
are the sentences' "raw" strings, "restval" images (the 30k of val2014 outside Karpathy's val and test) train
with "train" (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, utils.py `create_input_files`; ViLT's DATA.md puts
the file under karpathy/). Test: 5,000 images of val2014 with 25,010 captions (5 per image, a few images 6 or 7);
every caption of an image is kept, as the retrieval evaluations of ALBEF and BLIP count them (salesforce/BLIP,
data/coco_karpathy_dataset.py: one text per caption, `img2txt` lists all of an image's).

Splits prepared: "test" (the default), "val" and "train" (train + restval, 113k images). A prepared sample: the
image as published (rgb.jpg) and json {benchmark, split, karpathy_split, key (<filepath>/<filename>), file, cocoid,
size [h, w], captions [raw strings, whitespace-stripped]}. An image whose record is malformed or has no caption is
skipped and counted (bad_record); a missing or undecodable image likewise (missing_image, bad_image). A split file
that is not the documented object is an error of the whole benchmark.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import safe_key
from versavit.data.prepare.base import Source

# versavit.data.prepare imports benchmarks before this module (benchmarks' source list takes COCO_KARPATHY_SOURCE
# from here, at its end), so these helpers are defined by the time this import runs
from versavit.data.prepare.benchmarks import _read, _Skip, image_field

SPLIT_FILE = "dataset_coco.json"
SPLIT_FILE_DIRS = ("", "karpathy", "caption_datasets")  # where under the root the split file may sit
SPLITS = ("test", "val", "train")
# a prepared split -> the Karpathy split labels it takes
MEMBERS: dict[str, tuple[str, ...]] = {"test": ("test",), "val": ("val",), "train": ("train", "restval")}

Record = tuple[str, int, list[str], str]  # (key = <filepath>/<filename>, cocoid, captions, Karpathy split label)


# ------------------------------------------------------------------------------------------ the split file


def split_file(root: str) -> str:
    """The URL of dataset_coco.json under `root` (the first of SPLIT_FILE_DIRS that holds it)."""
    root = root.rstrip("/")
    for folder in SPLIT_FILE_DIRS:
        url = storage.join(root, folder, SPLIT_FILE) if folder else storage.join(root, SPLIT_FILE)
        if storage.exists(url):
            return url
    raise storage.StorageError(f"coco-karpathy: no {SPLIT_FILE} under {root} (looked in "
                               f"{', '.join(repr(d or '.') for d in SPLIT_FILE_DIRS)}); put Karpathy's split file "
                               "from caption_datasets.zip beside train2014/ and val2014/", kind="missing")


def parse_split_file(text: str, where: str = SPLIT_FILE) -> list[dict[str, Any]]:
    """dataset_coco.json's text -> its "images" list (entries unchecked: `parse_record`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"coco-karpathy: {where} is not valid JSON ({exc}); re-download caption_datasets.zip") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"coco-karpathy: {where} must be an object with an \"images\" list (Karpathy's "
                         f"dataset_coco.json), got {type(data).__name__}"
                         + (f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""))
    return data["images"]


def parse_record(entry: Any) -> Record:
    """One "images" entry -> (key, cocoid, captions, split label); ValueError when it lacks what retrieval needs."""
    if not isinstance(entry, dict):
        raise ValueError(f"an image entry must be an object, got {type(entry).__name__}")
    missing = [k for k in ("filepath", "filename", "split", "sentences") if k not in entry]
    if missing:
        raise ValueError(f"image entry without {missing}: {str(entry)[:200]}")
    if not isinstance(entry["sentences"], list):
        raise ValueError(f"{entry['filename']}: sentences must be a list")
    captions = []
    for sentence in entry["sentences"]:
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"{entry['filename']}: a sentence without its raw text: {str(sentence)[:120]}")
        captions.append(raw.strip())  # a few raw captions end in spaces or a newline
    if not captions:
        raise ValueError(f"{entry['filename']}: no sentences")
    key = f"{str(entry['filepath']).strip('/')}/{entry['filename']}"
    return key, int(entry.get("cocoid", entry.get("imgid", -1))), captions, str(entry["split"])


def split_entries(entries: Sequence[Any], split: str) -> list[Any]:
    """The entries of one prepared split (train takes train + restval), in the file's order."""
    if split not in MEMBERS:
        raise ValueError(f"coco-karpathy split must be one of {list(SPLITS)}, got {split!r}")
    labels = MEMBERS[split]
    return [e for e in entries if isinstance(e, dict) and e.get("split") in labels]


def images_root(split_file_url: str) -> str:
    """The folder holding train2014/ and val2014/: the one above the split file's folder when that is karpathy/
    or caption_datasets/, else the split file's own."""
    folder = split_file_url.rstrip("/").rpartition("/")[0]
    parent, _, name = folder.rpartition("/")
    return parent if name in SPLIT_FILE_DIRS[1:] else folder


# ------------------------------------------------------------------------------------------ the source


def list_coco_karpathy(input_url: str, split: str) -> list[Any]:
    """The split's image entries as published (the runner cuts them into shards; `read_coco_karpathy` parses)."""
    url = split_file(input_url)
    return split_entries(parse_split_file(storage.read_text(url), url), split)


def read_coco_karpathy(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """COCO images as published + every raw caption of each (json)."""
    root = images_root(split_file(input_url))
    for entry in units:
        counts["records"] += 1
        try:
            try:
                key, cocoid, captions, label = parse_record(entry)
            except ValueError:
                raise _Skip("bad_record") from None
            name, data, size = image_field(_read(storage.join(root, key), "missing_image"))
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        yield {"__key__": safe_key(Path(key).with_suffix("")), name: data,
               "json": {"benchmark": "coco-karpathy", "split": split, "karpathy_split": label, "key": key,
                        "file": key, "cocoid": cocoid, "size": list(size), "captions": captions}}


# ------------------------------------------------------------------------------------------ fixture

# Karpathy label -> images in the stand-in (test first: the evaluation split)
FIXTURE_IMAGES: dict[str, int] = {"test": 4, "val": 2, "restval": 1, "train": 2}
FIXTURE_SIZE = 48
_FIXTURE_IDS = {"test": 1000, "val": 2000, "restval": 3000, "train": 4000}


def fixture_truth(seed: int, label: str, index: int) -> dict[str, Any]:
    """Stand-in image `index` of Karpathy label `label`: "image" (as rendered, before JPEG), "key", "cocoid",
    "captions" (what the reader must give back: stripped) and "raw" (as written: test image 0 has six captions,
    test image 1's last one ends in " \\n", as a few published ones do). Captions come from the synthetic scene:
    its caption, its object count and one sentence per object."""
    from versavit.data.synthetic import render_sample

    scene = render_sample(seed, "test" if label == "test" else "train", index + 10 * list(_FIXTURE_IDS).index(label),
                          image_size=FIXTURE_SIZE)
    sentences = [scene.caption, f"A picture of {len(scene.objects)} objects."]
    sentences += [f"There is {o['expression']} in the room." for o in scene.objects]
    count = 6 if (label, index) == ("test", 0) else 5
    raw = sentences[:count]
    if (label, index) == ("test", 1):
        raw[-1] += " \n"
    folder = "train2014" if label == "train" else "val2014"  # restval, val and test are val2014 images
    cocoid = _FIXTURE_IDS[label] + 7 * index
    return {"image": scene.image, "key": f"{folder}/COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid,
            "captions": [s.strip() for s in raw], "raw": raw, "split": label}


def write_coco_karpathy_fixture(folder: Path, seed: int) -> None:
    """dataset_coco.json + val2014/ and train2014/ JPEGs: a few images per Karpathy split, captions from the
    synthetic scenes."""
    images, sentid = [], 0
    for label, n in FIXTURE_IMAGES.items():
        for i in range(n):
            truth = fixture_truth(seed, label, i)
            path = folder / truth["key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(codecs.encode_image(truth["image"], "jpg"))
            imgid = len(images)
            sentences = []
            for raw in truth["raw"]:
                sentences.append({"tokens": raw.lower().replace(".", " ").split(), "raw": raw, "imgid": imgid,
                                  "sentid": sentid})
                sentid += 1
            filepath, filename = truth["key"].split("/")
            images.append({"filepath": filepath, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                           "imgid": imgid, "split": label, "sentences": sentences, "cocoid": truth["cocoid"]})
    (folder / SPLIT_FILE).write_text(json.dumps({"images": images, "dataset": "coco"}))


COCO_KARPATHY_SOURCE = Source(
    name="coco-karpathy", kind="benchmark", tasks=("retrieval",), splits=SPLITS,
    about="COCO captions in Karpathy's splits, the image-text retrieval benchmark (test: 5,000 val2014 images, "
    "25,010 captions): dataset_coco.json from caption_datasets.zip (36 MB, https://cs.stanford.edu/people/karpathy/"
    "deepimagesent/caption_datasets.zip) + val2014.zip (6.2 GB) and, for the train split, train2014.zip (13 GB) "
    "from http://images.cocodataset.org/zips/, unzipped; --input holds dataset_coco.json (or karpathy/"
    "dataset_coco.json) beside train2014/ and val2014/. Splits test (default), val, train (= train + restval); "
    "images kept as published, every raw caption in the sample's json.",
    list_units=list_coco_karpathy, read_units=read_coco_karpathy, write_fixture=write_coco_karpathy_fixture,
    units_per_shard=256)
