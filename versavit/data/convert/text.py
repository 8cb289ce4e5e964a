"""Image + text records -> caption / VQA samples.

- captions (PixMo-Cap, SA-1B-InternVL, IDL-WDS pages): json {"caption"} (the caption task's text).
- conversations (FineVision): `images` (a list), `texts` = [{"user", "assistant"}, ...] turns, `source`.
  Only single-image samples are kept (the recipe's VQA data); text-only and multi-image records are
  dropped and counted. json: {"conversations": [{"question", "answer"}]} (what the caption task reads).

The layouts, as their authors publish them:
- PixMo-Cap (allenai/pixmo-cap): data/train-*.parquet rows {image_url, caption, transcripts}; images are
  URLs, fetched into pixmo_images/<sha256(image_url) hex> (Molmo's download layout), or carried as an
  `image` column (bytes) as in re-uploads with images.
- FineVision (HuggingFaceM4/FineVision): <subset>/train-*.parquet rows {images, texts, source, *_ratings}.
- SA-1B-InternVL (OpenGVLab/InternVL-SA-1B-Caption): internvl_sa1b_caption_*.jsonl in InternVL's chat
  format {id, image, width, height, conversations: [{from: human, value}, {from: gpt, value}]}; `image`
  names the SA-1B image relative to images/.
- IDL-WDS (pixparse/idl-wds): idl-train-NNNNN.tar webdataset shards; per document KEY.pdf, KEY.tif (the
  pages rendered, multi-page TIFF), KEY.json ({"pages": [{"lines": {"text", "bbox", "score"}, "words":
  {...}}]}, Textract OCR) and KEY.ocr. One sample per page with text: the TIFF page + its lines.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from versavit import storage
from versavit.data import codecs
from versavit.data.convert import synth
from versavit.data.convert.common import (
    SkipRecord,
    find_files,
    image_jpeg,
    iter_records,
    iter_tar_groups,
    load_image,
    read_record_unit,
    record_units,
    safe_key,
    write_dataset,
)

# The image placeholder some conversation sets put in the first user turn: the model places the
# image itself, so the placeholder would be a literal string in the question.
_IMAGE_PLACEHOLDER = re.compile(r"^\s*<image>\s*|\s*<image>\s*$")

# ------------------------------------------------------------------------------------ captions

if TYPE_CHECKING:
    from versavit.data.shards import Manifest


def caption_sample(rec: dict, jpeg: bytes, size: tuple[int, int], key: str, source: str) -> dict:
    """A caption record + its image -> sample (json caption; image_url and transcripts kept when present)."""
    meta: dict[str, Any] = {"source": source, "caption": str(rec["caption"]).strip(), "size": list(size)}
    if rec.get("image_url"):
        meta["image_url"] = rec["image_url"]
    if rec.get("transcripts") is not None and len(rec["transcripts"]):
        meta["transcripts"] = [str(t) for t in rec["transcripts"]]
    return {"__key__": safe_key(source, key), "rgb.jpg": jpeg, "json": meta}


def _caption_rows(rows: Iterator[tuple[str, dict]], images_url: str | None, source: str, counts: Counter,
                  image_of: Any = None) -> Iterator[dict]:
    for row, rec in rows:
        counts["records"] += 1
        if not str(rec.get("caption") or "").strip():
            counts["no_caption"] += 1
            continue
        try:
            ref = image_of(rec) if image_of else rec.get("image") or rec.get("image_path") or rec.get("image_url")
            jpeg, size = image_jpeg(load_image(ref, images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        yield caption_sample(rec, jpeg, size, str(rec.get("key") or rec.get("id") or row), source)


def convert_captions(records_url: str, output_url: str, images_url: str | None = None, *,
                     source: str = "pixmo-cap", samples_per_shard: int = 256) -> Manifest:
    """Image-caption records -> one caption shard dataset (warm-up / caption task)."""
    counts: Counter = Counter()
    rows = ((f"{n:09d}", rec) for n, rec in enumerate(iter_records(records_url)))
    meta = {"convert": {"format": "captions", "records": records_url, "images": images_url}}
    return write_dataset(_caption_rows(rows, images_url, source, counts), output_url, source, meta, counts,
                         samples_per_shard)


def _unit_key(unit: list[Any], row: str) -> str:
    """A stable, unique sample key for row `row` of a record-file unit: the file's path (no suffix) + row id."""
    return f"{unit[0].rsplit('.', 1)[0]}-{row}"


def url_hash(url: str) -> str:
    """The file name Molmo's downloader gives an image URL: its sha256 in hex."""
    return hashlib.sha256(url.encode()).hexdigest()


PIXMO_IMAGES = "pixmo_images"


def list_pixmo(input_url: str, split: str) -> list[Any]:
    return record_units(input_url, find_files(input_url, (".parquet", ".jsonl"), exclude=(f"{PIXMO_IMAGES}/",)))


def _pixmo_image(rec: dict) -> Any:
    if rec.get("image") is not None:
        return rec["image"]
    url = rec.get("image_url")
    return f"{PIXMO_IMAGES}/{url_hash(url)}" if url else None


def read_pixmo(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    for unit in units:
        rows = ((_unit_key(unit, row), rec) for row, rec in read_record_unit(input_url, unit, counts))
        yield from _caption_rows(rows, input_url, "pixmo-cap", counts, _pixmo_image)


def write_pixmo_fixture(folder: Path, seed: int) -> None:
    """allenai/pixmo-cap's parquet (data/train-0000N-of-00002.parquet: image_url, caption, transcripts; row
    groups of 2) and the images fetched to pixmo_images/<sha256(image_url)>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, s in enumerate(synth.scenes(seed)):
        url = f"https://example.invalid/pixmo/{seed}/{i}.jpg"
        synth.write(folder / PIXMO_IMAGES / url_hash(url), synth.jpeg(s))
        rows.append({"image_url": url, "caption": s.caption, "transcripts": [s.caption.split(".")[0]]})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for part in range(2):
        table = pa.Table.from_pylist(rows[part * 4:(part + 1) * 4])
        pq.write_table(table, folder / "data" / f"train-{part:05d}-of-00002.parquet", row_group_size=2)


# SA-1B-InternVL: InternVL's chat format over SA-1B images
SA1B_INTERNVL_IMAGES = "images"


def internvl_turns(conversations: list[dict]) -> list[dict[str, str]]:
    """InternVL/LLaVA chat turns [{from: human|gpt, value}] -> [{"question", "answer"}]."""
    turns, question = [], None
    for t in conversations or []:
        who, text = str(t.get("from", "")), str(t.get("value") or t.get("text") or "")
        if who in ("human", "user"):
            question = _IMAGE_PLACEHOLDER.sub("", text).strip()
        elif who in ("gpt", "assistant") and question is not None:
            if text.strip():
                turns.append({"question": question, "answer": text.strip()})
            question = None
    return turns


def list_sa1b_internvl(input_url: str, split: str) -> list[Any]:
    return record_units(input_url, find_files(input_url, (".jsonl",), exclude=(f"{SA1B_INTERNVL_IMAGES}/",)),
                        jsonl_unit_bytes=1 << 18)


def read_sa1b_internvl(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    images_url = storage.join(input_url, SA1B_INTERNVL_IMAGES)
    for unit in units:
        for row, rec in read_record_unit(input_url, unit, counts):
            counts["records"] += 1
            image = rec.get("image")
            if isinstance(image, list):
                if len(image) != 1:
                    counts["multi_image_dropped"] += 1
                    continue
                image = image[0]
            turns = internvl_turns(rec.get("conversations") or [])
            if not turns:
                counts["no_caption"] += 1
                continue
            try:
                jpeg, size = image_jpeg(load_image(image, images_url))
            except SkipRecord as skip:
                counts[skip.reason] += 1
                continue
            key = _unit_key(unit, str(rec.get("id", row)))
            yield caption_sample({"caption": turns[0]["answer"]}, jpeg, size, key, "sa1b-internvl")


INTERNVL_PROMPT = ("Generate an accurate, single-paragraph description based on the given image. Do not use "
                   "multiple paragraphs or line breaks.")


def write_sa1b_internvl_fixture(folder: Path, seed: int) -> None:
    """InternVL-SA-1B-Caption's JSONL (internvl_sa1b_caption_11m_single_image_en.jsonl, InternVL chat format) and
    the SA-1B images it names under images/ (sa_000000/sa_N.jpg, as the SA-1B tars unpack)."""
    lines = []
    for i, s in enumerate(synth.scenes(seed)):
        rel = f"sa_{i // 4:06d}/sa_{i + 1}.jpg"
        synth.write(folder / SA1B_INTERNVL_IMAGES / rel, synth.jpeg(s))
        h, w = s.image.shape[:2]
        lines.append(json.dumps({"id": i, "image": rel, "width": w, "height": h, "conversations": [
            {"from": "human", "value": f"<image>\n{INTERNVL_PROMPT}"}, {"from": "gpt", "value": s.caption}]}))
    synth.write(folder / "internvl_sa1b_caption_11m_single_image_en.jsonl", "\n".join(lines) + "\n")


# IDL-WDS: document pages (multi-page TIFF) + Textract OCR lines


def _tif_pages(data: bytes) -> list[Image.Image]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a damaged TIFF's EXIF: it fails below and is counted
        with Image.open(io.BytesIO(data)) as img:
            pages = []
            for i in range(getattr(img, "n_frames", 1)):
                img.seek(i)
                pages.append(img.convert("RGB"))
            return pages


def page_text(page: dict) -> str:
    """A page's OCR text: its lines, one per line (both of chug's page layouts: {lines: {text}} or {text})."""
    lines = page.get("lines", page) if isinstance(page, dict) else {}
    text = lines.get("text") if isinstance(lines, dict) else None
    return "\n".join(str(t).strip() for t in (text or []) if str(t).strip())


def list_idl(input_url: str, split: str) -> list[Any]:
    return find_files(input_url, (".tar",))


def read_idl(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    for unit in units:
        for key, fields in iter_tar_groups(storage.join(input_url, unit), counts):
            if "json" not in fields:
                continue
            counts["records"] += 1
            try:
                pages = json.loads(fields["json"])["pages"]
                if not isinstance(pages, list):
                    raise ValueError("pages is not a list")
            except (KeyError, TypeError, ValueError, UnicodeDecodeError):
                counts["bad_record"] += 1
                continue
            if "tif" not in fields:  # the PDF alone would need a rasteriser; the release has both
                counts["no_image"] += 1
                continue
            try:
                images = _tif_pages(fields["tif"])
            except Exception:
                counts["bad_image"] += 1
                continue
            doc = key.rsplit("/", 1)[-1]
            for p, page in enumerate(pages):
                text = page_text(page)
                if not text:
                    counts["empty_pages"] += 1
                    continue
                if p >= len(images):
                    counts["pages_without_image"] += 1
                    continue
                rgb = images[p]
                jpeg = codecs.encode_image(np.asarray(rgb), "jpg")
                yield {"__key__": safe_key("idl-wds", doc, f"p{p:04d}"), "rgb.jpg": jpeg,
                       "json": {"source": "idl-wds", "doc": doc, "page": p, "size": [rgb.height, rgb.width],
                                "caption": text}}


def _text_lines(text: str, width: int = 22) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _render_page(s: synth.SceneSample, lines: list[str], size: tuple[int, int] = (128, 160)) -> tuple[Image.Image,
                                                                                                    dict]:
    """A grey page: the scene as a figure, then the text lines; returns the page and its OCR (normalised boxes)."""
    from PIL import ImageDraw

    w, h = size
    page = Image.new("L", size, 255)
    page.paste(Image.fromarray(s.image).convert("L").resize((64, 64)), (4, 4))
    draw = ImageDraw.Draw(page)
    ocr: dict[str, dict[str, list]] = {"lines": {"text": [], "bbox": [], "score": []},
                                       "words": {"text": [], "bbox": [], "score": [], "line_pos": []}}
    y = 72
    for n, line in enumerate(lines):
        x0, y0, x1, y1 = draw.textbbox((4, y), line)
        draw.text((4, y), line, fill=0)
        ocr["lines"]["text"].append(line)
        ocr["lines"]["bbox"].append([x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h])
        ocr["lines"]["score"].append(99.5)
        x = 4
        for word in line.split():
            wx0, wy0, wx1, wy1 = draw.textbbox((x, y), word)
            ocr["words"]["text"].append(word)
            ocr["words"]["bbox"].append([wx0 / w, wy0 / h, (wx1 - wx0) / w, (wy1 - wy0) / h])
            ocr["words"]["score"].append(99.1)
            ocr["words"]["line_pos"].append([n, len(ocr["words"]["text"]) - 1])
            x = draw.textbbox((x, y), word + " ")[2]
        y += 11
    return page, ocr


IDL_DOC_PAGES = ((0, 1), (2,), (3, 4), (5,), (6, 7), (8,))  # the fixture's documents: scene index per page


def write_idl_fixture(folder: Path, seed: int) -> None:
    """pixparse/idl-wds' layout: idl-train-0000N.tar shards of documents (KEY.tif multi-page TIFF, KEY.pdf, KEY.json
    with Textract lines/words per page, KEY.ocr), plus _idl-train-info.json. Pages are rendered from the world:
    a figure of the scene and its caption as the text, so the OCR is exact."""
    info: dict[str, Any] = {"name": "idl-train", "splits": {"train": {"filenames": [], "shard_lengths": []}}}
    docs = [[synth.scene(seed, i) for i in pages] for pages in IDL_DOC_PAGES]
    for shard in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            mine = docs[shard * 3:(shard + 1) * 3]
            for d, scenes in enumerate(mine):
                key = f"{shard:02d}{d:04d}-idl"
                pages, ocr = [], []
                for s in scenes:
                    page, page_ocr = _render_page(s, _text_lines(s.caption))
                    pages.append(page)
                    ocr.append(page_ocr)
                tif, pdf = io.BytesIO(), io.BytesIO()
                pages[0].save(tif, format="TIFF", save_all=True, append_images=pages[1:])
                pages[0].save(pdf, format="PDF", save_all=True, append_images=pages[1:])
                meta = {"pages": ocr}
                for ext, data in (("json", json.dumps(meta).encode()), ("ocr", b"{}"), ("pdf", pdf.getvalue()),
                                  ("tif", tif.getvalue())):
                    member = tarfile.TarInfo(f"{key}.{ext}")
                    member.size, member.mtime = len(data), 0
                    tar.addfile(member, io.BytesIO(data))
        name = f"idl-train-{shard:05d}.tar"
        synth.write(folder / name, buf.getvalue())
        info["splits"]["train"]["filenames"].append(name)
        info["splits"]["train"]["shard_lengths"].append(len(docs[shard * 3:(shard + 1) * 3]))
    synth.write(folder / "_idl-train-info.json", json.dumps(info))


def idl_page_texts(seed: int) -> list[str]:
    """The OCR text of every page the IDL fixture holds, in document/page order (for tests)."""
    docs = [[synth.scene(seed, i) for i in pages] for pages in IDL_DOC_PAGES]
    return ["\n".join(_text_lines(s.caption)) for scenes in docs for s in scenes]


# ------------------------------------------------------------------------------------ conversations


def conversation_turns(texts: list[dict]) -> list[dict[str, str]]:
    """FineVision `texts` turns -> [{"question", "answer"}], dropping empty turns."""
    turns = []
    for t in texts or []:
        question = _IMAGE_PLACEHOLDER.sub("", str(t.get("user") or t.get("question") or "")).strip()
        answer = str(t.get("assistant") or t.get("answer") or "").strip()
        if question and answer:
            turns.append({"question": question, "answer": answer})
    return turns


def _conversation_rows(rows: Iterator[tuple[str, dict]], images_url: str | None, source: str,
                       counts: Counter) -> Iterator[dict]:
    for key, rec in rows:
        counts["records"] += 1
        images = rec.get("images")
        if images is None and rec.get("image") is not None:
            images = [rec["image"]]
        images = [im for im in (images or []) if im is not None]
        if not images:
            counts["text_only_dropped"] += 1
            continue
        if len(images) > 1:
            counts["multi_image_dropped"] += 1
            continue
        turns = conversation_turns(rec.get("texts") or rec.get("conversations") or [])
        if not turns:
            counts["no_turns"] += 1
            continue
        try:
            jpeg, (h, w) = image_jpeg(load_image(images[0], images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        subset = rec.get("source") or source
        yield {"__key__": safe_key(source, rec.get("id") or key), "rgb.jpg": jpeg,
               "json": {"source": source, "subset": subset, "size": [h, w], "conversations": turns}}


def convert_conversations(records_url: str, output_url: str, images_url: str | None = None, *,
                          source: str = "finevision", samples_per_shard: int = 256) -> Manifest:
    """FineVision-style conversation records -> one single-image VQA shard dataset."""
    counts: Counter = Counter()
    rows = ((f"{n:09d}", rec) for n, rec in enumerate(iter_records(records_url)))
    meta = {"convert": {"format": "conversations", "records": records_url, "images": images_url}}
    return write_dataset(_conversation_rows(rows, images_url, source, counts), output_url, source, meta, counts,
                         samples_per_shard)


def list_finevision(input_url: str, split: str) -> list[Any]:
    return record_units(input_url, find_files(input_url, (".parquet",)))


def read_finevision(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    for unit in units:
        rows = ((_unit_key(unit, row), rec) for row, rec in read_record_unit(input_url, unit, counts))
        yield from _conversation_rows(rows, input_url, "finevision", counts)


def write_finevision_fixture(folder: Path, seed: int) -> None:
    """HuggingFaceM4/FineVision's layout: one folder per subset with train-NNNNN-of-NNNNN.parquet (row groups of
    2). Rows: images (a list of {bytes, path}, as `datasets` stores Image features), texts ([{user, assistant}]:
    the scene's questions and answers; the first question carries the <image> placeholder), source and the
    rating columns. One text-only row and one two-image row are included: the recipe drops both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    subsets: dict[str, list[dict]] = {"synth_vqa": [], "synth_count": []}
    for i, s in enumerate(synth.scenes(seed)):
        qa = [q for q in s.qa if (q["kind"] == "count") == (i % 2 == 1)] or s.qa
        texts = [{"user": ("<image>\n" if j == 0 else "") + q["question"], "assistant": q["answer"]}
                 for j, q in enumerate(qa[:3])]
        name = "synth_count" if i % 2 else "synth_vqa"
        subsets[name].append({"images": [{"bytes": synth.png(s), "path": None}], "texts": texts, "source": name,
                              "relevance_ratings": [5] * len(texts), "relevance_min": 5,
                              "visual_dependency_ratings": [4] * len(texts), "visual_dependency_min": 4})
    first = synth.scene(seed, 0)
    subsets["synth_vqa"].append({"images": [], "texts": [{"user": "Say hi.", "assistant": "Hi."}],
                                 "source": "synth_vqa", "relevance_ratings": [5], "relevance_min": 5,
                                 "visual_dependency_ratings": [1], "visual_dependency_min": 1})
    subsets["synth_count"].append({"images": [{"bytes": synth.png(first), "path": None}] * 2,
                                   "texts": [{"user": "Same image?", "assistant": "Yes."}], "source": "synth_count",
                                   "relevance_ratings": [5], "relevance_min": 5,
                                   "visual_dependency_ratings": [5], "visual_dependency_min": 5})
    for name, rows in subsets.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name / "train-00000-of-00001.parquet", row_group_size=2)
