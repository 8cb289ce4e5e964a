"""DeepSpeed set-up from the run config: process group, engine config, initialisation."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from versavit.config.schema import TrainConfig
from versavit.models.precision import resolve_precision


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# The CUDA caching allocator grows segments in place instead of keeping blocks of every size ever asked for: the
# tasks' micro-steps differ in shape (caption at dynamic resolution, depth, refseg), which otherwise fragments
# memory. Read when the allocator first allocates, so set before any CUDA work (pods also get it in their env:
# versavit.launch.base.container_env).
ALLOC_CONF = "expandable_segments:True"


def configure_cuda() -> None:
    """Allocator and matmul settings of a GPU rank: expandable segments (unless PYTORCH_CUDA_ALLOC_CONF is set) and
    TF32 tensor cores for the fp32 matmuls and convolutions that remain (losses, fp32 runs); bf16 work is
    unaffected."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # before the first CUDA allocation of the rank
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 (the legacy flags are deprecated)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _skip_shm_comm_op() -> None:
    """On CPU, DeepSpeed's torch backend JIT-compiles its shared-memory comm op (C++, ~40 s on 2 cores, a compiler
    needed; again whenever the cached build looks stale) when it starts. That op serves only
    `inference_all_reduce`, which training never calls (gradients go through torch.distributed), so it is not
    built: the backend then takes its own fallback, as on a machine where the op is incompatible."""
    import importlib

    # by module name: the attribute deepspeed.comm.torch is the torch package (deepspeed.comm imports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(cfg: TrainConfig) -> torch.device:
    """gloo on CPU, nccl on GPUs; a timeout so a dead peer fails the run instead of hanging it."""
    import deepspeed

    _, _, local_rank = dist_env()
    cuda = torch.cuda.is_available()
    if cuda:
        configure_cuda()
        torch.cuda.set_device(local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if not cuda:
        _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                               timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def deepspeed_config(cfg: TrainConfig, grad_accum: int, grad_clip: float, device: str | None = None
                     ) -> dict[str, Any]:
    """ZeRO stage, precision, clipping and accumulation; the optimiser and schedule are ours. `device` ("cuda" or
    "cpu"; default: this machine's) decides the settings that differ between the two (the planner asks for
    "cuda")."""
    gpu = torch.cuda.is_available() if device is None else device == "cuda"
    ds = cfg.deepspeed
    overlap = gpu if ds.overlap_comm == "auto" else bool(ds.overlap_comm)
    return {
        "train_micro_batch_size_per_gpu": 1,  # batching is per task and done by our loaders
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        # contiguous gradients avoid memory fragmentation on GPUs; on a CPU the per-tensor copies into the
        # bucket only cost time (hooks 14.8 -> 3.2 ms, epilogue 14.8 -> 7.2 ms per step of the tiny config:
        # bench/train_step.py)
        # overlap_comm: gradient buckets are reduced on a side stream while backward goes on (two bucket buffers,
        # train.deepspeed); bucket sizes in elements (DeepSpeed's defaults: 5e8)
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": overlap, "contiguous_gradients": gpu,
                              "reduce_bucket_size": ds.reduce_bucket_size,
                              "allgather_bucket_size": ds.allgather_bucket_size},
        # no per-tensor inf/nan scan before each update (bf16 needs no loss scaling; the scan cost ~1% of the
        # tiny config's step): the loop checks the global gradient norm it computes anyway and stops the run
        "bf16": {"enabled": resolve_precision(cfg.precision) == "bf16", "check_grad_overflow": False},
        # torch's AdamW (fused on GPUs: versavit.train.optim), no JIT-compiled DeepSpeed optimiser op needed
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
