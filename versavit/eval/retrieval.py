"""Image-text retrieval (paper Table 11): the ViT aligned to a frozen SigLIP2 text encoder on image-caption pairs,
then zero-shot text -> image and image -> text recall on COCO (Karpathy test) and the synthetic world's val split.

Protocol (the paper's section 9.5; `eval.retrieval`):

    image side  the candidate's ViT, its final-layer patch tokens pooled by an attention-pooling layer as SigLIP does
                ("MAP" head: one learned query attending over the tokens with torch.nn.MultiheadAttention, then
                LayerNorm and a residual MLP of 4x width, big_vision's vit.MAPHead / transformers'
                Siglip2MultiheadAttentionPoolingHead), then a linear map to `embed_dim` where the ViT's width differs
                (the paper's Qwen2-VL ViT is 1280 wide = embed_dim: none)
    text side   the text model of a SigLIP / SigLIP2 checkpoint (`text_encoder`; paper: siglip2-so400m-patch14-384),
                frozen, its pooled output (the last token through its head) as transformers computes it, texts
                tokenised as its docs say (padding="max_length", the model's 64 positions, truncated); then a
                trainable MLP (Linear, GELU, Linear) to `embed_dim`. The paper extracts the text embeddings offline:
                a frozen encoder gives the same numbers on the fly
    loss        SigLIP's sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023,
                Algorithm 1): logits = t * <x_i, y_j> + b over L2-normalised embeddings, t = exp(t'), labels +1 on
                the diagonal and -1 elsewhere, loss = -sum log sigmoid(label * logit) / batch; t' and b learned,
                initialised to log 10 and -10 as the paper prescribes
    variants    "projection-only": the ViT frozen (no gradient, eval mode); pooling layer, text MLP, t' and b at
                `lr_projection` (paper 5e-4). "backbone-trained": the ViT trained too, at `lr_backbone` (paper 1e-5),
                the rest at `lr` (paper 1e-4). The text encoder is frozen in both.
    optimiser   AdamW (biases, norms, t' and b without weight decay), weight decay, betas, warm-up ratio and
                gradient clipping from `train.optim`; linear warm-up then cosine to 0 over
                min(epochs * ceil(N / batch), max_steps) steps
    data        image-caption shards (`train`: the paper's CC3M + CC12M + YFCC15M; empty = the synthetic benchmark's
                own train split for it, else the run's caption data, `versavit.data.inputs.task_urls`): a sample's
                text is its json "caption" (or one of its "captions", drawn per epoch; or its "txt" field), samples
                without one are passed over; images resized to R x R (bilinear, antialiased), R = `resolution` or
                `eval.probe.depth_resolution`; shards permuted and samples shuffled through a `shuffle_buffer`
                buffer each epoch
    scoring     every image and caption of the evaluation split embedded once; similarity = cosine (t and b do not
                change a ranking). Text -> image: a caption's positive is its image; image -> text: an image counts
                at k when any of its captions is in its top k (the Karpathy-split protocol of ALBEF and BLIP,
                salesforce/BLIP train_retrieval.py `itm_eval`: the best-ranked ground-truth caption). Ties count
                against the positive (a constant scorer finds nothing). R@1, R@5 and R@10 in both directions.

Metrics: "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", ... for projection-only and the same with "_bb" for backbone-
trained (paper: COCO T->I R@1 46.9 / 54.8, I->T 60.5 / 69.5). One model per (candidate, variant, training set) is
trained and scored on every benchmark of the comparison (zero-shot transfer, as the paper's). Seeded (`eval.seed`)
and deterministic on CPU; the caller's RNG state is left as it was. On CUDA the ViT and the text encoder run under
bf16 autocast (pooling, projections and loss in fp32). One process, one device: `batch_size` is that device's batch
(the paper's "per GPU": with one GPU the sigmoid loss sees 128 pairs, not 128 x 128). A candidate held in memory
(the random-init baseline) is copied before training: it is never modified.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from versavit.data.tasks import image_tensor
from versavit.eval.finetune.common import bf16_autocast, deterministic, relative_change
from versavit.eval.results import EvalResult, MetricSpec
from versavit.models.backbone import VisionBackbone

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark

log = logging.getLogger(__name__)

EVALUATOR = "retrieval"
VARIANTS: tuple[str, ...] = ("projection-only", "backbone-trained")
SUFFIX = {"projection-only": "", "backbone-trained": "_bb"}  # metric name suffix per variant (MLflow-safe)
DIRECTIONS = {"t2i": "T→I", "i2t": "I→T"}
KS: tuple[int, ...] = (1, 5, 10)
LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP: t' = log 10 (t = 10)
LOGIT_BIAS_INIT = -10.0  # SigLIP: b = -10, so the many negatives start near their target
EXAMPLES = 3  # query captions kept for the report's figure
TOP = 4  # images retrieved per query in the figure
THUMB = 64  # side of a figure thumbnail (kept for every scored image: 12 KB each)


def metric_name(direction: str, k: int, variant: str) -> str:
    """e.g. ("t2i", 1, "projection-only") -> "t2i_r1"; backbone-trained -> "t2i_r1_bb"."""
    return f"{direction}_r{k}{SUFFIX[variant]}"


METRIC_SPECS: dict[str, MetricSpec] = {
    metric_name(d, k, v): MetricSpec(f"{label} R@{k}" + (" (ViT trained)" if v == "backbone-trained" else ""))
    for v in VARIANTS for d, label in DIRECTIONS.items() for k in KS
}


# ------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class RetrievalSettings:
    """One comparison's schedule (`eval.retrieval`, `eval.seed`, `train.optim`, `data`)."""

    text_encoder: str | None
    embed_dim: int
    variants: tuple[str, ...]
    lr: float
    lr_projection: float
    lr_backbone: float
    batch_size: int
    epochs: int
    max_steps: int | None
    resolution: int
    train: tuple[str, ...]
    weight_decay: float
    betas: tuple[float, float]
    warmup_ratio: float
    grad_clip: float
    shuffle_buffer: int
    log_every: int
    seed: int
    num_workers: int | str = 0
    max_corrupt_fraction: float = 0.05
    min_samples_before_corrupt_check: int = 50

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RetrievalSettings:
        r, optim = cfg.eval.retrieval, cfg.train.optim
        return cls(text_encoder=r.text_encoder, embed_dim=r.embed_dim, variants=tuple(dict.fromkeys(r.variants)),
                   lr=r.lr, lr_projection=r.lr_projection, lr_backbone=r.lr_backbone, batch_size=r.batch_size,
                   epochs=r.epochs, max_steps=r.max_steps, resolution=r.resolution or cfg.eval.probe.depth_resolution,
                   train=tuple(r.train), weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                   warmup_ratio=optim.warmup_ratio, grad_clip=optim.grad_clip, shuffle_buffer=r.shuffle_buffer,
                   log_every=r.log_every, seed=cfg.eval.seed, num_workers=cfg.data.num_workers,
                   max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                   min_samples_before_corrupt_check=cfg.data.min_samples_before_corrupt_check)

    def total_steps(self, num_samples: int) -> int:
        """Optimiser steps: every full batch of every epoch, capped by max_steps (the shards' manifests give N)."""
        steps = self.epochs * max(1, num_samples // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def heads_lr(self, variant: str) -> float:
        return self.lr if variant == "backbone-trained" else self.lr_projection

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def describe_protocol(settings: RetrievalSettings) -> str:
    """One sentence on the protocol as configured (the evaluator's protocol note)."""
    cap = f", at most {settings.max_steps} steps" if settings.max_steps else ""
    text = settings.text_encoder or "a tiny random SigLIP2 text model (eval.retrieval.text_encoder unset)"
    variants = []
    if "projection-only" in settings.variants:
        variants.append(f"projection-only (ViT frozen, lr {settings.lr_projection:g})")
    if "backbone-trained" in settings.variants:
        variants.append(f"backbone-trained (ViT lr {settings.lr_backbone:g}, rest {settings.lr:g}; metrics *_bb)")
    return (f"Image-text retrieval: attention pooling on the ViT's final tokens + the frozen text model of {text} "
            f"with an MLP, both to {settings.embed_dim}-d, SigLIP sigmoid loss (t' = log 10, b = -10); "
            f"{' and '.join(variants)}; AdamW, {100 * settings.warmup_ratio:g}% warm-up then cosine, batch "
            f"{settings.batch_size}, {settings.epochs} epochs{cap} at {settings.resolution} px; recall@1/5/10 in both "
            "directions, image -> text counting any of an image's captions.")


# ------------------------------------------------------------------------------------------------
# recall


def retrieval_ranks(score: Callable[[slice, slice], torch.Tensor], num_images: int, txt2img: torch.Tensor,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the positives: (per caption, among all images; per image, of its best caption among all
    captions). A rank is the number of negatives scoring at least as high as the positive (ties count against it).

    score(image slice, caption slice) -> [images, captions] similarities; computed in chunks, so 5k x 25k never
    sits in memory at once. txt2img: [num_captions] the image index of each caption; every image needs one."""
    txt2img = txt2img.long().cpu()
    num_texts = int(txt2img.numel())
    counts = torch.bincount(txt2img, minlength=num_images)
    if num_texts == 0 or counts.numel() != num_images or bool((counts == 0).any()):
        raise ValueError(f"every image needs at least one caption ({num_images} images, {num_texts} captions, txt2img "
                         "indices must lie in [0, num_images))")
    t2i = torch.empty(num_texts, dtype=torch.long)
    for s in range(0, num_texts, chunk):
        sim = score(slice(0, num_images), slice(s, s + chunk)).float().cpu()  # [images, c]
        cols = torch.arange(sim.shape[1])
        positive = sim[txt2img[s:s + chunk], cols]
        t2i[s:s + chunk] = (sim >= positive[None]).sum(0) - 1  # the positive itself is >= itself
    i2t = torch.empty(num_images, dtype=torch.long)
    for s in range(0, num_images, chunk):
        sim = score(slice(s, s + chunk), slice(0, num_texts)).float().cpu()  # [c, captions]
        rows = torch.arange(s, s + sim.shape[0])
        positive = txt2img[None, :] == rows[:, None]
        best = sim.masked_fill(~positive, -math.inf).amax(1)
        i2t[s:s + sim.shape[0]] = ((sim >= best[:, None]) & ~positive).sum(1)
    return t2i, i2t


def recalls(t2i_ranks: torch.Tensor, i2t_ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"t2i_r1": fraction of captions whose image ranks first, ..., "i2t_r10": ...}."""
    out = {}
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            out[f"{direction}_r{k}"] = float((ranks < k).float().mean())
    return out


def recall_at_k(sim: torch.Tensor | np.ndarray, txt2img: Sequence[int] | torch.Tensor,
                ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k both ways from a full [num_images, num_captions] similarity matrix (see `retrieval_ranks`)."""
    sim = torch.as_tensor(np.asarray(sim), dtype=torch.float32)
    t2i, i2t = retrieval_ranks(lambda i, t: sim[i, t], sim.shape[0], torch.as_tensor(txt2img))
    return recalls(t2i, i2t, ks)


# ------------------------------------------------------------------------------------------------
# text encoder


# model_type of a checkpoint -> transformers class of its text model (full SigLIP / SigLIP2 checkpoints or their
# text-model folders; the fixed-resolution SigLIP2 releases such as siglip2-so400m-patch14-384 are SigLIP models)
_TEXT_MODELS = {"siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel",
                "siglip2": "Siglip2TextModel", "siglip2_text_model": "Siglip2TextModel"}


class TextEncoderUnavailable(RuntimeError):
    """The configured text encoder cannot be loaded (offline hub, wrong path): the evaluator skips, with this."""


class TextTower(nn.Module):
    """A frozen SigLIP / SigLIP2 text model and its tokenizer: `forward(texts)` -> pooled embeddings [n, dim]."""

    def __init__(self, model: nn.Module, tokenizer: Any, source: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.max_length = int(model.config.max_position_embeddings)
        self.dim = int(model.head.out_features)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        self.model.eval()  # frozen: dropout off whatever the caller's mode
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        # as transformers' SigLIP docs say: padding="max_length", as the model was trained
        inputs = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with bf16_autocast(self.device):
            return self.model(**inputs).pooler_output.float()


def load_text_tower(ref: str) -> TextTower:
    """The text model + tokenizer of a SigLIP / SigLIP2 checkpoint (hub id, folder, or staged s3:// copy)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from versavit.weights import local_model_path

    try:
        path = local_model_path(ref)
        model_type = AutoConfig.from_pretrained(path).model_type
    except Exception as exc:
        raise TextEncoderUnavailable(f"retrieval: cannot load the text encoder {ref!r} ({str(exc).splitlines()[0]}); "
                                     "set eval.retrieval.text_encoder to a SigLIP / SigLIP2 checkpoint (or stage "
                                     "it with `versavit weights stage`)") from exc
    if model_type not in _TEXT_MODELS:
        raise ValueError(f"retrieval: eval.retrieval.text_encoder {ref!r} is a {model_type!r} model; expected a "
                         f"SigLIP or SigLIP2 checkpoint (model_type {sorted(_TEXT_MODELS)})")
    model, info = getattr(transformers, _TEXT_MODELS[model_type]).from_pretrained(path, dtype=torch.float32,
                                                                                  output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:  # transformers would leave them random, with a warning
        missing = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
        raise ValueError(f"retrieval: the text model in {ref!r} lacks {len(missing)} weight(s), e.g. {missing[:3]}: "
                         "not a SigLIP / SigLIP2 checkpoint with a text tower")
    return TextTower(model, AutoTokenizer.from_pretrained(path), ref)


def tiny_tokenizer() -> Any:
    """A Siglip2Tokenizer (lower-casing BPE, Gemma's special tokens) whose merges are learnt from the synthetic
    world's words, so its captions are mostly one token a word. Deterministic."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    from versavit.data.synthetic import COLORS, RELATIONS, SHAPES, SIZES

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Siglip2Tokenizer's ids 0..4
    words = [*COLORS, *SIZES, *SHAPES, *(s + "s" for s in SHAPES), *RELATIONS, "a", "an", "the", "room", "with",
             "object", "objects", "and", "is", "of", "closest", "farthest", "there", "in", "picture", "photo",
             "no", "one", "two", "three", "four", "five", "six"]
    corpus = [" ".join(words)] * 4 + [f"a room with 3 objects: a {s} {c} {sh}." for c in COLORS for s in SIZES
                                      for sh in SHAPES]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Siglip2Tokenizer's normalisation; merges learnt within words (the split) so none spans two
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;?!'-▁")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, min_frequency=1, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Siglip2Tokenizer(vocab=model["vocab"], merges=merges)


def tiny_text_tower(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2) -> TextTower:
    """A random SigLIP2 text model (hidden 32, 2 layers, 64 positions) with `tiny_tokenizer`, built in memory under
    `seed` without touching the caller's RNG: the toy runs' text encoder (outputs meaningless but fixed)."""
    from transformers import Siglip2TextConfig, Siglip2TextModel

    tokenizer = tiny_tokenizer()
    config = Siglip2TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=64,
                               projection_size=hidden, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Siglip2TextModel(config)
    return TextTower(model, tokenizer, f"tiny random SigLIP2 text model (seed {seed})")


def save_tiny_text_encoder(path: str | Path, seed: int = 0, layout: str = "text") -> str:
    """`tiny_text_tower(seed)` saved with `save_pretrained` with its tokenizer, loadable by `load_text_tower`:
    layout "text" (the text model alone), "siglip2" (a whole tiny Siglip2Model, as google/siglip2-*-naflex) or
    "siglip" (a whole tiny SiglipModel, as the fixed-resolution google/siglip2-so400m-patch14-384)."""
    import transformers

    tower = tiny_text_tower(seed)
    path = Path(path)
    if layout == "text":
        tower.model.save_pretrained(str(path))
    elif layout in ("siglip", "siglip2"):
        prefix = "Siglip2" if layout == "siglip2" else "Siglip"
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "projection_size", "pad_token_id", "bos_token_id", "eos_token_id")
        text = {k: v for k, v in tower.model.config.to_dict().items() if k in keys}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "patch_size": 16, **({"num_patches": 16} if layout == "siglip2" else {"image_size": 32})}
        config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, f"{prefix}Model")(config)
        model.text_model.load_state_dict(tower.model.state_dict())
        model.save_pretrained(str(path))
    else:
        raise ValueError(f"layout must be text, siglip2 or siglip, got {layout!r}")
    tower.tokenizer.save_pretrained(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------
# model


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling ("MAP") head: a learned query attends over the tokens, then LayerNorm
    and a residual MLP (4x width, GELU); a linear map to `out_dim` where it differs from the token width."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.normal_(self.probe, std=dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.proj = nn.Linear(dim, out_dim) if out_dim != dim else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, dim] -> [B, out_dim]."""
        query = self.probe.expand(tokens.shape[0], -1, -1)
        x = self.attention(query, tokens, tokens, need_weights=False)[0]
        x = x + self.mlp(self.norm(x))
        return self.proj(x[:, 0])


class RetrievalModel(nn.Module):
    """ViT + attention pooling and frozen text tower + MLP, both to `embed_dim`, with SigLIP's t' and b."""

    def __init__(self, backbone: VisionBackbone, text: TextTower, embed_dim: int, train_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.text = text
        self.pool = AttentionPool(backbone.embed_dim, backbone.num_heads, embed_dim)
        self.text_proj = nn.Sequential(nn.Linear(text.dim, embed_dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor([LOGIT_SCALE_INIT]))  # t'
        self.logit_bias = nn.Parameter(torch.tensor([LOGIT_BIAS_INIT]))  # b
        self.train_backbone = train_backbone
        if not train_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> RetrievalModel:
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # frozen: as the features are in every other frozen-backbone protocol
        return self

    def heads(self) -> list[nn.Parameter]:
        """What trains in both variants: pooling, text MLP, t' and b."""
        return [*self.pool.parameters(), *self.text_proj.parameters(), self.logit_scale, self.logit_bias]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [0, 1] -> L2-normalised [B, embed_dim]."""
        grad = self.train_backbone and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), bf16_autocast(images.device):
            maps = self.backbone(images).maps
        tokens = maps.flatten(2).transpose(1, 2).float()  # [B, h*w, D]: the final layer's patch tokens
        return F.normalize(self.pool(tokens), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> L2-normalised [n, embed_dim] (the text tower frozen, its MLP trained)."""
        return F.normalize(self.text_proj(self.text(texts)), dim=-1)

    def logits(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return images @ texts.T * self.logit_scale.exp() + self.logit_bias


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss (Zhai et al. 2023, Algorithm 1) on a [n, n] logit matrix whose diagonal holds the pairs:
    -sum_ij log sigmoid(z_ij * logits_ij) / n, z = +1 on the diagonal, -1 elsewhere."""
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def build_model(candidate: Candidate, text: TextTower, variant: str, settings: RetrievalSettings,
                gradient_checkpointing: bool = False) -> RetrievalModel:
    """The model to train (fp32, CPU): a copy of the candidate's ViT (frozen for projection-only), fresh pooling and
    text MLP initialised from `settings.seed` without touching the caller's RNG."""
    if variant not in VARIANTS:
        raise ValueError(f"retrieval: unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    # a copy in both variants: the candidate's loaded module is shared with the other evaluators (never frozen,
    # moved or trained in place)
    backbone = copy.deepcopy(candidate.load_backbone())
    train_backbone = variant == "backbone-trained"
    if train_backbone and not any(p.requires_grad for p in backbone.parameters()):
        raise ValueError(f"retrieval: {candidate.name}'s backbone has no trainable parameter")
    unit = backbone.patch_size * backbone.merge_size
    if settings.resolution % unit:
        raise ValueError(f"retrieval: resolution {settings.resolution} is not a multiple of {unit} ({candidate.name}: "
                         f"patch {backbone.patch_size} x merge {backbone.merge_size}); set eval.retrieval.resolution")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = RetrievalModel(backbone.float(), text, settings.embed_dim, train_backbone)
    if train_backbone:
        backbone.set_gradient_checkpointing(gradient_checkpointing)
    return model


# ------------------------------------------------------------------------------------------------
# data


def sample_captions(meta: dict[str, Any], sample: Any = None) -> list[str]:
    """The caption(s) of an image-caption sample: json "captions" (a list), else json "caption", else a "txt"
    field (img2dataset's layout)."""
    texts = meta.get("captions")
    if isinstance(texts, str):
        texts = [texts]
    if not texts and meta.get("caption"):
        texts = [meta["caption"]]
    if not texts and sample is not None and "txt" in sample:
        texts = [sample["txt"]]
    return [str(t).strip() for t in texts or [] if str(t).strip()]


def _sample_image(sample: Any) -> np.ndarray:
    for name in ("rgb.jpg", "rgb.png", "jpg", "jpeg", "png"):
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')} has no image field")


def _pair_view(sample: Any, resolution: int, seed: int) -> tuple[torch.Tensor, str] | None:
    """A decoded shard sample -> (image [3, R, R] in [0, 1], one of its captions), or None without a caption."""
    texts = sample_captions(sample.get("json") or {}, sample)
    if not texts:
        return None
    key = zlib.crc32(str(sample.get("__key__", "")).encode())
    pick = int(np.random.default_rng([seed, key]).integers(len(texts))) if len(texts) > 1 else 0
    return image_tensor(_sample_image(sample), (resolution, resolution)), texts[pick]


@dataclass
class CaptionPairs:
    """Image-caption pairs streamed from shard datasets (folders with manifest.json, .tar URLs or brace patterns):
    `epoch(e)` yields (image [3, R, R], caption) once over every shard, in an order of (seed, e)."""

    urls: Sequence[str]
    resolution: int
    seed: int = 0
    shuffle_buffer: int = 2048
    num_workers: int | str = 0
    max_corrupt_fraction: float = 0.05
    min_samples: int = 50
    shards: list[str] = field(init=False)

    def __post_init__(self) -> None:
        from versavit.data.shards import resolve_shards

        self.shards = resolve_shards(list(self.urls))

    def num_samples(self) -> int | None:
        """Samples listed in the shards' manifests (an upper bound: captionless samples are passed over); None when
        a shard has no manifest entry (a bare .tar URL)."""
        from versavit.data.shards import shard_infos

        infos = shard_infos(self.shards)
        return None if any(i is None for i in infos) else sum(i.num_samples for i in infos)  # type: ignore[union-attr]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, str]]:
        from versavit.data.loader import CorruptionStats, loader_workers, make_loader, shard_pipeline

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        stats = CorruptionStats(self.max_corrupt_fraction, self.min_samples, name="retrieval")
        pipeline = shard_pipeline([self.shards[i] for i in order], stats=stats, split_by_node=False,
                                  seed=self.seed * 1000 + epoch, shuffle_buffer=self.shuffle_buffer,
                                  transform=functools.partial(_pair_view, resolution=self.resolution,
                                                              seed=self.seed * 1000 + epoch))
        workers = loader_workers(self.num_workers, training=True)
        for pair in make_loader(pipeline, num_workers=workers):
            if pair is not None:
                yield pair


class CaptionedImages:
    """An evaluation split of image-caption shards as (image, {"key", "captions"}) samples: the synthetic world's
    val split (its one scene caption per image), or any shard dataset with captions."""

    name = "captions"
    tasks = ("retrieval",)

    def __init__(self, url: str, split: str = "val", name: str = "captions") -> None:
        from versavit.data.shards import read_manifest

        self.url, self.split, self.name = url.rstrip("/"), split, name
        self.manifest = read_manifest(self.url)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        from versavit.data.loader import shard_pipeline

        # in shard order, one process: the same order on every pass; only the image and json are decoded
        for item in shard_pipeline(self.manifest.shard_urls(), split_by_node=False, transform=_captioned):
            if item is not None:
                yield item


def _captioned(sample: Any) -> tuple[np.ndarray, dict[str, Any]] | None:
    texts = sample_captions(sample.get("json") or {}, sample)
    return (_sample_image(sample), {"key": sample["__key__"], "captions": texts}) if texts else None


def scoring_reader(benchmark: Benchmark) -> Iterable[tuple[np.ndarray, dict[str, Any]]]:
    """What retrieval scores on a benchmark: its evaluation split's images and captions (the synthetic world's
    reader gives no captions: its shards are read for them)."""
    if benchmark.name == "synthetic":
        return CaptionedImages(benchmark.eval.url, benchmark.eval.split, "synthetic")  # type: ignore[attr-defined]
    if "retrieval" not in benchmark.tasks:
        raise ValueError(f"retrieval: benchmark {benchmark.name!r} has no captions (tasks: "
                         f"{', '.join(benchmark.tasks) or 'none'}); use coco-karpathy or synthetic")
    return benchmark.eval


def training_urls(benchmark: Benchmark, cfg: RunConfig) -> list[str]:
    """`eval.retrieval.train`; else the synthetic benchmark's own train split; else the run's caption data."""
    if cfg.eval.retrieval.train:
        return list(cfg.eval.retrieval.train)
    if benchmark.name == "synthetic" and benchmark.train is not None:
        return [benchmark.train.url]  # type: ignore[attr-defined]
    from versavit.data.inputs import task_urls

    try:
        return task_urls(cfg, "caption")
    except ValueError as exc:
        raise ValueError(f"retrieval: no image-caption pairs to train on ({exc}); set eval.retrieval.train to "
                         "prepared caption shards (the paper: CC3M + CC12M + YFCC15M)") from None


# ------------------------------------------------------------------------------------------------
# training and scoring


def _batches(pairs: Iterable[tuple[torch.Tensor, str]], batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Full batches only: the sigmoid loss's negatives are the batch."""
    images: list[torch.Tensor] = []
    texts: list[str] = []
    for image, text in pairs:
        images.append(image)
        texts.append(text)
        if len(images) == batch_size:
            yield torch.stack(images), texts
            images, texts = [], []


def train_retrieval_model(model: RetrievalModel, pairs: CaptionPairs, settings: RetrievalSettings, variant: str,
                          device: torch.device, label: str = "") -> list[float]:
    """Train `model` in place on `pairs`; returns the sigmoid loss of every optimiser step."""
    from versavit.train.optim import param_groups, warmup_cosine

    num_samples = pairs.num_samples()
    if num_samples is None and not settings.max_steps:
        raise ValueError(f"retrieval: training shards without a manifest ({pairs.shards[:2]}...): the steps of "
                         f"{settings.epochs} epochs cannot be counted; set eval.retrieval.max_steps")
    total = settings.total_steps(num_samples) if num_samples is not None else settings.max_steps
    named = {"heads": model.heads()}
    lrs = {"heads": settings.heads_lr(variant)}
    if model.train_backbone:
        named["backbone"], lrs["backbone"] = list(model.backbone.parameters()), settings.lr_backbone
    groups = param_groups(named, lrs, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=settings.betas, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, settings.warmup_ratio, "cosine"))
    params = [p for g in groups for p in g["params"]]
    losses: list[float] = []
    model.to(device).train()
    log.info("retrieval %s %s: %d steps (batch %d, %d epochs%s) at %d px, lr %g%s", label, variant, total,
             settings.batch_size, settings.epochs, f", capped at {settings.max_steps}" if settings.max_steps else "",
             settings.resolution, lrs["heads"], f" / ViT {settings.lr_backbone:g}" if model.train_backbone else "")
    start, epoch = time.monotonic(), 0
    while len(losses) < total:
        before = len(losses)
        for images, texts in _batches(pairs.epoch(epoch), settings.batch_size):
            images = images.to(device, non_blocking=True)
            loss = sigmoid_loss(model.logits(model.encode_images(images), model.encode_texts(texts)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step = len(losses)
            if step % settings.log_every == 0 or step == total:
                rate = step * settings.batch_size / max(time.monotonic() - start, 1e-9)
                log.info("retrieval %s %s: step %d/%d epoch %d loss %.4f t %.2f b %.2f (%.1f pairs/s)", label, variant,
                         step, total, epoch + 1, losses[-1], float(model.logit_scale.detach().exp()),
                         float(model.logit_bias.detach()), rate)
            if step >= total:
                break
        epoch += 1
        if len(losses) == before:
            raise ValueError(f"retrieval: the training pairs ({pairs.shards[:2]}...) gave no full batch of "
                             f"{settings.batch_size} captioned images")
    return losses


@dataclass
class Embedded:
    """A scored split: normalised embeddings, which image each caption describes, and the ranks."""

    images: torch.Tensor  # [n_img, E]
    texts: torch.Tensor  # [n_txt, E]
    txt2img: torch.Tensor  # [n_txt]
    captions: list[str]
    thumbs: list[np.ndarray]  # small copies of the images for the figure
    t2i_ranks: torch.Tensor
    i2t_ranks: torch.Tensor

    def metrics(self, ks: Sequence[int] = KS) -> dict[str, float]:
        return recalls(self.t2i_ranks, self.i2t_ranks, ks)


def _thumb(image: np.ndarray) -> np.ndarray:
    return (image_tensor(image, (THUMB, THUMB)) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.inference_mode()
def embed_split(model: RetrievalModel, samples: Iterable[tuple[np.ndarray, dict[str, Any]]], resolution: int,
                batch_size: int, device: torch.device) -> Embedded:
    """Embed every image and caption of an evaluation split (samples with "captions") and rank both ways."""
    model.to(device).eval()
    image_embs: list[torch.Tensor] = []
    captions: list[str] = []
    txt2img: list[int] = []
    thumbs: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    size = (resolution, resolution)

    def flush() -> None:
        if pending:
            image_embs.append(model.encode_images(torch.stack(pending).to(device)).float().cpu())
            pending.clear()

    for index, (image, target) in enumerate(samples):
        texts = [str(t) for t in target.get("captions") or []]
        if not texts:
            raise ValueError(f"retrieval: sample {target.get('key', index)} has no captions")
        pending.append(image_tensor(image, size))
        thumbs.append(_thumb(image))
        captions += texts
        txt2img += [index] * len(texts)
        if len(pending) == batch_size:
            flush()
    flush()
    if not image_embs:
        raise ValueError("retrieval: the evaluation split holds no image")
    images = torch.cat(image_embs)
    texts = torch.cat([model.encode_texts(captions[s:s + batch_size]).float().cpu()
                       for s in range(0, len(captions), batch_size)])
    txt = torch.tensor(txt2img)
    t2i, i2t = retrieval_ranks(lambda i, t: images[i] @ texts[t].T, images.shape[0], txt)
    return Embedded(images, texts, txt, captions, thumbs, t2i, i2t)


def examples(embedded: Embedded, n: int = EXAMPLES, top: int = TOP) -> dict[str, Any]:
    """The first caption of the first `n` images with the `top` images it retrieves (for the figure)."""
    out: dict[str, list[Any]] = {"caption": [], "gt": [], "top": [], "hit": []}
    for image in range(min(n, embedded.images.shape[0])):
        j = int(torch.nonzero(embedded.txt2img == image)[0])
        order = torch.argsort(embedded.images @ embedded.texts[j], descending=True)[:top].tolist()
        out["caption"].append(embedded.captions[j])
        out["gt"].append(embedded.thumbs[image])
        out["top"].append([embedded.thumbs[i] for i in order])
        out["hit"].append([i == image for i in order])
    return out


@dataclass
class TrainedVariant:
    """One variant trained for one candidate: the model, its loss curve and how far the ViT moved."""

    variant: str
    model: RetrievalModel
    losses: list[float]
    backbone_update: float
    train_urls: list[str]
    text_encoder: str


def train_variant(candidate: Candidate, text: TextTower, variant: str, pairs: CaptionPairs,
                  settings: RetrievalSettings, device: torch.device, gradient_checkpointing: bool = False
                  ) -> TrainedVariant:
    """Build and train one variant for `candidate` (seeded; the caller's RNG state kept)."""
    with deterministic(settings.seed, algorithms=device.type == "cpu"):
        model = build_model(candidate, text, variant, settings, gradient_checkpointing)
        before = {n: p.detach().cpu().clone() for n, p in model.backbone.named_parameters()}
        losses = train_retrieval_model(model, pairs, settings, variant, device, label=candidate.name)
        update = relative_change(before, model.backbone)
    return TrainedVariant(variant, model, losses, update, list(pairs.urls), text.source)


def score(trained: Sequence[TrainedVariant], benchmark: Benchmark, candidate_name: str,
          settings: RetrievalSettings, device: torch.device) -> EvalResult:
    """Each trained variant's recall on `benchmark` (one EvalResult, metrics suffixed per variant)."""
    result = EvalResult(EVALUATOR, benchmark.name, candidate_name)
    reader = scoring_reader(benchmark)
    for tv in sorted(trained, key=lambda t: VARIANTS.index(t.variant)):
        with deterministic(settings.seed, algorithms=device.type == "cpu"):
            embedded = embed_split(tv.model, reader, settings.resolution, settings.batch_size, device)
        for key, value in embedded.metrics().items():
            direction, k = key.split("_r")
            name = metric_name(direction, int(k), tv.variant)
            result.add(name, value, METRIC_SPECS[name])
        result.curves[f"train_loss{SUFFIX[tv.variant]}"] = tv.losses
        result.artifacts.setdefault("backbone_update", {})[tv.variant] = tv.backbone_update
        result.artifacts.setdefault("examples", {})[tv.variant] = examples(embedded)
        result.artifacts["images"], result.artifacts["captions"] = embedded.images.shape[0], len(embedded.captions)
        result.notes.append(f"{candidate_name} {tv.variant}: {len(tv.losses)} steps on {', '.join(tv.train_urls)}, "
                            f"final loss {tv.losses[-1]:.4f}, ViT weights moved {tv.backbone_update:.2e} (relative "
                            f"L2); {embedded.images.shape[0]} images, {len(embedded.captions)} captions scored")
        log.info("retrieval %s %s on %s: T→I R@1 %.1f%% I→T R@1 %.1f%% (%d images, %d captions)", candidate_name,
                 tv.variant, benchmark.name, 100 * result.value(metric_name("t2i", 1, tv.variant)),
                 100 * result.value(metric_name("i2t", 1, tv.variant)), embedded.images.shape[0],
                 len(embedded.captions))
    result.artifacts["settings"] = settings.as_dict()
    result.artifacts["text_encoder"] = trained[0].text_encoder if trained else None
    return result


def text_tower(settings: RetrievalSettings) -> TextTower:
    """The configured text encoder, or the tiny random one when none is set."""
    if settings.text_encoder:
        return load_text_tower(settings.text_encoder)
    log.warning("retrieval: eval.retrieval.text_encoder is unset: a tiny random SigLIP2 text model stands in (toy "
                "runs only; the paper uses siglip2-so400m-patch14-384)")
    return tiny_text_tower(settings.seed)


def evaluate_retrieval(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig,
                       device: torch.device | str | None = None, out_dir: Path | None = None,
                       cache: dict[tuple, TrainedVariant] | None = None) -> EvalResult:
    """Train every configured variant for `candidate` on the benchmark's training pairs (`training_urls`) and score
    recall@k on its evaluation split. `cache` (the evaluator's) holds trained variants by (candidate, variant,
    training set, settings), so a comparison over several benchmarks trains each once. With `out_dir`, writes
    `<out_dir>/retrieval-<benchmark>-<backbone>.json` (metrics, curves, notes, settings)."""
    settings = RetrievalSettings.from_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    urls = training_urls(benchmark, cfg)
    cache = {} if cache is None else cache
    text: TextTower | None = None
    trained = []
    for variant in settings.variants:
        key = (candidate.name, candidate.source, variant, tuple(urls), json.dumps(settings.as_dict(), sort_keys=True))
        if key not in cache:
            text = text or text_tower(settings)
            pairs = CaptionPairs(urls, settings.resolution, settings.seed, settings.shuffle_buffer,
                                 settings.num_workers, settings.max_corrupt_fraction,
                                 settings.min_samples_before_corrupt_check)
            cache[key] = train_variant(candidate, text, variant, pairs, settings, device,
                                       cfg.model.backbone.gradient_checkpointing)
        trained.append(cache[key])
    try:
        result = score(trained, benchmark, candidate.name, settings, device)
    finally:
        for tv in trained:
            tv.model.to("cpu")  # the next evaluator gets the device back
    result.elapsed_s = time.monotonic() - started
    if out_dir is not None:
        write_result(result, Path(out_dir))
    return result


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """`<out_dir>/retrieval-<benchmark>-<backbone>.json`: metrics, curves, notes and settings (no images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in f"{result.benchmark}-{result.backbone}")
    doc = {"evaluator": result.evaluator, "benchmark": result.benchmark, "backbone": result.backbone,
           "metrics": result.as_dict(), "curves": result.curves, "notes": result.notes,
           "elapsed_s": result.elapsed_s,
           "artifacts": {k: v for k, v in result.artifacts.items() if k != "examples"}}
    path = out_dir / f"{EVALUATOR}-{safe}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


__all__: list[str] = ["KS", "METRIC_SPECS", "VARIANTS", "AttentionPool", "CaptionPairs", "CaptionedImages",
                      "RetrievalModel", "RetrievalSettings", "TextEncoderUnavailable", "TextTower", "TrainedVariant",
                      "build_model", "describe_protocol", "embed_split", "evaluate_retrieval", "load_text_tower",
                      "metric_name", "recall_at_k", "recalls", "retrieval_ranks", "save_tiny_text_encoder",
                      "sigmoid_loss", "tiny_text_tower", "train_retrieval_model", "train_variant", "training_urls",
                      "write_result"]
