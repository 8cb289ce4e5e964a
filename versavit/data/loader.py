"""Reading shards: a webdataset pipeline over fsspec URLs that skips and counts bad data.

    shards -> (resample | split by node, worker) -> open (fsspec) -> tar -> group -> shuffle
           -> decode + validate + transform

Every stage gets the same handler, so a truncated shard (tar stage), a duplicate member (group
stage) and an undecodable image (decode stage) are all skipped and counted alike. The counts live
in shared memory so all DataLoader workers add up to one corrupt fraction; past
`max_corrupt_fraction` the run stops with a message that says what was skipped and why.
Wrong credentials or an unreachable endpoint are never "corrupt data": they stop at once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from versavit import storage
from versavit.data.codecs import LazySample, decode_sample

log = logging.getLogger(__name__)

_MAX_WORKERS = 64


class CorruptDataError(RuntimeError):
    """Too much of the data could not be read."""


class CorruptionStats:
    """Good and skipped sample counts shared by the main process and its DataLoader workers."""

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 50, max_warnings: int = 5):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.max_warnings = max_warnings
        # Row per worker (last row: main process); shared memory survives fork and spawn.
        self.counts = torch.zeros(_MAX_WORKERS + 1, 2, dtype=torch.int64).share_memory_()
        self.last_errors: list[str] = []

    @staticmethod
    def _row() -> int:
        info = torch.utils.data.get_worker_info()
        return _MAX_WORKERS if info is None else info.id % _MAX_WORKERS

    @property
    def good(self) -> int:
        return int(self.counts[:, 0].sum())

    @property
    def skipped(self) -> int:
        return int(self.counts[:, 1].sum())

    def add_good(self) -> None:
        self.counts[self._row(), 0] += 1

    def handler(self, exn: BaseException) -> bool:
        """webdataset exception handler: count, warn a few times, keep going (True) or raise."""
        if isinstance(exn, CorruptDataError | KeyboardInterrupt) or (
            isinstance(exn, storage.StorageError) and exn.fatal
        ):
            raise exn
        self.counts[self._row(), 1] += 1
        what = _describe(exn)
        self.last_errors = (self.last_errors + [what])[-self.max_warnings:]
        if self.skipped <= self.max_warnings:
            log.warning("skipping corrupt data: %s", what)
        self.check()
        return True

    def check(self, final: bool = False) -> None:
        seen = self.good + self.skipped
        if not self.skipped or (seen < self.min_samples and not final):
            return
        fraction = self.skipped / seen
        if fraction > self.max_fraction:
            raise CorruptDataError(
                f"{self.skipped} of {seen} samples ({fraction:.1%}) were corrupt or unreadable, more than "
                f"data.max_corrupt_fraction={self.max_fraction}; last: {'; '.join(self.last_errors[-3:])}. "
                "Fix or rewrite the listed shards, or raise data.max_corrupt_fraction."
            )

    def summary(self) -> dict[str, int]:
        return {"good": self.good, "skipped": self.skipped}


def _describe(exn: BaseException) -> str:
    parts = [str(a) for a in exn.args if isinstance(a, str)]
    text = " ".join(parts)[:300] or repr(exn)[:300]
    return f"{exn.__class__.__name__}: {text}"


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
        try:
            missing = [f for f in required if f not in raw]
            if missing:
                raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')} lacks {missing}")
            # with a transform, only the fields it reads are decoded (inside this try: corrupt ones skip)
            out = transform(LazySample(raw)) if transform is not None else decode_sample(raw)
        except Exception as exn:
            if stats.handler(exn):
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
) -> wds.DataPipeline:
    """An IterableDataset over the samples of `urls` (shard URLs, see `resolve_shards`).

    resampled=True draws shards with replacement forever (deterministic per rank/worker/seed), so
    a small task dataset can feed as many steps as a large one; otherwise each rank (and each
    DataLoader worker) reads its own slice of the shards once. `skip` drops that many samples
    (per worker, if a callable) from the start of the stream: the data position of a resumed run.
    Each sample carries `__ordinal__`, its position in the stream, for deterministic augmentation.
    """
    stats = stats or CorruptionStats()
    handler = stats.handler
    stages: list[Any] = []
    if resampled:
        stages.append(wds.ResampledShards(urls, seed=seed, deterministic=True))
    else:
        stages.append(wds.SimpleShardList(urls))
        if split_by_node:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages += [
        functools.partial(open_shards, handler=handler),
        functools.partial(tar_file_expander, handler=handler),
        functools.partial(group_by_keys, handler=handler),
    ]
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
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       collate_fn=_as_is, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None)
