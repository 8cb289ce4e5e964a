"""`versavit data check URL`: does a dataset folder hold what its manifest.json says?

Every shard listed must exist with the listed size; the checked shards (all, or a sampled
`sample_fraction` of them, chosen per shard name) must have the listed sha256 and yield every
sample the manifest lists, each with every field the manifest lists (`fields`). Problems come back
as one line each (missing shard, sha256 mismatch, lost samples of a shard) plus a summary line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from versavit import storage
from versavit.data.loader import CorruptionStats, _verify_shard, shard_pipeline
from versavit.data.shards import read_manifest


@dataclass
class CheckReport:
    url: str
    problems: list[str] = field(default_factory=list)
    summary: str = ""
    lost_by_shard: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, max_lines: int = 20) -> list[str]:
        """At most `max_lines` problem lines, a line saying how many more, and the summary."""
        out = self.problems[:max_lines]
        if len(self.problems) > max_lines:
            out.append(f"... and {len(self.problems) - max_lines} more problem(s)")
        return [*out, self.summary]


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with storage.open_url(url, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_dataset(url: str, sample_fraction: float = 1.0) -> CheckReport:
    """Check the dataset at `url` against its manifest (see the module doc)."""
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"--sample-fraction must be in (0, 1], got {sample_fraction}")
    report = CheckReport(url)
    manifest = read_manifest(url)
    checked: list[str] = []
    missing = changed = 0
    known_changed: list[str] = []  # reported here; the reader need not warn about them again
    for shard, shard_url in zip(manifest.shards, manifest.shard_urls(), strict=True):
        fs, path = storage.get_fs(shard_url)
        try:
            size = fs.size(path) if fs.exists(path) else None
        except Exception as exc:
            raise storage.describe_error(shard_url, exc) from exc
        if size is None:
            missing += 1
            report.problems.append(f"missing shard: {shard.name} ({shard.num_samples} samples)")
            continue
        sampled = sample_fraction >= 1 or _verify_shard(shard_url) < sample_fraction
        if size != shard.bytes:
            changed += 1
            known_changed.append(shard_url)
            report.problems.append(f"dataset changed under its manifest: {shard.name} is {size} bytes, manifest.json "
                                   f"lists {shard.bytes}")
        elif sampled and _sha256(shard_url) != shard.sha256:
            changed += 1
            report.problems.append(f"dataset changed under its manifest: {shard.name} sha256 differs from "
                                   "manifest.json")
        if sampled:
            checked.append(shard_url)
    if not checked and sample_fraction < 1 and manifest.shards:  # a tiny dataset: check one shard at least
        present = [u for u in manifest.shard_urls() if storage.exists(u)]
        checked = present[:1]
    stats = CorruptionStats(max_fraction=1.0, min_samples=1, max_warnings=0, name="check")
    stats.changed.extend(known_changed)
    listed = 0
    if checked:
        for _ in shard_pipeline(checked, stats=stats, required=tuple(manifest.fields), split_by_node=False,
                                strict=False, transform=_keys_only):
            pass
        infos = {s.name: s for s in manifest.shards}
        listed = sum(infos[u.rsplit("/", 1)[-1]].num_samples for u in checked)
        for shard_url, n in stats.lost_per_shard().items():
            name = shard_url.rsplit("/", 1)[-1]
            report.lost_by_shard[name] = n
            report.problems.append(f"lost samples: {name} yields {infos[name].num_samples - n} of its "
                                   f"{infos[name].num_samples} samples ({n} truncated, undecodable or lacking a field)")
    lost = sum(report.lost_by_shard.values())
    state = "ok" if report.ok else "PROBLEMS"
    report.summary = (f"{state}: {url}: {len(manifest.shards)} shard(s), {len(checked)} read and checked"
                      f"{'' if sample_fraction >= 1 else f' (sample fraction {sample_fraction})'}; {missing} missing, "
                      f"{changed} changed under the manifest, {lost} of {listed} samples lost")
    return report


def _keys_only(sample) -> str:  # noqa: ANN001 - a LazySample: decode every field, keep nothing
    for name in sample:
        sample[name]
    return sample["__key__"]
