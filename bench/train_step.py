"""Training step anatomy on a small config: per-task samples/s, data wait vs. compute, FLOP/s.

One process (world 1, gloo) and the tiny config's model, tasks and batch sizes, three ways on the
same batches, in alternating rounds so that drift of a shared machine hits all three alike:

    ours       the real `Trainer.step`: DeepSpeed engine (ZeRO-2), lambda-weighted accumulation over
               the tasks, one optimiser update per cycle, batches from the resampled shard streams
               (loaded in-process on a CPU, `data.num_workers: auto`; or by DataLoader workers on the
               same cores with --workers N); the batches it draws are recorded
    in-memory  the same `Trainer.step` replaying the recorded batches (no loader running): the loop's
               and DeepSpeed's cost without the loader's
    bare       forward + backward of the recorded batches through a plain copy of the model (no
               DeepSpeed hooks, no optimiser): the floor

Achieved FLOP/s come from torch's FLOP counter on the bare pass, as a fraction of this machine's
measured matmul FLOP/s in the same precision.

    python bench/train_step.py [--rounds 24] [--steps 1] [--size 224] [--workers auto|N] [--zero 2]

Targets (issue 3): data wait <= 10% of step time; the multi-task loop (our step minus its data wait)
within 10% of bare fwd+bwd. Both ratios with the data wait are printed too.
Paper-size backbone memory (<= 1.3x bf16 parameter bytes): bench/backbone_memory.py.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
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


def _recording(stream: Iterator, into: list) -> Iterator:
    for batch in stream:
        into.append(batch)
        yield batch


def deepspeed_breakdown(tr, recorded: dict[str, list], n: int) -> dict[str, float]:
    """ms per optimiser step inside DeepSpeed's ZeRO functions, over n more steps on held batches.

    Timers wrap the optimiser's methods on the class for these steps only (so the rounds above are
    untimed); nested names are parts of their parents.
    """
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    parts = {
        "gradient hooks (process_gradients)": (zero.DeepSpeedZeroOptimizer, "process_gradients"),
        "gradient hooks (count_used_parameters_in_backward)": (zero, "count_used_parameters_in_backward"),
        "backward epilogue (reduce + copy to fp32 partitions)":
            (zero.DeepSpeedZeroOptimizer, "independent_gradient_partition_epilogue"),
        "optimiser step, all": (zero.DeepSpeedZeroOptimizer, "step"),
        "  global grad norm (clipping)": (zero.DeepSpeedZeroOptimizer, "scaled_global_norm"),
        "  AdamW on the fp32 partitions": (zero.DeepSpeedZeroOptimizer, "_optimizer_step"),
        "  copy back to bf16 weights": (zero.DeepSpeedZeroOptimizer, "_update_model_bit16_weights"),
    }
    spent = dict.fromkeys(parts, 0.0)
    originals = {name: getattr(owner, attr) for name, (owner, attr) in parts.items()}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    for name, (owner, attr) in parts.items():
        setattr(owner, attr, timed(name, originals[name]))
    try:
        tr.streams = {t: itertools.cycle(v) for t, v in recorded.items()}
        for i in range(n):
            tr.step(10**6 + i)
    finally:
        for name, (owner, attr) in parts.items():
            setattr(owner, attr, originals[name])
        tr.close_streams()
    return {name: 1000 * t / n for name, t in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds of ours / in-memory / bare (default: 24 without workers, else 8)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps per round and way (default: 1 without loader workers, else 3)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="image side (multiple of 28); tiny.yaml's is 224")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--workers", default="auto", help="DataLoader workers per task stream (auto: as training does)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra dotted config overrides")
    args = ap.parse_args()

    from versavit.config import load_config
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic
    from versavit.data.loader import loader_workers
    from versavit.labeling.jobs import label_dataset
    from versavit.layout import labelled_root, synthetic_root
    from versavit.models.multitask import VersaViT
    from versavit.train.loop import Trainer

    workdir = Path(tempfile.mkdtemp(prefix="versavit-bench-train-"))
    s = args.size
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"workdir={workdir}", f"data.num_workers={args.workers}", "tracking.enabled=false",
        f"data.synthetic.image_size={s}", "data.synthetic.num_train=64", "data.synthetic.num_val=4",
        f"train.resolution={{caption_max: {s}, caption_min: 28, depth: {s}, refseg: {s}}}",
        f"train.precision={args.precision}", "train.multitask.max_steps=10000", "launch.nproc_per_node=1",
        f"train.zero_stage={args.zero}", *args.overrides,
    ])
    workers = loader_workers(cfg.data.num_workers, training=True)
    print(f"building a {s}px world and its text embeddings in {workdir} ...", flush=True)
    build_synthetic(synthetic_root(str(workdir)), SyntheticConfig(**cfg.data.synthetic.model_dump()), workers=2)
    label_dataset("embed", f"{synthetic_root(str(workdir))}/train", f"{labelled_root(str(workdir))}/train",
                  cfg.labeling)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    tr = Trainer.setup(cfg, "multitask", resume=False)
    plan = tr.plan
    # a plain copy of the model: the engine's module carries DeepSpeed's gradient hooks
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    bare_model = VersaViT.build(cfg.model, tasks=plan.tasks, loss=cfg.train.loss, dtype=dtype)
    bare_model.load_state_dict(tr.engine.module.state_dict())
    bare_model.train()

    def bare_step(streams: dict) -> float:
        t0 = time.perf_counter()
        for task in plan.micro_steps:
            loss, _ = bare_model(task, next(streams[task]))
            (plan.weights[task] * loss / plan.micro_steps.count(task)).backward()
        bare_model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step = 0

    def run(n: int) -> list[dict[str, float]]:
        nonlocal step
        points = [tr.step(step + i) for i in range(n)]
        step += n
        return points

    # Without loader workers nothing runs between steps, so the three ways alternate step by step (paired
    # on a drifting machine); with workers, their streams are stopped for the other two ways and restarted.
    rounds = args.rounds or (24 if workers == 0 else 8)
    args.steps = args.steps or (1 if workers == 0 else 3)
    run(args.warmup_steps)
    ours: list[dict[str, float]] = []
    in_memory: list[float] = []
    bare: list[float] = []
    ratios: list[tuple[float, float, float]] = []  # per round: ours / bare, ours' loop / bare, in-memory / bare
    for r in range(rounds):
        if r and workers:
            tr.open_streams()
            run(1)  # workers started and prefetching again; not counted
        # the batches ours draws are recorded, then replayed to the other two ways: the same batches
        recorded: dict[str, list] = {t: [] for t in plan.tasks}
        loader_streams = tr.streams
        tr.streams = {t: _recording(loader_streams[t], recorded[t]) for t in plan.tasks}
        ours += run(args.steps)
        loader_streams = {} if workers else loader_streams
        tr.close_streams()  # with workers: the last reference, so they stop; nothing runs beside the other ways
        tr.streams = {t: iter(recorded[t]) for t in plan.tasks}
        in_memory += [p["time/step_s"] for p in run(args.steps)]
        replay = {t: iter(recorded[t]) for t in plan.tasks}
        bare += [bare_step(replay) for _ in range(args.steps)]
        tr.streams = loader_streams
        o, m, b = (statistics.median(x[-args.steps:]) for x in ([p["time/step_s"] for p in ours], in_memory, bare))
        loop = statistics.median(p["time/step_s"] * (1 - p["time/data_wait_frac"]) for p in ours[-args.steps:])
        ratios.append((o / b, loop / b, m / b))
        print(f"round {r + 1}/{rounds}: ours {o:.3f} s, in-memory {m:.3f} s, bare {b:.3f} s", flush=True)
    tr.close_streams()
    breakdown = deepspeed_breakdown(tr, recorded, n=max(3, args.steps))

    with FlopCounterMode(display=False) as counter:
        bare_step({t: iter(recorded[t]) for t in plan.tasks})
    flops = counter.get_total_flops()
    peak = matmul_flops(dtype)

    step_s = statistics.median(p["time/step_s"] for p in ours)
    wait = statistics.median(p["time/data_wait_frac"] for p in ours)
    bare_s = statistics.median(bare)
    n = rounds * args.steps
    ours_ratio, loop_ratio, mem_ratio = (statistics.median(r[i] for r in ratios) for i in range(3))
    print(f"\nconfig: tiny model at {s}px, {args.precision}, tasks {plan.tasks}, batches {plan.batch_size}, "
          f"{workers} loader worker(s)/task, ZeRO-{args.zero}, medians of {n} steps per way; ratios: median "
          f"over {rounds} rounds of the round's medians")
    for t in plan.tasks:
        print(f"  {t:8s} {statistics.median(p[f'throughput/{t}_samples_per_s'] for p in ours):8.1f} samples/s")
    print(f"step time (ours): {step_s:.3f} s   data wait: {wait:.1%} of the step (target <= 10%)")
    print(f"bare fwd+bwd of the same batches: {bare_s:.3f} s")
    print(f"multi-task loop (ours minus its data wait) / bare = {loop_ratio:.2f} (target <= 1.10)")
    print(f"  the same loop on batches held in memory: {statistics.median(in_memory):.3f} s; / bare = {mem_ratio:.2f}")
    print(f"  ours including the data wait / bare = {ours_ratio:.2f} (the loader shares the cores with the step)")
    print("DeepSpeed's share of a step (ms per optimiser step, held batches):")
    for name, ms in breakdown.items():
        print(f"  {name:55s} {ms:7.1f}")
    print(f"FLOPs per step (fwd+bwd): {flops / 1e9:.2f} GFLOP; achieved {flops / step_s / 1e9:.1f} GFLOP/s ours, "
          f"{flops / bare_s / 1e9:.1f} GFLOP/s bare")
    print(f"machine matmul ({args.precision}, 1024^3): {peak / 1e9:.1f} GFLOP/s -> ours at "
          f"{flops / step_s / peak:.1%} of it")


if __name__ == "__main__":
    main()
