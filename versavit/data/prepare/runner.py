"""Run `versavit data prepare`: a source's work units -> output shards, sharded across workers and resumable.

The split's units (`Source.list_units`, a deterministic list) are cut into output shards of
`units_per_shard` units: shard j holds the samples of units[j*k:(j+1)*k]. Worker i of n takes shards
j = i, i+n, i+2n, ...; each shard is committed atomically (`shard-NNNNNN.tar`), then its done record
(`done/shard-NNNNNN.json`: the units' digest, the settings signature, samples, sha256, size, counts per
reason). A rerun skips shards whose record matches, so an interrupted job redoes only what is missing and a
changed source version or setting redoes everything. The worker that finds every record present and valid
writes manifest.json (meta["prepare"]: source, split, input, signature, counts). When that manifest already
exists with the same signature and its done records and shards are all there, the call returns at once
without listing the input (`relist=True` checks the input again, redoing only shards whose units changed).

Corrupt inputs (undecodable image, malformed record, missing file: versavit.data.convert.CORRUPT_REASONS)
are skipped and counted; past `max_corrupt_fraction` of the records the job stops with CorruptDataError.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from versavit import storage
from versavit.config import ConfigError
from versavit.data import codecs
from versavit.data.convert.common import CORRUPT_REASONS
from versavit.data.done import (
    done_names,
    manifest_from_records,
    output_shards,
    read_done_records,
    remove_file,
    remove_stale_manifest,
    write_done_record,
)
from versavit.data.errors import CorruptDataError
from versavit.data.prepare.base import Source
from versavit.data.shards import FORMAT, MANIFEST, Manifest, ShardWriter, read_manifest

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
_ONE_SHARD = 2**31  # a ShardWriter that never rolls over: one output shard per call
MIN_RECORDS_BEFORE_CHECK = 50  # the corrupt fraction is judged mid-job only once this many records were read


def get_source(name: str) -> Source:
    """The registered source `name`; a ConfigError (usage, exit 2) with the closest names otherwise."""
    from versavit.data.prepare import SOURCES

    if name not in SOURCES:
        close = difflib.get_close_matches(name, list(SOURCES), n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"unknown source {name!r}{hint}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def resolve_split(src: Source, split: str | None) -> str:
    """`split`, or the source's default (its first); a ConfigError for a split the source does not have."""
    if split is None:
        return src.splits[0]
    if split not in src.splits:
        raise ConfigError(f"source {src.name!r} has no split {split!r}; its splits: {', '.join(src.splits)}")
    return split


def units_digest(units: list[Any]) -> str:
    """A digest of a list of work units (JSON-serialisable)."""
    return hashlib.sha256(json.dumps(units, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def settings_signature(src: Source, split: str, input_url: str, units_per_shard: int) -> dict[str, Any]:
    """What determines a prepared dataset besides its units: a done record or manifest with another is stale."""
    return {"source": src.name, "version": src.version, "split": split, "input": input_url.rstrip("/"),
            "units_per_shard": units_per_shard, "format": FORMAT}


def corrupt_count(counts: Counter | dict[str, int]) -> int:
    return sum(int(v) for k, v in counts.items() if k in CORRUPT_REASONS)


def check_corrupt(name: str, counts: Counter | dict[str, int], max_fraction: float, final: bool) -> None:
    """Raise CorruptDataError (one line) when the corrupt records exceed `max_fraction` of those read."""
    corrupt = corrupt_count(counts)
    seen = max(int(counts.get("records", 0)), int(counts.get("samples", 0)) + corrupt)
    if not corrupt or (not final and seen < MIN_RECORDS_BEFORE_CHECK) or corrupt / seen <= max_fraction:
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k in CORRUPT_REASONS and v)
    raise CorruptDataError(f"{name}: {corrupt} of {seen} input records are corrupt ({corrupt / seen:.1%} > "
                           f"max_corrupt_fraction {max_fraction:.1%}): {reasons}; fix or re-download the input, "
                           "or raise data.max_corrupt_fraction")


def _write_shard(src: Source, input_url: str, split: str, units: list[Any], output_url: str,
                 index: int) -> dict[str, Any]:
    """Read `units` and write their samples as output shard `index` (atomically); returns the record fields."""
    counts: Counter = Counter()
    fields: set[str] = set()
    keys: set[str] = set()
    start = time.perf_counter()
    with ShardWriter(output_url, samples_per_shard=_ONE_SHARD, start_index=index, write_manifest=False) as writer:
        for sample in src.read_units(input_url, split, units, counts):
            if sample["__key__"] in keys:  # two samples with one key would merge when read back
                counts["duplicate_key_dropped"] += 1
                continue
            keys.add(sample["__key__"])
            if isinstance(sample.get("json"), dict):
                sample = {**sample, "json": codecs.encode_json(sample["json"])}
            writer.write(sample)
            fields.update(k for k in sample if not k.startswith("__"))
    info = writer.shards[0] if writer.shards else None
    counts["samples"] = info.num_samples if info else 0
    return {"shard": info.name if info else None, "num_samples": counts["samples"],
            "sha256": info.sha256 if info else None, "bytes": info.bytes if info else 0, "fields": sorted(fields),
            "counts": dict(sorted(counts.items())), "seconds": round(time.perf_counter() - start, 3)}


def _record_valid(record: dict | None, digest: str, signature: dict, outputs: set[str]) -> bool:
    return (record is not None and record.get("units_sha256") == digest and record.get("signature") == signature
            and (record.get("shard") is None or record["shard"] in outputs))


def _existing_manifest(output_url: str) -> Manifest | None:
    try:
        return read_manifest(output_url)
    except storage.StorageError as exc:
        if exc.fatal:
            raise
        return None
    except (ValueError, TypeError):
        return None


def finalize_prepared(src: Source, split: str, input_url: str, output_url: str, signature: dict,
                      digests: list[str], max_corrupt_fraction: float = 1.0) -> tuple[Manifest | None, list[int]]:
    """Write manifest.json if every shard has a valid done record; returns (manifest or None, shards missing).

    The corrupt fraction over all shards is checked first: a dataset past it gets no manifest.
    """
    indices = list(range(len(digests)))
    present = done_names(output_url)
    absent = [j for j in indices if f"shard-{j:06d}.json" not in present]
    if absent:
        return None, absent
    records = read_done_records(output_url, indices, present)
    outputs = output_shards(output_url)
    missing = [j for j in indices if not _record_valid(records.get(j), digests[j], signature, outputs)]
    if missing:
        return None, missing
    ordered = [records[j] for j in indices]
    totals: Counter = Counter()
    for r in ordered:
        totals.update(r["counts"])
    check_corrupt(f"{src.name} {split}", totals, max_corrupt_fraction, final=True)
    meta = {"source": src.name, "split": split, "tasks": list(src.tasks),
            "prepare": {**signature, "units": sum(int(r["units"]) for r in ordered), "shards_total": len(indices),
                        "units_sha256": units_digest(digests), "counts": dict(sorted(totals.items())),
                        "corrupt": corrupt_count(totals)}}
    return manifest_from_records(f"{src.name}/{split}", ordered, meta, output_url), []


def prepare_dataset(source: str, input_url: str, output_url: str, split: str | None = None, shard_index: int = 0,
                    num_shards: int = 1, progress: Progress | None = None, max_corrupt_fraction: float = 1.0, *,
                    units_per_shard: int | None = None, relist: bool = False) -> dict[str, Any]:
    """Worker `shard_index` of `num_shards` of preparing `source`'s `split` (default: its first) from `input_url`
    (its published layout, a folder or URL) into versavit shards at `output_url`.

    Returns a summary: shards (total, mine, already done, processed), samples written, counts per reason,
    corrupt, whether the manifest was written (`manifest`: its URL, else None) and `noop` when the dataset was
    already complete with the same settings. `units_per_shard` overrides the source's; `progress(name,
    units_done, units_total)` is called after every shard.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
                          f"num_shards={num_shards}")
    src = get_source(source)
    split = resolve_split(src, split)
    k = units_per_shard or src.units_per_shard
    if k < 1:
        raise ConfigError(f"units_per_shard must be >= 1, got {k}")
    signature = settings_signature(src, split, input_url, k)
    name = f"{src.name}/{split}"
    start = time.perf_counter()
    summary: dict[str, Any] = {"source": src.name, "split": split, "input": input_url, "output": output_url,
                               "shards_processed": [], "samples": 0, "corrupt": 0, "counts": {}, "noop": False}

    existing = None if relist else _existing_manifest(output_url)
    if existing is not None and _signature_of(existing) == signature and _still_complete(existing, output_url):
        total = int(existing.meta["prepare"]["shards_total"])
        mine_n = len(range(total)[shard_index::num_shards])
        log.info("%s: already prepared at %s (%d samples); nothing to do", name, output_url, existing.num_samples)
        return {**summary, "shards_total": total, "shards_mine": mine_n, "shards_already_done": mine_n,
                "noop": True, "finalized": True, "shards_missing": [], "num_samples": existing.num_samples,
                "manifest": storage.join(output_url, MANIFEST), "seconds": round(time.perf_counter() - start, 3)}

    units = src.list_units(input_url, split)
    if not units:
        raise storage.StorageError(f"{name}: nothing to prepare under {input_url} (no units found). Expected: "
                                   f"{src.about}", kind="missing")
    chunks = [units[j:j + k] for j in range(0, len(units), k)]
    digests = [units_digest(c) for c in chunks]
    mine = list(range(len(chunks)))[shard_index::num_shards]
    records = read_done_records(output_url, mine)
    outputs = output_shards(output_url)
    pending = [j for j in mine if not _record_valid(records.get(j), digests[j], signature, outputs)]
    if pending:
        storage.ensure_bucket(output_url)
        remove_stale_manifest(output_url)
    counts: Counter = Counter()
    total_units = sum(len(chunks[j]) for j in pending)
    units_done = 0
    if progress is not None:
        progress(name, 0, total_units)
    for j in pending:
        result = _write_shard(src, input_url, split, chunks[j], output_url, j)
        if result["shard"] is None and f"shard-{j:06d}.tar" in outputs:  # an earlier run's shard of these units
            remove_file(storage.join(output_url, f"shard-{j:06d}.tar"))
        record = {"source": src.name, "split": split, "index": j, **result, "units": len(chunks[j]),
                  "units_sha256": digests[j], "signature": signature, "finished": time.time()}
        write_done_record(output_url, j, record)
        counts.update(result["counts"])
        units_done += len(chunks[j])
        log.info("%s: shard %d done (%d samples from %d units)", name, j, result["num_samples"], len(chunks[j]))
        if progress is not None:
            progress(name, units_done, total_units)
        check_corrupt(name, counts, max_corrupt_fraction, final=False)
    check_corrupt(name, counts, max_corrupt_fraction, final=True)
    manifest, missing = finalize_prepared(src, split, input_url, output_url, signature, digests, max_corrupt_fraction)
    return {**summary, "shards_total": len(chunks), "shards_mine": len(mine),
            "shards_already_done": len(mine) - len(pending), "shards_processed": pending,
            "samples": counts["samples"], "corrupt": corrupt_count(counts), "counts": dict(sorted(counts.items())),
            "finalized": manifest is not None, "shards_missing": missing,
            "num_samples": manifest.num_samples if manifest is not None else None,
            "manifest": storage.join(output_url, MANIFEST) if manifest is not None else None,
            "seconds": round(time.perf_counter() - start, 3)}


def _still_complete(manifest: Manifest, output_url: str) -> bool:
    """Every done record and every listed shard still there (two listings; the input is not read)."""
    total = int(manifest.meta["prepare"]["shards_total"])
    present = done_names(output_url)
    outputs = output_shards(output_url)
    return (all(f"shard-{j:06d}.json" in present for j in range(total))
            and all(s.name in outputs for s in manifest.shards))


def _signature_of(manifest: Manifest) -> dict[str, Any] | None:
    prep = manifest.meta.get("prepare") or {}
    keys = ("source", "version", "split", "input", "units_per_shard", "format")
    return {k: prep[k] for k in keys} if all(k in prep for k in keys) else None


def prepare_splits(source: str, input_url: str, output_url: str, splits: list[str] | None = None, *,
                   nested: bool | None = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """`prepare_dataset` for each of `splits` (none: the source's default split). Each split goes to
    `<output>/<split>` when `nested` (default: when more than one split is given), else to `<output>`."""
    src = get_source(source)
    names = [resolve_split(src, s) for s in splits] if splits else [src.splits[0]]
    if len(set(names)) != len(names):
        raise ConfigError(f"a split is given twice: {', '.join(names)}")
    nested = len(names) > 1 if nested is None else nested
    return {s: prepare_dataset(source, input_url, storage.join(output_url, s) if nested else output_url, s,
                               **kwargs) for s in names}
