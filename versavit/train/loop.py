"""The training loop shared by every stage of every recipe (VersaViT's, SAILViT-style, ...).

A recipe (`cfg.train.stages()`, config `train.recipe`) is an ordered list of stages; each names its
tasks, trainable parameter patterns, learning rates, text source and length, so the loop has no
stage-specific code. Run under torchrun (one process per device). One optimiser step = one cycle of
micro-steps: one per active task (the same task on every rank: DeepSpeed's collectives must match), or,
for a single-task stage with `global_batch`, that task's micro-batches accumulated up to the global
batch; gradients accumulated over the cycle, weighted by lambda_task / (micro-steps of that task).

Outputs under `<workdir>/stages/<stage>[-<variant>]/`: checkpoints/ (resumable), export/ (Hugging Face
backbone + heads, and the tensors trained so far), stage.json (the small manifest the next stage reads).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
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
from versavit.layout import export_url, metrics_log, run_name, stage_url, staging_root, version_export_url
from versavit.models.mllm import check_base as check_mllm_base
from versavit.models.mllm import export_mllm
from versavit.models.multitask import VersaViT
from versavit.models.precision import precision_dtype, resolve_precision
from versavit.tracking import model_version_meta, stage_run
from versavit.train import checkpoint
from versavit.train.engine import deepspeed_config, dist_env, init_distributed, initialize
from versavit.train.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)
TRAINED_STATE = "trained_state.pt"
REGISTERED = "registered.json"  # in an exports/<hash>-<step>/ folder once a model version points at it
MLLM_DIR = "mllm"  # export/mllm: the full Qwen2-VL with the trained tower (model.backbone.export_mllm)


@dataclass
class StagePlan:
    stage: str
    tasks: list[str]
    micro_steps: list[str]  # the tasks of one optimiser step, in order
    batch_size: dict[str, int]
    total_steps: int
    checkpoint_interval: int
    weights: dict[str, float]
    url: str  # <workdir>/stages/<stage>[-<variant>]
    lrs: dict[str, float] = field(default_factory=dict)
    variant: str = ""
    trainable: list[str] = field(default_factory=list)
    caption_source: str = "mixed"
    weight_decay: float = 0.0
    synergy: bool = False

    @property
    def checkpoints(self) -> str:
        return storage.join(self.url, "checkpoints")

    @property
    def export(self) -> str:
        return storage.join(self.url, "export")


def _dataset_size(urls: list[str]) -> int | None:
    try:
        return sum(read_manifest(u).num_samples for u in urls)
    except (storage.StorageError, ValueError):
        return None  # shard URLs without a manifest: the length must come from max_steps


def plan_stage(cfg: RunConfig, stage: str, world: int = 1, variant: str = "") -> StagePlan:
    """Tasks, micro-steps, batch sizes, step count and learning rates of recipe stage `stage`."""
    rs = cfg.train.stage(stage)
    tasks = list(rs.tasks)
    batch = {t: rs.batch_size[t] for t in tasks}
    # one micro-step per task, or (single task) micro-batches accumulated up to the global batch
    accum = 1 if rs.global_batch is None else max(1, rs.global_batch // (batch[tasks[0]] * world))
    micro = tasks * accum
    weights = {t: rs.loss_weights[t] for t in tasks}
    if rs.max_steps:
        steps = rs.max_steps
    else:  # one epoch of the largest task; smaller tasks are resampled to the same step count
        sizes = {t: _dataset_size(task_urls(cfg, t, stage=stage)) for t in tasks}
        if any(v is None for v in sizes.values()):
            raise ValueError(f"{cfg.train.stage_path(stage)}.max_steps is required: dataset sizes unknown for "
                             f"{[t for t, v in sizes.items() if v is None]}")
        per_step = {t: batch[t] * world * micro.count(t) for t in tasks}
        steps = max(1, math.ceil(rs.epochs * max(sizes[t] / per_step[t] for t in tasks)))
    wd = cfg.train.optim.weight_decay if rs.weight_decay is None else rs.weight_decay
    return StagePlan(stage, tasks, micro, batch, steps, rs.checkpoint_interval, weights,
                     stage_url(cfg, stage, variant), {"backbone": rs.lr_backbone, "heads": rs.lr_heads}, variant,
                     list(rs.trainable), rs.caption_source, wd, rs.synergy.enabled)


def _init_weights_from(model: VersaViT, url: str) -> list[str]:
    """Load the tensors earlier stages trained (e.g. the warm-up projector); returns the loaded names.

    Tensors of heads (or the synergy module) this stage does not build are skipped: a caption-only stage
    may follow a multi-task one. Any other unknown name is an error (a different model).
    """
    local = Path(storage.get_fs(url)[1]) if not storage.is_remote(url) else None
    blob = (local / TRAINED_STATE).read_bytes() if local else storage.read_bytes(storage.join(url, TRAINED_STATE))
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    own = model.state_dict()
    built = tuple(f"heads.{h}." for h in model.heads) + (("synergy.",) if model.synergy is not None else ())
    skipped = [k for k in state if k not in own and k.startswith(("heads.", "synergy.")) and not k.startswith(built)]
    missing = [k for k in state if k not in own and k not in skipped]
    if missing:
        raise ValueError(f"{url}: {len(missing)} parameter(s) do not exist in this model, e.g. {missing[:3]}")
    state = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("init: skipped %d tensor(s) of heads this stage does not build", len(skipped))
    return list(state)


def resolve_init(cfg: RunConfig, stage: str, variant: str = "") -> str | None:
    """The export a stage starts from: "auto" = the previous stage of the recipe (same variant, falling back
    to variant ""), None when there is none yet; an explicit URL as given."""
    init = cfg.train.stage(stage).init_from
    if init != "auto":
        return init
    names = [s.name for s in cfg.train.stages()]
    i = names.index(stage)
    if i == 0:
        return None
    for v in dict.fromkeys([variant, ""]):
        export = export_url(cfg, names[i - 1], v)
        if storage.exists(storage.join(export, TRAINED_STATE)):
            return export
    log.warning("stage %s: previous stage %s has no export yet; starting from the initial weights", stage,
                names[i - 1])
    return None


def build_stage_model(cfg: RunConfig, plan: StagePlan, dtype: torch.dtype, init_from: str | None = None,
                      ) -> tuple[VersaViT, list[str], dict[str, list[torch.nn.Parameter]]]:
    """The model stage `plan.stage` trains: built from the config (seeded: the same init on every rank, and
    DeepSpeed also broadcasts rank 0's), the tensors `init_from` holds, the stage's trainable set, then gradient
    checkpointing as configured and training mode whatever loaded each part (VersaViT.prepare_training).

    Returns (model, names of the tensors loaded from init_from, trainable parameters by optimiser group)."""
    rs = cfg.train.stage(plan.stage)
    torch.manual_seed(cfg.train.seed)
    model = VersaViT.build(cfg.model, tasks=plan.tasks, loss=cfg.train.loss, dtype=dtype, synergy=rs.synergy)
    inherited = _init_weights_from(model, init_from) if init_from else []
    trainable = model.set_trainable(plan.trainable)
    model.prepare_training(cfg.model)
    if _exports_mllm(cfg, model):  # fail now, not after the stage: the export needs a full checkpoint
        check_mllm_base(cfg.model.backbone.pretrained)
    return model, inherited, trainable


def _exports_mllm(cfg: RunConfig, model: VersaViT) -> bool:
    """model.backbone.export_mllm and this stage trains the tower (a frozen tower is the base's own)."""
    if not cfg.model.backbone.export_mllm:
        return False
    if not cfg.model.backbone.pretrained:
        raise ValueError("model.backbone.export_mllm needs model.backbone.pretrained: the full Qwen2-VL / "
                         "Qwen2.5-VL checkpoint the trained tower goes back into")
    return any(p.requires_grad for p in model.backbone.parameters())


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
    inherited: list[str] = field(default_factory=list)  # tensor names loaded from init_from

    @classmethod
    def setup(cls, cfg: RunConfig, stage: str, variant: str = "", resume: bool = True) -> Trainer:
        """Process group, model (+ weights of an earlier stage), trainable set, DeepSpeed engine, resumed
        state, data streams."""
        storage.configure(cfg.storage)
        device = init_distributed(cfg.train)
        rank, world, _ = dist_env()
        plan = plan_stage(cfg, stage, world, variant)
        if cfg.train.restart:  # start over: the old checkpoints go first (they may be another config's)
            checkpoint.remove(plan.checkpoints, rank)
            resume = False
        elif resume:  # a checkpoint of another config is never resumed silently (fails before any build)
            checkpoint.check_resumable(plan.checkpoints, cfg)
        dtype = precision_dtype(cfg.train.precision)
        if cfg.train.precision == "auto" and rank == 0:
            log.info("train.precision auto: %s on this machine", resolve_precision("auto"))
        init_from = resolve_init(cfg, stage, variant)
        model, inherited, trainable = build_stage_model(cfg, plan, dtype, init_from)
        if init_from and rank == 0:
            log.info("initialised %d tensors from %s", len(inherited), init_from)
        groups = param_groups(trainable, plan.lrs, plan.weight_decay)
        optim_cfg = cfg.train.optim
        optimizer = build_optimizer(groups, optim_cfg)
        scheduler = build_scheduler(optimizer, plan.total_steps, optim_cfg)
        engine = initialize(model, optimizer, scheduler,
                            deepspeed_config(cfg.train, len(plan.micro_steps), optim_cfg.grad_clip))
        storage.remove_stale_staging(staging_root(cfg))  # what a killed run left (its pid no longer runs)
        client = (checkpoint.load(engine, plan.checkpoints, rank, staging_root(cfg)) if resume else None) or {}
        batches_done: dict[str, int] = dict(client.get("batches_done", {t: 0 for t in plan.tasks}))
        trainer = cls(cfg, plan, engine, optimizer, {}, batches_done, device, rank, world,
                      int(client.get("step", 0)), init_from, inherited)
        trainer.open_streams()
        return trainer

    def open_streams(self) -> None:
        """One resampled stream per task, starting at its data position (`batches_done`)."""
        self.close_streams()
        self.streams = {t: task_batches(self.cfg, t, self.plan.batch_size[t], self.batches_done[t], seed_offset=i,
                                        caption_source=self.plan.caption_source, stage=self.plan.stage)
                        for i, t in enumerate(self.plan.tasks)}

    def close_streams(self) -> None:
        """Release the streams; their DataLoader workers stop when the last reference goes."""
        self.streams = {}

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step: a micro-step per entry of plan.micro_steps, then the metrics point."""
        plan, engine = self.plan, self.engine
        t_step = time.perf_counter()
        wait = 0.0
        losses: dict[str, list[float]] = {t: [] for t in plan.tasks}
        extra: dict[str, list[float]] = {}  # the tasks' loss terms and the synergy module's numbers
        task_time: dict[str, float] = dict.fromkeys(plan.tasks, 0.0)
        for task in plan.micro_steps:
            t0 = time.perf_counter()
            batch = _to_device(next(self.streams[task]), self.device)
            t1 = time.perf_counter()
            wait += t1 - t0
            loss, parts = engine(task, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: {task} loss is {loss.item()} on rank {self.rank}")
            # lambda-weighted sum over tasks (not DeepSpeed's mean over micro-steps), and a plain mean over a
            # task's accumulated micro-batches: lambda_task / (its micro-steps in this cycle)
            engine.backward(loss * plan.weights[task] / plan.micro_steps.count(task), scale_wrt_gas=False)
            engine.step()
            losses[task].append(parts.get("task_loss", float(loss.detach())))
            for k, v in parts.items():
                if k != "task_loss":
                    extra.setdefault(k if k.startswith("synergy/") else f"parts/{task}/{k}", []).append(v)
            self.batches_done[task] += 1
            task_time[task] += time.perf_counter() - t1
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise FloatingPointError(f"step {step}: gradient norm is {grad_norm} on rank {self.rank} after "
                                     "finite losses; the run stops (the last checkpoint is intact): lower the "
                                     "learning rates or use train.precision=fp32 to find the layer")
        step_time = time.perf_counter() - t_step
        keys = sorted(extra)  # the same on every rank: every rank ran the same micro-steps
        means = _mean_over_ranks([sum(v) / len(v) for v in losses.values()]
                                 + [sum(extra[k]) / len(extra[k]) for k in keys])
        point: dict[str, float] = {f"loss/{t}": v for t, v in zip(plan.tasks, means, strict=False)}
        point["loss/total"] = sum(plan.weights[t] * point[f"loss/{t}"] for t in plan.tasks)
        point.update(zip(keys, means[len(plan.tasks):], strict=True))
        if grad_norm is not None:
            point["grad_norm"] = grad_norm
        for g in self.optimizer.param_groups:
            point[f"lr/{g['name']}"] = g["lr"]
        for t in plan.tasks:
            n = plan.batch_size[t] * self.world * plan.micro_steps.count(t)
            point[f"throughput/{t}_samples_per_s"] = n / max(task_time[t], 1e-9)
        point["time/step_s"] = step_time
        point["time/data_wait_frac"] = wait / step_time
        point.update(self.data_counters())
        return point

    def data_counters(self) -> dict[str, float]:
        """`data/<task>_lost_samples` and `_lost_fraction`: what each task's loader lost (this rank's view)."""
        stats = [getattr(self.streams.get(t), "stats", None) for t in self.plan.tasks]
        return {k: v for s in stats if s is not None for k, v in s.metrics().items()}

    def save(self, step: int) -> None:
        checkpoint.save(self.engine, self.plan.checkpoints, step, {"step": step, "batches_done": self.batches_done},
                        self.rank, staging_root(self.cfg), meta={"config_hash": checkpoint.resume_hash(self.cfg)})


def run_stage(cfg: RunConfig, stage: str, variant: str = "") -> dict[str, Any]:
    """Train recipe stage `stage` to its end (resuming from the latest checkpoint if any); every rank calls this."""
    tr = Trainer.setup(cfg, stage, variant)
    plan, rank, start = tr.plan, tr.rank, tr.start
    name = run_name(stage, variant)
    metrics_path = metrics_log(cfg, name)
    if rank == 0 and start == 0:
        metrics_path.unlink(missing_ok=True)
    progress = _Progress(rank == 0, name, plan.total_steps, start,
                         samples_per_step=sum(plan.batch_size[t] * tr.world for t in plan.micro_steps))
    fault = _fault_injection(rank)
    last_saved = start
    try:
        with stage_run(cfg, name, tags={"versavit.resumed_from_step": str(start)}, rank=rank) as (tracker, run):
            if start == 0:
                tracker.log_config(run, config_to_dict(cfg))
            if rank == 0:
                _log_inputs(cfg, plan, tracker, run)
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
            return _finish(cfg, plan, tr.engine, rank, tracker, run, tr.init_from, tr.inherited,
                           data={t: getattr(tr.streams.get(t), "stats", None) for t in plan.tasks})
    finally:
        tr.close_streams()
        progress.close()
        if rank == 0:
            log.info("%s: last committed checkpoint at step %d", name, last_saved)


def _log_inputs(cfg: RunConfig, plan: StagePlan, tracker: Any, run: Any) -> None:
    """Each dataset the stage reads, as an MLflow dataset input (URL + manifest digest), context
    `train/<tasks reading it>`."""
    readers: dict[str, list[str]] = {}
    for task in plan.tasks:
        for url in task_urls(cfg, task, stage=plan.stage):
            readers.setdefault(url, []).append(task)
    for url, tasks in readers.items():
        try:
            m = read_manifest(url)
        except (storage.StorageError, ValueError):
            continue  # a bare .tar shard has no manifest to name it by
        tracker.log_dataset(run, m.name, url, m.digest, context=f"train/{','.join(tasks)}", num_samples=m.num_samples)


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


def _finish(cfg: RunConfig, plan: StagePlan, engine: Any, rank: int, tracker: Any, run: Any,
            init_from: str | None, inherited: list[str] = (), data: dict[str, Any] | None = None,
            ) -> dict[str, Any]:
    """Export (rank 0): HF backbone + heads, the trained tensors, stage.json; register the backbone.

    trained_state.pt holds every tensor trained so far in the recipe (this stage's trainable set plus what
    it inherited), so the next stage may train a different subset without losing an earlier one's work.
    """
    module: VersaViT = engine.module
    result: dict[str, Any] = {}
    if rank == 0:
        keep = set(inherited)
        trained = {k: v.detach().cpu() for k, v in module.named_parameters() if v.requires_grad or k in keep}
        with storage.local_staging("export", staging_root(cfg)) as tmp:
            module.save_pretrained(tmp)
            torch.save(trained, Path(tmp) / TRAINED_STATE)
            if _exports_mllm(cfg, module):  # export/mllm: the base MLLM with this stage's tower
                record = export_mllm(cfg.model.backbone.pretrained, Path(tmp) / "backbone", Path(tmp) / MLLM_DIR)
                log.info("%s/%s: %s with the trained tower (%d visual tensors)", plan.export, MLLM_DIR,
                         cfg.model.backbone.pretrained, record["visual_tensors"])
            fs, _ = storage.get_fs(plan.export)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    with storage.atomic_local_file(storage.join(plan.export, str(path.relative_to(tmp)))) as dst:
                        Path(dst).write_bytes(path.read_bytes())
            # a registered version points at an immutable copy (export/ is overwritten by the next run)
            version = version_export_url(cfg, plan.stage, plan.variant,
                                         f"{checkpoint.resume_hash(cfg)}-{plan.total_steps}")
            registered = storage.exists(storage.join(version, REGISTERED))
            for path in [] if registered else sorted((Path(tmp) / "backbone").rglob("*")):
                if path.is_file():
                    with storage.atomic_local_file(storage.join(version, str(path.relative_to(tmp)))) as dst:
                        Path(dst).write_bytes(path.read_bytes())
        run_id = tracker.run_id(run)
        result = {"stage": plan.stage, "variant": plan.variant, "export_url": plan.export,
                  "config_hash": config_hash(cfg), "checkpoint_url": plan.checkpoints,
                  "steps": plan.total_steps, "tasks": plan.tasks, "init_from": init_from,
                  "mlflow_run_id": run_id, "registered_backbone_url": storage.join(version, "backbone"),
                  "plan": asdict(plan),
                  "data": {t: s.summary() for t, s in (data or {}).items() if s is not None}}
        storage.write_text(storage.join(plan.url, "stage.json"), json.dumps(result, indent=1, default=str))
        tracker.set_tags(run, {"versavit.export_url": plan.export})
        if registered:  # the same config and step (a rerun of a finished stage): that version already exists
            log.info("backbone of %s already registered from %s", plan.url, version)
        else:
            source = storage.join(version, "backbone")
            tracker.register_model(run, f"{cfg.name}-{plan.url.rsplit('/', 1)[-1]}-backbone", source,
                                   **model_version_meta(cfg, run_name(plan.stage, plan.variant), plan.tasks,
                                                        plan.total_steps, source,
                                                        metrics_log(cfg, run_name(plan.stage, plan.variant))))
            if getattr(tracker, "enabled", True):  # untracked: a later tracked run registers it
                storage.write_text(storage.join(version, REGISTERED), json.dumps({"mlflow_run_id": run_id}))
    if dist.is_initialized():
        dist.barrier()
    return result


class _Progress:
    """Rank 0's progress: a rich bar with the latest per-task losses on a terminal; elsewhere (under torchrun
    the rank's output is a file the launcher streams, e.g. in a pipeline step) one plain line every ~10 s or
    10% of the steps, and at the end: step, loss, samples/s, ETA."""

    EVERY_S = 10.0

    def __init__(self, enabled: bool, stage: str, total: int, start: int, samples_per_step: int = 0):
        from versavit.progress import console, progress_bar

        self.bar = None
        self.plain = enabled and not console.is_terminal
        self.stage, self.total, self.start, self.samples_per_step = stage, total, start, samples_per_step
        self.t0 = self.last = time.monotonic()
        self.last_step = start
        if enabled and not self.plain:
            self._ctx = progress_bar()
            self.bar = self._ctx.__enter__()
            self.task = self.bar.add_task(stage, total=total, completed=start)

    def update(self, step: int, point: dict[str, float], tasks: list[str]) -> None:
        desc = " ".join(f"{t}={point[f'loss/{t}']:.3f}" for t in tasks)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"{self.stage} {desc}")
        if not self.plain:
            return
        now = time.monotonic()
        done = step - self.start
        if not (done == 1 or step == self.total or now - self.last >= self.EVERY_S
                or step % max(1, self.total // 10) == 0):
            return
        # steps/s over the steps since the last line (the first step, with its warm-up, only until then)
        since, self.last, self.last_step = (self.last_step, self.last), now, step
        rate = (step - since[0]) / max(now - since[1], 1e-9) if done > 1 else done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        speed = f"  {rate * self.samples_per_step:.1f} samples/s" if self.samples_per_step else ""
        loss = point.get("loss/total", float("nan"))
        print(f"{self.stage} step {step}/{self.total}  loss {loss:.3f} ({desc}){speed}  "
              f"ETA {int(eta) // 60}:{int(eta) % 60:02d}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self._ctx.__exit__(None, None, None)
            self.bar = None
