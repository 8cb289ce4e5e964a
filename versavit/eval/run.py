"""The evaluation stage: every evaluator, every benchmark, every backbone, one comparison report, in MLflow.

    run_eval(cfg)                         baseline vs trained (the multi-task stage's export)
    compare_backbones({"caption": url1, "caption+depth": url2, "all": url3}, cfg)      N named backbones
    evaluate_one(cfg, exports, "da2k")    one evaluator (the pipeline's fan-out step): results JSON + figures
    report_from_results(cfg, exports, [results URLs])   the report of the fan-out (the pipeline's report step)

The protocols are the registry's (versavit.eval.evaluators, picked by `eval.evaluators`); this module only
loops: for each backbone (loaded once), each evaluator, each benchmark it applies to -> an EvalResult.

Which backbones `run_eval` compares (versavit.eval.candidates):
- "trained": `<workdir>/stages/multitask/export` (or the `trained` argument / `--trained`).
- "baseline": `eval.baseline_backbone` if set; else the backbone the multi-task stage started from:
  `model.backbone.pretrained` if set (e.g. Qwen/Qwen2-VL-7B-Instruct: the paper's Qwen2-VL ViT row), else
  the export named by `train.multitask.init_from` when that is a URL, else a random-init tower built exactly
  as training builds it (`torch.manual_seed(train.seed)`, then the tower first, in train.precision) - the
  tiny configuration's case. The warm-up stage trains only the projector, so it never changes the baseline.

A backbone given by URL may be a versavit export (a folder with versavit.json: backbone/ plus heads, so the
zero-shot depth and referring-segmentation heads are evaluated too), a Hugging Face vision-tower folder, a
full Qwen2-VL checkpoint or hub id, or an s3:// URL of any of those (copied to the local cache first).

Metric names in MLflow: `<backbone>/<evaluator>/<benchmark>/<metric>`, e.g.
`trained/linear-probe/synthetic/seg_miou`, `baseline/linear-probe/nyu/depth_rmse`,
`trained/zero-shot-depth/synthetic/absrel`, `trained/da2k/synthetic/accuracy`; the deltas to the reference
backbone as `delta/<backbone>/<evaluator>/<benchmark>/<metric>`, all in the report's units (% and metres:
`report.UNITS`); training curves (probe and fine-tune losses) as `<backbone>/<evaluator>/<benchmark>/<curve>`
over steps. MLflow keys take [A-Za-z0-9_-. /:] only, so the tracker writes a name like `caption+depth` as
`caption_depth` (the report keeps the name as given).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versavit import storage, weights
from versavit.config import RunConfig, config_to_dict
from versavit.eval import evaluators, report
from versavit.eval.candidates import Candidate, baseline_candidate, resolve_candidate, trained_candidate  # noqa: F401 - re-exported
from versavit.eval.datasets import Benchmark, open_benchmarks
from versavit.eval.evaluators import EvalResult, Evaluator
from versavit.eval.jobs import results_url
from versavit.layout import eval_cache_dir, metrics_log, metrics_log_of_export, reports_dir
from versavit.models.backbone import VisionBackbone
from versavit.tracking import stage_run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------


def open_benches(cfg: RunConfig, specs: list[str] | None = None) -> list[Benchmark]:
    """Every benchmark of `eval.benchmarks` (or `specs`); RefCOCO gives one per evaluation split."""
    return [b for spec in (specs or list(cfg.eval.benchmarks)) for b in open_benchmarks(spec, cfg.workdir)]


def make_evaluators(cfg: RunConfig, names: list[str] | None, out_dir: Path) -> list[Evaluator]:
    """The configured evaluators (`eval.evaluators`, or `names`), in report order, sharing one context."""
    names = list(names or cfg.eval.evaluators)
    for name in names:
        if name not in evaluators.MODULES:
            raise ValueError(f"unknown evaluator {name!r}; valid: {', '.join(evaluators.MODULES)} "
                             "(`versavit eval --list`)")
    ctx = evaluators.EvalContext(cfg=cfg, cache=eval_cache_dir(cfg), out_dir=out_dir)
    order = list(evaluators.MODULES)
    return [evaluators.get(n)(ctx) for n in sorted(names, key=order.index)]


@dataclass
class Evaluation:
    """What running evaluators on backbones gives: results, notes, figure files."""

    results: list[EvalResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)


def evaluate(candidates: list[Candidate], benches: list[Benchmark], evals: list[Evaluator],
             figures_dir: Path | None) -> Evaluation:
    """Each backbone (loaded once, then released) through each evaluator on each benchmark it applies to; then
    each evaluator's figures per benchmark, with every backbone in them (none without `figures_dir`)."""
    out = Evaluation()
    for cand in candidates:
        backbone = cand.load_backbone()
        out.backbones[cand.name] = {"source": cand.source, "digest": cand.digest, "heads": list(cand.heads),
                                    "embed_dim": backbone.embed_dim, "depth": backbone.depth, "kind": backbone.kind}
        del backbone
        for ev in evals:
            for bench in benches:
                if not ev.applies_to(bench) or not set(ev.needs_heads) <= set(cand.heads):
                    continue  # a backbone without the heads an evaluator reads: said once, in the note below
                started = time.perf_counter()
                try:
                    result = ev.run(cand, bench)
                except evaluators.Skipped as exc:
                    out.notes.append(f"{ev.name} of {cand.name} on {bench.name} skipped: {exc}")
                    log.warning(out.notes[-1])
                    continue
                result.elapsed_s = round(time.perf_counter() - started, 1)
                out.results.append(result)
        if not cand.heads:
            out.notes.append(f"{cand.name} has no task heads (not a multi-task export): the evaluators that need "
                             "them (zero-shot depth, DA-2K, referring segmentation) skip it")
        cand.release()
    out.figures = _figures(evals, benches, out.results, figures_dir) if figures_dir is not None else []
    for ev in evals:
        if note := ev.protocol_note():
            out.notes.append(note)
    return out


def _figures(evals: list[Evaluator], benches: list[Benchmark], results: list[EvalResult], out: Path) -> list[Path]:
    """Each evaluator's figures per benchmark, every backbone in them (matplotlib: most of a tiny run's time)."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for ev in evals:
        for bench in benches:
            shown = [r for r in results if r.evaluator == ev.name and r.benchmark == bench.name]
            if shown:
                files += ev.figures(shown, out)
    return files


def results_to_json(evaluation: Evaluation) -> dict[str, Any]:
    """The typed results as JSON (no in-memory artifacts): what a fan-out step hands to the report step."""
    return {"results": [r.to_json() for r in evaluation.results],
            "notes": evaluation.notes, "figures": [f.name for f in evaluation.figures],
            "backbones": evaluation.backbones}


def results_from_json(data: Mapping[str, Any]) -> Evaluation:
    out = Evaluation(notes=list(data.get("notes", [])), backbones=dict(data.get("backbones", {})))
    out.results.extend(EvalResult.from_json(r) for r in data.get("results", []))
    return out


def _candidates(backbones: Mapping[str, str | VisionBackbone | Candidate], cfg: RunConfig) -> list[Candidate]:
    cache = eval_cache_dir(cfg)
    candidates = [resolve_candidate(name, spec, cache) for name, spec in backbones.items()]
    for cand, name in zip(candidates, backbones, strict=True):
        cand.name = name
    return candidates


def compare_backbones(backbones: Mapping[str, str | VisionBackbone | Candidate], cfg: RunConfig, *,
                      reference: str | None = None, benchmarks: list[str] | None = None,
                      out_dir: str | Path | None = None, stage: str = "eval",
                      title: str | None = None, evaluator_names: list[str] | None = None) -> dict[str, Any]:
    """Evaluate N named backbones on equal terms (same data, seed and schedules) and write one report.

    backbones: name -> URL / hub id / in-memory VersaViT / Candidate, in table order; the reference (default: the
    first) is what deltas are taken against; evaluator_names: default `eval.evaluators`. Returns metrics, table,
    paths of written files."""
    if not backbones:
        raise ValueError("compare_backbones needs at least one backbone")
    cfg = weights.resolve(cfg)  # the text embedder from its staged copy (weights.url)
    storage.configure(cfg.storage)
    candidates = _candidates(backbones, cfg)
    reference = reference or candidates[0].name
    if reference not in backbones:
        raise ValueError(f"reference {reference!r} is not one of {list(backbones)}")
    out = Path(out_dir) if out_dir else reports_dir(cfg, stage)
    out.mkdir(parents=True, exist_ok=True)
    evals = make_evaluators(cfg, evaluator_names, out)
    benches = open_benches(cfg, benchmarks)
    started = time.perf_counter()
    with stage_run(cfg, stage, tags=_tags(candidates, reference, benchmarks or list(cfg.eval.benchmarks),
                                          evals)) as (tracker, run):
        tracker.log_config(run, config_to_dict(cfg))
        _log_datasets(tracker, run, benches)
        evaluation = evaluate(candidates, benches, evals, out / "figures")
        return _report(cfg, tracker, run, evaluation, candidates, reference, [b.name for b in benches], evals, out,
                       title, started, benches)


def _tags(candidates: list[Candidate], reference: str, specs: list[str], evals: list[Evaluator]) -> dict[str, str]:
    return {"versavit.eval.backbones": ",".join(c.name for c in candidates), "versavit.eval.reference": reference,
            "versavit.eval.benchmarks": ",".join(specs), "versavit.eval.evaluators": ",".join(e.name for e in evals),
            **{f"versavit.eval.source.{c.name}": c.source for c in candidates}}


def _log_datasets(tracker: Any, run: Any, benches: list[Benchmark]) -> None:
    for bench in benches:
        for reader in (bench.eval, bench.train):
            if reader is not None:
                tracker.log_dataset(run, f"{bench.name}-{reader.split}", str(reader.root), reader.digest(),
                                    context=f"eval-{reader.split}", num_samples=len(reader))


def _report(cfg: RunConfig, tracker: Any, run: Any, evaluation: Evaluation, candidates: list[Candidate],
            reference: str, bench_names: list[str], evals: list[Evaluator], out: Path, title: str | None,
            started: float, benches: list[Benchmark] | None = None) -> dict[str, Any]:
    """Tables, notes, figures and metrics of one comparison, written to `out` and logged to `run`."""
    names = [c.name for c in candidates]
    table = report.comparison_table(evaluation.results, reference, names, evals, bench_names)
    _log_metrics(tracker, run, evaluation.results, table)
    metrics: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    for r in evaluation.results:
        metrics[r.backbone].setdefault(r.benchmark, {}).update({f"{r.evaluator}/{k}": v
                                                                for k, v in r.as_dict().items()})
    results = {"reference": reference, "backbones": evaluation.backbones, "metrics": metrics,
               "evaluators": {e.name: {"title": e.title, "kind": e.kind, "settings": e.settings()} for e in evals},
               "benchmarks": {b.name: {"eval": b.eval.describe(), "train": b.train.describe() if b.train else None}
                              for b in benches or []},
               "per_class_iou": {r.benchmark: {} for r in evaluation.results},
               "notes": evaluation.notes, "elapsed_s": round(time.perf_counter() - started, 1)}
    for r in evaluation.results:
        if "per_class_iou" in r.artifacts:
            results["per_class_iou"][r.benchmark][r.backbone] = r.artifacts["per_class_iou"]
    sources = {c.name: c.source for c in candidates}
    title = title or f"VersaViT evaluation: {' vs '.join(names)} ({cfg.name})"
    files = report.write_tables(out, table, results, sources, title, evaluation.notes)
    figures = list(evaluation.figures)
    training = _training_curves(out / "figures", cfg, candidates)
    if training:
        figures.append(training)
    for f in [*files, *figures]:
        tracker.log_artifact(run, str(f), "eval" if f.parent == out else "eval/figures")
    tracker.log_metrics(run, {"eval/elapsed_s": time.perf_counter() - started}, step=0)
    return {**results, "table": table, "files": [str(f) for f in [*files, *figures]], "out_dir": str(out),
            "report_dir": str(out), "mlflow_run_id": run.run_id}


def _log_metrics(tracker: Any, run: Any, results: list[EvalResult], table: dict) -> None:
    # in the report's units (report.UNITS: % and metres), as every figure a person reads
    flat = {f"{r.backbone}/{r.evaluator}/{r.benchmark}/{m.name}": m.display for r in results for m in r.metrics
            if m.finite}
    for section in table["sections"]:
        columns = {c["key"]: c for c in section["columns"]}
        for name, deltas in section["deltas"].items():
            flat.update({f"delta/{name}/{key}": report.display_value(columns[key], v)
                         for key, v in deltas.items() if report._finite(v)})
    for r in results:
        for i, v in enumerate(r.artifacts.get("per_class_iou") or []):
            if v is not None:
                flat[f"{r.backbone}/{r.evaluator}/{r.benchmark}/seg_iou/{i:03d}"] = 100 * v
    tracker.log_metrics(run, flat, step=0)
    for r in results:
        for curve, values in r.curves.items():
            for step, value in enumerate(values, 1):
                tracker.log_metrics(run, {f"{r.backbone}/{r.evaluator}/{r.benchmark}/{curve}": value}, step=step)


def _training_curves(out: Path, cfg: RunConfig, candidates: list[Candidate]) -> Path | None:
    """The training stages' loss curves (warm-up, and each export's own run) in one figure."""
    # an export of this workdir (multitask, multitask-<variant> of the ablation) names its own run's log
    logs = {"warm-up": metrics_log(cfg, "warmup")}
    for cand in candidates:
        if cand.export is not None and (log_path := metrics_log_of_export(cand.export)) is not None:
            logs[cand.name] = log_path
    if len(logs) == 1:
        logs["multi-task"] = metrics_log(cfg, "multitask")
    out.mkdir(parents=True, exist_ok=True)
    return report.training_curves(logs, out / "training_losses.png")


def comparison_backbones(cfg: RunConfig, trained: str | None = None, baseline: str | VisionBackbone | None = None,
                         extra: Mapping[str, str] | None = None,
                         exports: Mapping[str, str] | None = None) -> dict[str, str | VisionBackbone | Candidate]:
    """The evaluation stage's backbones: the baseline (the reference) first, then the trained one(s).

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
    return backbones


def run_eval(cfg: RunConfig, trained: str | None = None, baseline: str | VisionBackbone | None = None,
             extra: Mapping[str, str] | None = None, out_dir: str | Path | None = None,
             exports: Mapping[str, str] | None = None, evaluator_names: list[str] | None = None) -> dict[str, Any]:
    """The evaluation stage: the baseline (the reference) vs the trained backbone(s), with every configured
    evaluator on eval.benchmarks (see `comparison_backbones` for the arguments)."""
    backbones = comparison_backbones(cfg, trained, baseline, extra, exports)
    return compare_backbones(backbones, cfg, reference="baseline", out_dir=out_dir, evaluator_names=evaluator_names)


# ------------------------------------------------------------------------------------------------
# the pipeline's fan-out: one step per evaluator, then one report step


def evaluate_one(cfg: RunConfig, exports: Mapping[str, str], evaluator: str, publish: bool = True) -> str:
    """One evaluator on every backbone (baseline + exports) and benchmark, as its own MLflow stage run
    `eval-<evaluator>` (figures and metrics there); its typed results to `results_url`. Returns that URL.
    `publish` False (the other processes of a data-parallel job): the same work, nothing tracked or written."""
    cfg = weights.resolve(cfg)
    storage.configure(cfg.storage)
    candidates = _candidates(comparison_backbones(cfg, exports=exports), cfg)
    url = results_url(cfg, evaluator)
    if not publish:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"versavit-eval-{evaluator}-") as scratch:
            evaluate(candidates, open_benches(cfg), make_evaluators(cfg, [evaluator], Path(scratch)), None)
        return url
    out = reports_dir(cfg, f"eval-{evaluator}")
    evals = make_evaluators(cfg, [evaluator], out)
    benches = open_benches(cfg)
    with stage_run(cfg, f"eval-{evaluator}", tags=_tags(candidates, "baseline", list(cfg.eval.benchmarks),
                                                         evals)) as (tracker, run):
        _log_datasets(tracker, run, benches)
        evaluation = evaluate(candidates, benches, evals, out / "figures")
        _log_metrics(tracker, run, evaluation.results, report.comparison_table(
            evaluation.results, "baseline", [c.name for c in candidates], evals, [b.name for b in benches]))
        for f in evaluation.figures:
            tracker.log_artifact(run, str(f), "eval/figures")
            storage.write_bytes(storage.join(cfg.workdir, "stages", "eval", "figures", f.name), f.read_bytes())
    storage.write_text(url, json.dumps({**results_to_json(evaluation), "benchmarks": [b.name for b in benches]},
                                       default=report._json_default))
    return url


def report_from_results(cfg: RunConfig, exports: Mapping[str, str], urls: list[str]) -> dict[str, Any]:
    """The comparison report of the fan-out: every evaluator step's results (and figures) in one table, logged
    as the `eval` stage run, exactly as `run_eval` would write it in one process."""
    storage.configure(cfg.storage)
    out = reports_dir(cfg, "eval")
    merged = Evaluation()
    bench_names: list[str] = []
    for url in urls:
        data = json.loads(storage.read_text(url))
        part = results_from_json(data)
        merged.results += part.results
        merged.notes += [n for n in part.notes if n not in merged.notes]
        merged.backbones.update(part.backbones)
        bench_names += [b for b in data.get("benchmarks", []) if b not in bench_names]
        for name in data.get("figures", []):
            target = out / "figures" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(storage.join(cfg.workdir, "stages", "eval", "figures", name)))
            merged.figures.append(target)
    evals = make_evaluators(cfg, sorted({r.evaluator for r in merged.results}) or None, out)
    # the backbones as the evaluator steps named them (no export is copied here: the report needs only names)
    names = ["baseline", *((variant or "trained") for variant in exports)]
    candidates = [Candidate(n, merged.backbones.get(n, {}).get("source", "")) for n in names]
    started = time.perf_counter()
    with stage_run(cfg, "eval", tags=_tags(candidates, "baseline", list(cfg.eval.benchmarks), evals)) as (tracker,
                                                                                                          run):
        tracker.log_config(run, config_to_dict(cfg))
        return _report(cfg, tracker, run, merged, candidates, "baseline", bench_names, evals, out, None, started)
