"""Done records of sharded, resumable jobs (`versavit label ...`, `versavit data prepare ...`).

A job writes output shard i (`shard-NNNNNN.tar`, committed atomically by ShardWriter), then
`<output>/done/shard-NNNNNN.json`: what it was made from, the settings signature and the shard's sample
count, sha256 and size. A rerun skips every shard whose record still matches; the worker that sees every
record present and valid writes `<output>/manifest.json` from them (`created` is the latest record's time,
so any finisher writes the same bytes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from versavit import storage
from versavit.data.shards import MANIFEST, Manifest, ShardInfo

log = logging.getLogger(__name__)

DONE_DIR = "done"


def done_url(output_url: str, index: int) -> str:
    """Where shard `index`'s done record lives."""
    return storage.join(output_url, DONE_DIR, f"shard-{index:06d}.json")


def done_names(output_url: str) -> set[str]:
    """File names of the done records present (one listing)."""
    return {u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(output_url, DONE_DIR), ".json")}


def read_done_records(output_url: str, indices: Iterable[int], present: set[str] | None = None) -> dict[int, dict]:
    """Done records of `indices` that exist (one listing, then one read per present record)."""
    present = done_names(output_url) if present is None else present
    records: dict[int, dict] = {}
    for i in indices:
        if f"shard-{i:06d}.json" in present:
            try:
                records[i] = json.loads(storage.read_text(done_url(output_url, i)))
            except (storage.StorageError, json.JSONDecodeError) as exc:
                if isinstance(exc, storage.StorageError) and exc.fatal:
                    raise
                log.warning("ignoring unreadable done record of shard %d: %s", i, exc)
    return records


def write_done_record(output_url: str, index: int, record: dict[str, Any]) -> None:
    """Commit shard `index`'s record (atomically); write it only after the shard itself."""
    storage.write_text(done_url(output_url, index), json.dumps(record, indent=1))


def output_shards(output_url: str) -> set[str]:
    """File names of the shard tars present in `output_url`."""
    return {u.rsplit("/", 1)[-1] for u in storage.list_files(output_url, ".tar")}


def remove_file(url: str) -> None:
    """Delete `url` if it exists."""
    if storage.exists(url):
        fs, path = storage.get_fs(url)
        try:
            fs.rm(path)
        except Exception as exc:
            raise storage.describe_error(url, exc) from exc


def remove_stale_manifest(output_url: str) -> None:
    """A manifest from an earlier, different run would point at shards about to change."""
    remove_file(storage.join(output_url, MANIFEST))


def manifest_from_records(name: str, ordered: list[dict[str, Any]], meta: dict[str, Any], output_url: str,
                          write: bool = True) -> Manifest:
    """The dataset manifest of every shard's done record (in shard order; shards with no samples are left out),
    written to `<output>/manifest.json` unless write=False."""
    manifest = Manifest(
        name=name,
        num_samples=sum(int(r["num_samples"]) for r in ordered),
        shards=[ShardInfo(r["shard"], r["num_samples"], r["sha256"], r["bytes"]) for r in ordered if r["shard"]],
        fields=sorted({f for r in ordered for f in r.get("fields", [])}),
        meta=meta,
        created=max((float(r["finished"]) for r in ordered), default=0.0),  # same bytes from any finisher
        url=output_url.rstrip("/"),
    )
    if write:
        storage.write_text(storage.join(output_url, MANIFEST), manifest.to_json())
    return manifest
