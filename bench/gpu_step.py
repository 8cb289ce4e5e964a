"""Training-step throughput on one GPU: per-task samples/s and MFU at the paper's resolutions and per-GPU batches,
with paper-size modules (configs/paper.yaml: ViT-H/14, Qwen3-1.7B, the DPT and referring-segmentation heads).

Model: `versavit.train.plan.build_skeleton` on the GPU (random weights: no checkpoint is read, nothing is
downloaded), the stage's trainable set, gradient checkpointing and attention as configured, TF32 and the
expandable-segments allocator (versavit.train.engine.configure_cuda), torch's fused AdamW over the trainable
parameters (one GPU: no DeepSpeed, nothing to partition). Inputs: the planner's worst-case samples (caption
images at caption_max, texts at max_text_tokens; depth and refseg at their resolutions). Each task: `--warmup`
untimed micro-steps, then `--steps` timed micro-steps (forward + backward, CUDA-synchronised), then one timed
optimiser step.

FLOPs: torch's FlopCounterMode over one sample's forward + backward with checkpointing off: model FLOPs
(matmuls, convolutions and attention at 2 per multiply-add, causal attention counted in full; elementwise work and
the recomputation of checkpointed layers not counted, as MFU defines it). MFU = FLOPs per sample x samples/s /
the GPU's dense bf16 peak (versavit.train.plan.GPUS, from the vendor's spec sheet; --peak-tflops otherwise).
The multi-task step (one micro-step per task + one optimiser step) is reported too: its MFU is what a training
step achieves on this GPU.

`--tiny`: the tiny config on the CPU at 112 px in fp32 (what the test suite runs): the same code; the MFU is then
of this CPU's measured fp32 matmul FLOP/s, meaningless for GPUs.

    python bench/gpu_step.py [--config configs/paper.yaml] [--stage multitask] [--steps 5] [--warmup 2] [--tiny]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = ["train.precision=fp32",
                  "train.resolution={caption_max: 112, caption_min: 56, depth: 112, refseg: 112}",
                  "train.multitask.batch_size={caption: 2, depth: 2, refseg: 2}"]


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Any, stage: str, device: torch.device, steps: int, warmup: int, peak: float) -> dict[str, Any]:
    from versavit.train.optim import build_optimizer, param_groups
    from versavit.train.plan import build_skeleton, sample_batch
    from versavit.train.trace import FLOP_FORMULAS

    rs = cfg.train.stage(stage)
    dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    model = build_skeleton(cfg, list(rs.tasks), dtype, rs.synergy, device=str(device))
    groups = param_groups(model.set_trainable(list(rs.trainable)), {"backbone": rs.lr_backbone, "heads": rs.lr_heads},
                          cfg.train.optim.weight_decay)
    optimizer = build_optimizer(groups, cfg.train.optim, fused=device.type == "cuda")
    head = model.heads["caption"] if "caption" in model.heads else None  # noqa: SIM401 - ModuleDict
    out: dict[str, Any] = {"stage": stage, "tasks": {}}
    step_flops = step_time = 0.0
    for task in rs.tasks:
        b = rs.batch_size[task]
        # model FLOPs: one sample, checkpointing off (no recomputation counted)
        model.backbone.set_gradient_checkpointing(False)
        if head is not None:
            head.set_gradient_checkpointing(False)
        model.train()
        one = sample_batch(cfg, task, head, 1, device)
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        with counter:
            model(task, one)[0].backward()
        model.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        model.prepare_training(cfg.model)  # checkpointing as configured
        data = sample_batch(cfg, task, head, b, device)
        for _ in range(warmup):
            model(task, data)[0].backward()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(task, data)[0].backward()
        _sync(device)
        micro = (time.perf_counter() - start) / steps
        out["tasks"][task] = {"batch": b, "flops_per_sample": flops, "micro_step_s": micro,
                              "samples_per_s": b / micro, "mfu": flops * b / micro / peak}
        step_flops += flops * b
        step_time += micro
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    out["optimizer_step_s"] = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    out["step_s"] = step_time + out["optimizer_step_s"]
    out["step_mfu"] = step_flops / out["step_s"] / peak
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="run config (default: configs/paper.yaml; --tiny: "
                    "configs/tiny.yaml)")
    ap.add_argument("--stage", default="multitask", help="the recipe stage whose tasks, batches and trainable set run")
    ap.add_argument("--steps", type=int, default=5, help="timed micro-steps per task")
    ap.add_argument("--warmup", type=int, default=2, help="untimed micro-steps per task first")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s of this GPU (default: from "
                    "its name, versavit.train.plan.GPUS)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on the CPU at 112 px (the test suite)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    from versavit.config import load_config
    from versavit.train.plan import GPUS

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    config = args.config or str(ROOT / ("configs/paper.yaml" if cuda else "configs/tiny.yaml"))
    cfg = load_config(config, ([] if cuda else TINY_OVERRIDES) + list(args.overrides))
    if cuda:
        from versavit.train.engine import configure_cuda

        configure_cuda()
        name = torch.cuda.get_device_name()
        known = next((g for g in sorted(GPUS, key=len, reverse=True) if g in name.upper()), None)
        if args.peak_tflops is None and known is None:
            raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")
        peak = args.peak_tflops * 1e12 if args.peak_tflops else GPUS[known].peak_bf16_flops
        where = f"{name}, peak {peak / 1e12:g} TFLOP/s dense bf16"
    else:
        torch.manual_seed(0)
        peak = matmul_flops(torch.float32, device)
        where = f"CPU, measured fp32 matmul {peak / 1e9:.1f} GFLOP/s (MFU of this CPU, not a GPU figure)"
    print(f"{config}, stage {args.stage} on {where}")
    print("FLOPs: FlopCounterMode, one sample's forward + backward without checkpointing (model FLOPs)")
    res = measure(cfg, args.stage, device, args.steps, args.warmup, peak)
    print(f"{'task':<8} {'batch':>5} {'TFLOP/sample':>13} {'micro-step s':>13} {'samples/s':>10} {'MFU':>6}")
    for task, r in res["tasks"].items():
        print(f"{task:<8} {r['batch']:>5} {r['flops_per_sample'] / 1e12:>13.4g} {r['micro_step_s']:>13.4f} "
              f"{r['samples_per_s']:>10.2f} {r['mfu']:>6.1%}")
    print(f"optimiser step {res['optimizer_step_s']:.4f} s; multi-task step {res['step_s']:.4f} s, MFU "
          f"{res['step_mfu']:.1%}" + (f"; peak allocated {res['peak_gib']:.1f} GiB" if "peak_gib" in res else ""))
    return res


if __name__ == "__main__":
    main()
