"""The VQA evaluator's data: (image, question, answer, category) examples for the two training stages and the
evaluation split, read from shard datasets (the synthetic world, or what `versavit data prepare` writes).

    stage 1   caption data: a sample's caption (json `caption`, asked with the caption prompt), or, for samples
              without one (OCR-style data), its question/answer turns
    stage 2   VQA data: json `qa` ({question, answer, kind}: the synthetic world's, versavit.data.synthetic.scene
              `_questions`) and `conversations` ({question, answer}: FineVision / InternVL chat data as prepared)
    eval      the evaluation split's QA pairs in shard order, numbered 0.. (the predictions file's `index`); a
              benchmark's questions (versavit.eval.vqa.protocol `evaluation_questions`) also carry their options
              (MCQ), alternative answers and the benchmark's own index

Texts are read as versavit.data.tasks reads them for the caption task (`CAPTION_PROMPT`, the json fields above);
`category` is the synthetic question's kind (count, color, shape, spatial), "caption" for captions, else
"conversation". Images are resized as the caption task resizes them (`vqa_image`: Qwen2-VL's smart_resize to
sides that are multiples of the backbone's patch x merge, between min_side^2 and max_side^2 pixels).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from versavit.data.shards import read_manifest, resolve_shards
from versavit.data.tasks import CAPTION_PROMPT, image_tensor

Source = Literal["caption", "vqa"]
_IMAGE_FIELDS = ("rgb.jpg", "rgb.png", "jpg", "jpeg", "png")


@dataclass
class QAExample:
    """One question about one image (a caption is the answer to the caption prompt). An evaluation question may
    be multiple-choice (`options`, its answer a letter) or list alternative answers (`answers`, any one counts):
    versavit.eval.vqa.metrics.score scores each by its own rule."""

    key: str
    image: np.ndarray  # [H, W, 3] uint8
    question: str
    answer: str
    category: str
    index: int = -1  # position in the evaluation split
    options: dict[str, str] = field(default_factory=dict)  # MCQ: {letter: option text}
    answers: tuple[str, ...] = ()  # the answers that count, when the benchmark lists several
    source_index: str = ""  # the benchmark's own index of the question (VLMEvalKit's `index`), if it has one

    @property
    def prediction_index(self) -> str | int:
        """The predictions file's `index`: the benchmark's own when it has one, else the position."""
        return self.source_index or self.index


def sample_pairs(meta: dict[str, Any], source: Source, kinds: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """The (question, answer, category) pairs a sample's json offers to `source`; `kinds` keeps only those QA
    categories (empty: all)."""
    qa = [(q["question"], q["answer"], str(q.get("kind") or "vqa")) for q in meta.get("qa") or []]
    qa += [(c["question"], c["answer"], "conversation") for c in meta.get("conversations") or []]
    if source == "caption":
        if meta.get("caption"):
            return [(CAPTION_PROMPT, meta["caption"], "caption")]
        return qa  # OCR / document data come as question-answer turns
    if source != "vqa":
        raise ValueError(f"unknown source {source!r}; expected caption or vqa")
    return [p for p in qa if not kinds or p[2] in kinds]


def _image(sample: dict[str, Any]) -> np.ndarray:
    for name in _IMAGE_FIELDS:
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')} has no image field ({', '.join(_IMAGE_FIELDS)})")


def num_samples(urls: Sequence[str]) -> int | None:
    """Samples in the datasets `urls` (from their manifests); None when a URL is a bare shard (no manifest)."""
    total = 0
    for url in urls:
        if url.endswith(".tar") or "{" in url:
            return None
        total += read_manifest(url).num_samples
    return total


def _pairs_of(source: Source, kinds: Sequence[str]):  # -> Callable[[Mapping], tuple | None]
    """A shard-pipeline transform: (key, image, pairs) of a sample, None without pairs. Only the json and the image
    are decoded (the synthetic world's depth, instance and class maps are never read)."""
    def transform(sample: Mapping[str, Any]) -> tuple[str, np.ndarray, list[tuple[str, str, str]]] | None:
        pairs = sample_pairs(sample.get("json") or {}, source, kinds)
        return (str(sample["__key__"]), _image(sample), pairs) if pairs else None

    return transform


def examples(urls: Sequence[str], source: Source, kinds: Sequence[str] = (), seed: int | None = None,
             shuffle_buffer: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[QAExample, int]]:
    """Every (image, question, answer) of `urls` for `source`, and the samples read since the previous example
    (the stream's progress: 1 for a sample's first example, plus the samples without any skipped before it; 0 for
    its other examples): in shard order, or (with `seed`) the shard order permuted and the samples shuffled through
    a `shuffle_buffer`-sample buffer. One process (no DataLoader workers). With `world` > 1, process `rank`'s share:
    every world-th shard of the (same) permuted order when there are at least `world` shards, else every
    world-th sample; the shares are disjoint and together the whole."""
    from versavit.data.loader import shard_pipeline

    shards = resolve_shards(list(urls))
    if seed is not None:
        shards = [shards[i] for i in np.random.default_rng(seed).permutation(len(shards))]
    by_shard = world > 1 and len(shards) >= world
    if by_shard:
        shards = shards[rank::world]
    pipeline = shard_pipeline(shards, split_by_node=False, seed=seed or 0, transform=_pairs_of(source, kinds),
                              shuffle_buffer=shuffle_buffer if seed is not None else 0)
    skipped = 0
    position = -1
    for item in pipeline:
        position += 1
        if world > 1 and not by_shard and position % world != rank:
            continue  # another process's sample
        if item is None:
            skipped += 1
            continue
        key, image, pairs = item
        for i, (q, a, cat) in enumerate(pairs):
            yield QAExample(key, image, q, a, cat), (1 + skipped if i == 0 else 0)
        skipped = 0


def training_batches(urls: Sequence[str], source: Source, batch_size: int, seed: int, shuffle_buffer: int,
                     kinds: Sequence[str] = (), epochs: int | None = 1, keep: int = 0, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[list[QAExample], int]]:
    """Shuffled batches of `source` examples, epoch after epoch (`epochs` None: forever), with the number of
    samples read so far. Examples are shuffled again through a buffer, so that one image's questions spread over
    batches; every epoch has its own order (seed + epoch). A dataset of at most `keep` samples is read once and
    kept in memory for the later epochs (reshuffled whole). The last short batch of the stream is kept. With
    `world` > 1: process `rank`'s share of the data (`examples`), the sample count its own."""
    rng = np.random.default_rng(seed)
    total = num_samples(urls) if keep else None
    kept: list[QAExample] | None = [] if total is not None and total <= keep else None
    buffer: list[QAExample] = []
    batch: list[QAExample] = []
    read = 0
    epoch = 0
    size = max(shuffle_buffer, batch_size)

    def stream() -> Iterator[tuple[QAExample, int]]:
        if epoch == 0 or kept is None:
            for example, n in examples(urls, source, kinds, seed=seed + epoch, shuffle_buffer=shuffle_buffer,
                                       rank=rank, world=world):
                if kept is not None and epoch == 0:
                    kept.append(example)
                yield example, n
        else:
            seen: set[str] = set()
            for i in rng.permutation(len(kept)):
                n = int(kept[i].key not in seen)
                seen.add(kept[i].key)
                yield kept[i], n

    while epochs is None or epoch < epochs:
        found = False
        for example, n in stream():
            found = True
            read += n
            buffer.append(example)
            if len(buffer) >= size:
                batch.append(buffer.pop(int(rng.integers(len(buffer)))))
                if len(batch) == batch_size:
                    yield batch, read
                    batch = []
        if not found:
            raise ValueError(f"no {source} examples in {list(urls)}" + (f" of kinds {list(kinds)}" if kinds else ""))
        epoch += 1
    for i in rng.permutation(len(buffer)):
        batch.append(buffer[i])
        if len(batch) == batch_size:
            yield batch, read
            batch = []
    if batch:
        yield batch, read


def eval_examples(urls: Sequence[str], kinds: Sequence[str] = (), limit: int | None = None) -> list[QAExample]:
    """The evaluation split's QA pairs in shard order, numbered from 0 (`limit`: the first that many)."""
    out: list[QAExample] = []
    for example, _ in examples(urls, "vqa", kinds):
        if limit is not None and len(out) >= limit:
            break
        example.index = len(out)
        out.append(example)
    if not out:
        raise ValueError(f"no question/answer pairs in {list(urls)}" + (f" of kinds {list(kinds)}" if kinds else ""))
    return out


def vqa_image(rgb: np.ndarray, min_side: int, max_side: int, factor: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] in [0, 1] at the caption task's dynamic resolution (sides multiples of
    `factor`, h * w within [min_side^2, max_side^2], aspect ratio kept), as versavit.data.tasks.caption_view."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor=factor, min_pixels=min_side * min_side,
                        max_pixels=max_side * max_side)
    return image_tensor(rgb, (h, w))


__all__ = ["QAExample", "Source", "eval_examples", "examples", "num_samples", "sample_pairs", "training_batches",
           "vqa_image"]
