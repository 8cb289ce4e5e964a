"""The VQA benchmarks of the paper's Table 2 (MMBench, MMStar, MMMU, MathVista, HallusionBench, AI2D, OCRBench,
MM-Vet) as VLMEvalKit distributes them, read from its TSVs (the published layout) or from prepared shards.

    <root>/MMStar.tsv    (VLMEvalKit's LMUData folder: one TSV per benchmark, images inline as base64)

Layout, parsing and prompts: versavit.data.prepare.vlmevalkit (which the published-layout reader shares). One
sample per question (a TSV row): the row's first image and the target {"key", "index" (the TSV's), "qa":
[{"question": the prompt VLMEvalKit asks (MCQ: hint, question, options and the instruction), "answer" (MCQ: the
option letter), "kind" (the row's category, else "vqa"), "options": {letter: text} (MCQ), "answers":
[alternatives] (when the answer lists several)}]}: what the `vqa` evaluator scores (versavit.eval.vqa: an MCQ
question by the option letter the answer names, an open one by exact match with any alternative).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from versavit.data.prepare.benchmarks import _Skip
from versavit.data.prepare.vlmevalkit import (
    SPLITS,
    Question,
    question_bytes,
    question_image,
    read_questions,
    spec_of,
    target_of,
    tsv_url,
)
from versavit.eval.datasets.base import BenchmarkReader, Sample
from versavit.eval.datasets.prepared import _image, _ShardReader

TASKS = ("vqa",)


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


class VLMEvalKitTSV(BenchmarkReader):
    """A VLMEvalKit benchmark TSV (the published layout: <root>/<file>.tsv, images inline)."""

    tasks = TASKS

    def __init__(self, root: str | Path, name: str, split: str = "test") -> None:
        if split not in SPLITS:
            raise ValueError(f"{name} split must be one of {list(SPLITS)}, got {split!r}")
        self.name = name
        self.spec = spec_of(name)
        self.counts: Counter = Counter()  # rows read and skipped, by reason (as `versavit data prepare` counts)
        super().__init__(root, split)

    def _items(self) -> list[Question]:
        url = tsv_url(str(self.root), self.name)
        self._tsv = Path(url)
        digest = hashlib.sha256()
        with open(self._tsv, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self._sha = digest.hexdigest()[:16]
        items = []
        for q in read_questions(self.name, url, self.counts):
            try:
                question_image(q, str(self.root), self.counts)  # decoded once here: the unreadable ones skipped
            except _Skip as skip:
                self.counts[skip.reason] += 1
                continue
            self.counts["samples"] += 1
            items.append(q)
        return items

    def digest(self) -> str:
        """The TSV's content (every question and image is in it) and the split."""
        ident = f"{type(self).__name__}:{self.name}:{self.split}:{self._sha}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def _load(self, item: Question) -> Sample:
        return _rgb(question_bytes(item, str(self.root))), target_of(item)


class PreparedVLMEvalKit(_ShardReader):
    """A VLMEvalKit benchmark prepared by `versavit data prepare <name>` (the question in each sample's json)."""

    tasks = TASKS

    def __init__(self, url: str, name: str, split: str = "test") -> None:
        self.name = name
        self._open(url, split)

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            meta = sample.get("json") or {}
            qa = meta.get("qa")
            if not qa:
                raise ValueError(f"{self.name}: prepared sample {sample['__key__']} in {self.url} has no question; "
                                 f"prepare it with `versavit data prepare {self.name}`")
            index = str(meta.get("index", sample["__key__"]))
            yield _image(sample), {"key": meta.get("key", index), "index": index, "qa": [dict(q) for q in qa]}
