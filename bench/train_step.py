"""Training step anatomy on a small config: per-task samples/s, data wait vs. compute, FLOP/s.

One process (world 1, gloo), the real `Trainer` (DeepSpeed ZeRO-2 engine, resampled shard
streams, lambda-weighted accumulation over tasks) against the bare forward+backward of the same
batches held in memory, on the same model. Achieved FLOP/s come from torch's FLOP counter on the
bare pass, as a fraction of this machine's measured matmul FLOP/s in the same precision.

    python bench/train_step.py [--steps 6] [--size 112] [--precision bf16|fp32]

Targets (issue 3): data wait <= 10% of step time; our step within 10% of bare fwd+bwd.
Paper-size backbone memory (<= 1.3x bf16 parameter bytes): bench/backbone_memory.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=112, help="image side (multiple of 28)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per task stream")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    args = ap.parse_args()

    from versavit.config import load_config
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic, labelled_root, synthetic_root
    from versavit.labeling.jobs import label_dataset
    from versavit.train.loop import Trainer

    workdir = Path(tempfile.mkdtemp(prefix="versavit-bench-train-"))
    s = args.size
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"workdir={workdir}", f"data.num_workers={args.workers}", "tracking.enabled=false",
        f"data.synthetic.image_size={s}", "data.synthetic.num_train=64", "data.synthetic.num_val=4",
        f"train.multitask.resolution={{caption_max: {s}, caption_min: 28, depth: {s}, refseg: {s}}}",
        f"train.precision={args.precision}", "train.multitask.max_steps=1000", "launch.nproc_per_node=1",
        f"train.zero_stage={args.zero}",
    ])
    print(f"building a {s}px world and its text embeddings in {workdir} ...", flush=True)
    build_synthetic(synthetic_root(str(workdir)), SyntheticConfig(**cfg.data.synthetic.model_dump()), workers=2)
    label_dataset("embed", f"{synthetic_root(str(workdir))}/train", f"{labelled_root(str(workdir))}/train",
                  cfg.labeling)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    tr = Trainer.setup(cfg, "multitask", resume=False)
    for step in range(args.warmup_steps):
        tr.step(step)
    points = [tr.step(args.warmup_steps + i) for i in range(args.steps)]

    # the same kind of batches, in memory, through the same model: forward + backward only
    model = tr.engine.module
    batches = [{t: next(tr.streams[t]) for t in tr.plan.tasks} for _ in range(args.steps)]
    weights = tr.plan.weights

    def bare_step(b: dict) -> None:
        for task in tr.plan.micro_steps:
            loss, _ = model(task, b[task])
            (weights[task] * loss).backward()
        model.zero_grad(set_to_none=True)

    bare_step(batches[0])
    bare = []
    for b in batches:
        t0 = time.perf_counter()
        bare_step(b)
        bare.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:
        bare_step(batches[0])
    flops = counter.get_total_flops()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_flops(dtype)

    step_s = statistics.median(p["time/step_s"] for p in points)
    wait = statistics.median(p["time/data_wait_frac"] for p in points)
    bare_s = statistics.median(bare)
    print(f"\nconfig: tiny model at {s}px, {args.precision}, tasks {tr.plan.tasks}, "
          f"batches {tr.plan.batch_size}, {args.workers} loader workers/task, ZeRO-{args.zero}, "
          f"median of {args.steps} steps")
    for t in tr.plan.tasks:
        print(f"  {t:8s} {statistics.median(p[f'throughput/{t}_samples_per_s'] for p in points):8.1f} samples/s")
    print(f"step time (ours): {step_s:.3f} s   data wait: {wait:.1%} of the step (target <= 10%)")
    print(f"bare fwd+bwd of the same batches: {bare_s:.3f} s   ours / bare = {step_s / bare_s:.2f} "
          "(target <= 1.10)")
    print(f"FLOPs per step (fwd+bwd): {flops / 1e9:.2f} GFLOP; achieved {flops / step_s / 1e9:.1f} GFLOP/s ours, "
          f"{flops / bare_s / 1e9:.1f} GFLOP/s bare")
    print(f"machine matmul ({args.precision}, 1024^3): {peak / 1e9:.1f} GFLOP/s -> ours at "
          f"{flops / step_s / peak:.1%} of it")


if __name__ == "__main__":
    main()
