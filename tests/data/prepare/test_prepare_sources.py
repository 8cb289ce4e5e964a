"""Each training source: its fixture (the published layout rendered from the synthetic world) prepared into shards,
read back through the training reader and held to the world's exact labels; a corrupt input is skipped and
counted; SA-1B's genuine format sample is read with its quirks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SEED
from prepare_helpers import by_key, raw_field, read, rewrite_tar, truncate

from versavit.data import codecs
from versavit.data.convert import synth
from versavit.data.convert.text import idl_page_texts, url_hash
from versavit.data.prepare.runner import prepare_dataset, prepare_splits
from versavit.data.prepare.training import TRAINING_SOURCES
from versavit.data.tasks import CAPTION_PROMPT, refseg_view, text_pairs

# Caption sources are checked through `text_pairs`, the pairs the caption task's view picks from (caption_view
# itself only adds a resize through transformers' smart_resize, whose import alone outlasts these tests).
REAL_SA1B = Path(__file__).resolve().parents[2] / "fixtures" / "real-format-samples" / "sa1b" / "datumaro"


def scene(i: int) -> synth.SceneSample:
    return synth.scene(SEED, i)


def boxes(i: int) -> list[list[float]]:
    return [[float(v) for v in o["bbox"]] for o in scene(i).objects]


def check_refseg(sample: dict, expected_mask: Callable[[str], np.ndarray]) -> None:
    """The refseg task's view of a sample (embeddings stubbed: one row per object) gives the exact mask."""
    n = len(sample["json"].get("objects") or [1])
    sample["emb.npy"] = np.eye(max(n, 2), 8, dtype=np.float16)[:n]
    view = refseg_view(sample, synth.FIXTURE_SIZE, seed=0)
    assert np.array_equal(view["mask"].numpy() > 0, expected_mask(view["expression"]))


def check_objects365(out: str, root: Path) -> None:
    samples = by_key(out)
    assert sorted(samples) == [f"objects365-{1000 + i}" for i in range(6)]
    raw = raw_field(out)
    for i in range(6):
        meta = samples[f"objects365-{1000 + i}"]["json"]
        assert [o["bbox"] for o in meta["objects"]] == boxes(i)
        assert [o["label"] for o in meta["objects"]] == [o["shape"] for o in scene(i).objects]
        assert meta["size"] == [synth.FIXTURE_SIZE] * 2
        # the JSON says images/v1/patch0/..., the train tar unpacked to patch0/...: found, bytes untouched
        assert raw[f"objects365-{1000 + i}"] == (root / "train" / "patch0" / f"objects365_v1_{i:08d}.jpg").read_bytes()


def check_grit(out: str, root: Path) -> None:
    samples = by_key(out)
    assert len(samples) == 8
    for n in range(8):
        s = samples[f"grit-{n // 4:05d}{n % 4:04d}"]
        meta = s["json"]
        assert [o["expression"] for o in meta["objects"]] == [o["expression"] for o in scene(n).objects]
        assert [o["bbox"] for o in meta["objects"]] == boxes(n)
        assert all(o["expression"] in meta["caption"] for o in meta["objects"])
        assert text_pairs(meta, "caption") == [(CAPTION_PROMPT, meta["caption"])]


def check_sa1b(out: str, root: Path) -> None:
    samples = by_key(out)
    assert sorted(samples) == sorted(f"sa1b-{i + 1}" for i in range(8))
    for i in range(8):
        s, world = samples[f"sa1b-{i + 1}"], scene(i)
        objects = s["json"]["objects"]
        assert [o["bbox"] for o in objects] == boxes(i)
        for o, w in zip(objects, world.objects, strict=True):
            assert np.array_equal(codecs.decode_rle(o["segmentation"]), synth.mask(world, w["id"]))
            o["expression"] = w["expression"]  # what `label describe` adds
        by_expr = {w["expression"]: synth.mask(world, w["id"]) for w in world.objects}
        check_refseg(s, by_expr.__getitem__)


def check_refer(out: str, root: Path) -> None:
    samples = read(out)
    assert len(samples) == sum(len(scene(i).objects) for i in range(4))  # images 0-3 are the train split
    for s in samples:
        meta = s["json"]
        world = scene((meta["image_id"] - 9) // 16)
        [obj] = [o for o in world.objects if o["expression"] == meta["expression"]]
        assert meta["split"] == "train" and meta["objects"][0]["bbox"] == [float(v) for v in obj["bbox"]]
        assert np.array_equal(s["mask.png"] > 0, synth.mask(world, obj["id"]))
        check_refseg(s, lambda expr, m=synth.mask(world, obj["id"]): m)


def check_pixmo(out: str, root: Path) -> None:
    samples = read(out)
    raw = raw_field(out)
    assert len(samples) == 8
    for s in samples:
        i = int(s["json"]["image_url"].rsplit("/", 1)[-1].split(".")[0])
        assert s["json"]["caption"] == scene(i).caption
        assert s["json"]["transcripts"] == [scene(i).caption.split(".")[0]]
        assert raw[s["__key__"]] == (root / "pixmo_images" / url_hash(s["json"]["image_url"])).read_bytes()
        assert text_pairs(s["json"], "caption") == [(CAPTION_PROMPT, scene(i).caption)]


def check_idl(out: str, root: Path) -> None:
    samples = read(out)
    assert [s["json"]["caption"] for s in samples] == idl_page_texts(SEED)
    assert all(s["rgb.jpg"].shape == (160, 128, 3) for s in samples)
    assert text_pairs(samples[0]["json"], "caption") == [(CAPTION_PROMPT, idl_page_texts(SEED)[0])]


def check_finevision(out: str, root: Path) -> None:
    samples = read(out)
    assert len(samples) == 8
    for s in samples:
        # which scene: the rows hold PNGs, re-encoded once (JPEG q95) like every non-JPEG input
        [i] = [i for i in range(8) if np.array_equal(s["rgb.jpg"], codecs.decode_image(synth.jpeg(scene(i))))]
        qa = {(q["question"], q["answer"]) for q in scene(i).qa}
        turns = [(t["question"], t["answer"]) for t in s["json"]["conversations"]]
        assert turns and set(turns) <= qa
        assert text_pairs(s["json"], "vqa") == turns


def check_sa1b_internvl(out: str, root: Path) -> None:
    samples = by_key(out)
    raw = raw_field(out)
    assert len(samples) == 8
    for i in range(8):
        key = f"sa1b-internvl-internvl_sa1b_caption_11m_single_image_en-{i}"
        assert samples[key]["json"]["caption"] == scene(i).caption
        assert raw[key] == (root / "images" / f"sa_{i // 4:06d}" / f"sa_{i + 1}.jpg").read_bytes()


# the fixture's stand-in classes: synthetic class -> (COCO-Stuff name, expression)
COCO_STUFF_NAMES = {"floor": ("floor-other", "floor"), "wall": ("wall-other", "wall"),
                    "ball": ("sports ball", "sports ball"), "cube": ("cardboard", "cardboard"),
                    "cylinder": ("cup", "cup")}


def check_coco_stuff(out: str, root: Path) -> None:
    """One sample per train image (0-5), one query per class present, its mask exact with the unlabelled top
    rows (255) in no mask; image 0's 2x2 speck of sky is below the minimum area (DROPPED)."""
    from versavit.data.synthetic import CLASSES

    samples = by_key(out)
    assert sorted(samples) == [f"coco-stuff-{139 + 16 * i:012d}" for i in range(6)]
    for i in range(6):
        s, world = samples[f"coco-stuff-{139 + 16 * i:012d}"], scene(i)
        expected = {}
        for k in np.unique(world.semantic).tolist():
            mask = world.semantic == k
            mask[:3] = False  # the unlabelled band
            if i == 0:
                mask[-2:, -2:] = False  # the speck of sky
            if mask.any():
                expected[COCO_STUFF_NAMES[CLASSES[k]]] = mask
        objects = s["json"]["objects"]
        assert {(o["label"], o["expression"]) for o in objects} == set(expected)
        assert "sky-other" not in {o["label"] for o in objects}
        for o in objects:
            got = codecs.decode_rle(o["segmentation"])
            assert np.array_equal(got, expected[o["label"], o["expression"]]) and not got[:3].any()
        by_expr = {expr: m for (_, expr), m in expected.items()}
        check_refseg(s, by_expr.__getitem__)


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "objects365": check_objects365, "grit": check_grit, "sa1b": check_sa1b, "refcoco": check_refer,
    "refcoco+": check_refer, "refcocog": check_refer, "pixmo-cap": check_pixmo, "idl-wds": check_idl,
    "finevision": check_finevision, "sa1b-internvl": check_sa1b_internvl, "coco-stuff": check_coco_stuff,
}
DROPPED = {"finevision": {"multi_image_dropped": 1, "text_only_dropped": 1},  # filters, not corruption
           "coco-stuff": {"small_class_dropped": 1}}


def test_every_training_source_is_checked() -> None:
    assert set(CHECKS) == {s.name for s in TRAINING_SOURCES}
    for src in TRAINING_SOURCES:  # documented: what to download, the layout, the size
        assert "<input>" in src.about and any(u in src.about for u in ("GB", "TB", "M ")), src.name


@pytest.mark.parametrize("name", list(CHECKS))
def test_source_fixture_prepares_to_exact_labels(name: str, fixtures_root: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    summary = prepare_dataset(name, str(fixtures_root / name), out)
    assert summary["manifest"] and summary["corrupt"] == 0
    assert {k: v for k, v in summary["counts"].items() if k not in ("records", "samples")} == DROPPED.get(name, {})
    CHECKS[name](out, fixtures_root / name)


def _corrupt_objects365(root: Path) -> None:
    truncate(root / "train" / "patch0" / "objects365_v1_00000002.jpg")


def _corrupt_grit(root: Path) -> None:
    rewrite_tar(root / "00001.tar", lambda name, data: data[:100] if name == "000010001.jpg" else data)


def _corrupt_sa1b(root: Path) -> None:
    (root / "sa_000000" / "sa_2.json").write_text('{"image": {"image_id": 2')


def _corrupt_refer(root: Path) -> None:
    truncate(root / "images/mscoco/images/train2014" / "COCO_train2014_000000000009.jpg")


def _corrupt_pixmo(root: Path) -> None:
    (root / "pixmo_images" / url_hash(f"https://example.invalid/pixmo/{SEED}/3.jpg")).unlink()


def _corrupt_idl(root: Path) -> None:
    rewrite_tar(root / "idl-train-00000.tar", lambda name, data: data[:300] if name == "000000-idl.tif" else data)


def _corrupt_finevision(root: Path) -> None:
    path = root / "synth_vqa" / "train-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": None}]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)


def _corrupt_sa1b_internvl(root: Path) -> None:
    path = root / "internvl_sa1b_caption_11m_single_image_en.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], '{"id": 99, "image": "sa_000000/sa_9', *lines[3:]]) + "\n")


def _corrupt_coco_stuff(root: Path) -> None:
    truncate(root / "annotations" / "train2017" / f"{155:012d}.png")


# source -> (make one input corrupt, reason, how many records that loses, samples left)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, int, int]] = {
    "objects365": (_corrupt_objects365, "bad_image", 1, 5),
    "grit": (_corrupt_grit, "bad_image", 1, 7),
    "sa1b": (_corrupt_sa1b, "bad_json", 1, 7),
    "refcoco": (_corrupt_refer, "bad_image", len(scene(0).objects), 14 - len(scene(0).objects)),
    "pixmo-cap": (_corrupt_pixmo, "missing_image", 1, 7),
    "idl-wds": (_corrupt_idl, "bad_image", 1, 7),  # document 0 (two pages) has a truncated TIFF
    "finevision": (_corrupt_finevision, "bad_image", 1, 7),
    "sa1b-internvl": (_corrupt_sa1b_internvl, "bad_record", 1, 8),
    "coco-stuff": (_corrupt_coco_stuff, "bad_label", 1, 5),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_input_is_skipped_and_counted(name: str, fixture_copy: Callable[[str], Path], tmp_path: Path) -> None:
    corrupt, reason, lost, left = CORRUPTIONS[name]
    root = fixture_copy(name)
    corrupt(root)
    summary = prepare_dataset(name, str(root), str(tmp_path / "out"))
    assert summary["counts"][reason] == lost and summary["corrupt"] == lost
    assert summary["samples"] == left and summary["num_samples"] == left
    assert len(read(str(tmp_path / "out"))) == left


def test_refcoco_eval_splits_are_prepared_each_to_its_folder(fixtures_root: Path, tmp_path: Path) -> None:
    summaries = prepare_splits("refcocog", str(fixtures_root / "refcocog"), str(tmp_path / "out"), ["val", "test"])
    assert sorted(summaries) == ["test", "val"]
    for split, images in (("val", (4, 5)), ("test", (6, 7))):
        samples = read(str(tmp_path / "out" / split))
        assert len(samples) == sum(len(scene(i).objects) for i in images)
        assert {s["json"]["split"] for s in samples} == {split}
        assert {(s["json"]["image_id"] - 9) // 16 for s in samples} == set(images)


def test_sa1b_genuine_sample_quirks(tmp_path: Path) -> None:
    """Datumaro's SA-1B exemplar (tests/fixtures/real-format-samples/sa1b): a.json is well formed; b.json's one
    mask has area 0 and an RLE size [5, 10] that is not its image's (h 10, w 5): dropped, so b has no objects."""
    root = tmp_path / "sa_000000"
    shutil.copytree(REAL_SA1B, root)
    summary = prepare_dataset("sa1b", str(tmp_path), str(tmp_path / "out"))
    assert summary["counts"] == {"bad_mask_dropped": 1, "no_objects": 1, "records": 2, "samples": 1}
    [s] = read(str(tmp_path / "out"))
    assert s["__key__"] == "sa1b-1" and s["json"]["size"] == [5, 10] and s["rgb.jpg"].shape == (5, 10, 3)
    [obj] = s["json"]["objects"]
    genuine = json.loads((REAL_SA1B / "a.json").read_text())["annotations"][0]
    assert obj["bbox"] == [3.0, 1.0, 4.0, 5.0] and obj["area"] == 4 and obj["predicted_iou"] == genuine["predicted_iou"]
    expected = np.zeros((5, 10), bool)
    expected[1:5, 3] = True  # the bbox [3, 1, 1, 4]: column 3, rows 1-4
    assert np.array_equal(codecs.decode_rle(obj["segmentation"]), expected)
    assert raw_field(str(tmp_path / "out"))["sa1b-1"] == (REAL_SA1B / "a.jpg").read_bytes()
