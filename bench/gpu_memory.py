"""Measured memory of each training micro-step next to `versavit plan`'s figures (versavit.train.plan).

On a GPU (configs/paper.yaml by default, at its per-GPU batches): paper-size modules with random weights
(`build_skeleton` on the GPU: no checkpoint is read, no download), the stage's trainable set and gradient
checkpointing as configured, one micro-step (forward + backward) per task. Measured: the peak of
torch.cuda.max_memory_allocated during the micro-step, minus what was allocated before it and the parameter
gradients it leaves; planned: the plan's activations + recompute + logits (the same three things). The
parameters' bytes are compared too (allocated after the build vs. the plan's parameters).

On a CPU (`--tiny`, what the test suite runs; or any run without a GPU): the tiny config at 112 px in fp32 with
checkpointing off. Measured: the bytes autograd keeps for backward (saved_tensors_hooks, parameters excluded:
versavit.train.trace.run_traced on real tensors); planned: the plan's activations without checkpointing + the kept
logits. Peak memory is not comparable there (the CPU allocator has no peak counter).

    python bench/gpu_memory.py [--config configs/paper.yaml] [--stage multitask] [--batch N] [--tiny]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
TINY_OVERRIDES = ["train.precision=fp32", "model.backbone.gradient_checkpointing=false",
                  "model.heads.caption.gradient_checkpointing=false",
                  "train.resolution={caption_max: 112, caption_min: 56, depth: 112, refseg: 112}",
                  "train.warmup.batch_size={caption: 2}",
                  "train.multitask.batch_size={caption: 2, depth: 2, refseg: 2}"]


def run(cfg: Any, stages: list[str], batch: int | None, device: torch.device) -> list[dict[str, Any]]:
    from versavit.train.plan import build_skeleton, plan_run, sample_batch
    from versavit.train.trace import run_traced

    rows = []
    for stage in stages:
        plan = plan_run(cfg, stages=[stage], use_manifests=False)
        rs = cfg.train.stage(stage)
        dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
        model = build_skeleton(cfg, list(rs.tasks), dtype, rs.synergy, device=str(device))
        model.set_trainable(list(rs.trainable))
        model.prepare_training(cfg.model)  # checkpointing as configured, training mode
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        measured_params = torch.cuda.memory_allocated() - before if device.type == "cuda" else params
        head = model.heads["caption"] if "caption" in model.heads else None  # noqa: SIM401 - ModuleDict
        for m in plan.micro_steps:
            b = batch or m.batch
            scale = b / m.batch
            data = sample_batch(cfg, m.task, head, b, device)
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss, _ = model(m.task, data)
                loss.backward()
                torch.cuda.synchronize()
                grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
                measured = torch.cuda.max_memory_allocated() - base - grads
                planned = scale * (m.activations + m.recompute + m.logits)
                what = "peak - before - gradients"
            else:
                vocab = head.llm.get_output_embeddings().weight.shape[0] if head is not None else None
                trace = run_traced(model, lambda m=m, d=data, net=model: net(m.task, d)[0], vocab_size=vocab)
                measured = sum(trace.saved.values())
                planned = scale * (m.activations_no_ckpt + m.logits / 2)
                what = "saved for backward"
            model.zero_grad(set_to_none=True)
            rows.append({"stage": stage, "task": m.task, "batch": b, "planned": planned, "measured": measured,
                         "ratio": measured / planned if planned else float("nan"), "what": what,
                         "params_planned": m.params, "params_measured": measured_params,
                         "plan_total": scale * (m.total - m.reserved) + m.reserved,
                         "seconds": time.perf_counter() - start})
        del model
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="run config (default: configs/paper.yaml; --tiny: "
                    "configs/tiny.yaml)")
    ap.add_argument("--stage", action="append", help="stage(s) to measure (default: every recipe stage)")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch of every task (default: the config's)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on the CPU at 112 px (the test suite)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    from versavit.config import load_config

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        from versavit.train.engine import configure_cuda

        configure_cuda()
    config = args.config or str(ROOT / ("configs/tiny.yaml" if args.tiny or not cuda else "configs/paper.yaml"))
    overrides = (TINY_OVERRIDES if not cuda else []) + list(args.overrides)
    cfg = load_config(config, overrides)
    stages = args.stage or [s.name for s in cfg.train.stages()]
    device = torch.device("cuda" if cuda else "cpu")
    print(f"{config} on {torch.cuda.get_device_name() if cuda else 'CPU'}; measured: "
          f"{'peak allocated during the micro-step' if cuda else 'bytes saved for backward'}")
    rows = run(cfg, stages, args.batch, device)
    print(f"{'stage':<10} {'task':<8} {'batch':>5} {'planned GiB':>12} {'measured GiB':>13} {'ratio':>6} "
          f"{'params plan/measured GiB':>25} {'plan total GiB':>15}")
    for r in rows:
        print(f"{r['stage']:<10} {r['task']:<8} {r['batch']:>5} {r['planned'] / GIB:>12.4f} "
              f"{r['measured'] / GIB:>13.4f} "
              f"{r['ratio']:>6.3f} {r['params_planned'] / GIB:>12.3f}/{r['params_measured'] / GIB:<12.3f} "
              f"{r['plan_total'] / GIB:>15.2f}")
    return rows


if __name__ == "__main__":
    main()
