"""What a `versavit data prepare` source is: how to list a published dataset's work units, read a slice of
them as versavit samples, and write a tiny stand-in of its layout for tests and the rehearsal.

A source never writes shards itself: the runner (versavit.data.prepare.runner) partitions the units into
output shards, gives workers disjoint slices (`--shard-index/--num-shards`), writes each shard atomically
with a done record, skips shards already done with the same settings, and writes the manifest once every
shard is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# (input URL, split) -> the split's work units in a deterministic order (JSON-serialisable: file names, ids)
ListUnits = Callable[[str, str], list[Any]]
# (input URL, split, units, counts) -> versavit samples ({"__key__", "rgb.jpg": bytes, "json": dict, ...}); a
# unit that cannot be read is skipped and counted in `counts` (reason -> n), never fatal on its own
ReadUnits = Callable[[str, str, list[Any], Counter], Iterator[dict[str, Any]]]
# (folder, seed) -> writes a tiny stand-in of the published layout there, rendered from the synthetic world
WriteFixture = Callable[[Path, int], None]


@dataclass(frozen=True)
class Source:
    """One published dataset `versavit data prepare NAME` reads."""

    name: str
    kind: Literal["training", "benchmark"]
    tasks: tuple[str, ...]  # what its samples serve: caption, depth, refseg (training); seg, depth, refseg (benchmarks)
    splits: tuple[str, ...]  # splits it can prepare; the first is the default
    about: str  # what it is, what to download, the folder layout expected, its size
    list_units: ListUnits
    read_units: ReadUnits
    write_fixture: WriteFixture
    units_per_shard: int = 256  # units (usually images) per output shard
    version: int = 1  # of the reader's output: shards prepared by another version are redone
