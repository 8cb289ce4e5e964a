"""What every converter shares: reading records and images from URLs, and writing task shards.

Field conventions of converted samples (the same as the synthetic world's where they overlap):

    rgb.jpg    the image: the original bytes when they already are a JPEG, else re-encoded (q95)
    mask.png   8-bit mask (0/255) of the one referred object of a single-object sample (RefCOCO)
    json       {"source", "size": [h, w], "objects": [{"id", "bbox": [x0, y0, x1, y1] pixels,
               "label"?, "expression"?, "segmentation"? (COCO RLE), ...}], "expression"?,
               "caption"?, "conversations"?: [{"question", "answer"}], ...}

Object ids run 1..n in `objects` order, like the synthetic world's instance ids. Records whose image
is missing or undecodable are skipped and counted per reason (CORRUPT_REASONS are the reasons that
mean a broken input; the others are deliberate filters, e.g. crowd boxes or multi-image rows).

Work units (what `versavit data prepare` partitions into shards) of the shared layouts:
- record files (`record_units`): `[path, row_group, row_group + 1]` of a .parquet, `[path, byte_start,
  byte_end]` of a .jsonl (the lines that start in the range), `[path, 0, 0]` for a whole .json;
- webdataset tars (`iter_tar_groups`): one tar per unit.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image

from versavit import storage
from versavit.data import codecs

if TYPE_CHECKING:
    from versavit.data.shards import Manifest

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
# skip reasons that mean a broken or missing input (counted against data.max_corrupt_fraction)
CORRUPT_REASONS = frozenset({"bad_image", "missing_image", "remote_image", "no_image", "bad_record", "bad_json",
                             "bad_file", "bad_tar",
                             # benchmarks (versavit.data.prepare.benchmarks): label / depth files and their pairing
                             "missing_label", "bad_label", "missing_depth", "bad_depth", "size_mismatch"})
JSONL_UNIT_BYTES = 1 << 20  # a .jsonl work unit: the lines starting in 1 MiB


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
    from versavit.data.shards import ShardWriter

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


# ------------------------------------------------------------------------------------ layouts


def find_files(url: str, suffixes: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Files below `url` (recursively) ending in one of `suffixes`, as sorted paths relative to it; paths
    starting with an `exclude` prefix are left out. A missing folder is a StorageError (kind missing)."""
    fs, root = storage.get_fs(url)
    try:
        found = fs.find(root)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc
    if not found and not fs.exists(root):
        raise storage.StorageError(f"{url} does not exist: check --input", kind="missing")
    prefix = root.rstrip("/") + "/"
    rel = (p[len(prefix):] for p in found if p.startswith(prefix))
    return sorted(r for r in rel if (not suffixes or r.lower().endswith(suffixes))
                  and not r.startswith(exclude) and not r.rsplit("/", 1)[-1].startswith("."))


def first_existing(root: str, candidates: Iterable[str]) -> str | None:
    """The first of `candidates` (paths relative to `root`) that exists, as a URL; None if none does."""
    for rel in candidates:
        url = storage.join(root, rel)
        if storage.exists(url):
            return url
    return None


def file_size(url: str) -> int:
    fs, path = storage.get_fs(url)
    try:
        return int(fs.size(path))
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc


def file_stamp(url: str) -> tuple[Any, ...]:
    """(size, modification time or ETag) of a file: part of the key of per-process caches of parsed files."""
    fs, path = storage.get_fs(url)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc
    return info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `url` (a ranged GET on S3)."""
    if end <= start:
        return b""
    fs, path = storage.get_fs(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc


def _parquet_file(url: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(storage.open_url(url, "rb"))


def record_units(input_url: str, files: list[str], jsonl_unit_bytes: int = JSONL_UNIT_BYTES) -> list[list[Any]]:
    """Work units of record files (paths relative to `input_url`): a .parquet's row groups, a .jsonl's byte
    ranges, a .json whole. Reads only parquet footers and file sizes."""
    units: list[list[Any]] = []
    for rel in files:
        url = storage.join(input_url, rel)
        if rel.endswith(".parquet"):
            try:
                groups = _parquet_file(url).metadata.num_row_groups
            except storage.StorageError:
                raise
            except Exception as exc:  # not a parquet file (truncated download): one unit, counted when read
                log.warning("%s: unreadable parquet footer (%s)", url, exc)
                groups = 1
            units += [[rel, g, g + 1] for g in range(groups)]
        elif rel.endswith(".jsonl"):
            size = file_size(url)
            units += [[rel, start, min(start + jsonl_unit_bytes, size)] for start in range(0, size, jsonl_unit_bytes)]
        else:
            units.append([rel, 0, 0])
    return units


def _jsonl_lines(url: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines of a .jsonl that start in [start, end): ranged reads, no full download."""
    size = file_size(url)
    end = min(end, size)
    lo = max(0, start - 1)
    data = read_range(url, lo, end)
    pos = lo
    if start > 0:  # the line holding byte start-1 belongs to the unit before; ours start after its newline
        cut = data.find(b"\n")
        if cut < 0 or lo + cut + 1 >= end:
            return
        data, pos = data[cut + 1:], lo + cut + 1
    read_to = end
    while not data.endswith(b"\n") and read_to < size:  # finish the last line, which runs past `end`
        more = read_range(url, read_to, min(read_to + (1 << 16), size))
        read_to += len(more)
        cut = more.find(b"\n")
        data += more[:cut + 1] if cut >= 0 else more
        if cut >= 0:
            break
    for line in data.splitlines(keepends=True):
        if line.strip():
            yield pos, line
        pos += len(line)


def read_record_unit(input_url: str, unit: list[Any], counts: Counter) -> Iterator[tuple[str, dict]]:
    """(row id, record) of one record-file unit; a malformed line or an unreadable file is counted
    (bad_record / bad_file) and skipped. Row ids are stable: the row number (parquet, json) or the line's
    byte offset (jsonl)."""
    rel, a, b = unit
    url = storage.join(input_url, rel)
    if rel.endswith(".parquet"):
        try:
            pf = _parquet_file(url)
            offset = sum(pf.metadata.row_group(g).num_rows for g in range(a))
            rows = pf.read_row_group(a).to_pylist()
        except storage.StorageError as exc:
            if exc.fatal or exc.kind != "missing":
                raise
            counts["bad_file"] += 1
            return
        except Exception as exc:
            log.warning("%s row group %d unreadable: %s", url, a, exc)
            counts["bad_file"] += 1
            return
        for i, row in enumerate(rows):
            yield str(offset + i), row
    elif rel.endswith(".jsonl"):
        for pos, line in _jsonl_lines(url, a, b):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                counts["records"] += 1
                counts["bad_record"] += 1
                continue
            yield str(pos), record
    else:
        try:
            data = read_json(url)
        except ValueError:
            counts["bad_file"] += 1
            return
        if isinstance(data, dict):
            data = data.get("data") or data.get("annotations") or [data]
        for i, record in enumerate(data):
            yield str(i), record


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path up to the first dot of the base name, then the field."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_groups(url: str, counts: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of a webdataset tar, streamed (S3 too). A truncated or corrupt archive is counted
    once as bad_tar; the samples before the damage are kept."""
    key, group = None, {}
    try:
        with storage.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _tar_key(member.name)
                if k.rsplit("/", 1)[-1].startswith("._") or not ext:  # macOS resource forks, stray files
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext] = data
    except storage.StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        log.warning("%s: damaged tar (%s); %d sample(s) before it kept", url, exc, counts["records"])
        counts["bad_tar"] += 1
        return
    if key is not None:
        yield key, group
