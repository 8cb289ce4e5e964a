"""Capacity plan of a run (`versavit plan`): before the GPUs are asked for, what each micro-step needs per GPU,
whether it fits, the largest batch that would, how long each stage takes and what the run writes to object
storage. Every figure is computed from the config, none is measured on a GPU (bench/gpu_memory.py and
bench/gpu_step.py measure them when one is at hand).

Memory per GPU, for each stage and task micro-step (ZeRO, Rajbhandari et al. 2020, as DeepSpeed 0.19's
stage_1_and_2.py implements it for the config versavit.train.engine builds), in the training dtype's bytes p
(bf16: 2):

    parameters   every parameter of the stage's model x p, replicated on every GPU
    gradients    trainable x p; partitioned over the data-parallel world W (nnodes x nproc_per_node) at ZeRO 2
    optimiser    trainable x (4 fp32 master, bf16 only + 8 AdamW moments); partitioned at ZeRO 1 and 2
    buckets      DeepSpeed's contiguous gradient buckets, reduce_bucket_size x p each, two with overlap_comm;
                 plus the largest trainable tensor's gradient before it is copied in. allgather_bucket_size
                 allocates nothing: the updated parameters are gathered with all_gather_into_tensor straight
                 into DeepSpeed's flat parameter buffer
    activations  what autograd keeps for backward, traced (versavit.train.trace) at full width and
                 resolution on a reduced-depth analogue of the stage's model (1-3 ViT blocks and LLM layers of
                 each kind: trainable, frozen on the gradient's path, frozen below it), scaled to full depth:
                 rest + sum over kinds of (layers of that kind x the bytes one such layer keeps). With gradient
                 checkpointing a layer keeps only its input (tokens x width x p) and one layer's activations
                 exist again while it is recomputed in backward. Per sample (traced at batch 1; every kept
                 tensor is per sample), times the task's per-GPU batch
    logits       caption: the fp32 log-probabilities the cross-entropy keeps (supervised tokens x vocab x 4),
                 twice: their gradient exists too at the start of backward
    reserved     CUDA context, cuBLAS workspaces and NCCL buffers: RESERVED_GIB, assumed, not measured

Worst-case inputs: caption images at caption_max x caption_max and texts at max_text_tokens (of which the
answer gets all but the question's tokens, as CaptionHead truncates); depth and refseg at their resolutions.

FLOPs per sample: torch's FlopCounterMode over the traced forward + backward of the analogue (matmuls,
convolutions and attention, 2 FLOPs per multiply-add; elementwise work not counted; causal attention counted
in full), with the layers scaled like the bytes: rest + sum over kinds of (count x one layer's FLOPs). These are
model FLOPs: checkpointing's recomputation is not in them, as MFU defines it. Time at a stated MFU:
FLOPs / (MFU x peak dense bf16 FLOP/s of the GPU, GPUS). Steps as the loop counts them
(versavit.train.loop.plan_stage): one epoch of the largest task, from the dataset manifests when they can be
read, else the paper's dataset sizes (PAPER_SAMPLES).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from versavit import storage
from versavit.config import RunConfig
from versavit.config.schema import LossConfig
from versavit.config.trainable import BLOCKS_PREFIXES
from versavit.models import siglip2
from versavit.models.backbone import _KINDS, _vision_config, tower_class, wrap_tower
from versavit.models.heads.caption import CaptionHead, Projector, tiny_llm_config
from versavit.models.heads.depth import DepthHead
from versavit.models.heads.refseg import RefSegHead
from versavit.models.multitask import VersaViT
from versavit.models.synergy import SynergyModule
from versavit.models.tokenizer import IM_END, build_tiny_tokenizer
from versavit.train.engine import deepspeed_config
from versavit.train.trace import run_traced, shadow

log = logging.getLogger(__name__)
GIB = 2**30
RESERVED_GIB = 2.0  # CUDA context (~0.5 GiB), cuBLAS workspaces and NCCL buffers: an assumption, not measured
DEFAULT_MFU = 0.35


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_bf16_flops: float  # dense (no sparsity) bf16 tensor-core FLOP/s
    memory_gib: float


# Dense bf16 tensor-core peaks from NVIDIA's spec sheets, which print the 2:4-sparse figure (twice these) for the
# Hopper parts: H20 product brief (FP16/BF16 tensor core 148 TFLOPS, 96 GB HBM3); H100 SXM5 datasheet (BF16 1,979
# TFLOPS with sparsity -> 989 dense, 80 GB); H200 SXM datasheet (the H100's compute, 141 GB); A100 SXM datasheet
# (BF16 312 TFLOPS dense, 624 sparse; 80 GB). Memory: approximately what the GPU reports as usable, a little under the
# sheet's GB (an H100's 80 GB shows 79.6 GiB); set launch.resources.gpu_memory_gib to what your nodes report.
GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("H20", 148e12, 95.5),
    GpuSpec("H100", 989e12, 79.6),
    GpuSpec("H200", 989e12, 139.8),
    GpuSpec("A100", 312e12, 79.2),
)}

# Sample counts of the paper's datasets (RECIPE.md, stage 0), by the data.datasets names of configs/paper.yaml and,
# where the source alone says which set it is, by source: the stage lengths when the manifests cannot be read.
PAPER_SAMPLES: dict[str, int] = {
    "pixmo-cap": 600_000, "idl-wds": 4_700_000, "sa1b-internvl": 4_100_000, "finevision": 14_000_000,
    "open-images": 1_700_000, "objects365-depth": 1_700_000, "google-landmarks": 2_700_000, "places365": 8_000_000,
    "sa1b-depth": 11_000_000, "cc3m": 2_800_000, "grit": 13_900_000, "objects365-refseg": 1_600_000,
    "sa1b-dam": 600_000,
}
_UNAMBIGUOUS_SOURCES = ("pixmo-cap", "idl-wds", "sa1b-internvl", "finevision", "grit")

# Bytes of one stored training sample (for the object-storage volume when manifests cannot be read): JPEG at
# quality 95 (versavit's encoder) of photographs ~0.35 bytes per pixel; 16-bit PNG depth maps (fast compression)
# ~1.5 bytes per pixel; a float16 text embedding per referring expression; RLE masks and texts ~1-2 KB. Images are
# assumed stored at the training resolution (sources keep their own, often larger: a lower bound).
JPEG_BYTES_PER_PIXEL = 0.35
DEPTH_PNG_BYTES_PER_PIXEL = 1.5
TEXT_BYTES = 2048
MASK_BYTES = 1024

# Architectures of the hub checkpoints a paper config names, for planning without the hub (a local folder or the
# Hugging Face cache is read first). Qwen3 config.json values; the vision towers' vision_config.
KNOWN_LLMS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
_QWEN3_COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# the merger's output width (the LLM's hidden size): the only part of the tower model.backbone's sizes do not give
KNOWN_TOWER_OUT: dict[str, int] = {
    "Qwen/Qwen2-VL-2B-Instruct": 1536, "Qwen/Qwen2-VL-7B-Instruct": 3584, "Qwen/Qwen2-VL-7B": 3584,
    "Qwen/Qwen2-VL-72B-Instruct": 8192, "Qwen/Qwen2.5-VL-3B-Instruct": 2048, "Qwen/Qwen2.5-VL-7B-Instruct": 3584,
}
_BLOCKS = BLOCKS_PREFIXES  # the ViT blocks: Qwen-VL's tower.blocks, SigLIP2's tower.encoder.layers
_LAYERS = "heads.caption.llm.model.layers."


# --------------------------------------------------------------------------------------------------------------
# hardware


def gpu_spec(cfg: RunConfig, name: str | None = None) -> GpuSpec:
    """The GPU of the run: `name`, else the model in launch.node_selector's values (e.g. nvidia.com/gpu.product:
    NVIDIA-H20), else H100. launch.resources.gpu_memory_gib overrides the table's memory."""
    if name is None:
        labels = " ".join(str(v) for v in cfg.launch.node_selector.values()).upper()
        for known in sorted(GPUS, key=len, reverse=True):  # H200 before H20
            if re.search(rf"(^|[^A-Z0-9]){known}($|[^0-9])", labels):
                name = known
                break
    name = (name or "H100").upper()
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (another GPU: --gpu H100 --peak-tflops X "
                         "and launch.resources.gpu_memory_gib)")
    spec = GPUS[name]
    memory = getattr(cfg.launch.resources, "gpu_memory_gib", None)
    return GpuSpec(spec.name, spec.peak_bf16_flops, float(memory) if memory else spec.memory_gib)


# --------------------------------------------------------------------------------------------------------------
# the stage's model on the meta device


def _cached_json(ref: str, filename: str = "config.json") -> dict | None:
    """A local folder's file, or a hub repo's from the Hugging Face cache; never the network."""
    if os.path.isdir(ref):
        path = os.path.join(ref, filename)
        return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(ref, filename)
    except Exception:  # noqa: BLE001 - not a repo id
        return None
    return json.load(open(path, encoding="utf-8")) if isinstance(path, str) else None


def _vision_settings(cfg: RunConfig) -> tuple[Any, str]:
    """The tower's transformers vision config and where its sizes came from."""
    b = cfg.model.backbone
    vc = _vision_config(b)
    source = "model.backbone sizes"
    if b.pretrained:
        raw = _cached_json(b.pretrained)
        if b.kind == siglip2.KIND:
            vision_cls, full_cls = siglip2.VISION_CONFIG_CLASS, siglip2.FULL_CONFIG_CLASS
        else:
            _, vision_cls, full_cls = _KINDS[b.kind]
        if raw is not None:
            vc = (full_cls(**raw).vision_config if "vision_config" in raw else vision_cls(**raw))
            source = b.pretrained
        elif b.kind == siglip2.KIND:  # no merger to size; SigLIP2's checkpoints carry their pooling head (frozen)
            vc.vision_use_head = True
            source = f"model.backbone sizes with SigLIP2's pooling head ({b.pretrained} not readable offline)"
        elif b.pretrained in KNOWN_TOWER_OUT:
            key = "hidden_size" if b.kind == "qwen2_vl" else "out_hidden_size"
            setattr(vc, key, KNOWN_TOWER_OUT[b.pretrained])
            source = f"model.backbone sizes, merger of {b.pretrained} (built-in table)"
        else:
            source = f"model.backbone sizes ({b.pretrained} not readable offline)"
    return vc, source


def _llm_config(cfg: RunConfig, vocab: int, pad: int, eos: int) -> tuple[Any, str]:
    from transformers import AutoConfig, Qwen3Config

    c = cfg.model.heads.caption
    if c.llm is None:
        return tiny_llm_config(c, vocab, pad, eos), "tiny (heads.caption.tiny_llm_*)"
    raw = _cached_json(c.llm)
    if raw is not None:
        model_type = raw.pop("model_type", "qwen3")
        return AutoConfig.for_model(model_type, **raw), c.llm
    if c.llm in KNOWN_LLMS:
        return Qwen3Config(**_QWEN3_COMMON, **KNOWN_LLMS[c.llm]), f"{c.llm} (built-in table)"
    raise ValueError(f"cannot read the config of model.heads.caption.llm {c.llm!r} offline (not a folder, not in "
                     f"the Hugging Face cache, not one of {', '.join(KNOWN_LLMS)}): stage it or run "
                     "`huggingface-cli download` first")


def _attn(cfg: RunConfig) -> str:
    """What the trace runs: eager as configured; sdpa and flash_attention_2 both as a fused kernel (the same
    tensors kept: see versavit.train.trace)."""
    return "eager" if getattr(cfg.model.backbone, "attn_implementation", "sdpa") == "eager" else "sdpa"


def build_skeleton(cfg: RunConfig, tasks: list[str], dtype: torch.dtype, synergy: Any = None,
                   vit_kinds: list[int] | None = None, llm_kinds: list[int] | None = None,
                   depth_layers: list[int] | None = None, device: str = "meta") -> VersaViT:
    """The stage's VersaViT with every parameter on `device` (meta: shapes only; else randomly initialised, no
    checkpoint read: the benches build paper-size modules this way). vit_kinds / llm_kinds: build that many ViT
    blocks / LLM layers (an analogue; None = the configured depth)."""
    b = cfg.model.backbone
    vc, _ = _vision_settings(cfg)
    vc._attn_implementation = _attn(cfg)
    depth_key = "num_hidden_layers" if b.kind == siglip2.KIND else "depth"
    full_depth = getattr(vc, depth_key)
    if vit_kinds is not None:
        setattr(vc, depth_key, len(vit_kinds))
        if b.kind == "qwen2_5_vl":  # the analogue's blocks keep the attention (window / full) of what they mirror
            full = set(vc.fullatt_block_indexes)
            vc.fullatt_block_indexes = [a for a, j in enumerate(vit_kinds) if j in full]
    tower_cls = tower_class(b.kind)
    with torch.device(device):
        tower = tower_cls._from_config(vc, dtype=dtype, attn_implementation=_attn(cfg))
    backbone = wrap_tower(tower, b.kind)
    dim = backbone.embed_dim
    layers = depth_layers or cfg.model.heads.depth.layers or [math.ceil(full_depth * k / 3) for k in (1, 2, 3)]
    heads: dict[str, nn.Module] = {}
    # dense heads: on the meta device directly; real ones are initialised on the CPU (their random Fourier basis
    # takes a CPU generator) and moved
    dense = torch.device("meta") if device == "meta" else torch.device("cpu")
    with torch.device(device):
        if "caption" in tasks:
            from transformers import AutoModelForCausalLM

            tok = build_tiny_tokenizer()
            lc, _ = _llm_config(cfg, len(tok), tok.pad_token_id, tok.convert_tokens_to_ids(IM_END))
            if llm_kinds is not None:
                lc.num_hidden_layers = len(llm_kinds)
                if getattr(lc, "layer_types", None):
                    lc.layer_types = [lc.layer_types[j] for j in llm_kinds]
            # the LLM loads with transformers' default attention (sdpa): model.backbone.attn_implementation is the
            # tower's
            llm = AutoModelForCausalLM.from_config(lc, dtype=dtype, attn_implementation="sdpa")
            hidden = llm.get_input_embeddings().embedding_dim
            projector = Projector(4 * dim, cfg.model.heads.caption.projector_hidden, hidden).to(dtype)
            heads["caption"] = CaptionHead(projector, llm, tok, cfg.model.heads.caption.max_text_tokens)
    with dense:
        if "depth" in tasks:
            heads["depth"] = DepthHead(cfg.model.heads.depth, embed_dim=dim, num_layers=len(layers)).to(device, dtype)
        if "refseg" in tasks:
            heads["refseg"] = RefSegHead(cfg.model.heads.refseg, embed_dim=dim).to(device, dtype)
    with torch.device(device):
        module = None
        if synergy is not None and synergy.enabled:
            from versavit.config.schema import TASKS

            module = SynergyModule(dim, [t for t in TASKS if t in tasks], synergy).to(dtype)
    model = VersaViT(backbone, {t: heads[t] for t in ("caption", "depth", "refseg") if t in heads}, layers,
                     LossConfig(**cfg.train.loss.model_dump()),
                     depth_target=cfg.model.heads.depth.target, synergy=module,
                     synergy_weight=synergy.weight if module is not None else 0.0)
    return model.train()


def _layer_of(name: str) -> tuple[str, int] | None:
    for prefix, kind in (*((p, "vit") for p in _BLOCKS), (_LAYERS, "llm")):
        if name.startswith(prefix):
            return kind, int(name[len(prefix):].split(".", 1)[0])
    return None


def _kinds(model: VersaViT, attention: list[str] | None = None) -> dict[str, list[tuple[tuple, int]]]:
    """ViT blocks and LLM layers grouped by kind, in forward order: (signature, count). The signature is the
    trainable flags of the layer's parameters, whether a gradient reaches its input (then it keeps activations even
    when frozen) and its attention type."""
    flags: dict[tuple[str, int], list[bool]] = {}
    vit_upstream = llm_upstream = False  # something before the first ViT block / LLM layer trains
    for name, p in model.named_parameters():
        where = _layer_of(name)
        if where:
            flags.setdefault(where, []).append(p.requires_grad)
        elif p.requires_grad:
            vit_upstream |= name.startswith(("backbone.tower.patch_embed", "backbone.tower.embeddings"))
            llm_upstream |= name.startswith(("backbone.", "heads.caption.projector", "heads.caption.llm.model.embed"))
    out: dict[str, list[tuple[tuple, int]]] = {"vit": [], "llm": []}
    for kind, upstream in (("vit", vit_upstream), ("llm", llm_upstream)):
        layers = sorted(i for k, i in flags if k == kind)
        upstream |= kind == "llm" and any(any(flags[("vit", i)]) for k, i in flags if k == "vit")
        for i in layers:
            sig = (tuple(flags[(kind, i)]), upstream, attention[i] if attention and kind == "vit" else "")
            if out[kind] and out[kind][-1][0] == sig:
                out[kind][-1] = (sig, out[kind][-1][1] + 1)
            else:
                out[kind].append((sig, 1))
            upstream |= any(flags[(kind, i)])
    return out


def _analogue_plan(groups: list[tuple[tuple, int]], minimum: int) -> list[int]:
    """Which kind each analogue layer stands for: one per kind, in order, padded to `minimum` with the last."""
    seq = list(range(len(groups)))
    while len(seq) < minimum and seq:
        seq.append(seq[-1])
    return seq


# --------------------------------------------------------------------------------------------------------------
# tracing one task of one stage


@dataclass
class TaskProfile:
    """One task of one stage at full size, per sample: what is kept for backward and the FLOPs."""

    task: str
    inputs: str  # what one sample is, in words
    vit_tokens: int
    llm_tokens: int  # LLM sequence length (caption), else 0
    answer_tokens: int
    vit_width: int = 0  # ViT embed dim, LLM hidden size: a checkpointed layer keeps tokens x width x p
    llm_width: int = 0
    vit_layers: list[dict] = field(default_factory=list)  # per kind: count, bytes, flops, keeps (needs grad)
    llm_layers: list[dict] = field(default_factory=list)
    rest_bytes: int = 0  # everything kept outside the ViT blocks and LLM layers, logits excluded
    logits_bytes: int = 0
    flops: int = 0  # model FLOPs of forward + backward
    recompute_flops: int = 0  # forward FLOPs of the checkpointed layers (recomputed in backward)

    def activation_bytes(self, ckpt_vit: bool, ckpt_llm: bool, p: int) -> tuple[int, int]:
        """(kept bytes per sample, bytes of one layer recomputed in backward) under the checkpointing flags, in a
        dtype of p bytes."""
        kept, recompute = self.rest_bytes, 0
        for layers, ckpt, per_token in ((self.vit_layers, ckpt_vit, p * self.vit_width * self.vit_tokens),
                                        (self.llm_layers, ckpt_llm, p * self.llm_width * self.llm_tokens)):
            for k in layers:
                if ckpt and k["bytes"]:
                    kept += k["count"] * per_token
                    recompute = max(recompute, k["bytes"])
                else:
                    kept += k["count"] * k["bytes"]
        return kept, recompute


def _sample(cfg: RunConfig, task: str, head: CaptionHead | None) -> tuple[dict[str, Any], str, int, int, int]:
    """A worst-case batch of one sample at the configured resolution, what it is, ViT tokens, LLM tokens and
    supervised answer tokens. Images and labels are real CPU tensors (small); see versavit.train.trace."""
    r = cfg.train.resolution
    patch = cfg.model.backbone.patch_size
    if task == "caption":
        side = r.caption_max
        n_visual = (side // patch) ** 2 // 4
        answer = " ".join(["a"] * (2 * cfg.model.heads.caption.max_text_tokens))
        question = "Describe the image."
        ids = head.build_batch([n_visual], [question], [answer])
        seq, supervised = int(ids.input_ids.shape[1]), int((ids.labels != -100).sum())
        batch = {"image": [torch.zeros(3, side, side)], "question": [question], "answer": [answer]}
        return (batch, f"{side}x{side} px, {seq} LLM tokens ({n_visual} visual, {supervised} supervised)",
                (side // patch) ** 2, seq, supervised)
    side = r.depth if task == "depth" else r.refseg
    if task == "depth":
        batch = {"image": torch.zeros(1, 3, side, side), "target": torch.ones(1, side, side),
                 "valid": torch.ones(1, side, side, dtype=torch.bool)}
    else:
        text = cfg.model.heads.refseg.text_dim
        batch = {"image": torch.zeros(1, 3, side, side), "text_embedding": torch.zeros(1, text),
                 "mask": torch.zeros(1, side, side)}
    return batch, f"{side}x{side} px", (side // patch) ** 2, 0, 0


def sample_batch(cfg: RunConfig, task: str, head: CaptionHead | None, batch: int, device: torch.device | str
                 ) -> dict[str, Any]:
    """The plan's worst-case sample of `task` repeated `batch` times, on `device` (random images): what the
    benches and the tests run for real."""
    one, *_ = _sample(cfg, task, head)
    if task == "caption":
        return {"image": [torch.rand_like(im).to(device) for im in one["image"] * batch],
                "question": one["question"] * batch, "answer": one["answer"] * batch}
    out = {k: torch.cat([v] * batch).to(device) for k, v in one.items()}
    out["image"] = torch.rand_like(out["image"])
    return out


def _set_trainable(model: VersaViT, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, False))


def _starts(groups: list[tuple[tuple, int]]) -> list[int]:
    out, i = [], 0
    for _, count in groups:
        out.append(i)
        i += count
    return out


def profile_stage(cfg: RunConfig, stage: str, dtype: torch.dtype) -> tuple[dict[str, TaskProfile], dict[str, int]]:
    """Trace every task of `stage` on one reduced-depth analogue of its model (see the module docstring); returns
    the per-task profiles and the full model's parameter counts."""
    rs = cfg.train.stage(stage)
    tasks = list(rs.tasks)
    full = build_skeleton(cfg, tasks, dtype, rs.synergy)
    full.set_trainable(list(rs.trainable))
    counts = {"total": sum(p.numel() for p in full.parameters()),
              "trainable": sum(p.numel() for p in full.parameters() if p.requires_grad),
              "largest_trainable": max((p.numel() for p in full.parameters() if p.requires_grad), default=0),
              "backbone": sum(p.numel() for p in full.backbone.parameters()),
              **{f"head_{h}": sum(p.numel() for p in m.parameters()) for h, m in full.heads.items()}}
    if "caption" in full.heads:
        counts["head_caption_projector"] = sum(p.numel() for p in full.heads["caption"].projector.parameters())
    attention = None
    if cfg.model.backbone.kind == "qwen2_5_vl":
        fullatt = set(full.backbone.tower.config.fullatt_block_indexes)
        attention = ["full" if i in fullatt else "window" for i in range(full.backbone.depth)]
    kinds = _kinds(full, attention)
    n_depth = len(full.depth_layers)
    # the depth head reads len(layers) maps: the analogue has that many blocks (one more when the last map is not
    # the final block's), each of a kind the full model has, in order
    vit_min = n_depth + (1 if max(full.depth_layers) < full.backbone.depth else 0) if "depth" in tasks else 1
    vit_seq = _analogue_plan(kinds["vit"], vit_min)
    llm_seq = _analogue_plan(kinds["llm"], 1) if "caption" in tasks else []
    vit_rep = [_starts(kinds["vit"])[k] for k in vit_seq]  # the full model's layer each analogue layer mirrors
    llm_rep = [_starts(kinds["llm"])[k] for k in llm_seq]
    model = build_skeleton(cfg, tasks, dtype, rs.synergy, vit_kinds=vit_rep, llm_kinds=llm_rep or None,
                           depth_layers=list(range(1, n_depth + 1)))
    full_flags = {n: p.requires_grad for n, p in full.named_parameters()}
    del full
    for name, p in model.named_parameters():
        where = _layer_of(name)
        if where is not None:
            kind, a = where
            prefix = f"backbone.{model.backbone.blocks_path}." if kind == "vit" else _LAYERS
            j = (vit_rep if kind == "vit" else llm_rep)[a]
            name = f"{prefix}{j}.{name[len(prefix):].split('.', 1)[1]}"
        p.requires_grad_(full_flags.get(name, False))
    head = model.heads["caption"] if "caption" in model.heads else None  # noqa: SIM401 - ModuleDict has no get
    scoped = {f"vit{a}": [blk] for a, blk in enumerate(model.backbone.blocks)}
    if head is not None:
        scoped.update({f"llm{a}": [layer] for a, layer in enumerate(head.llm.model.layers)})
    vocab = head.llm.get_output_embeddings().weight.shape[0] if head is not None else None
    vit_ckpt = cfg.model.backbone.gradient_checkpointing
    llm_ckpt = getattr(cfg.model.heads.caption, "gradient_checkpointing", True)
    profiles: dict[str, TaskProfile] = {}
    for task in tasks:
        batch, inputs, vit_tokens, llm_tokens, answer = _sample(cfg, task, head)
        with shadow():
            trace = run_traced(model, lambda task=task, batch=batch: model(task, batch)[0], scoped, vocab_size=vocab)
        model.zero_grad(set_to_none=True)
        prof = TaskProfile(task, inputs, vit_tokens, llm_tokens if task == "caption" else 0, answer,
                           vit_width=model.backbone.embed_dim,
                           llm_width=head.llm.config.hidden_size if head is not None and task == "caption" else 0)
        layer_flops = 0
        for kind, seq, groups, fqn in (("vit", vit_seq, kinds["vit"], f"backbone.{model.backbone.blocks_path}"),
                                       ("llm", llm_seq if task == "caption" else [], kinds["llm"],
                                        "heads.caption.llm.model.layers")):
            seen: dict[int, tuple[int, int]] = {}
            for a, k in enumerate(seq):
                b = trace.saved.get(f"{kind}{a}", 0)
                f = trace.flops.get(f"{type(model).__name__}.{fqn}.{a}", 0)
                layer_flops += f
                seen[k] = max(seen.get(k, (0, 0)), (b, f))
            for k, (sig, count) in enumerate(groups if seq else []):
                b, f = seen.get(k, (0, 0))
                (prof.vit_layers if kind == "vit" else prof.llm_layers).append(
                    {"count": count, "bytes": b, "flops": f, "trainable": all(sig[0]), "frozen": not any(sig[0]),
                     "gradient_in": sig[1]})
        scoped_bytes = sum(v for k, v in trace.saved.items() if k != "rest")
        prof.logits_bytes = trace.saved_by_kind.get("logits", 0)
        prof.rest_bytes = sum(trace.saved.values()) - scoped_bytes - prof.logits_bytes
        prof.flops = trace.flops.get("Global", 0) - layer_flops + sum(
            k["count"] * k["flops"] for k in prof.vit_layers + prof.llm_layers)
        # what checkpointing recomputes: a layer's forward, ~1/3 of its forward + backward when it trains (1/2 when
        # only its input needs a gradient)
        for layers, ckpt in ((prof.vit_layers, vit_ckpt), (prof.llm_layers, llm_ckpt)):
            for k in layers:
                if ckpt and k["bytes"]:
                    prof.recompute_flops += k["count"] * k["flops"] // (2 if k["frozen"] else 3)
        profiles[task] = prof
    return profiles, counts


# --------------------------------------------------------------------------------------------------------------
# memory


@dataclass
class MicroStep:
    stage: str
    task: str
    batch: int
    inputs: str
    params: int
    grads: int
    optimizer: int
    buckets: int
    activations: int
    activations_no_ckpt: int
    recompute: int
    logits: int
    reserved: int
    total: int
    gpu_bytes: int
    fits: bool
    headroom: int
    max_batch: int
    flops_per_sample: int
    checkpointing: str
    advice: str = ""


def _zero(cfg: RunConfig, counts: dict[str, int], world: int, p: int, accum: int) -> dict[str, int]:
    stage = cfg.train.zero_stage
    t = counts["trainable"]
    ds = deepspeed_config(cfg.train, accum, cfg.train.optim.grad_clip, device="cuda")
    zo = ds["zero_optimization"]
    master = 4 if p == 2 else 0
    grads = t * p // (world if stage >= 2 else 1)
    optimizer = t * (master + 8) // (world if stage >= 1 else 1)
    reduce_bucket = int(zo.get("reduce_bucket_size", 5e8))
    n_buffers = (2 if zo.get("overlap_comm") else 1) if zo.get("contiguous_gradients") else 0
    buckets = n_buffers * reduce_bucket * p + counts["largest_trainable"] * p
    return {"grads": grads, "optimizer": optimizer, "buckets": buckets,
            "step_fp32_grads": 4 * t // (world if stage >= 1 else 1), "reduce_bucket_size": reduce_bucket,
            "bucket_buffers": n_buffers, "allgather_bucket_size": int(zo.get("allgather_bucket_size", 5e8)),
            "overlap_comm": bool(zo.get("overlap_comm"))}


def micro_step(cfg: RunConfig, stage: str, prof: TaskProfile, counts: dict[str, int], batch: int, world: int,
               gpu: GpuSpec, accum: int, dtype: torch.dtype) -> MicroStep:
    p = torch.finfo(dtype).bits // 8
    vit_ckpt = cfg.model.backbone.gradient_checkpointing
    llm_ckpt = getattr(cfg.model.heads.caption, "gradient_checkpointing", True)
    kept, recompute = prof.activation_bytes(vit_ckpt, llm_ckpt, p)
    kept_none, _ = prof.activation_bytes(False, False, p)
    z = _zero(cfg, counts, world, p, accum)
    params = counts["total"] * p
    reserved = int(RESERVED_GIB * GIB)
    fixed = params + z["grads"] + z["optimizer"] + z["buckets"] + reserved
    per_sample = kept + recompute + 2 * prof.logits_bytes
    total = fixed + batch * per_sample
    gpu_bytes = int(gpu.memory_gib * GIB)
    max_batch = max(0, (gpu_bytes - fixed) // per_sample) if per_sample else 0
    ckpt = ", ".join(f"{n} {'on' if on else 'off'}" for n, on, layers in
                     (("ViT", vit_ckpt, prof.vit_layers), ("LLM", llm_ckpt, prof.llm_layers)) if layers)
    step = MicroStep(stage, prof.task, batch, prof.inputs, params, z["grads"], z["optimizer"], z["buckets"],
                     batch * kept, batch * kept_none, batch * recompute, 2 * batch * prof.logits_bytes, reserved,
                     total, gpu_bytes, total <= gpu_bytes, gpu_bytes - total, int(max_batch), prof.flops, ckpt)
    if not step.fits:
        tips = []
        if not (vit_ckpt and llm_ckpt):
            kept_all, rec_all = prof.activation_bytes(True, True, p)
            with_ckpt = fixed + batch * (kept_all + rec_all + 2 * prof.logits_bytes)
            tips.append(f"gradient checkpointing of every layer: {with_ckpt / GIB:.1f} GiB")
        if max_batch:
            tips.append(f"per-GPU batch <= {max_batch}")
        if cfg.train.zero_stage < 2:
            tips.append("train.zero_stage 2")
        step.advice = "; ".join(tips) or "a GPU with more memory"
    return step


# --------------------------------------------------------------------------------------------------------------
# steps, time, storage


def _dataset_entry(cfg: RunConfig, url: str) -> tuple[str, Any] | None:
    for name, spec in cfg.data.datasets.items():
        if url in (spec.training_url(), spec.url, spec.labelled):
            return name, spec
    return None


def _can_read(cfg: RunConfig, url: str) -> bool:
    """Whether reading `url` can work here without a long wait: local paths always; s3 only with credentials in
    the environment (without them botocore spends ~25 s looking for instance credentials per URL)."""
    if not storage.is_remote(url):
        return True
    return bool(os.environ.get(cfg.storage.access_key_env))


def dataset_size(cfg: RunConfig, url: str, use_manifests: bool = True) -> tuple[int | None, int | None, str]:
    """(samples, stored bytes or None, where the count came from) of one training URL."""
    if use_manifests and _can_read(cfg, url):
        from versavit.data.shards import read_manifest

        try:
            m = read_manifest(url)
            return m.num_samples, sum(s.bytes for s in m.shards), "manifest"
        except (storage.StorageError, ValueError, OSError):
            pass
    entry = _dataset_entry(cfg, url)
    if entry:
        name, spec = entry
        if name in PAPER_SAMPLES:
            return PAPER_SAMPLES[name], None, "paper"
        if spec.source in _UNAMBIGUOUS_SOURCES:
            return PAPER_SAMPLES[spec.source], None, "paper"
    return None, None, "unknown"


def stage_steps(cfg: RunConfig, stage: str, world: int, use_manifests: bool = True
                ) -> tuple[int | None, list[str], dict[str, dict[str, Any]]]:
    """Optimiser steps of `stage` as the loop counts them, its micro-steps, and per task the samples read."""
    from versavit.data.inputs import task_urls

    rs = cfg.train.stage(stage)
    tasks = list(rs.tasks)
    batch = {t: rs.batch_size[t] for t in tasks}
    accum = 1 if rs.global_batch is None else max(1, rs.global_batch // (batch[tasks[0]] * world))
    micro = tasks * accum
    data: dict[str, dict[str, Any]] = {}
    for t in tasks:
        urls = task_urls(cfg, t, stage=stage)
        sizes = [dataset_size(cfg, u, use_manifests) for u in urls]
        known = all(s is not None for s, _, _ in sizes)
        data[t] = {"samples": sum(s for s, _, _ in sizes) if known else None,
                   "source": "/".join(sorted({w for _, _, w in sizes})), "urls": urls}
    if rs.max_steps:
        for d in data.values():
            d["source"] = "max_steps"
        return rs.max_steps, micro, data
    if any(d["samples"] is None for d in data.values()):
        return None, micro, data
    per_step = {t: batch[t] * world * micro.count(t) for t in tasks}
    return max(1, math.ceil(rs.epochs * max(data[t]["samples"] / per_step[t] for t in tasks))), micro, data


def _task_of_url(cfg: RunConfig) -> dict[str, str]:
    """Training URL -> the task that reads it (from every stage's sources)."""
    from versavit.data.inputs import task_urls

    out: dict[str, str] = {}
    for rs in cfg.train.stages():
        for t in rs.tasks:
            try:
                out.update(dict.fromkeys(task_urls(cfg, t, stage=rs.name), t))
            except ValueError:
                continue
    return out


def _sample_bytes(cfg: RunConfig, task: str, labels: list[str]) -> float:
    r = cfg.train.resolution
    side = {"caption": r.caption_max, "depth": r.depth, "refseg": r.refseg}[task]
    per = JPEG_BYTES_PER_PIXEL * side * side + TEXT_BYTES
    if "depth" in labels:
        per += DEPTH_PNG_BYTES_PER_PIXEL * side * side
    if "masks" in labels:
        per += MASK_BYTES
    if "embed" in labels:
        per += 2 * cfg.model.heads.refseg.text_dim  # float16
    return per


def storage_volume(cfg: RunConfig, stage_counts: dict[str, dict[str, int]], stage_steps_: dict[str, int | None],
                   p: int, use_manifests: bool = True) -> dict[str, Any]:
    """Bytes the run keeps in object storage: dataset shards (each prepared dataset once, plus a full copy per
    label step: each step writes the shards again with its labels added), DeepSpeed checkpoints (every one is
    kept: checkpoint.save never deletes) and the stage exports."""
    readers = _task_of_url(cfg)
    rows, prepared = [], set()
    for name, spec in cfg.data.datasets.items():
        task = readers.get(spec.training_url())
        n, stored, where = dataset_size(cfg, spec.training_url(), use_manifests)
        if n is None:
            n, stored, where = dataset_size(cfg, spec.url, use_manifests)
        if n is None or task is None:
            rows.append({"dataset": name, "samples": n, "bytes": None, "copies": 0, "source": "unknown"})
            continue
        copies = len(spec.labels) + (0 if spec.url in prepared else 1)
        prepared.add(spec.url)
        if stored is None:
            stored = int(n * _sample_bytes(cfg, task, list(spec.labels)))
            where = f"{where} samples, bytes estimated"
        rows.append({"dataset": name, "samples": n, "bytes": stored * copies, "copies": copies, "source": where})
    ckpts = []
    for stage, counts in stage_counts.items():
        rs = cfg.train.stage(stage)
        steps = stage_steps_.get(stage)
        n = math.ceil(steps / rs.checkpoint_interval) if steps else None
        master = 4 if p == 2 else 0
        one = counts["total"] * p + counts["trainable"] * (master + 8)  # model states + ZeRO optimiser shards
        export = counts["total"] * p + counts["trainable"] * p  # export/ (the model) + trained_state.pt
        ckpts.append({"stage": stage, "checkpoints": n, "bytes_each": one, "bytes": (n or 0) * one + export,
                      "export_bytes": export})
    shards = sum(r_["bytes"] or 0 for r_ in rows)
    total_ckpt = sum(c["bytes"] for c in ckpts)
    return {"datasets": rows, "checkpoints": ckpts, "shard_bytes": shards, "checkpoint_bytes": total_ckpt,
            "total_bytes": shards + total_ckpt,
            "unknown": [r_["dataset"] for r_ in rows if r_["bytes"] is None]}


# --------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class StagePlanRow:
    stage: str
    steps: int | None
    micro_steps: list[str]
    samples: dict[str, Any]
    step_flops: int  # per GPU, one optimiser step
    step_seconds: float
    wall_hours: float | None
    gpu_hours: float | None
    params: dict[str, int]


@dataclass
class RunPlan:
    config: str
    gpu: str
    gpus: int
    gpu_memory_gib: float
    peak_tflops: float
    mfu: float
    precision: str
    zero_stage: int
    deepspeed: dict[str, Any]
    micro_steps: list[MicroStep]
    stages: list[StagePlanRow]
    storage: dict[str, Any]
    notes: list[str]
    profiles: list[dict[str, Any]] = field(default_factory=list)  # {"stage", "profile": TaskProfile as a dict}

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.micro_steps)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}

    def metrics(self, stage: str | None = None) -> dict[str, float]:
        """Flat `plan/...` numbers for MLflow (GiB, TFLOP, hours)."""
        out: dict[str, float] = {"plan/gpus": self.gpus, "plan/gpu_memory_gib": self.gpu_memory_gib,
                                 "plan/mfu": self.mfu, "plan/fits": float(self.fits)}
        for m in self.micro_steps:
            if stage is None or m.stage == stage:
                key = f"plan/{m.stage}/{m.task}"
                out.update({f"{key}/total_gib": m.total / GIB, f"{key}/headroom_gib": m.headroom / GIB,
                            f"{key}/activations_gib": m.activations / GIB, f"{key}/max_batch": m.max_batch,
                            f"{key}/tflops_per_sample": m.flops_per_sample / 1e12, f"{key}/fits": float(m.fits)})
        for s in self.stages:
            if (stage is None or s.stage == stage) and s.steps:
                out.update({f"plan/{s.stage}/steps": s.steps, f"plan/{s.stage}/step_s": s.step_seconds,
                            f"plan/{s.stage}/wall_h": s.wall_hours or 0.0, f"plan/{s.stage}/gpu_h": s.gpu_hours or 0.0})
        if stage is None:
            out["plan/storage_tb"] = self.storage["total_bytes"] / 1e12
        return out


def plan_run(cfg: RunConfig, config_name: str = "", gpu: str | None = None, mfu: float = DEFAULT_MFU,
             peak_tflops: float | None = None, stages: list[str] | None = None, use_manifests: bool = True) -> RunPlan:
    """The capacity plan of `cfg` (every recipe stage, or `stages`)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    spec = gpu_spec(cfg, gpu)
    peak = peak_tflops * 1e12 if peak_tflops else spec.peak_bf16_flops
    world = cfg.launch.nnodes * cfg.launch.nproc_per_node
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    notes = []
    if cfg.train.precision == "auto":
        notes.append("train.precision auto: planned as bf16 (what it resolves to on a bf16 GPU)")
    attn = getattr(cfg.model.backbone, "attn_implementation", "sdpa")
    if attn != "eager":
        notes.append(f"attention ({attn}) traced as a fused kernel: q, k, v, output and logsumexp kept, no S x S "
                     "matrix (versavit.train.trace)")
    vc, vsource = _vision_settings(cfg)
    notes.append(f"ViT sizes: {vsource}")
    micro: list[MicroStep] = []
    traced: list[dict[str, Any]] = []
    rows: list[StagePlanRow] = []
    all_counts: dict[str, dict[str, int]] = {}
    all_steps: dict[str, int | None] = {}
    for rs in cfg.train.stages():
        if stages and rs.name not in stages:
            continue
        steps, micro_tasks, samples = stage_steps(cfg, rs.name, world, use_manifests)
        accum = len(micro_tasks)
        profiles, counts = profile_stage(cfg, rs.name, dtype)
        step_flops = 0
        for task, prof in profiles.items():
            traced.append({"stage": rs.name, "profile": asdict(prof)})
            ms = micro_step(cfg, rs.name, prof, counts, rs.batch_size[task], world, spec, accum, dtype)
            micro.append(ms)
            step_flops += micro_tasks.count(task) * rs.batch_size[task] * prof.flops
        all_counts[rs.name] = counts
        all_steps[rs.name] = steps
        step_s = step_flops / (mfu * peak)
        wall = steps * step_s / 3600 if steps else None
        rows.append(StagePlanRow(rs.name, steps, micro_tasks, samples, step_flops, step_s, wall,
                                 wall * world if wall is not None else None, counts))
        if steps is None:
            notes.append(f"{rs.name}: step count unknown (no manifest readable and no paper size for "
                         f"{[t for t, d in samples.items() if d['samples'] is None]}): set max_steps")
    p = torch.finfo(dtype).bits // 8
    vol = storage_volume(cfg, all_counts, all_steps, p, use_manifests)
    ds = deepspeed_config(cfg.train, 1, cfg.train.optim.grad_clip, device="cuda")["zero_optimization"]
    notes += [f"buckets: {2 if ds['overlap_comm'] else 1} x reduce_bucket_size {ds['reduce_bucket_size']:.3g} x {p} "
              f"bytes (overlap_comm {'on' if ds['overlap_comm'] else 'off'}) + the largest trainable tensor's "
              "gradient; allgather_bucket_size allocates nothing (all_gather_into_tensor into the flat buffer)",
              f"reserved: {RESERVED_GIB:g} GiB for the CUDA context, cuBLAS workspaces and NCCL (assumed, not "
              "measured)",
              "logits: the fp32 log-probabilities the cross-entropy keeps, x 2 (their gradient at the start of "
              "backward); caption worst case: every image at caption_max^2, every text at max_text_tokens",
              "activations: traced per sample at full width on a reduced-depth analogue, x layers, x batch "
              "(versavit.train.plan); a checkpointed layer keeps its input, one layer is recomputed at a time"]
    return RunPlan(config_name, spec.name, world, spec.memory_gib, peak / 1e12, mfu, precision, cfg.train.zero_stage,
                   ds, micro, rows, vol, notes, traced)


# --------------------------------------------------------------------------------------------------------------
# rendering


def _gib(n: float) -> str:
    x = n / GIB
    return f"{x:.1f}" if abs(x) >= 1 or x == 0 else f"{x:.2g}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def markdown(plan: RunPlan) -> str:
    """The plan as Markdown (what `versavit plan` prints; README's figures are this output)."""
    out = [f"Plan of {plan.config or 'the config'}: {plan.gpus} x {plan.gpu} ({plan.gpu_memory_gib:g} GiB, "
           f"{plan.peak_tflops:g} TFLOP/s dense bf16), {plan.precision}, ZeRO {plan.zero_stage}, MFU {plan.mfu:g}. "
           "Computed from the config (shape-level traces), not measured.", "",
           "Memory per GPU of each micro-step, GiB (activations with the configured checkpointing; without it in "
           "brackets):", "",
           "| stage | task | batch/GPU | sample (worst case) | params | grads | optimiser | buckets | activations "
           "| recompute | logits | reserved | total | fits | headroom | max batch |", "|" + "---|" * 16]
    for m in plan.micro_steps:
        out.append(f"| {m.stage} | {m.task} | {m.batch} | {m.inputs} | {_gib(m.params)} | {_gib(m.grads)} | "
                   f"{_gib(m.optimizer)} | {_gib(m.buckets)} | {_gib(m.activations)} ({_gib(m.activations_no_ckpt)}) | "
                   f"{_gib(m.recompute)} | {_gib(m.logits)} | {_gib(m.reserved)} | **{_gib(m.total)}** | "
                   f"{'yes' if m.fits else '**no**'} | {_gib(m.headroom)} | {m.max_batch} |")
    for m in plan.micro_steps:
        if not m.fits:
            out.append(f"\n{m.stage}/{m.task} does not fit: {m.advice}.")
    out += ["", "Activations per layer and token (KiB kept for backward; checkpointed: the layer's input only):", "",
            "| stage | task | ViT tokens | ViT layers: count x KiB/token | LLM tokens | LLM layers: count x KiB/token "
            "| checkpointing | rest MiB/sample | logits MiB/sample |", "|" + "---|" * 9]
    for prof_row in plan.profiles:
        st, pr = prof_row["stage"], prof_row["profile"]

        def layers(rows: list[dict], tokens: int) -> str:
            return ", ".join(f"{r['count']} x {r['bytes'] / max(tokens, 1) / 1024:.1f}"
                             f"{' (frozen)' if r['frozen'] else ''}" for r in rows) or "-"

        ms = next(m for m in plan.micro_steps if m.stage == st and m.task == pr["task"])
        out.append(f"| {st} | {pr['task']} | {pr['vit_tokens']} | {layers(pr['vit_layers'], pr['vit_tokens'])} | "
                   f"{pr['llm_tokens'] or '-'} | {layers(pr['llm_layers'], pr['llm_tokens'])} | {ms.checkpointing} | "
                   f"{pr['rest_bytes'] / 2**20:.1f} | {pr['logits_bytes'] / 2**20:.1f} |")
    out += ["", f"Compute at MFU {plan.mfu:g} (model FLOPs: forward + backward, FlopCounterMode; checkpointing's "
            "recomputation not counted):", "",
            "| stage | micro-steps/step | TFLOP/sample | TFLOP/step/GPU | steps | s/step | wall h | GPU h |",
            "|---|---|---|---|---|---|---|---|"]
    for s in plan.stages:
        per = ", ".join(f"{m.task} {m.flops_per_sample / 1e12:.3g}" for m in plan.micro_steps if m.stage == s.stage)
        src = "/".join(sorted({d["source"] for d in s.samples.values()}))
        steps = f"{s.steps:,} ({src})" if s.steps else f"? ({src})"
        wall = f"{s.wall_hours:.1f}" if s.wall_hours is not None else "?"
        gpuh = f"{s.gpu_hours:,.0f}" if s.gpu_hours is not None else "?"
        out.append(f"| {s.stage} | {len(s.micro_steps)} | {per} | {s.step_flops / 1e12:.4g} | {steps} | "
                   f"{s.step_seconds:.3g} | {wall} | {gpuh} |")
    known = [s for s in plan.stages if s.wall_hours is not None]
    if known:
        out.append(f"| all | | | | | | {sum(s.wall_hours for s in known):.1f} | "
                   f"{sum(s.gpu_hours for s in known):,.0f} |")
    vol = plan.storage
    out += ["", "Object storage:", "", "| what | samples | copies | bytes | from |", "|---|---|---|---|---|"]
    for r in vol["datasets"]:
        if r["bytes"] is not None:
            out.append(f"| {r['dataset']} | {r['samples']:,} | {r['copies']} | {_bytes(r['bytes'])} | {r['source']} |")
    for c in vol["checkpoints"]:
        out.append(f"| {c['stage']} checkpoints + export | {c['checkpoints'] or '?'} x {_bytes(c['bytes_each'])} | | "
                   f"{_bytes(c['bytes'])} | every checkpoint is kept |")
    out.append(f"| **total** | | | **{_bytes(vol['total_bytes'])}** | shards {_bytes(vol['shard_bytes'])}, "
               f"checkpoints {_bytes(vol['checkpoint_bytes'])} |")
    if vol["unknown"]:
        out.append(f"\nNot counted (size unknown): {', '.join(vol['unknown'])}.")
    out += [""] + [f"- {n}" for n in plan.notes]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# the pipeline's record


def should_plan(cfg: RunConfig) -> bool:
    """A run on GPUs (cluster backends, GPUs requested, or a local GPU): the plan is of GPU memory and time."""
    return cfg.launch.backend != "local" or cfg.launch.resources.gpus_per_node > 0 or torch.cuda.is_available()


def log_plan(cfg: RunConfig, stage: str, variant: str = "") -> RunPlan | None:
    """Log the plan of `stage` to MLflow before it trains (stages.stage_train): a `plan_<stage>` run under the
    pipeline's run with the settings as params (plan.*) and the figures as metrics (plan/...); returns the plan.
    Planning never stops a launch: a failure to plan is logged as a warning and returns None."""
    from versavit.layout import run_name
    from versavit.tracking import stage_run

    try:
        result = plan_run(cfg, stages=[stage])
    except Exception as exc:  # noqa: BLE001 - the plan is advice; the launch goes on
        log.warning("no capacity plan for %s: %s", stage, exc)
        return None
    for m in result.micro_steps:
        if not m.fits:
            log.warning("plan: %s/%s needs %.1f GiB per GPU, more than %g GiB (%s)", m.stage, m.task, m.total / GIB,
                        result.gpu_memory_gib, m.advice)
    params = {"gpu": result.gpu, "gpus": result.gpus, "gpu_memory_gib": result.gpu_memory_gib,
              "peak_tflops": result.peak_tflops, "mfu": result.mfu, "precision": result.precision,
              "zero_stage": result.zero_stage, **{f"deepspeed.{k}": v for k, v in result.deepspeed.items()},
              **{f"{m.task}.checkpointing": m.checkpointing for m in result.micro_steps},
              **{f"{m.task}.sample": m.inputs for m in result.micro_steps}}
    with stage_run(cfg, f"plan_{run_name(stage, variant)}") as (tracker, run):
        tracker.log_config(run, {"plan": params})
        tracker.log_metrics(run, result.metrics(stage), step=0)
    return result
