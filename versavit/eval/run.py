"""The evaluation stage: every benchmark, every backbone, one comparison report, tracked in MLflow.

    run_eval(cfg)                         baseline vs trained (the multi-task stage's export)
    compare_backbones({"caption": url1, "caption+depth": url2, "all": url3}, cfg)      N named backbones

Which backbones `run_eval` compares:
- "trained": `<workdir>/stages/multitask/export` (or the `trained` argument / `--trained`).
- "baseline": `eval.baseline_backbone` if set; else the backbone the multi-task stage started from:
  `model.backbone.pretrained` if set (e.g. Qwen/Qwen2-VL-7B-Instruct: the paper's Qwen2-VL ViT row), else
  the export named by `train.multitask.init_from` when that is a URL, else a random-init tower built exactly
  as training builds it (`torch.manual_seed(train.seed)`, then the tower first, in train.precision) - the
  tiny configuration's case. The warm-up stage trains only the projector, so it never changes the baseline.

A backbone given by URL may be a versavit export (a folder with versavit.json: backbone/ plus heads, so the
zero-shot depth and referring-segmentation heads are evaluated too), a Hugging Face vision-tower folder, a
full Qwen2-VL checkpoint or hub id, or an s3:// URL of any of those (copied to the local cache first).

Metric names in MLflow: `<backbone>/<benchmark>/<group>/<metric>`, e.g. `trained/synthetic/probe/seg_miou`,
`baseline/nyu/probe/depth_rmse`, `trained/synthetic/zeroshot/depth_absrel`, `trained/synthetic/refseg/ciou`;
the deltas to the reference backbone as `delta/<backbone>/<benchmark>/<group>/<metric>`, all in the report's
units (% and metres: `report.UNITS`); probe loss curves as `<backbone>/<benchmark>/probe/<task>_loss` over
steps. MLflow keys take [A-Za-z0-9_-. /:] only, so the tracker writes a name like `caption+depth` as
`caption_depth` (the report keeps the name as given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from versavit import storage, weights
from versavit.config import RunConfig, config_to_dict
from versavit.eval import report
from versavit.eval.datasets import Benchmark, open_benchmarks
from versavit.eval.features import backbone_digest, cached_features
from versavit.eval.probe import ProbeSettings, train_depth_probe, train_seg_probe
from versavit.eval.refseg import RefSegSkipped, evaluate_refseg
from versavit.eval.zeroshot import evaluate_zeroshot_depth
from versavit.layout import eval_cache_dir, metrics_log, metrics_log_of_export, reports_dir, weights_record_url
from versavit.models.backbone import VisionBackbone
from versavit.models.precision import precision_dtype, resolve_precision
from versavit.tracking import stage_run

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One backbone of a comparison: where it comes from and, for a versavit export, its local folder."""

    name: str
    source: str  # URL / path / hub id, or a description of an in-memory backbone
    backbone: VisionBackbone | None = None  # given in memory (the random-init baseline)
    export: Path | None = None  # local versavit export (backbone/ + heads)
    heads: tuple[str, ...] = ()

    def load_backbone(self) -> VisionBackbone:
        if self.backbone is not None:
            return self.backbone.float().eval()
        path = str(self.export / "backbone") if self.export else self.source
        return VisionBackbone.from_pretrained(path, dtype=torch.float32).eval()


def _local_copy(url: str, cache: Path) -> Path:
    """A local folder for `url` (s3:// folders are copied once into the cache, safely across processes)."""
    if not storage.is_remote(url):
        return Path(url.removeprefix("file://"))
    return weights.cached_copy(url, cache / "exports" / hashlib.sha256(url.encode()).hexdigest()[:16])


def resolve_candidate(name: str, spec: str | VisionBackbone | Candidate, cache: Path) -> Candidate:
    """A URL / hub id / in-memory backbone -> Candidate (versavit exports keep their heads)."""
    if isinstance(spec, Candidate):
        return spec
    if isinstance(spec, VisionBackbone):
        return Candidate(name, "in-memory backbone", backbone=spec)
    if storage.is_remote(spec) and storage.exists(weights_record_url(spec)):
        return Candidate(name, spec)  # a staged checkpoint: from_pretrained copies it into the node's model cache
    local = _local_copy(spec, cache) if storage.is_remote(spec) else Path(spec)
    if (local / "versavit.json").is_file():
        heads = tuple(h for h in json.loads((local / "versavit.json").read_text())["heads"] if h != "caption")
        return Candidate(name, spec, export=local, heads=heads)
    if local.is_dir():
        return Candidate(name, str(local))
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:  # a path, not an owner/name hub id
        raise storage.StorageError(f"backbone {name!r}: {spec} does not exist (expected a versavit export, a "
                                   "vision-tower folder or a hub id)", kind="missing")
    return Candidate(name, spec)  # a hub id: loaded (and downloaded if allowed) by VisionBackbone


def baseline_candidate(cfg: RunConfig) -> Candidate:
    """The backbone the multi-task stage started from (see the module docstring for the rules)."""
    cfg = weights.resolve(cfg)  # staged checkpoints (weights.url) instead of hub ids
    cache = eval_cache_dir(cfg)
    if cfg.eval.baseline_backbone:
        return resolve_candidate("baseline", cfg.eval.baseline_backbone, cache)
    if cfg.model.backbone.pretrained:
        return resolve_candidate("baseline", cfg.model.backbone.pretrained, cache)
    init = cfg.train.multitask.init_from
    if init and init != "auto":
        return resolve_candidate("baseline", init, cache)
    dtype = precision_dtype(cfg.train.precision)  # as the multi-task stage built it on this machine
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # what run_stage does right before VersaViT.build (tower first)
        backbone = VisionBackbone.build(cfg.model.backbone, dtype=dtype)
    precision = resolve_precision(cfg.train.precision)
    return Candidate("baseline", f"random init (train.seed={cfg.train.seed}, {precision}): the multi-task "
                     "stage's starting backbone", backbone=backbone)


def trained_candidate(cfg: RunConfig, url: str | None = None) -> Candidate:
    url = url or storage.join(cfg.workdir, "stages", "multitask", "export")
    if not storage.exists(url):
        raise storage.StorageError(f"no trained backbone at {url}: run `versavit train multitask` first, or pass "
                                   "--trained URL", kind="missing")
    return resolve_candidate("trained", url, eval_cache_dir(cfg))


# ------------------------------------------------------------------------------------------------


def _probe_backbone(cand: Candidate, backbone: VisionBackbone, digest: str, bench: Benchmark, cfg: RunConfig,
                    settings: ProbeSettings, cache: Path, metrics: dict, extras: dict) -> None:
    """Seg and depth linear probes of one backbone on one benchmark (features from the cache)."""
    probe = cfg.eval.probe
    wanted = [t for t in ("seg", "depth") if t in bench.tasks]
    if not wanted or bench.train is None:
        return
    res = {"seg": probe.seg_resolution, "depth": probe.depth_resolution}
    sets = {}
    for r in sorted({res[t] for t in wanted}):
        sets[r] = tuple(cached_features(backbone, reader, r, cache, batch_size=probe.batch_size, digest=digest,
                                        label=cand.name) for reader in (bench.train, bench.eval))
    out = metrics.setdefault(bench.name, {})
    ex = extras.setdefault(bench.name, {})
    for task in wanted:
        train, val = sets[res[task]]
        label = f"{cand.name} {bench.name} {task}"
        if task == "seg":
            result = train_seg_probe(train, val, bench.eval.num_classes, settings, bench.eval.ignore_index, label)
            out["probe/seg_miou"], out["probe/seg_acc"] = result.metrics["miou"], result.metrics["acc"]
            ex.setdefault("per_class_iou", {})[cand.name] = result.metrics["iou_per_class"]
        else:
            result = train_depth_probe(train, val, bench.eval.min_depth, bench.eval.max_depth, settings, label)
            for k in ("rmse", "absrel", "delta1"):
                out[f"probe/depth_{k}"] = result.metrics[k]
        ex.setdefault(f"probe_{task}_pred", {})[cand.name] = result.examples["pred"]
        ex.setdefault(f"probe_{task}_loss", {})[cand.name] = result.history["step_loss"]
        ex.setdefault(f"probe_{task}_val", val)


def _heads_eval(cand: Candidate, bench: Benchmark, cfg: RunConfig, metrics: dict, extras: dict,
                notes: list[str]) -> None:
    """Zero-shot depth and referring segmentation with the export's own heads."""
    from versavit.models.multitask import VersaViT

    todo = [h for h in ("depth", "refseg") if h in cand.heads and h in bench.tasks]
    if not todo or cand.export is None:
        return
    model = VersaViT.from_export(str(cand.export), cfg.model, heads=todo, dtype=torch.float32)
    res = cfg.train.resolution
    out = metrics.setdefault(bench.name, {})
    ex = extras.setdefault(bench.name, {})
    if "depth" in todo:
        # the space the head was trained in: recorded by the export if it says so, else the run's config
        meta = json.loads((cand.export / "versavit.json").read_text())
        space = meta.get("depth_target") or (meta.get("heads_config") or {}).get("depth", {}).get("target") \
            or model.heads["depth"].target
        z = evaluate_zeroshot_depth(model, bench.eval, res.depth, space,
                                    batch_size=cfg.eval.probe.batch_size, label=cand.name)
        for k in ("absrel", "delta1", "rmse"):
            out[f"zeroshot/depth_{k}"] = z["metrics"][k]
        ex.setdefault("zeroshot", {})[cand.name] = z["examples"]
    if "refseg" in todo:
        try:
            r = evaluate_refseg(model, bench.eval, res.refseg, _embedder(cfg, bench), label=cand.name)
        except RefSegSkipped as exc:
            notes.append(f"referring segmentation of {cand.name} on {bench.name} skipped: {exc}")
            log.warning(notes[-1])
        else:
            out["refseg/ciou"], out["refseg/miou"] = r["metrics"]["ciou"], r["metrics"]["miou"]
            ex.setdefault("refseg", {})[cand.name] = r["examples"]


def _embedder(cfg: RunConfig, bench: Benchmark):  # -> Callable[[list[str]], np.ndarray] | None
    """The run's text embedder for benchmarks without precomputed embeddings (RefCOCO), loaded on first use."""
    if bench.name == "synthetic":
        return None  # emb.npy or nothing: the head was trained on exactly those embeddings
    state: dict[str, Any] = {}

    def embed(sentences: list[str]) -> np.ndarray:
        if "model" not in state:
            from versavit.labeling.embed import TextEmbedder

            try:
                state["model"] = TextEmbedder(cfg.labeling.teachers.embedder, device=cfg.labeling.device)
            except Exception as exc:  # no weights on this machine: a skipped benchmark, not a failed stage
                raise RefSegSkipped(f"embedder {cfg.labeling.teachers.embedder} cannot be loaded ({exc})") from exc
        return state["model"].encode(sentences)

    return embed


def compare_backbones(backbones: Mapping[str, str | VisionBackbone | Candidate], cfg: RunConfig, *,
                      reference: str | None = None, benchmarks: list[str] | None = None,
                      out_dir: str | Path | None = None, stage: str = "eval",
                      title: str | None = None) -> dict[str, Any]:
    """Evaluate N named backbones on equal terms (same data, seed and probe schedule) and write one report.

    backbones: name -> URL / hub id / in-memory VisionBackbone / Candidate, in table order; the reference
    (default: the first) is what deltas are taken against. Returns metrics, table, paths of written files.
    """
    if not backbones:
        raise ValueError("compare_backbones needs at least one backbone")
    cfg = weights.resolve(cfg)  # the text embedder from its staged copy (weights.url)
    storage.configure(cfg.storage)
    cache = eval_cache_dir(cfg)
    candidates = [resolve_candidate(name, spec, cache) for name, spec in backbones.items()]
    for cand, name in zip(candidates, backbones, strict=True):
        cand.name = name
    reference = reference or candidates[0].name
    if reference not in backbones:
        raise ValueError(f"reference {reference!r} is not one of {list(backbones)}")
    specs = benchmarks or list(cfg.eval.benchmarks)
    benches = [b for spec in specs for b in open_benchmarks(spec, cfg.workdir)]  # RefCOCO: one per split
    settings = ProbeSettings.from_config(cfg.eval)
    out = Path(out_dir) if out_dir else reports_dir(cfg, stage)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)

    tags = {"versavit.eval.backbones": ",".join(backbones), "versavit.eval.reference": reference,
            "versavit.eval.benchmarks": ",".join(specs),
            **{f"versavit.eval.source.{c.name}": c.source for c in candidates}}
    started = time.perf_counter()
    with stage_run(cfg, stage, tags=tags) as (tracker, run):
        tracker.log_config(run, config_to_dict(cfg))
        for bench in benches:
            for reader in (bench.eval, bench.train):
                if reader is not None:
                    tracker.log_dataset(run, f"{bench.name}-{reader.split}", str(reader.root), reader.digest(),
                                        context=f"eval-{reader.split}", num_samples=len(reader))
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        extras: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        info: dict[str, dict[str, Any]] = {}
        for cand in candidates:
            backbone = cand.load_backbone()
            digest = backbone_digest(backbone)
            info[cand.name] = {"source": cand.source, "digest": digest, "heads": list(cand.heads),
                               "embed_dim": backbone.embed_dim, "depth": backbone.depth, "kind": backbone.kind}
            m = metrics.setdefault(cand.name, {})
            for bench in benches:
                _probe_backbone(cand, backbone, digest, bench, cfg, settings, cache, m, extras)
            del backbone
            for bench in benches:
                _heads_eval(cand, bench, cfg, m, extras, notes)
            if not cand.heads:
                notes.append(f"{cand.name} has no task heads (not a multi-task export): linear probes only")
        table = report.comparison_table(metrics, reference, [b.name for b in benches])
        _log_metrics(tracker, run, metrics, table, extras)
        notes += _protocol_notes(cfg, settings)
        results = {"reference": reference, "backbones": info, "metrics": metrics,
                   "benchmarks": {b.name: {"eval": b.eval.describe(),
                                           "train": b.train.describe() if b.train else None} for b in benches},
                   "probe_settings": settings.__dict__, "per_class_iou": {b: e.get("per_class_iou", {})
                                                                         for b, e in extras.items()},
                   "notes": notes, "elapsed_s": round(time.perf_counter() - started, 1)}
        sources = {c.name: c.source for c in candidates}
        title = title or f"VersaViT evaluation: {' vs '.join(backbones)} ({cfg.name})"
        files = report.write_tables(out, table, results, sources, title, notes)
        files += _figures(out / "figures", benches, extras, cfg, candidates)
        for f in files:
            tracker.log_artifact(run, str(f), "eval" if f.parent == out else "eval/figures")
        tracker.log_metrics(run, {"eval/elapsed_s": time.perf_counter() - started}, step=0)
    return {**results, "table": table, "files": [str(f) for f in files], "out_dir": str(out),
            "report_dir": str(out), "mlflow_run_id": run.run_id}


def _log_metrics(tracker: Any, run: Any, metrics: dict, table: dict, extras: dict) -> None:
    # in the report's units (report.UNITS: % and metres), as every figure a person reads
    flat = {f"{name}/{bench}/{metric}": report.display_value(metric, value) for name, per in metrics.items()
            for bench, ms in per.items() for metric, value in ms.items() if report._finite(value)}
    for section in table["sections"]:
        for name, deltas in section["deltas"].items():
            flat.update({f"delta/{name}/{key}": report.display_value(key.split("/", 1)[1], v)
                         for key, v in deltas.items() if report._finite(v)})
    for bench, ex in extras.items():
        for name, ious in ex.get("per_class_iou", {}).items():
            flat.update({f"{name}/{bench}/probe/seg_iou/{i:03d}": 100 * v for i, v in enumerate(ious) if v is not None})
    tracker.log_metrics(run, flat, step=0)
    for bench, ex in extras.items():
        for task in ("seg", "depth"):
            for name, losses in ex.get(f"probe_{task}_loss", {}).items():
                for step, value in enumerate(losses, 1):
                    tracker.log_metrics(run, {f"{name}/{bench}/probe/{task}_loss": value}, step=step)


def _protocol_notes(cfg: RunConfig, s: ProbeSettings) -> list[str]:
    p = cfg.eval.probe
    head = s.depth_head if s.depth_head == "linear" else f"binned ({s.depth_bins} bins, {s.depth_bins_space})"
    return [
        f"Linear probes: frozen final-layer patch features, BatchNorm + 1x1 conv, {s.epochs} epochs, AdamW lr {s.lr} "
        f"(cosine), batch {s.batch_size}, seed {s.seed}; segmentation at {p.seg_resolution} px, depth at "
        f"{p.depth_resolution} px ({head} head); images and labels resized to R x R, metrics at R x R.",
        f"Zero-shot depth / referring segmentation at the multi-task resolutions "
        f"({cfg.train.resolution.depth} / {cfg.train.resolution.refseg} px), scored at label size.",
    ]


def _figures(out: Path, benches: list[Benchmark], extras: dict, cfg: RunConfig,
             candidates: list[Candidate]) -> list[Path]:
    """Depth, segmentation and referring-segmentation examples; probe and training loss curves."""
    files: list[Path] = []
    for bench in benches:
        ex = extras.get(bench.name, {})
        val = ex.get("probe_depth_val")
        preds = {f"{n} probe": p for n, p in ex.get("probe_depth_pred", {}).items()}
        if val is not None and val.images is not None and len(val.images):
            k = len(val.images)
            zs = {f"{n} zero-shot": _resized(e["pred"], val.resolution) for n, e in ex.get("zeroshot", {}).items()}
            files.append(report.depth_figure(out / f"depth_{bench.name}.png", list(val.images),
                                             list(val.targets["depth"][:k]), list(val.targets["valid"][:k]),
                                             {**preds, **zs}, f"{bench.name}: depth (input, truth, predictions)"))
        elif ex.get("zeroshot"):
            first = next(iter(ex["zeroshot"].values()))
            files.append(report.depth_figure(out / f"depth_{bench.name}.png", first["image"], first["gt"],
                                             first["valid"], {f"{n} zero-shot": e["pred"]
                                                              for n, e in ex["zeroshot"].items()},
                                             f"{bench.name}: zero-shot depth"))
        val = ex.get("probe_seg_val")
        if val is not None and val.images is not None and len(val.images):
            k = len(val.images)
            preds = {f"{n} probe": p for n, p in ex.get("probe_seg_pred", {}).items()}
            files.append(report.seg_figure(out / f"seg_{bench.name}.png", list(val.images),
                                           list(val.targets["seg"][:k]), preds, bench.eval.num_classes,
                                           f"{bench.name}: semantic segmentation (linear probe)"))
        if ex.get("refseg"):
            files.append(report.refseg_figure(out / f"refseg_{bench.name}.png", ex["refseg"],
                                              f"{bench.name}: referring segmentation"))
        curves = {f"{task} probe loss": ex[f"probe_{task}_loss"] for task in ("seg", "depth")
                  if ex.get(f"probe_{task}_loss")}
        if curves:
            files.append(report.curves_figure(out / f"probe_loss_{bench.name}.png", curves,
                                              f"{bench.name}: linear-probe training loss (same seed and schedule)"))
    # an export of this workdir (multitask, multitask-<variant> of the ablation) names its own run's log
    logs = {"warm-up": metrics_log(cfg, "warmup")}
    for cand in candidates:
        if cand.export is not None and (log_path := metrics_log_of_export(cand.export)) is not None:
            logs[cand.name] = log_path
    if len(logs) == 1:
        logs["multi-task"] = metrics_log(cfg, "multitask")
    training = report.training_curves(logs, out / "training_losses.png")
    if training:
        files.append(training)
    return files


def _resized(maps: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Label-size predictions -> R x R (nearest), to sit beside the probe's panels."""
    out = []
    for m in maps:
        t = torch.from_numpy(np.asarray(m, np.float32))[None, None]
        out.append(torch.nn.functional.interpolate(t, size=(size, size), mode="nearest-exact")[0, 0].numpy())
    return out


def run_eval(cfg: RunConfig, trained: str | None = None, baseline: str | VisionBackbone | None = None,
             extra: Mapping[str, str] | None = None, out_dir: str | Path | None = None,
             exports: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The evaluation stage: the baseline (the reference) vs the trained backbone, on eval.benchmarks.

    exports: variant -> export URL, as training stages return them (variant "" = the plain multi-task stage,
    shown as "trained"; the ablation's "caption", "caption-depth", "all" keep their names); replaces `trained`.
    extra: more named backbones appended to the comparison."""
    storage.configure(cfg.storage)
    base = baseline_candidate(cfg) if baseline is None else resolve_candidate("baseline", baseline, eval_cache_dir(cfg))
    backbones: dict[str, str | VisionBackbone | Candidate] = {"baseline": base}
    if exports:
        for variant, url in exports.items():
            name = variant or "trained"
            if name in backbones:
                raise ValueError(f"backbone name {name!r} appears twice")
            backbones[name] = url
    else:
        backbones["trained"] = trained_candidate(cfg, trained)
    backbones.update(extra or {})
    return compare_backbones(backbones, cfg, reference="baseline", out_dir=out_dir)
