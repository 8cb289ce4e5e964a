"""What every converter shares: reading records and images from URLs, and writing task shards.

Field conventions of converted samples (the same as the synthetic world's where they overlap):

    rgb.jpg    the image: the original bytes when they already are a JPEG, else re-encoded (q95)
    mask.png   8-bit mask (0/255) of the one referred object of a single-object sample (RefCOCO)
    json       {"source", "size": [h, w], "objects": [{"id", "bbox": [x0, y0, x1, y1] pixels,
               "label"?, "expression"?, "segmentation"? (COCO RLE), ...}], "expression"?,
               "caption"?, "conversations"?: [{"question", "answer"}], ...}

Object ids run 1..n in `objects` order, like the synthetic world's instance ids. Records whose image
is missing or undecodable are skipped and counted per reason in the manifest's meta["convert"].
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from PIL import Image

from versavit import storage
from versavit.data import codecs
from versavit.data.shards import Manifest, ShardWriter

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


class SkipRecord(Exception):
    """A record that cannot become a sample; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_jpeg(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """Image bytes -> (JPEG bytes, (height, width)). JPEGs pass through untouched (no re-encoding loss).

    The image is fully decoded once either way, so a truncated or corrupt file is caught here
    rather than in training.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = (img.height, img.width)
            if data[:3] == JPEG_MAGIC and img.mode in ("RGB", "L"):
                return data, size
            rgb = img.convert("RGB")
    except Exception as exc:
        raise SkipRecord("bad_image", f"{exc.__class__.__name__}: {exc}") from None
    import numpy as np

    return codecs.encode_image(np.asarray(rgb), "jpg"), size


def load_image(value: Any, root: str | None = None) -> bytes:
    """An image reference as records carry them -> bytes.

    bytes; {"bytes": ..., "path": ...} (Hugging Face `datasets` Image); a PIL image; or a path /
    URL (relative paths resolve against `root`). http(s) URLs are not fetched: a converter runs
    on a cluster node that reads from object storage, so download them into it first.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return load_image(value.get("path"), root)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    if isinstance(value, str) and value:
        if value.startswith(("http://", "https://")):
            raise SkipRecord("remote_image", value)
        url = value if "://" in value or value.startswith("/") or root is None else storage.join(root, value)
        try:
            return storage.read_bytes(url)
        except storage.StorageError as exc:
            if exc.fatal:
                raise
            raise SkipRecord("missing_image", url) from None
    raise SkipRecord("no_image", repr(value)[:80])


def read_json(url: str) -> Any:
    return json.loads(storage.read_text(url))


def _parquet_records(url: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with storage.open_url(url, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def iter_records(url: str) -> Iterator[dict]:
    """Records of a .jsonl, .json (a list, or {"data"|"annotations": [...]}) or .parquet file, or of a
    folder of such files (sorted by name)."""
    if not url.endswith(RECORD_SUFFIXES):
        files = [u for u in storage.list_files(url) if u.endswith(RECORD_SUFFIXES)]
        if not files:
            raise storage.StorageError(f"no {'/'.join(RECORD_SUFFIXES)} record files under {url}", kind="missing")
        for f in files:
            yield from iter_records(f)
        return
    if url.endswith(".parquet"):
        yield from _parquet_records(url)
    elif url.endswith(".jsonl"):
        for line in storage.read_text(url).splitlines():
            if line.strip():
                yield json.loads(line)
    else:
        data = read_json(url)
        if isinstance(data, dict):
            data = data.get("data") or data.get("annotations") or [data]
        yield from data


def xywh_to_xyxy(box: Iterable[float]) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)]


def clip_box(box: list[float], height: int, width: int) -> list[float] | None:
    """Clip to the image; None when nothing of the box is left."""
    x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])
    return [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)] if x1 > x0 and y1 > y0 else None


def safe_key(*parts: Any) -> str:
    """A webdataset sample key: no dots (they start the field suffix) and no slashes."""
    text = "-".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in text)


def write_dataset(samples: Iterable[dict[str, Any]], output_url: str, name: str, meta: dict[str, Any],
                  counts: Counter, samples_per_shard: int = 256) -> Manifest:
    """Write samples (each with __key__, rgb.jpg, json dict) as a shard dataset; counts go in meta.

    `counts` is filled by the sample generator while it runs (skips per reason) and recorded,
    with the number written, in manifest.meta["convert"].
    """
    storage.ensure_bucket(output_url)
    with ShardWriter(output_url, samples_per_shard=samples_per_shard, name=name, meta=meta) as writer:
        for sample in samples:
            if isinstance(sample.get("json"), dict):
                sample = {**sample, "json": codecs.encode_json(sample["json"])}
            writer.write(sample)
            counts["written"] += 1
        writer.meta["convert"] = {**writer.meta.get("convert", {}), "counts": dict(sorted(counts.items()))}
    assert writer.manifest is not None
    log.info("%s: %s", name, dict(counts))
    return writer.manifest
