"""What the fine-tuning evaluators (`versavit.eval.finetune.depth`, `versavit.eval.finetune.refseg`) share: seeded,
deterministic work that leaves the caller's RNG as it was, bf16 autocast, an epoch's sample order (a random-access
split permuted whole, a stream shuffled through a buffer), batching, a background prefetch thread, how far training
moved a module's weights, and an EvalResult written to JSON (+ .npz of its example arrays) and read back."""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from versavit.eval.results import EvalResult

if TYPE_CHECKING:
    from versavit.eval.datasets.base import BenchmarkReader, Sample

T = TypeVar("T")
B = TypeVar("B")


# ------------------------------------------------------------------------------------------------
# seeding and precision


@contextlib.contextmanager
def deterministic(seed: int, algorithms: bool = True) -> Iterator[torch.Generator]:
    """Seeded work that leaves the caller's RNG state and determinism flags as they were; with `algorithms`,
    torch's deterministic algorithms too (warn-only). Yields a generator of `seed` for the caller's own draws."""
    flag, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if algorithms:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.use_deterministic_algorithms(flag, warn_only=warn)


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU that has it (a paper-size ViT does not train in fp32 at batch 32); fp32 on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def relative_change(before: dict[str, torch.Tensor], module: nn.Module) -> float:
    """||w_after - w_before|| / ||w_before|| over the tensors in `before` (L2 over all of them)."""
    num = den = 0.0
    for name, p in module.named_parameters():
        if name in before:
            w0 = before[name]
            num += float((p.detach().cpu().double() - w0.double()).pow(2).sum())
            den += float(w0.double().pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


# ------------------------------------------------------------------------------------------------
# data order and batching


def random_access(reader: BenchmarkReader) -> bool:
    """File-layout readers list their samples (`items`) and load any by index; shard streams list none."""
    items = getattr(reader, "items", None)
    return bool(items) and len(items) == len(reader)


def reader_samples(reader: BenchmarkReader, generator: torch.Generator) -> Iterator[Sample]:
    """Every sample of `reader` once: a random-access reader in a permutation drawn from `generator`, a stream in
    its own order."""
    if random_access(reader):
        for index in torch.randperm(len(reader), generator=generator).tolist():
            yield reader[index]
    else:
        yield from reader


def shuffled(items: Iterable[T], buffer_size: int, generator: torch.Generator, swap_last: bool = False
             ) -> Iterator[T]:
    """`items` shuffled through a buffer: once it holds `buffer_size`, each new item releases one drawn uniformly
    from it (then the rest, drawn likewise). The drawn item leaves by `list.pop(k)` (the others keep their order),
    or with `swap_last` by moving the last item into its place: the same distribution, another order for a seed."""
    buffer: list[T] = []

    def pop() -> T:
        k = int(torch.randint(len(buffer), (), generator=generator))
        if swap_last:
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            return buffer.pop()
        return buffer.pop(k)

    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield pop()
    while buffer:
        yield pop()


def batches(items: Iterable[T], batch_size: int, stack: Callable[[list[T]], B]) -> Iterator[B]:
    """`stack` of every `batch_size` consecutive items (the last batch may be short)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield stack(batch)
            batch = []
    if batch:
        yield stack(batch)


@dataclass
class _Failure:
    exc: BaseException


_DONE = object()


class Prefetch:
    """Run an iterator in a background thread (named `name`), `depth` items ahead (decoding overlaps the device's
    step). One producer, so the order is the iterator's; its exceptions are raised in the consumer; `close()`
    stops it."""

    def __init__(self, it: Iterator[Any], depth: int = 2, name: str = "finetune-data") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(exc))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue) and wait for its thread."""
        self._stop.set()
        self._thread.join(timeout=30)


# ------------------------------------------------------------------------------------------------
# results on disk (a fine-tune run as its own job hands its result back through these files)


def safe_name(text: str) -> str:
    """`text` with every character but letters, digits and `-_.+` replaced by `_` (a file name)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def write_result(result: EvalResult, out_dir: Path, arrays: Sequence[str],
                 values: Mapping[str, Callable[[Any], Any]] | None = None) -> Path:
    """`<out_dir>/<evaluator>-<benchmark>-<backbone>.json` (metrics, curves, notes, artifacts) and `.npz` (the
    example lists named in `arrays`); returns the JSON's path. The JSON's "examples" is the .npz's name (null
    without arrays) or, with `values` (example lists kept in the JSON, each item through its converter, e.g.
    {"iou": float}), {"arrays": that name, <key>: [...]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(f"{result.evaluator}-{result.benchmark}-{result.backbone}")
    examples = result.artifacts.get("examples") or {}
    saved = {f"{k}_{i}": np.asarray(v) for k in arrays for i, v in enumerate(examples.get(k, []))}
    if saved:
        np.savez_compressed(out_dir / f"{stem}.npz", **saved)
    npz = f"{stem}.npz" if saved else None
    doc = {
        **result.to_json(),
        "artifacts": {k: v for k, v in result.artifacts.items() if k != "examples"},
        "examples": npz if not values else
        {"arrays": npz, **{k: [convert(v) for v in examples.get(k, [])] for k, convert in values.items()}},
    }
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)  # a reader never sees half a result
    return path


def load_result(path: Path, arrays: Sequence[str], values: Iterable[str] = ()) -> EvalResult:
    """An EvalResult from what `write_result` wrote with the same `arrays` and `values` (keys): the examples too
    when the .npz is there."""
    path = Path(path)
    doc = json.loads(path.read_text())
    result = EvalResult.from_json(doc)
    ex = doc.get("examples") or {}
    if isinstance(ex, str):  # written without `values`: the .npz's name
        ex = {"arrays": ex}
    if ex.get("arrays") and (path.parent / ex["arrays"]).is_file():
        examples: dict[str, list[Any]] = {k: [] for k in arrays}
        with np.load(path.parent / ex["arrays"]) as z:
            for key in arrays:
                i = 0
                while f"{key}_{i}" in z:
                    examples[key].append(z[f"{key}_{i}"])
                    i += 1
        for key in values:
            examples[key] = list(ex.get(key, []))
        result.artifacts["examples"] = examples
    return result


__all__: list[str] = ["Prefetch", "batches", "bf16_autocast", "deterministic", "load_result", "random_access",
                      "reader_samples", "relative_change", "safe_name", "shuffled", "write_result"]
