"""Reading shards: a webdataset pipeline over fsspec URLs that skips and counts bad data.

    shards -> (resample | split by node, worker) -> open (fsspec) -> tar -> group -> shuffle
           -> decode + validate + transform

A truncated shard (tar stage), a duplicate member (group stage), an undecodable image or a missing
field the reader needs (decode stage) are skipped and counted in lost samples against manifest.json
(a shard that yields 10 of its 16 samples lost 6), once per shard whatever the passes over it. The
counts live in shared memory so all DataLoader workers add up to one lost fraction; past
`max_corrupt_fraction` the run stops with one line that says what was lost and why, also when a
worker raised it. Each shard's size is checked against the manifest (and its sha256 when asked):
a shard that reads whole but differs was rewritten under the manifest (DatasetChangedError).
Wrong credentials or an unreachable endpoint are never "corrupt data": they stop at once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from versavit import storage
from versavit.data.codecs import LazySample, decode_sample
from versavit.data.errors import CorruptDataError, DatasetChangedError, _worker_message  # noqa: F401
from versavit.data.shards import shard_infos

log = logging.getLogger(__name__)

_MAX_WORKERS = 64


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


class CorruptionStats:
    """Good and lost sample counts shared by the main process and its DataLoader workers.

    Lost samples are counted against the manifest, per shard: a pass over a shard that yields 10 of
    the 16 samples manifest.json lists for it (truncated tar, undecodable image, a sample lacking a
    field the reader needs) lost 6. A shard counts once whatever the passes over it (a resampled
    stream reads it again and again): its lost count is the largest of any pass, never a sum. The
    fraction is lost samples / samples listed for the shards visited so far. Shards without a
    manifest count one lost sample per error (their size is unknown).
    """

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 50, max_warnings: int = 5,
                 name: str = ""):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.max_warnings = max_warnings
        self.name = name  # the task (or split) in messages and metric names
        # Row per worker (last row: main process); shared memory survives fork and spawn.
        # columns: good samples, error events (for streams not bound to shards)
        self.counts = torch.zeros(_MAX_WORKERS + 1, 2, dtype=torch.int64).share_memory_()
        self.urls: list[str] = []
        self.index: dict[str, int] = {}
        self.expected: list[int] = []  # samples per shard from the manifest, -1 when unknown
        self.shards: list[Any] = []  # ShardInfo or None per shard
        self.lost_by_shard = torch.zeros(0, dtype=torch.int64)  # [rows, shards]: max lost per pass
        self.seen_by_shard = torch.zeros(0, dtype=torch.int64)  # [rows, shards]: samples listed / read
        self.last_errors: list[str] = []
        self.changed: list[str] = []  # shards that differ from their manifest entry (this process)
        self._passes: dict[tuple[int, int], list[int]] = {}  # (shard, pass) -> [bad, raw, done]
        self._next_pass = 0
        self._warned = 0

    def bind(self, urls: list[str], infos: list[Any]) -> None:
        """Attach the shards (and their manifest entries, None where unknown) before workers start."""
        self.urls = list(urls)
        self.index = {u: i for i, u in enumerate(self.urls)}
        self.shards = list(infos)
        self.expected = [-1 if s is None else int(s.num_samples) for s in infos]
        self.lost_by_shard = torch.zeros(_MAX_WORKERS + 1, len(urls), dtype=torch.int64).share_memory_()
        self.seen_by_shard = torch.zeros(_MAX_WORKERS + 1, len(urls), dtype=torch.int64).share_memory_()

    @staticmethod
    def _row() -> int:
        info = torch.utils.data.get_worker_info()
        return _MAX_WORKERS if info is None else info.id % _MAX_WORKERS

    @property
    def good(self) -> int:
        return int(self.counts[:, 0].sum())

    @property
    def lost(self) -> int:
        """Samples lost (pass-free, see the class doc); for unbound streams, error events."""
        by_shard = int(self.lost_by_shard.amax(0).sum()) if self.lost_by_shard.numel() else 0
        return by_shard + int(self.counts[:, 1].sum())

    @property
    def skipped(self) -> int:
        return self.lost

    @property
    def seen(self) -> int:
        """Samples the visited shards hold by their manifest (good + lost where no manifest)."""
        events = int(self.counts[:, 1].sum())
        if not self.urls:  # not bound to shards (a hand-made stream): good + errors
            return self.good + events
        return int(self.seen_by_shard.amax(0).sum()) + events

    @property
    def fraction(self) -> float:
        return self.lost / self.seen if self.seen else 0.0

    def lost_per_shard(self) -> dict[str, int]:
        if not self.lost_by_shard.numel():
            return {}
        lost = self.lost_by_shard.amax(0).tolist()
        return {u: n for u, n in zip(self.urls, lost, strict=True) if n}

    def add_good(self) -> None:
        self.counts[self._row(), 0] += 1

    # -- per shard pass (called by read_shards / the decode stage in the process that reads) --------

    def begin_pass(self, url: str) -> tuple[int, int] | None:
        i = self.index.get(url)
        if i is None:
            return None
        self._next_pass += 1
        token = (i, self._next_pass)
        self._passes[token] = [0, 0, 0]
        if len(self._passes) > 4096:  # passes long done; a shuffle buffer never holds samples that old
            for old in list(self._passes)[:1024]:
                del self._passes[old]
        row = self._row()
        if self.expected[i] >= 0:
            self.seen_by_shard[row, i] = self.expected[i]
        return token

    def raw_sample(self, token: tuple[int, int] | None) -> None:
        if token is not None and token in self._passes:
            self._passes[token][1] += 1

    def end_pass(self, token: tuple[int, int] | None) -> None:
        if token is None or token not in self._passes:
            return
        state = self._passes[token]
        state[2] = 1
        i = token[0]
        if self.expected[i] < 0:
            row = self._row()
            self.seen_by_shard[row, i] = max(int(self.seen_by_shard[row, i]), state[1])
        self._update(token)

    def sample_lost(self, token: tuple[int, int] | None) -> None:
        if token is not None and token in self._passes:
            self._passes[token][0] += 1
            self._update(token)
        else:
            self.counts[self._row(), 1] += 1

    def _update(self, token: tuple[int, int]) -> None:
        bad, raw, done = self._passes[token]
        i = token[0]
        lost = bad + (max(0, self.expected[i] - raw) if done and self.expected[i] >= 0 else 0)
        row = self._row()
        if lost > int(self.lost_by_shard[row, i]):
            self.lost_by_shard[row, i] = lost

    # -- webdataset handlers ------------------------------------------------------------------------

    def _note(self, exn: BaseException) -> None:
        if isinstance(exn, CorruptDataError | KeyboardInterrupt) or (
            isinstance(exn, storage.StorageError) and exn.fatal
        ):
            raise exn
        what = _describe(exn)
        self.last_errors = (self.last_errors + [what])[-self.max_warnings:]
        self._warned += 1
        if self._warned <= self.max_warnings:
            log.warning("%sskipping corrupt data: %s", f"{self.name}: " if self.name else "", what)

    def handler(self, exn: BaseException, token: tuple[int, int] | None = None) -> bool:
        """webdataset exception handler: one lost sample (of `token`'s shard pass if given), warn, go on."""
        self._note(exn)
        self.sample_lost(token)
        self.check()
        return True

    def read_handler(self, exn: BaseException, token: tuple[int, int] | None) -> bool:
        """For the tar stages of a shard pass: the samples it lost are counted at its end (vs the manifest)."""
        self._note(exn)
        if token is None or self.expected[token[0]] < 0:
            self.sample_lost(None)
        return True

    def check(self, final: bool = False) -> None:
        lost, seen = self.lost, self.seen
        if not lost or (seen < self.min_samples and not final):
            return
        fraction = lost / seen
        if fraction > self.max_fraction:
            worst = sorted(self.lost_per_shard().items(), key=lambda kv: -kv[1])[:3]
            shards = ", ".join(
                f"{u.rsplit('/', 1)[-1]} ({n}" + (f" of {self.expected[self.index[u]]}" if self.expected[
                    self.index[u]] >= 0 else "") + ")" for u, n in worst)
            where = f" in {len(self.lost_per_shard())} shard(s): {shards}" if worst else ""
            raise CorruptDataError(_one_line(
                f"{self.name + ': ' if self.name else ''}{lost} of {seen} samples ({fraction:.1%}) lost to corrupt "
                f"or unreadable data{where}, more than data.max_corrupt_fraction={self.max_fraction}; last: "
                f"{'; '.join(self.last_errors[-2:])}. Fix or rewrite the listed shards, or raise "
                "data.max_corrupt_fraction.", limit=900))

    def summary(self) -> dict[str, Any]:
        return {"good": self.good, "skipped": self.lost, "lost_samples": self.lost, "samples": self.seen,
                "lost_fraction": round(self.fraction, 6),
                "lost_by_shard": {u.rsplit("/", 1)[-1]: n for u, n in self.lost_per_shard().items()}}

    def metrics(self, prefix: str = "data") -> dict[str, float]:
        """`data/<name>_lost_samples` and `data/<name>_lost_fraction` for metrics.jsonl and MLflow."""
        name = self.name or "stream"
        return {f"{prefix}/{name}_lost_samples": float(self.lost),
                f"{prefix}/{name}_lost_fraction": float(self.fraction)}


def _describe(exn: BaseException) -> str:
    parts = [str(a) for a in exn.args if isinstance(a, str)]
    text = " ".join(parts)[:300] or repr(exn)[:300]
    return _one_line(f"{exn.__class__.__name__}: {text}")


class _CountingStream:
    """A shard's byte stream that counts (and, when asked, hashes) what is read; drained at the end."""

    def __init__(self, stream: Any, sha: bool):
        self.stream = stream
        self.bytes = 0
        self.sha = hashlib.sha256() if sha else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data

    def drain(self) -> None:
        try:
            while self.read(1 << 20):
                pass
        except Exception:  # noqa: BLE001 - an unreadable tail: the size check says so
            pass

    def close(self) -> None:
        self.stream.close()


def _verify_shard(url: str) -> float:
    """A stable number in [0, 1) per shard URL: the sampled sha256 check takes those below its fraction."""
    return zlib.crc32(url.rsplit("/", 1)[-1].encode()) / 2**32


def read_shards(data: Iterable[dict[str, Any]], stats: CorruptionStats, verify_fraction: float = 0.0,
                strict: bool = True) -> Iterator[dict]:
    """{"url"} -> raw samples (tagged `__shard__`: shard pass), counting each pass against the manifest.

    Each opened shard's size is checked against manifest.json (always; cheap) and, for the sampled
    `verify_fraction` of shards, its sha256. A shard that reads whole but differs from its manifest
    entry was rewritten under the manifest: DatasetChangedError (strict), or a recorded warning.
    """
    for item in data:
        url = item["url"]
        token = stats.begin_pass(url)
        info = stats.shards[token[0]] if token is not None else None
        handler = functools.partial(stats.read_handler, token=token)
        errors_before = stats._warned
        try:
            stream = storage.open_url(url, "rb")
        except Exception as exn:
            handler(exn)
            stats.end_pass(token)
            stats.check()
            continue
        counting = _CountingStream(stream, sha=info is not None and _verify_shard(url) < verify_fraction)
        try:
            source = [{"url": url, "stream": counting}]
            for sample in group_by_keys(tar_file_expander(source, handler=handler), handler=handler):
                stats.raw_sample(token)
                sample["__shard__"] = token
                yield sample
            counting.drain()
        finally:
            counting.close()
        stats.end_pass(token)
        if info is not None:
            _compare_with_manifest(url, info, counting, stats, clean=stats._warned == errors_before, strict=strict)
        stats.check()


def _compare_with_manifest(url: str, info: Any, counting: _CountingStream, stats: CorruptionStats, clean: bool,
                           strict: bool) -> None:
    problem = ""
    if counting.bytes != info.bytes:
        problem = f"{counting.bytes} bytes, manifest.json lists {info.bytes}"
    elif counting.sha is not None and counting.sha.hexdigest() != info.sha256:
        problem = f"sha256 {counting.sha.hexdigest()[:12]}..., manifest.json lists {info.sha256[:12]}..."
    if not problem:
        return
    message = (f"dataset changed under its manifest: {url} is {problem} (rewritten after the manifest was "
               "written, e.g. by a second writer); rewrite the dataset")
    if strict and clean:  # it reads whole, so it is another shard, not a damaged one
        raise DatasetChangedError(message)
    if url not in stats.changed:
        stats.changed.append(url)
        log.warning("%s", message)


def open_shards(data: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """{"url"} -> {"url", "stream"}, through fsspec so s3:// (MinIO) works like a local path."""
    for item in data:
        url = item["url"]
        try:
            stream = storage.open_url(url, "rb")
        except Exception as exn:
            if handler(exn):
                continue
            break
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def _seeded_shuffle(data: Iterable[dict], bufsize: int, seed: int) -> Iterator[dict]:
    # A different but reproducible order in every rank and worker.
    rank, _, worker, _ = pytorch_worker_info()
    yield from _shuffle(data, bufsize=bufsize, initial=min(bufsize, 64), seed=hash((seed, rank, worker)))


def _number_and_skip(data: Iterable[dict], skip: int | Callable[[int, int], int]) -> Iterator[dict]:
    """Number raw samples in stream order and drop the first `skip` (resume), before decoding.

    `skip` may depend on the DataLoader worker: a callable (worker, num_workers) -> samples.
    Skipping raw samples costs only tar reading, so resuming deep into a stream stays cheap.
    """
    _, _, worker, num_workers = pytorch_worker_info()
    n_skip = skip(worker, num_workers) if callable(skip) else skip
    for ordinal, sample in enumerate(data):
        if ordinal < n_skip:
            continue
        sample["__ordinal__"] = ordinal
        yield sample


def _decode_and_transform(data: Iterable[dict], required: tuple[str, ...], transform: Callable | None,
                          stats: CorruptionStats) -> Iterator[Any]:
    for raw in data:
        token = raw.pop("__shard__", None)
        try:
            missing = [f for f in required if f not in raw]
            if missing:
                raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')} lacks {missing}")
            # with a transform, only the fields it reads are decoded (inside this try: corrupt ones skip)
            out = transform(LazySample(raw)) if transform is not None else decode_sample(raw)
        except Exception as exn:
            if stats.handler(exn, token):
                continue
            break
        stats.add_good()
        yield out


def _check_at_end(data: Iterable[Any], stats: CorruptionStats) -> Iterator[Any]:
    yield from data
    stats.check(final=True)


def shard_pipeline(
    urls: list[str],
    *,
    stats: CorruptionStats | None = None,
    resampled: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 0,
    required: tuple[str, ...] = (),
    transform: Callable[[dict[str, Any]], Any] | None = None,
    split_by_node: bool = True,
    skip: int | Callable[[int, int], int] = 0,
    verify_fraction: float = 0.0,
    strict: bool = True,
) -> wds.DataPipeline:
    """An IterableDataset over the samples of `urls` (shard URLs, see `resolve_shards`).

    resampled=True draws shards with replacement forever (deterministic per rank/worker/seed), so
    a small task dataset can feed as many steps as a large one; otherwise each rank (and each
    DataLoader worker) reads its own slice of the shards once. `skip` drops that many samples
    (per worker, if a callable) from the start of the stream: the data position of a resumed run.
    Each sample carries `__ordinal__`, its position in the stream, for deterministic augmentation.
    Lost samples are counted against the shards' manifest.json (see CorruptionStats); each shard's size
    is checked against it, and its sha256 for the `verify_fraction` of shards (sampled per shard name).
    """
    stats = stats or CorruptionStats()
    stats.bind(urls, shard_infos(urls))
    stages: list[Any] = []
    if resampled:
        stages.append(wds.ResampledShards(urls, seed=seed, deterministic=True))
    else:
        stages.append(wds.SimpleShardList(urls))
        if split_by_node:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(functools.partial(read_shards, stats=stats, verify_fraction=verify_fraction, strict=strict))
    if shuffle_buffer > 1:
        stages.append(functools.partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed))
    stages.append(functools.partial(_number_and_skip, skip=skip))
    stages.append(functools.partial(_decode_and_transform, required=required, transform=transform, stats=stats))
    if not resampled:
        stages.append(functools.partial(_check_at_end, stats=stats))
    pipeline = wds.DataPipeline(*stages)
    pipeline.stats = stats
    return pipeline


def loader_workers(setting: int | str, training: bool) -> int:
    """`data.num_workers` as a number. "auto": for a training stream, 0 when the step runs on the CPU (it
    keeps every core busy; workers decoding beside it slowed the tiny config's step by 20-50% on 2 cores
    while loading in-process cost ~6%: bench/train_step.py), else 2; for data jobs, the CPU count."""
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise ValueError(f"data.num_workers must be a non-negative integer or 'auto', got {setting!r}")
        return setting
    if training:
        return 2 if torch.cuda.is_available() else 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _as_is(sample: Any) -> Any:
    return sample


def make_loader(dataset: wds.DataPipeline, num_workers: int = 0, batch_size: int | None = None,
                collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over a shard pipeline (batching in the workers when batch_size is given).

    Samples pass through unchanged (numpy stays numpy) unless `collate_fn` says otherwise.
    """
    if batch_size is not None:
        dataset = dataset.compose(wds.batched(batch_size, collation_fn=collate_fn, partial=False))
    # pinned (page-locked) batches on GPU machines: the loop's non_blocking copies to the device then overlap
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       collate_fn=_as_is, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None,
                                       pin_memory=torch.cuda.is_available())
