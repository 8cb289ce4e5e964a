"""Fine-tuned referring segmentation (paper Table 10): backbone + SAM-style refseg head + a LoRA-tuned text encoder,
trained on referring-segmentation data, scored by cIoU (RefCOCO val / testA / testB: 78.8 / 81.2 / 76.2 in the paper).

Protocol (`eval.refseg_finetune`; the paper: LoRA with alpha = rank = 8 on the text encoder, backbone at 1e-5 and
the rest at 1e-4, 50 epochs on RefCOCO/+/g + COCO-Stuff):

    model       the candidate's backbone (trainable, lr_backbone) + the referring-segmentation head
                (`versavit.models.heads.RefSegHead`: the multi-task export's own head when the candidate is an export
                with one, else a fresh head from `model.heads.refseg`, built as `VersaViT.build` builds it and
                initialised from `eval.seed`) + a text encoder: the sentence-transformer `text_encoder` (default
                `labeling.teachers.embedder`, the model whose embeddings the multi-task head was trained on), its
                sentence embedding L2-normalised as `versavit.labeling.embed.TextEmbedder` makes it. The encoder's
                weights are frozen; peft LoRA adapters (r = lora_rank, lora_alpha, no dropout) sit on its attention
                projections (BERT: query/key/value/attention.output.dense; Qwen-style: q/k/v/o_proj). When the
                encoder's width differs from the head's `text_dim` (e.g. the tests' 32-wide encoder for a 16-wide
                head), a linear projection encoder dim -> text_dim is added and trained with the head. LoRA B starts
                at zero, so before the first step the encoder embeds exactly as the embedder does.
    optimiser   AdamW, two groups: backbone at lr_backbone; head, LoRA adapters and projection at lr_rest (biases and
                norms without weight decay); weight decay, betas, warm-up ratio and gradient clipping from
                `train.optim`. Schedule: linear warm-up over warmup_ratio of an estimate of the run's steps (one
                query per training sample), then cosine decay per epoch (epoch e of E at 0.5 (1 + cos(pi e / E))):
                how many queries an epoch holds is only known once it has been read, so the decay is by epoch.
    data        every (image, expression) query of every training sample once per epoch: the benchmark's own train
                split (the synthetic world's) plus `train_readers` (RefCOCO/+/g train, COCO-Stuff prepared as
                referring segmentation: versavit.data.convert.cocostuff); readers interleaved at random in
                proportion to their sizes, queries shuffled through a `shuffle_buffer`-query buffer (a random-access
                reader is also permuted whole). Images resized to R x R (bilinear, antialiased:
                `versavit.data.tasks.image_tensor`), masks to R x R (nearest), R = `resolution` or
                `train.resolution.refseg`. No flips (they would turn "left" into "right"). Text embeddings that come
                with the data (emb.npy) are not used: the tuned encoder embeds every expression.
    loss        `versavit.losses.SegmentationLoss` (train.loss.seg_bce * BCE + train.loss.seg_dice * Dice on the
                R x R mask logits), the loss the multi-task stage trains this head with.
    scoring     `versavit.eval.refseg.evaluate_refseg` on the benchmark's evaluation split, the protocol of the
                zero-shot `refseg` evaluator: the image at R x R, the logits upsampled to the label's size, foreground
                where > 0; cIoU = cumulative intersection / cumulative union over all queries, mIoU = mean per-query
                IoU (versavit.eval.metrics.MaskMeter).

Epochs are capped by `max_steps` (toy configs). Seeded (`eval.seed`: head, LoRA and projection initialisation, data
order) and deterministic on CPU; the caller's RNG state is left as it was. On CUDA the forward runs under bf16
autocast and the frozen text encoder is held in bf16 (its LoRA adapters in fp32); gradient checkpointing of the
backbone follows `model.backbone.gradient_checkpointing`. One process, one device: `batch_size` is that device's
batch (the paper's "per GPU"). A candidate held in memory (the random-init baseline) is copied, never modified.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from versavit.data.tasks import image_tensor
from versavit.eval.finetune import common
from versavit.eval.finetune.common import (
    Prefetch,
    batches,
    bf16_autocast,
    deterministic,
    reader_samples,
    relative_change,
    safe_name,
    shuffled,
)
from versavit.eval.results import EvalResult, MetricSpec
from versavit.losses import SegmentationLoss
from versavit.models.backbone import VisionBackbone
from versavit.models.heads.refseg import RefSegHead

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark
    from versavit.eval.datasets.base import BenchmarkReader, Sample

log = logging.getLogger(__name__)

EVALUATOR = "refseg-finetune"
EXAMPLES = 4  # evaluation queries kept for the report's figure (evaluate_refseg's choice: the first of each image)
METRIC_SPECS: dict[str, MetricSpec] = {"ciou": MetricSpec("cIoU"), "miou": MetricSpec("mIoU")}
# last names of the attention projections LoRA adapts: BERT-style (MiniLM, ...), Llama/Qwen-style, T5, fused qkv
_ATTENTION_NAMES = frozenset({"query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj",
                              "qkv_proj", "Wqkv", "c_attn"})
_T5_ATTENTION_NAMES = frozenset({"q", "k", "v", "o"})
ADAPTER_PROJECTION = "text_projection.pt"  # beside the peft adapter when the encoder needed a projection


class TextEncoderUnavailable(RuntimeError):
    """The text encoder cannot be loaded on this machine (no weights, offline): the message says what to do."""


# ------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class RefsegFinetuneSettings:
    """The schedule shared by every backbone of one comparison (`eval.refseg_finetune`, `eval.seed`,
    `train.optim`, `train.loss`)."""

    resolution: int
    epochs: int
    batch_size: int
    lr_backbone: float
    lr_rest: float
    lora_rank: int
    lora_alpha: int
    text_encoder: str
    max_steps: int | None
    weight_decay: float
    betas: tuple[float, float]
    warmup_ratio: float
    grad_clip: float
    seg_bce: float
    seg_dice: float
    shuffle_buffer: int
    log_every: int
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RefsegFinetuneSettings:
        from versavit import weights

        f, optim, loss = cfg.eval.refseg_finetune, cfg.train.optim, cfg.train.loss
        # the embedder as staged (weights.url) when the label steps use it; an explicit text_encoder as given
        encoder = f.text_encoder or weights.resolve(cfg).labeling.teachers.embedder
        return cls(resolution=f.resolution or cfg.train.resolution.refseg, epochs=f.epochs, batch_size=f.batch_size,
                   lr_backbone=f.lr_backbone, lr_rest=f.lr_rest, lora_rank=f.lora_rank, lora_alpha=f.lora_alpha,
                   text_encoder=encoder, max_steps=f.max_steps, weight_decay=optim.weight_decay,
                   betas=tuple(optim.betas), warmup_ratio=optim.warmup_ratio, grad_clip=optim.grad_clip,
                   seg_bce=loss.seg_bce, seg_dice=loss.seg_dice, shuffle_buffer=f.shuffle_buffer,
                   log_every=f.log_every, seed=cfg.eval.seed)

    def warmup_steps(self, num_samples: int) -> int:
        """Linear warm-up length: warmup_ratio of the steps at one query per sample (a lower bound of the run's)."""
        steps = self.epochs * math.ceil(max(num_samples, 1) / self.batch_size)
        steps = min(steps, self.max_steps) if self.max_steps else steps
        return math.ceil(self.warmup_ratio * steps)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def describe_protocol(settings: RefsegFinetuneSettings) -> str:
    """One sentence on the protocol as configured (the evaluator's protocol note)."""
    cap = f", at most {settings.max_steps} steps" if settings.max_steps else ""
    return (f"Fine-tuned referring segmentation: backbone (lr {settings.lr_backbone:g}) + refseg head (the export's "
            f"own when it has one, else a fresh one) + LoRA r={settings.lora_rank}, alpha={settings.lora_alpha} on "
            f"the attention projections of the text encoder {settings.text_encoder} (head and LoRA at lr "
            f"{settings.lr_rest:g}), AdamW, batch {settings.batch_size}, {settings.epochs} epochs{cap} at "
            f"{settings.resolution} px on the benchmark's train split plus eval.refseg_finetune.train; "
            f"{settings.seg_bce:g} BCE + {settings.seg_dice:g} Dice; cIoU = cumulative intersection / union over "
            "all queries of the evaluation split.")


# ------------------------------------------------------------------------------------------------
# text encoder with LoRA


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the Linear layers of `model` that are attention projections (what LoRA adapts), in module order."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if parts[-1] in _ATTENTION_NAMES or name.endswith("attention.output.dense") or \
                (parts[-1] in _T5_ATTENTION_NAMES and len(parts) > 1 and "attention" in parts[-2].lower()):
            names.append(name)
    return names


def _lora_targets(names: Sequence[str]) -> list[str]:
    """Module-name suffixes that select exactly `names` in peft's matching (`key.endswith("." + target)`):
    the last name, or BERT's "attention.output.dense" (its bare "dense" would also pick the MLP)."""
    out: list[str] = []
    for name in names:
        target = "attention.output.dense" if name.endswith("attention.output.dense") else name.split(".")[-1]
        if target not in out:
            out.append(target)
    return out


class LoraTextEncoder(nn.Module):
    """A sentence-transformer whose transformer carries peft LoRA adapters on its attention projections:
    `forward(sentences)` -> L2-normalised sentence embeddings [n, out_dim] (through `projection` when the encoder's
    width is not out_dim). Only the adapters and the projection are trainable."""

    def __init__(self, model: nn.Module, peft_model: Any, encoder_dim: int, out_dim: int, model_id: str,
                 targets: list[str]) -> None:
        super().__init__()
        self.model = model  # the SentenceTransformer; its transformer is the peft model's base (adapters injected)
        self.__dict__["peft_model"] = peft_model  # same parameters as model[0]: not registered a second time
        self.encoder_dim, self.out_dim = encoder_dim, out_dim
        self.model_id = model_id
        self.targets = targets
        self.projection = nn.Linear(encoder_dim, out_dim) if encoder_dim != out_dim else None

    @classmethod
    def load(cls, model_id: str, out_dim: int, rank: int, alpha: int,
             dtype: torch.dtype = torch.float32) -> LoraTextEncoder:
        """Load `model_id` as `versavit.labeling.embed.TextEmbedder` does (bundled all-MiniLM-L6-v2, staged s3://
        checkpoints), freeze it and add LoRA (r = rank, lora_alpha = alpha) to its attention projections."""
        from peft import LoraConfig, get_peft_model
        from sentence_transformers import SentenceTransformer

        from versavit.labeling.embed import resolve_embedder
        from versavit.labeling.runtime import load_failed
        from versavit.weights import local_model_path

        try:
            model = SentenceTransformer(resolve_embedder(local_model_path(model_id)), device="cpu")
        except Exception as exc:
            raise TextEncoderUnavailable(str(load_failed("refseg-finetune text encoder", model_id, exc))) from exc
        if dtype != torch.float32:
            model = model.to(dtype)
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        encoder_dim = int(get_dim())
        transformer = model[0].auto_model
        names = attention_projections(transformer)
        if not names:
            raise ValueError(f"text encoder {model_id} ({type(transformer).__name__}): no attention projections "
                             "found for LoRA (expected Linear layers named query/key/value, q_proj/k_proj/v_proj/"
                             "o_proj, ...)")
        targets = _lora_targets(names)
        # in place: the adapters are injected into `transformer`, which the sentence-transformer keeps calling
        peft_model = get_peft_model(transformer, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                            target_modules=targets, bias="none"))
        for name, p in model.named_parameters():  # get_peft_model froze the transformer's base weights already
            p.requires_grad_("lora_" in name)
        return cls(model, peft_model, encoder_dim, out_dim, model_id, targets)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, sentences: Sequence[str]) -> torch.Tensor:
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = preprocess(list(sentences))
        device = self.device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        emb = F.normalize(self.model(features)["sentence_embedding"].float(), dim=-1)
        return self.projection(emb) if self.projection is not None else emb

    @torch.no_grad()
    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Embeddings as the evaluation reads them: float32 [n, out_dim] on the CPU."""
        if not sentences:
            return np.zeros((0, self.out_dim), np.float32)
        return self(sentences).float().cpu().numpy()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The encoder's own (frozen) weights by name."""
        return {n: p for n, p in self.model.named_parameters() if "lora_" not in n}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.lora_parameters() + (list(self.projection.parameters()) if self.projection is not None else [])

    def save_adapter(self, path: Path) -> Path:
        """peft's `save_pretrained` of the adapters (adapter_config.json + weights; reload with
        `PeftModel.from_pretrained(<the encoder's transformer>, path)`), plus the projection when there is one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(path))
        if self.projection is not None:
            torch.save({k: v.detach().cpu() for k, v in self.projection.state_dict().items()},
                       path / ADAPTER_PROJECTION)
        (path / "versavit_text_encoder.json").write_text(json.dumps(
            {"text_encoder": self.model_id, "encoder_dim": self.encoder_dim, "out_dim": self.out_dim,
             "lora_targets": self.targets, "projection": ADAPTER_PROJECTION if self.projection is not None else None,
             "normalize": True}, indent=1))
        return path


# ------------------------------------------------------------------------------------------------
# model


class RefsegFinetuneModel(nn.Module):
    """Backbone + refseg head + LoRA text encoder: `forward(images, sentences, size)` -> mask logits [B, *size]."""

    def __init__(self, backbone: VisionBackbone, head: RefSegHead, text: LoraTextEncoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.text = text

    def forward(self, images: torch.Tensor, sentences: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
        maps = self.backbone(images).maps
        emb = self.text(sentences).to(maps.dtype)
        return self.head(maps, emb, size)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """What trains, by learning rate: {"backbone": ViT, "rest": head + LoRA adapters (+ projection)}."""
        return {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                "rest": list(self.head.parameters()) + self.text.trainable_parameters()}

    def scoring_model(self):  # -> VersaViT (backbone + heads["refseg"]) for evaluate_refseg
        from versavit.models.multitask import VersaViT

        return VersaViT(self.backbone, {"refseg": self.head}, depth_layers=[])


def build_refseg_model(candidate: Candidate, cfg: RunConfig, settings: RefsegFinetuneSettings | None = None,
                       device: torch.device | str | None = None) -> tuple[RefsegFinetuneModel, str]:
    """The model to fine-tune, fp32 (the frozen text encoder in bf16 on a GPU that has it), and where its head
    comes from ("export" or "fresh"). Head (when fresh), LoRA and projection are initialised under settings.seed
    without touching the caller's RNG, so two calls build the same model."""
    settings = settings or RefsegFinetuneSettings.from_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if candidate.export is not None and "refseg" in candidate.heads:
        from versavit.eval.candidates import load_multitask

        loaded = load_multitask(candidate, cfg, ["refseg"])
        backbone, head, origin = loaded.backbone, loaded.heads["refseg"], "export"
    else:
        backbone = candidate.load_backbone()
        if candidate.backbone is not None:  # the candidate's own module: never train it in place
            backbone = copy.deepcopy(backbone)
        head, origin = None, "fresh"
    unit = backbone.patch_size * backbone.merge_size
    if settings.resolution % unit:
        raise ValueError(f"refseg-finetune: resolution {settings.resolution} is not a multiple of {unit} "
                         f"({candidate.name}: patch {backbone.patch_size} x merge {backbone.merge_size})")
    text_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if head is None:
            head = RefSegHead(cfg.model.heads.refseg, embed_dim=backbone.embed_dim)
        text = LoraTextEncoder.load(settings.text_encoder, head.text_dim, settings.lora_rank, settings.lora_alpha,
                                    dtype=text_dtype)
    model = RefsegFinetuneModel(backbone.float(), head.float(), text)
    model.backbone.set_gradient_checkpointing(cfg.model.backbone.gradient_checkpointing)
    for p in list(model.backbone.parameters()) + list(model.head.parameters()):
        p.requires_grad_(True)
    return model, origin


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class _Query:
    image: torch.Tensor  # [3, R, R] uint8, shared by the queries of one image
    mask: torch.Tensor  # [R, R] bool
    sentence: str


def _masks_at(masks: Sequence[np.ndarray], resolution: int) -> torch.Tensor:
    """Boolean masks [n, H, W] -> [n, R, R] (nearest: a mask is never blended)."""
    t = torch.from_numpy(np.stack([np.asarray(m, bool) for m in masks]).astype(np.uint8))
    if tuple(t.shape[-2:]) != (resolution, resolution):
        t = F.interpolate(t[:, None].float(), size=(resolution, resolution), mode="nearest-exact")[:, 0]
    return t.bool()


def sample_queries(image: np.ndarray, target: dict[str, Any], resolution: int) -> list[_Query]:
    """Every (mask, sentence) query of one sample, at R x R."""
    masks, sentences = target.get("masks") or [], target.get("sentences") or []
    if not masks:
        return []
    if len(sentences) < len(masks):
        raise ValueError(f"sample {target.get('key')}: {len(sentences)} sentences for {len(masks)} masks")
    x = (image_tensor(image, (resolution, resolution)) * 255).round().to(torch.uint8)  # uint8: 4x less to buffer
    return [_Query(x, m, str(s)) for m, s in zip(_masks_at(masks, resolution), sentences, strict=False)]


def _interleaved(readers: Sequence[BenchmarkReader], generator: torch.Generator) -> Iterator[Sample]:
    """The samples of every reader once, the next reader drawn in proportion to the samples it has left."""
    streams = [reader_samples(r, generator) for r in readers]
    left = [max(len(r), 1) for r in readers]
    while streams:
        k = int(torch.multinomial(torch.tensor(left, dtype=torch.float64), 1, generator=generator))
        try:
            sample = next(streams[k])
        except StopIteration:
            del streams[k], left[k]
            continue
        left[k] = max(left[k] - 1, 1)
        yield sample


def _epoch_queries(readers: Sequence[BenchmarkReader], settings: RefsegFinetuneSettings,
                   generator: torch.Generator) -> Iterator[_Query]:
    """One epoch: every query of every training sample, shuffled through a buffer of `shuffle_buffer` queries."""
    queries = (q for image, target in _interleaved(readers, generator)
               for q in sample_queries(image, target, settings.resolution))
    yield from shuffled(queries, settings.shuffle_buffer, generator, swap_last=True)


def _stack(batch: list[_Query]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return torch.stack([q.image for q in batch]), torch.stack([q.mask for q in batch]), [q.sentence for q in batch]


# ------------------------------------------------------------------------------------------------
# training and scoring


def training_readers(benchmark: Benchmark, train_readers: Sequence[BenchmarkReader] = ()) -> list[BenchmarkReader]:
    """The benchmark's own train split (when it has one) and the extra training sets; a ValueError naming what
    to configure when there is nothing to train on."""
    if "refseg" not in benchmark.tasks:
        raise ValueError(f"refseg-finetune: benchmark {benchmark.name!r} has no referring-segmentation task (tasks: "
                         f"{', '.join(benchmark.tasks) or 'none'})")
    readers = ([benchmark.train] if benchmark.train is not None else []) + list(train_readers)
    if not readers:
        raise ValueError(f"refseg-finetune: nothing to train on for {benchmark.name!r}: it has no train split "
                         "(RefCOCO's val/testA/testB are evaluation splits) and no training set was given; set "
                         "eval.refseg_finetune.train to prepared training sets, e.g. [s3://.../refcoco/train, "
                         "s3://.../coco-stuff] (`versavit data prepare refcoco` / `coco-stuff`)")
    return readers


def train_refseg_model(model: RefsegFinetuneModel, readers: Sequence[BenchmarkReader],
                       settings: RefsegFinetuneSettings, device: torch.device, label: str = "") -> list[float]:
    """Fine-tune `model` in place on the queries of `readers`; returns the loss of every optimiser step.
    Call it inside a seeded context (`train_refseg` does); the data order has its own generator of settings.seed."""
    from versavit.train.optim import param_groups

    model.to(device).train()
    groups = param_groups(model.parameter_groups(), {"backbone": settings.lr_backbone, "rest": settings.lr_rest},
                          settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=settings.betas, weight_decay=settings.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    seg_loss = SegmentationLoss(settings.seg_bce, settings.seg_dice)
    generator = torch.Generator().manual_seed(settings.seed)
    num_samples = sum(len(r) for r in readers)
    warmup = settings.warmup_steps(num_samples)
    size = (settings.resolution, settings.resolution)
    names = ", ".join(f"{r.name}/{r.split} ({len(r)})" for r in readers)
    log.info("refseg-finetune %s on %s: %d epochs%s, batch %d, %d px, lr %g / %g, LoRA r=%d alpha=%d on %s",
             label, names, settings.epochs, f" capped at {settings.max_steps} steps" if settings.max_steps else "",
             settings.batch_size, settings.resolution, settings.lr_backbone, settings.lr_rest, settings.lora_rank,
             settings.lora_alpha, ", ".join(model.text.targets))
    losses: list[float] = []
    start = time.monotonic()
    for epoch in range(settings.epochs):
        if settings.max_steps and len(losses) >= settings.max_steps:
            break
        decay = 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
        before = len(losses)
        prefetch = Prefetch(batches(_epoch_queries(readers, settings, generator), settings.batch_size, _stack),
                            name="refseg-finetune-data")
        try:
            for images, masks, sentences in prefetch:
                scale = decay * min(1.0, (len(losses) + 1) / warmup) if warmup else decay
                for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = lr * scale
                images = images.to(device, non_blocking=True).float().div_(255)
                masks = masks.to(device)
                with bf16_autocast(device):
                    logits = model(images, sentences, size)
                loss, _ = seg_loss(logits.float(), masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                step = len(losses)
                if step % settings.log_every == 0:
                    rate = step * settings.batch_size / max(time.monotonic() - start, 1e-9)
                    log.info("refseg-finetune %s: step %d epoch %d/%d loss %.4f lr %.3g/%.3g (%.1f queries/s)",
                             label, step, epoch + 1, settings.epochs, losses[-1], optimizer.param_groups[0]["lr"],
                             optimizer.param_groups[-1]["lr"], rate)
                if settings.max_steps and step >= settings.max_steps:
                    break
        finally:
            prefetch.close()
        if len(losses) == before:
            raise ValueError(f"refseg-finetune: the training sets ({names}) hold no referred object (no masks)")
    return losses


class _WithoutEmbeddings:
    """A reader whose targets lose precomputed text embeddings (emb.npy): the tuned encoder embeds every query."""

    def __init__(self, reader: BenchmarkReader) -> None:
        self.reader = reader
        self.name, self.split = reader.name, reader.split

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[Sample]:
        for image, target in self.reader:
            yield image, {k: v for k, v in target.items() if k != "embeddings"}


def score_refseg_model(model: RefsegFinetuneModel, reader: BenchmarkReader, resolution: int,
                       device: torch.device | str | None = None, label: str = "") -> dict[str, Any]:
    """cIoU / mIoU of `model` on `reader` by `versavit.eval.refseg.evaluate_refseg` (the zero-shot evaluator's
    protocol and MaskMeter), every expression embedded by the model's (tuned) text encoder."""
    from versavit.eval.refseg import evaluate_refseg

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    return evaluate_refseg(model.scoring_model(), _WithoutEmbeddings(reader), resolution,  # type: ignore[arg-type]
                           embed=model.text.encode, device=device, label=label)


@dataclass
class FinetunedRefseg:
    """A fine-tuned model and how it was trained (the evaluator reuses it for every evaluation split of the same
    training sets: RefCOCO val / testA / testB, RefCOCO+ and RefCOCOg)."""

    candidate: str
    model: RefsegFinetuneModel
    origin: str  # "export" or "fresh" head
    losses: list[float]
    settings: RefsegFinetuneSettings
    train_sets: list[str]  # name/split (samples) of each training reader
    backbone_update: float  # relative L2 change of the backbone's weights
    adapter: str | None = None  # where the LoRA adapter was saved
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def train_refseg(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig,
                 train_readers: Sequence[BenchmarkReader] = (), device: torch.device | str | None = None,
                 out_dir: Path | None = None) -> FinetunedRefseg:
    """Build and fine-tune the model (see the module doc); with `out_dir`, the LoRA adapter is saved there
    (`refseg-finetune-<training sets>-<backbone>-lora/`, peft's save_pretrained)."""
    readers = training_readers(benchmark, train_readers)
    settings = RefsegFinetuneSettings.from_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    with deterministic(settings.seed):
        model, origin = build_refseg_model(candidate, cfg, settings, device)
        before = {n: p.detach().cpu().clone() for n, p in model.backbone.named_parameters()}
        losses = train_refseg_model(model, readers, settings, device, label=candidate.name)
        update = relative_change(before, model.backbone)
        del before
    train_sets = [f"{r.name}/{r.split} ({len(r)})" for r in readers]
    run = FinetunedRefseg(candidate.name, model, origin, losses, settings, train_sets, update)
    if out_dir is not None:
        tag = "+".join(dict.fromkeys(r.name for r in readers))
        adapter_dir = Path(out_dir) / safe_name(f"{EVALUATOR}-{tag}-{candidate.name}-lora")
        run.adapter = str(model.text.save_adapter(adapter_dir))
    text = model.text
    projection = "" if text.projection is None else f", projection {text.encoder_dim} -> {text.out_dim}"
    run.notes.append(f"{candidate.name}: {'the export' if origin == 'export' else 'a fresh'} refseg head, LoRA on "
                     f"{settings.text_encoder} ({', '.join(text.targets)}){projection}, {len(losses)} steps on "
                     f"{', '.join(train_sets)}, final loss {losses[-1]:.4f}, backbone weights moved {update:.2e} "
                     "(relative L2)")
    run.elapsed_s = time.monotonic() - started
    return run


def score_finetuned(run: FinetunedRefseg, benchmark: Benchmark, device: torch.device | str | None = None
                    ) -> EvalResult:
    """The EvalResult of a fine-tuned model on `benchmark.eval`: metrics "ciou", "miou" (fractions, shown in %),
    curve "train_loss", artifacts "examples" (image, gt, pred, sentence, iou of a few queries), "head", "adapter",
    "train_sets", "backbone_update", "settings", "objects"."""
    started = time.monotonic()
    scored = score_refseg_model(run.model, benchmark.eval, run.settings.resolution, device, label=run.candidate)
    metrics = scored["metrics"]
    result = EvalResult(EVALUATOR, benchmark.name, run.candidate)
    for key, spec in METRIC_SPECS.items():
        result.add(key, metrics[key], spec)
    result.curves["train_loss"] = list(run.losses)
    result.artifacts.update({"examples": scored["examples"], "head": run.origin, "adapter": run.adapter,
                             "train_sets": run.train_sets, "backbone_update": run.backbone_update,
                             "settings": run.settings.as_dict(), "objects": metrics.get("objects", 0)})
    result.notes.extend(run.notes)
    result.elapsed_s = run.elapsed_s + time.monotonic() - started
    log.info("refseg-finetune %s on %s: cIoU %.2f%% mIoU %.2f%% (%d queries)", run.candidate, benchmark.name,
             100 * metrics["ciou"], 100 * metrics["miou"], metrics.get("objects", 0))
    return result


def finetune_refseg(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig,
                    train_readers: Sequence[BenchmarkReader] = (), device: torch.device | str | None = None,
                    out_dir: Path | None = None) -> EvalResult:
    """Fine-tune `candidate`'s backbone + a refseg head + a LoRA text encoder on the benchmark's train split (if
    any) plus `train_readers`, then score cIoU / mIoU on `benchmark.eval` (see the module doc and
    `score_finetuned` for what the result holds). With `out_dir`: the LoRA adapter and
    `<out_dir>/refseg-finetune-<benchmark>-<backbone>.json` (+ .npz of the examples; `load_result` reads them)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = train_refseg(candidate, benchmark, cfg, train_readers, device, out_dir)
    result = score_finetuned(run, benchmark, device)
    if out_dir is not None:
        write_result(result, Path(out_dir))
    return result


# ------------------------------------------------------------------------------------------------
# results on disk (a fine-tune run as its own job hands its result back through these files)

_EXAMPLE_ARRAYS = ("image", "gt", "pred")  # in the .npz; each example's sentence and IoU are in the JSON
_EXAMPLE_VALUES = {"sentence": str, "iou": float}


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """`<out_dir>/refseg-finetune-<benchmark>-<backbone>.json` (metrics, curves, notes, artifacts, example sentences
    and IoUs) and `.npz` (example images and masks); returns the JSON's path."""
    return common.write_result(result, out_dir, arrays=_EXAMPLE_ARRAYS, values=_EXAMPLE_VALUES)


def load_result(path: Path) -> EvalResult:
    """An EvalResult from what `write_result` wrote (the examples too when the .npz is there)."""
    return common.load_result(path, arrays=_EXAMPLE_ARRAYS, values=_EXAMPLE_VALUES)


__all__: list[str] = ["METRIC_SPECS", "FinetunedRefseg", "LoraTextEncoder", "RefsegFinetuneModel",
                      "RefsegFinetuneSettings", "TextEncoderUnavailable", "attention_projections",
                      "build_refseg_model", "describe_protocol", "finetune_refseg", "load_result", "sample_queries",
                      "score_finetuned", "score_refseg_model", "train_refseg", "train_refseg_model",
                      "training_readers", "write_result"]
