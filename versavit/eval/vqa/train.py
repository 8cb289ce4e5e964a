"""The two training stages of the VQA evaluation (paper Table 2's MLLM), and greedy prediction.

    model     `VqaModel`: the candidate's backbone (a copy, frozen throughout) + a fresh caption head (projector +
              LLM, versavit.eval.vqa.model), initialised under `eval.seed`
    stage 1   the projector alone on caption data (`eval.vqa.stage1_data`; default: the synthetic benchmark's train
              split, else the run's caption-task data) at `stage1_lr` (paper: 5e-4); the LLM is frozen but in the
              graph (gradients reach the projector through it)
    stage 2   projector + LLM on VQA data (`stage2_data`, same default, its question/answer pairs; `qa_kinds`
              keeps some question kinds) at `stage2_lr` (paper: 2e-5)
    optimiser AdamW per stage (betas from `train.optim`, weight decay `eval.vqa.weight_decay`, LLaVA's 0; biases and
              norms never decayed), linear warm-up over `train.optim.warmup_ratio` of the stage then
              `train.optim.schedule` (cosine to 0), gradient clipping `train.optim.grad_clip`; a stage runs one
              epoch of its data, or `stage*_steps` optimiser steps (repeating the data as needed) when set; batch
              `eval.vqa.batch_size` examples (one question about one image each)
    loss      the caption head's: cross-entropy over the answer tokens and the closing <|im_end|>

Seeded (`eval.seed`: head initialisation, data order) and, on the CPU, deterministic; the caller's RNG state is left
as it was. Images at the caption task's dynamic resolution (`train.resolution.caption_min` .. `caption_max`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from versavit.eval.vqa import parallel
from versavit.eval.vqa.data import QAExample, Source, num_samples, training_batches
from versavit.eval.vqa.metrics import AnswerPrior
from versavit.eval.vqa.model import VqaModel

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VqaSettings:
    """The protocol as configured (`eval.vqa`, `eval.seed`, `train.optim`, `train.resolution`, `data`)."""

    llm: str | None
    stage1_lr: float
    stage2_lr: float
    stage1_steps: int | None
    stage2_steps: int | None
    stage1_data: tuple[str, ...]
    stage2_data: tuple[str, ...]
    batch_size: int
    qa_kinds: tuple[str, ...]
    max_questions: int | None
    max_new_tokens: int
    lmms_tasks: tuple[str, ...]
    min_side: int
    max_side: int
    weight_decay: float
    betas: tuple[float, float]
    warmup_ratio: float
    schedule: str
    grad_clip: float
    shuffle_buffer: int
    log_every: int
    in_memory: int
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> VqaSettings:
        v, optim, res = cfg.eval.vqa, cfg.train.optim, cfg.train.resolution
        return cls(llm=v.llm or cfg.model.heads.caption.llm, stage1_lr=v.stage1_lr, stage2_lr=v.stage2_lr,
                   stage1_steps=v.stage1_steps, stage2_steps=v.stage2_steps, stage1_data=tuple(v.stage1_data),
                   stage2_data=tuple(v.stage2_data), batch_size=v.batch_size, qa_kinds=tuple(v.qa_kinds),
                   max_questions=v.max_questions, max_new_tokens=v.max_new_tokens,
                   lmms_tasks=tuple(v.lmms_tasks), min_side=res.caption_min,
                   max_side=res.caption_max, weight_decay=v.weight_decay, betas=tuple(optim.betas),
                   warmup_ratio=optim.warmup_ratio, schedule=optim.schedule, grad_clip=optim.grad_clip,
                   shuffle_buffer=cfg.data.shuffle_buffer, log_every=v.log_every, in_memory=v.in_memory,
                   seed=cfg.eval.seed)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def describe_protocol(s: VqaSettings) -> str:
    """One sentence on the protocol as configured (the evaluator's protocol note)."""
    def steps(n: int | None) -> str:
        return f"{n} steps" if n else "one epoch"

    kinds = f" ({', '.join(s.qa_kinds)} questions)" if s.qa_kinds else ""
    return (f"VQA with the frozen backbone in an MLLM: backbone -> fresh 2x2-merge projector -> "
            f"{s.llm or 'a tiny random Qwen3'}; stage 1 the projector on captions (lr {s.stage1_lr:g}, "
            f"{steps(s.stage1_steps)}), stage 2 projector + LLM on VQA pairs{kinds} (lr {s.stage2_lr:g}, "
            f"{steps(s.stage2_steps)}), AdamW, batch {s.batch_size}, images {s.min_side}-{s.max_side} px; greedy "
            "answers scored by exact match after the VQA evaluation's normalisation; chance = the commonest training "
            "answer of each question kind."
            + (f" Also scored with lmms-eval on: {', '.join(s.lmms_tasks)}." if s.lmms_tasks else ""))


# ------------------------------------------------------------------------------------------------
# model


def build_vqa_model(candidate: Candidate, cfg: RunConfig, settings: VqaSettings) -> VqaModel:
    """The candidate's backbone (a frozen copy: the candidate's own module is never touched) + a fresh caption
    head from `model.heads.caption` with the LLM `settings.llm`, initialised under `settings.seed`."""
    from versavit.models.heads.caption import CaptionHead

    backbone = copy.deepcopy(candidate.load_backbone()).float()
    head_cfg = cfg.model.heads.caption
    if settings.llm != head_cfg.llm:  # eval.vqa.llm: its own tokenizer
        head_cfg = head_cfg.model_copy(update={"llm": settings.llm, "tokenizer": None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = CaptionHead.build(head_cfg, vision_dim=backbone.embed_dim)
    return VqaModel(backbone, head, settings.min_side, settings.max_side, settings.max_new_tokens)


# ------------------------------------------------------------------------------------------------
# training


def lr_factor(progress: float, warmup_ratio: float, schedule: str = "cosine") -> float:
    """LR multiplier at `progress` (0..1) through a stage: linear warm-up over `warmup_ratio`, then cosine to 0 (or
    constant), versavit.train.optim.warmup_cosine in fractions of the stage (one epoch's length is known in
    samples, not in steps)."""
    if warmup_ratio and progress < warmup_ratio:
        return max(progress / warmup_ratio, 1e-3)
    if schedule == "constant":
        return 1.0
    rest = (progress - warmup_ratio) / max(1e-12, 1 - warmup_ratio)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, rest))))


def train_stage(model: VqaModel, stage: int, urls: Sequence[str], source: Source, params: list[torch.nn.Parameter],
                lr: float, steps: int | None, settings: VqaSettings, prior: AnswerPrior | None = None,
                label: str = "") -> list[float]:
    """One training stage on `urls`: `params` trained (everything else of the model frozen), one epoch or `steps`
    optimiser steps; the answers seen are counted into `prior`. Returns the loss of every step."""
    from versavit.train.optim import param_groups

    total = num_samples(urls) if steps is None else None
    if steps is None and not total:
        raise ValueError(f"vqa stage {stage}: {list(urls)} are bare shard URLs (no manifest: the epoch length is "
                         f"unknown); set eval.vqa.stage{stage}_steps")
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    par = parallel.current()
    groups = param_groups({"trainable": params}, {"trainable": lr}, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=settings.betas, weight_decay=settings.weight_decay)
    # several processes: DeepSpeed ZeRO-2 averages the gradients and partitions the optimiser state (parallel.py)
    engine = parallel.zero2_engine(model, optimizer, settings.batch_size, settings.grad_clip) if par.world > 1 \
        else None
    if engine is not None:
        optimizer = engine.optimizer
        total = None if total is None else -(-total // par.world)  # this process's share
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    log.info("vqa %s stage %d: %s on %s, lr %g, %s%s", label, stage, source, ", ".join(urls), lr,
             f"{steps} steps" if steps else f"one epoch ({total} samples)",
             f", {par.world} processes (ZeRO-2)" if par.world > 1 else "")
    batches = iter(training_batches(urls, source, settings.batch_size, settings.seed + 1000 * stage,
                                    settings.shuffle_buffer, settings.qa_kinds if source == "vqa" else (),
                                    epochs=1 if steps is None else None, keep=settings.in_memory, rank=par.rank,
                                    world=par.world))
    while True:
        item = next(batches, None)
        if not parallel.all_have(item is not None, par):  # the processes step together: all, or none
            break
        batch, read = item  # type: ignore[misc]
        progress = len(losses) / steps if steps else min(read / total, 1.0)  # type: ignore[operator]
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(progress, settings.warmup_ratio, settings.schedule)
        out = model.loss([e.image for e in batch], [e.question for e in batch], [e.answer for e in batch])
        if engine is not None:
            engine.backward(out.loss)
            engine.step()  # clips at gradient_clipping, steps, zeroes the gradients
        else:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
        losses.append(parallel.mean(float(out.loss.detach()), par))
        if prior is not None:
            prior.update([e.answer for e in batch], [e.category for e in batch])
        if len(losses) % settings.log_every == 0:
            log.info("vqa %s stage %d: step %d%s loss %.4f (%.1f examples/s)", label, stage, len(losses),
                     f"/{steps}" if steps else f", {read}/{total} samples", losses[-1],
                     len(losses) * settings.batch_size * par.world / max(time.monotonic() - started, 1e-9))
        if steps and len(losses) >= steps:
            break
    if engine is not None:
        engine.destroy()  # its gradient hooks go with it: the next stage trains other parameters
    for p in model.parameters():
        p.requires_grad_(False)
    if not losses:
        raise ValueError(f"vqa stage {stage}: no training batch from {list(urls)}")
    return losses


def train_two_stages(model: VqaModel, stage1_urls: Sequence[str], stage2_urls: Sequence[str],
                     settings: VqaSettings, label: str = "") -> tuple[list[float], list[float], AnswerPrior]:
    """Stage 1 (projector on captions), then stage 2 (projector + LLM on VQA); returns both loss curves and the
    answer counts of stage 2 (the chance level's blind guess)."""
    projector = model.head.projector_parameters()
    stage1 = train_stage(model, 1, stage1_urls, "caption", projector, settings.stage1_lr, settings.stage1_steps,
                         settings, label=label)
    prior = AnswerPrior()
    stage2 = train_stage(model, 2, stage2_urls, "vqa", projector + model.head.llm_parameters(), settings.stage2_lr,
                         settings.stage2_steps, settings, prior=prior, label=label)
    par = parallel.current()
    if par.world > 1:  # every process counted its own share of the answers
        merged = AnswerPrior()
        for counts in parallel.gather(prior.as_dict(), par):
            for category, answers in AnswerPrior.from_dict(counts).counts.items():
                merged.counts[category].update(answers)
        prior = merged
    return stage1, stage2, prior


@torch.no_grad()
def predict(model: VqaModel, examples: Sequence[QAExample], batch_size: int,
            max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to `examples`, in order (several processes: each answers every world-th, gathered)."""
    model.eval()
    par = parallel.current()
    share = list(examples)[par.rank::par.world]
    out: list[str] = []
    for i in range(0, len(share), batch_size):
        chunk = share[i: i + batch_size]
        out += model.answer([e.image for e in chunk], [e.question for e in chunk], max_new_tokens)
    if par.world == 1:
        return out
    parts = parallel.gather(out, par)
    return [parts[i % par.world][i // par.world] for i in range(len(examples))]


__all__ = ["VqaSettings", "build_vqa_model", "describe_protocol", "lr_factor", "predict",
           "train_stage", "train_two_stages"]
