"""The training loop shared by every stage: caption warm-up and multi-task training.

Run under torchrun (one process per device). One optimiser step = one cycle of micro-steps:
in the multi-task stage one micro-step per active task (the same task on every rank: DeepSpeed's
collectives must match), gradients accumulated over the cycle, weighted by lambda_task.

Outputs under `<workdir>/stages/<stage>/`: checkpoints/ (resumable), export/ (Hugging Face
backbone + heads), stage.json (the small manifest the next stage reads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from versavit import storage
from versavit.config import RunConfig, config_hash, config_to_dict
from versavit.data.shards import read_manifest
from versavit.data.tasks import task_batches, task_urls
from versavit.models.multitask import VersaViT
from versavit.train import checkpoint
from versavit.train.engine import deepspeed_config, dist_env, init_distributed, initialize
from versavit.train.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)
STAGES = ("warmup", "multitask")
TRAINED_STATE = "trained_state.pt"


@dataclass
class StagePlan:
    stage: str
    tasks: list[str]
    micro_steps: list[str]  # the tasks of one optimiser step, in order
    batch_size: dict[str, int]
    total_steps: int
    checkpoint_interval: int
    weights: dict[str, float]
    url: str  # <workdir>/stages/<stage>
    lrs: dict[str, float] = field(default_factory=dict)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.url, "checkpoints")

    @property
    def export(self) -> str:
        return storage.join(self.url, "export")


def stage_url(cfg: RunConfig, stage: str, variant: str = "") -> str:
    """`<workdir>/stages/<stage>[-<variant>]`: variants (ablation branches) share data and warm-up."""
    return storage.join(cfg.workdir, "stages", f"{stage}-{variant}" if variant else stage)


def _dataset_size(urls: list[str]) -> int | None:
    try:
        return sum(read_manifest(u).num_samples for u in urls)
    except (storage.StorageError, ValueError):
        return None  # shard URLs without a manifest: the length must come from max_steps


def plan_stage(cfg: RunConfig, stage: str, world: int = 1, variant: str = "") -> StagePlan:
    """Tasks, batch sizes, step count and learning rates of `stage`, from the config alone."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if stage == "warmup":
        w = cfg.train.warmup
        accum = max(1, w.global_batch // (w.micro_batch * world))
        tasks, micro, batch = ["caption"], ["caption"] * accum, {"caption": w.micro_batch}
        weights, length, lrs = {"caption": 1.0}, w, {"projector": w.lr}
    else:
        m = cfg.train.multitask
        tasks, micro, batch = list(m.tasks), list(m.tasks), {t: m.batch_size[t] for t in m.tasks}
        weights = {t: getattr(m.loss_weights, t) for t in tasks}
        length, lrs = m, {"backbone": m.optim.lr_backbone, "heads": m.optim.lr_heads}
    if length.max_steps:
        steps = length.max_steps
    else:  # one epoch of the largest task; smaller tasks are resampled to the same step count
        sizes = {t: _dataset_size(task_urls(cfg, t)) for t in tasks}
        if any(v is None for v in sizes.values()):
            raise ValueError(f"train.{stage}.max_steps is required: dataset sizes unknown for "
                             f"{[t for t, v in sizes.items() if v is None]}")
        per_step = {t: batch[t] * world * micro.count(t) for t in tasks}
        steps = max(1, math.ceil(length.epochs * max(sizes[t] / per_step[t] for t in tasks)))
    return StagePlan(stage, tasks, micro, batch, steps, length.checkpoint_interval, weights,
                     stage_url(cfg, stage, variant), lrs)


def _init_weights_from(model: VersaViT, url: str) -> int:
    """Load the parameters an earlier stage trained (e.g. the warm-up projector)."""
    local = Path(storage.get_fs(url)[1]) if not storage.is_remote(url) else None
    blob = (local / TRAINED_STATE).read_bytes() if local else storage.read_bytes(storage.join(url, TRAINED_STATE))
    import io

    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{url}: {len(missing)} parameter(s) do not exist in this model, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return len(state)


def _resolve_init(cfg: RunConfig) -> str | None:
    init = cfg.train.multitask.init_from
    if init == "auto":
        warm = storage.join(stage_url(cfg, "warmup"), "export")
        return warm if storage.exists(storage.join(warm, TRAINED_STATE)) else None
    return init


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


@dataclass
class Trainer:
    """Everything one stage's loop needs; `setup` builds it, `step` runs one optimiser step."""

    cfg: RunConfig
    plan: StagePlan
    engine: Any
    optimizer: torch.optim.Optimizer
    streams: dict[str, Any]
    batches_done: dict[str, int]
    device: torch.device
    rank: int
    world: int
    start: int
    init_from: str | None

    @classmethod
    def setup(cls, cfg: RunConfig, stage: str, variant: str = "", resume: bool = True) -> Trainer:
        """Process group, model (+ weights of an earlier stage), DeepSpeed engine, resumed state, data streams."""
        storage.configure(cfg.storage)
        device = init_distributed(cfg.train)
        rank, world, _ = dist_env()
        plan = plan_stage(cfg, stage, world, variant)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        torch.manual_seed(cfg.train.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's)
        model = VersaViT.build(cfg.model, tasks=plan.tasks, weights=cfg.train.multitask.loss_weights, dtype=dtype)
        init_from = _resolve_init(cfg) if stage == "multitask" else None
        if init_from:
            n = _init_weights_from(model, init_from)
            if rank == 0:
                log.info("initialised %d tensors from %s", n, init_from)
        if stage == "warmup":
            groups = param_groups({"projector": model.freeze_for_warmup()}, plan.lrs, 0.0)
        else:
            groups = param_groups({"backbone": model.backbone_group(), "heads": model.heads_group()}, plan.lrs,
                                  cfg.train.multitask.optim.weight_decay)
        optim_cfg = cfg.train.multitask.optim
        optimizer = build_optimizer(groups, optim_cfg)
        scheduler = build_scheduler(optimizer, plan.total_steps, optim_cfg)
        engine = initialize(model, optimizer, scheduler,
                            deepspeed_config(cfg.train, len(plan.micro_steps), optim_cfg.grad_clip))
        client = (checkpoint.load(engine, plan.checkpoints, rank) if resume else None) or {}
        batches_done: dict[str, int] = dict(client.get("batches_done", {t: 0 for t in plan.tasks}))
        streams = {t: task_batches(cfg, t, plan.batch_size[t], batches_done[t], seed_offset=i)
                   for i, t in enumerate(plan.tasks)}
        return cls(cfg, plan, engine, optimizer, streams, batches_done, device, rank, world,
                   int(client.get("step", 0)), init_from)

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step: a micro-step per entry of plan.micro_steps, then the metrics point."""
        plan, engine = self.plan, self.engine
        t_step = time.perf_counter()
        wait = 0.0
        losses: dict[str, list[float]] = {t: [] for t in plan.tasks}
        task_time: dict[str, float] = dict.fromkeys(plan.tasks, 0.0)
        for task in plan.micro_steps:
            t0 = time.perf_counter()
            batch = _to_device(next(self.streams[task]), self.device)
            t1 = time.perf_counter()
            wait += t1 - t0
            loss, _parts = engine(task, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: {task} loss is {loss.item()} on rank {self.rank}")
            # lambda-weighted sum over tasks (not DeepSpeed's mean over micro-steps) for multi-task;
            # a plain mean over accumulated micro-batches for the single-task warm-up.
            engine.backward(plan.weights[task] * loss, scale_wrt_gas=(plan.stage == "warmup"))
            engine.step()
            losses[task].append(float(loss.detach()))
            self.batches_done[task] += 1
            task_time[task] += time.perf_counter() - t1
        step_time = time.perf_counter() - t_step
        means = _mean_over_ranks([sum(v) / len(v) for v in losses.values()])
        point: dict[str, float] = {f"loss/{t}": v for t, v in zip(plan.tasks, means, strict=True)}
        point["loss/total"] = sum(plan.weights[t] * point[f"loss/{t}"] for t in plan.tasks)
        for g in self.optimizer.param_groups:
            point[f"lr/{g['name']}"] = g["lr"]
        for t in plan.tasks:
            n = plan.batch_size[t] * self.world * plan.micro_steps.count(t)
            point[f"throughput/{t}_samples_per_s"] = n / max(task_time[t], 1e-9)
        point["time/step_s"] = step_time
        point["time/data_wait_frac"] = wait / step_time
        return point

    def save(self, step: int) -> None:
        checkpoint.save(self.engine, self.plan.checkpoints, step, {"step": step, "batches_done": self.batches_done},
                        self.rank)


def run_stage(cfg: RunConfig, stage: str, variant: str = "") -> dict[str, Any]:
    """Train `stage` to its end (resuming from the latest checkpoint if any); every rank calls this."""
    from versavit.pipeline import make_tracker  # tracking set-up shared with the other stages

    tr = Trainer.setup(cfg, stage, variant)
    plan, rank, start = tr.plan, tr.rank, tr.start
    run_name = f"{stage}-{variant}" if variant else stage
    tracker = make_tracker(cfg, rank)
    tags = {"versavit.config_hash": config_hash(cfg), "versavit.resumed_from_step": str(start)}
    run = tracker.start_stage_run(run_name, tracker.parent_from_env(), tags=tags)
    if start == 0:
        tracker.log_config(run, config_to_dict(cfg))
    metrics_path = _metrics_path(cfg, run_name)
    if rank == 0 and start == 0:
        metrics_path.unlink(missing_ok=True)
    progress = _Progress(rank == 0, run_name, plan.total_steps, start)
    fault = _fault_injection(rank)
    last_saved = start
    try:
        for step in range(start, plan.total_steps):
            if fault is not None and step == fault:
                log.warning("fault injection: rank %d kills itself at step %d", rank, step)
                os.kill(os.getpid(), signal.SIGKILL)
            point = tr.step(step)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step + 1, **point}) + "\n")
            if (step + 1) % cfg.train.log_interval == 0 or step + 1 == plan.total_steps:
                tracker.log_metrics(run, point, step=step + 1)
            progress.update(step + 1, point, plan.tasks)
            if (step + 1) % plan.checkpoint_interval == 0 or step + 1 == plan.total_steps:
                tr.save(step + 1)
                last_saved = step + 1
        result = _finish(cfg, plan, tr.engine, rank, tracker, run, tr.init_from)
        tracker.end_run(run, "FINISHED")
        return result
    except BaseException:
        tracker.end_run(run, "FAILED")
        raise
    finally:
        progress.close()
        tracker.close()
        if rank == 0:
            log.info("%s: last committed checkpoint at step %d", run_name, last_saved)


def _fault_injection(rank: int) -> int | None:
    """VERSAVIT_FAULT_INJECT="rank=R,step=S": rank R dies at step S (tests the launcher's failure report)."""
    spec = os.environ.get("VERSAVIT_FAULT_INJECT")
    if not spec:
        return None
    fields = dict(part.split("=", 1) for part in spec.split(","))
    return int(fields["step"]) if int(fields["rank"]) == rank else None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor)
            else [x.to(device, non_blocking=True) for x in v] if isinstance(v, list) and v and
            isinstance(v[0], torch.Tensor) else v for k, v in batch.items()}


def _metrics_path(cfg: RunConfig, stage: str) -> Path:
    from versavit.pipeline import reports_dir

    return reports_dir(cfg, stage) / "metrics.jsonl"


def _finish(cfg: RunConfig, plan: StagePlan, engine: Any, rank: int, tracker: Any, run: Any,
            init_from: str | None) -> dict[str, Any]:
    """Export (rank 0): HF backbone + heads, the trained tensors, stage.json; register the backbone."""
    module: VersaViT = engine.module
    result: dict[str, Any] = {}
    if rank == 0:
        import tempfile

        trained = {k: v.detach().cpu() for k, v in module.named_parameters() if v.requires_grad}
        with tempfile.TemporaryDirectory() as tmp:
            module.save_pretrained(tmp)
            torch.save(trained, Path(tmp) / TRAINED_STATE)
            fs, _ = storage.get_fs(plan.export)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    with storage.atomic_local_file(storage.join(plan.export, str(path.relative_to(tmp)))) as dst:
                        Path(dst).write_bytes(path.read_bytes())
        run_id = tracker.run_id(run)
        result = {"stage": plan.stage, "variant": plan.url.rsplit("/", 1)[-1], "export_url": plan.export,
                  "config_hash": config_hash(cfg), "checkpoint_url": plan.checkpoints,
                  "steps": plan.total_steps, "tasks": plan.tasks, "init_from": init_from,
                  "mlflow_run_id": run_id, "plan": asdict(plan)}
        storage.write_text(storage.join(plan.url, "stage.json"), json.dumps(result, indent=1, default=str))
        tracker.set_tags(run, {"versavit.export_url": plan.export})
        tracker.register_model(run, f"{cfg.name}-{plan.url.rsplit('/', 1)[-1]}-backbone",
                               storage.join(plan.export, "backbone"))
    if dist.is_initialized():
        dist.barrier()
    return result


class _Progress:
    """A rich progress bar with the latest per-task losses, on rank 0 only."""

    def __init__(self, enabled: bool, stage: str, total: int, start: int):
        self.bar = None
        if enabled:
            from versavit.progress import progress_bar

            self._ctx = progress_bar()
            self.bar = self._ctx.__enter__()
            self.task = self.bar.add_task(stage, total=total, completed=start)
            self.stage = stage

    def update(self, step: int, point: dict[str, float], tasks: list[str]) -> None:
        if self.bar is not None:
            desc = " ".join(f"{t}={point[f'loss/{t}']:.3f}" for t in tasks)
            self.bar.update(self.task, completed=step, description=f"{self.stage} {desc}")

    def close(self) -> None:
        if self.bar is not None:
            self._ctx.__exit__(None, None, None)
            self.bar = None
