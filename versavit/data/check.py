"""`versavit data check URL`: does a dataset folder hold what its manifest.json says, and can each task use
its samples?

Every shard listed must exist with the listed size; the checked shards (all, or a sampled
`sample_fraction` of them, chosen per shard name; none at 0, which checks presence and sizes only) must
have the listed sha256 and yield every sample the manifest lists, each with every field the manifest lists
(`fields`). Then, per task (`tasks`: caption, depth, refseg; by default the tasks the samples claim:
`meta.tasks` of the manifest, else every task some sample carries data for), each checked sample either
serves the task or is unusable for a reason: a member the task reads is missing (depth.png; emb.npy and
masks for refseg; caption or question/answer text for caption) or undecodable, or the sample is not in its
shard at all (truncated or unreadable). Problems come back as one line each (missing shard, sha256
mismatch, lost samples of a shard, unusable samples of a task) plus a summary line.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from versavit import storage
from versavit.data.loader import CorruptionStats, _verify_shard, shard_pipeline
from versavit.data.shards import read_manifest

TASKS = ("caption", "depth", "refseg")
IMAGE_FIELDS = ("rgb.jpg", "rgb.png", "jpg", "jpeg", "png")
NOT_READ = "not in its shard (truncated or unreadable)"


@dataclass
class TaskReport:
    """How many of the checked samples one task can use, and why the others not (reason -> count, example)."""

    task: str
    listed: int = 0
    usable: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def unusable(self) -> int:
        return self.listed - self.usable

    def line(self) -> str:
        why = ", ".join(f"{n} {reason}" + (f" (e.g. {self.examples[reason]})" if reason in self.examples else "")
                        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return f"task {self.task}: {self.unusable} of {self.listed} samples unusable: {why}"


@dataclass
class CheckReport:
    url: str
    problems: list[str] = field(default_factory=list)
    summary: str = ""
    lost_by_shard: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, TaskReport] = field(default_factory=dict)

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


def _short(exc: BaseException) -> str:
    """An error as a reason shared by many samples: no sample key, no object address, bounded."""
    text = re.sub(r"sample \S+?:? (?=\S)", "", str(exc))
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    return " ".join(f"{type(exc).__name__}: {text}".split())[:120]


def _decodes(sample: Any, name: str) -> str | None:
    try:
        sample[name]
    except Exception as exc:  # noqa: BLE001 - the reason is what we report
        return f"undecodable {'depth.png' if name == 'depth' else name} ({_short(exc)})"
    return None


def _meta(sample: Any) -> dict[str, Any]:
    try:
        meta = sample.get("json", {})
    except Exception:  # noqa: BLE001 - undecodable json: reported by the task that needs it
        return {}
    return meta if isinstance(meta, dict) else {}


def claimed_tasks(sample: Any) -> set[str]:
    """The tasks a sample carries data for: depth (depth.png), refseg (emb.npy or mask.png), caption (text)."""
    from versavit.data.tasks import text_pairs

    out = set()
    if "depth" in sample:
        out.add("depth")
    if "emb.npy" in sample or "mask.png" in sample:
        out.add("refseg")
    if text_pairs(_meta(sample)):
        out.add("caption")
    return out


def task_problem(task: str, sample: Any) -> str | None:
    """Why `sample` (a LazySample) cannot serve `task`, or None: the members its view reads, then the view."""
    from versavit.data.tasks import depth_view, refseg_view, text_pairs

    image = next((n for n in IMAGE_FIELDS if n in sample), None)
    if image is None:
        return "lack an image (rgb.jpg / rgb.png)"
    if task == "depth" and "depth" not in sample:
        return "lack depth.png"
    if task == "refseg":
        if "emb.npy" not in sample:
            return "lack emb.npy (text embeddings: run `versavit label embed`)"
        objects = _meta(sample).get("objects") or []
        has_instances = bool(objects) and ("inst.png" in sample or all("segmentation" in o for o in objects))
        if not has_instances and "mask.png" not in sample:
            return "lack masks (inst.png + json objects, or mask.png)"
    if task == "caption":
        if "json" not in sample:
            return "lack json (caption or question/answer text)"
        if (problem := _decodes(sample, "json")) is not None:
            return problem
        if not text_pairs(_meta(sample)):
            return "have no caption or question/answer text in json"
    for name in (image, *{"depth": ("depth",), "refseg": ("emb.npy", "inst.png", "mask.png")}.get(task, ())):
        if name in sample and (problem := _decodes(sample, name)) is not None:
            return problem
    try:
        if task == "depth":
            depth_view(sample, 8)
        elif task == "refseg":
            refseg_view(sample, 8)
    except Exception as exc:  # noqa: BLE001 - the reason is what we report
        return _short(exc)
    return None


class _Examiner:
    """The check pipeline's transform: records each sample's claims and per-task problems, then decodes every
    field and requires the manifest's fields (a sample failing either is a lost sample, as before)."""

    def __init__(self, tasks: Iterable[str], required: Iterable[str]):
        self.tasks = tuple(tasks)
        self.required = tuple(required)
        self.claims: set[str] = set()
        self.problems: dict[str, collections.Counter] = {t: collections.Counter() for t in self.tasks}
        self.examples: dict[str, dict[str, str]] = {t: {} for t in self.tasks}
        self.examined = 0

    def __call__(self, sample: Any) -> str:
        key = str(sample["__key__"]) if "__key__" in sample else "?"
        self.examined += 1
        self.claims |= claimed_tasks(sample)
        for task in self.tasks:
            if (problem := task_problem(task, sample)) is not None:
                self.problems[task][problem] += 1
                self.examples[task].setdefault(problem, key)
        missing = [f for f in self.required if ("depth" if f == "depth.png" else f) not in sample]
        if missing:
            raise ValueError(f"sample {key} lacks {missing}")
        for name in sample:  # decode every field, keep nothing
            sample[name]
        return key


def check_dataset(url: str, sample_fraction: float = 1.0, tasks: Iterable[str] | None = None) -> CheckReport:
    """Check the dataset at `url` against its manifest, and per task (see the module doc).

    `sample_fraction` 0 checks presence and sizes only (no shard is read); `tasks` None: the claimed tasks."""
    if not 0 <= sample_fraction <= 1:
        raise ValueError(f"--sample-fraction must be in [0, 1], got {sample_fraction}")
    tasks = None if tasks is None else list(dict.fromkeys(tasks))
    if unknown := [t for t in tasks or () if t not in TASKS]:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
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
    if not checked and 0 < sample_fraction < 1 and manifest.shards:  # a tiny dataset: check one shard at least
        present = [u for u in manifest.shard_urls() if storage.exists(u)]
        checked = present[:1]
    stats = CorruptionStats(max_fraction=1.0, min_samples=1, max_warnings=0, name="check")
    stats.changed.extend(known_changed)
    claimed = [t for t in (manifest.meta.get("tasks") or []) if t in TASKS]
    examiner = _Examiner(tasks if tasks is not None else (claimed or TASKS), manifest.fields)
    listed = 0
    if checked:
        for _ in shard_pipeline(checked, stats=stats, split_by_node=False, strict=False, transform=examiner):
            pass
        infos = {s.name: s for s in manifest.shards}
        listed = sum(infos[u.rsplit("/", 1)[-1]].num_samples for u in checked)
        for shard_url, n in stats.lost_per_shard().items():
            name = shard_url.rsplit("/", 1)[-1]
            report.lost_by_shard[name] = n
            report.problems.append(f"lost samples: {name} yields {infos[name].num_samples - n} of its "
                                   f"{infos[name].num_samples} samples ({n} truncated, undecodable or lacking a field)")
        evaluated = tasks if tasks is not None else (claimed or [t for t in TASKS if t in examiner.claims])
        for task in evaluated:
            reasons = dict(examiner.problems[task])
            if listed > examiner.examined:
                reasons[NOT_READ] = listed - examiner.examined
            tr = TaskReport(task, listed, examiner.examined - sum(examiner.problems[task].values()), reasons,
                            examiner.examples[task])
            report.tasks[task] = tr
            if tr.unusable:
                report.problems.append(tr.line())
    lost = sum(report.lost_by_shard.values())
    state = "ok" if report.ok else "PROBLEMS"
    fraction = "" if sample_fraction >= 1 else \
        " (sample fraction 0: presence and sizes only)" if sample_fraction == 0 else \
        f" (sample fraction {sample_fraction})"
    per_task = ", ".join(f"{t} {r.usable}/{r.listed}" for t, r in report.tasks.items())
    report.summary = (f"{state}: {url}: {len(manifest.shards)} shard(s), {len(checked)} read and checked{fraction}; "
                      f"{missing} missing, {changed} changed under the manifest, "
                      + (f"{lost} of {listed} samples lost" if checked else "no samples read")
                      + (f"; usable samples per task: {per_task}" if per_task else ""))
    return report
