"""The evaluator registry: names, kinds, `versavit eval --list`, typed results, the lr grid, extra probe
resolutions, the paper's rows in the report, and a training-type evaluator run as its own launched job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import ROOT, eval_config
from typer.testing import CliRunner

from versavit.config import ConfigError, load_config
from versavit.config.schema import EVALUATOR_NAMES, TRAINING_EVALUATORS
from versavit.eval import report
from versavit.eval.evaluators import EvalContext, EvalResult, MetricSpec, all_evaluators, get

REQUIRED = ("linear-probe", "zero-shot-depth", "da2k", "finetune-depth", "refseg-finetune", "correspondence")


def test_registry_matches_the_config_names_and_kinds() -> None:
    evaluators = all_evaluators()
    assert tuple(evaluators) == EVALUATOR_NAMES and set(REQUIRED) <= set(evaluators)
    assert {n for n, cls in evaluators.items() if cls.kind == "training"} == set(TRAINING_EVALUATORS)
    for name, cls in evaluators.items():
        assert cls.name == name and cls.title and cls.benchmarks_help and cls.metric_specs, name
        assert all(k.replace("_", "").replace(".", "").isalnum() for k in cls.metric_specs), name  # MLflow-safe


def test_eval_list_shows_every_evaluator_with_its_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit import cli

    monkeypatch.setattr(cli.console, "_width", 250)  # one line per row: the names are not folded
    result = CliRunner().invoke(cli.app, ["eval", "--list", "--config", str(ROOT / "configs/tiny.yaml")])
    assert result.exit_code == 0, result.output
    for name in REQUIRED:
        assert name in result.output
    assert "nyu" in result.output and "navi" in result.output.lower() and "training" in result.output


def test_unknown_evaluator_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown evaluator 'da2' \(did you mean 'da2k'\?\)"):
        load_config(ROOT / "configs/tiny.yaml", ["eval.evaluators=[linear-probe, da2]"])


def _ctx(tmp_path: Path, *overrides: str) -> EvalContext:
    return EvalContext(eval_config(tmp_path, *overrides), tmp_path / "cache", tmp_path / "out")


def test_report_has_one_table_per_evaluator_with_the_papers_rows(tmp_path: Path) -> None:
    probe = get("linear-probe")(_ctx(tmp_path, "eval.probe.extra_seg_resolutions=[448]"))
    corr = get("correspondence")(_ctx(tmp_path))
    results = []
    for name, miou in (("baseline", 0.30), ("trained", 0.45)):
        r = EvalResult("linear-probe", "ade20k", name)
        r.add("seg_miou", miou, probe.metric_specs["seg_miou"])
        r.add("seg_miou_448px", miou - 0.02, MetricSpec("mIoU@448"))
        results.append(r)
    headline = next(iter(corr.columns()))
    r = EvalResult("correspondence", "navi", "trained")
    r.add(headline, 0.4, corr.columns()[headline])
    results.append(r)
    table = report.comparison_table(results, "baseline", ["baseline", "trained"], [probe, corr], ["ade20k", "navi"])
    assert [s["key"] for s in table["sections"]] == ["linear-probe", "correspondence"]
    seg = table["sections"][0]
    assert [c["key"] for c in seg["columns"]] == ["linear-probe/ade20k/seg_miou", "linear-probe/ade20k/seg_miou_448px"]
    assert seg["deltas"]["trained"]["linear-probe/ade20k/seg_miou"] == pytest.approx(0.15)
    assert seg["paper"]["VersaViT (paper)"] == {"linear-probe/ade20k/seg_miou": 49.6,
                                                "linear-probe/ade20k/seg_miou_448px": 42.3}
    assert table["sections"][1]["paper"]["Qwen2-VL ViT (paper)"] == {f"correspondence/navi/{headline}": 39.27}
    md = report.to_markdown(table, {}, "t")
    assert "| trained | 45.0 (+15.0) | 43.0 (+15.0) |" in md
    assert "| *Qwen2-VL ViT (paper)* | 33.6 | 31.4 |" in md and "| *VersaViT (paper)* | 41.64 |" in md


def test_results_survive_the_json_between_fan_out_steps() -> None:
    from versavit.eval.run import Evaluation, results_from_json, results_to_json

    r = EvalResult("da2k", "synthetic", "trained", curves={"loss": [1.0, 0.5]}, notes=["n"])
    r.add("accuracy", 0.75, MetricSpec("DA-2K acc."))
    back = results_from_json(json.loads(json.dumps(results_to_json(Evaluation(results=[r], notes=["x"])))))
    got = back.results[0]
    assert (got.evaluator, got.benchmark, got.backbone, got.curves) == ("da2k", "synthetic", "trained", r.curves)
    assert got.metrics == r.metrics and back.notes == ["x"]


def test_lr_grid_reports_the_best_rate_on_val(eval_run: Path) -> None:
    from versavit.eval.candidates import trained_candidate
    from versavit.eval.datasets import open_benchmarks

    grid = [1e-6, 3e-2]
    ctx = EvalContext(eval_config(eval_run, f"eval.probe.lr_grid={grid}", "eval.probe.epochs=2",
                                  "eval.probe.extra_seg_resolutions=[28]"), eval_run / "cache" / "eval",
                      eval_run / "lr-grid")
    bench = open_benchmarks("synthetic", ctx.cfg.workdir)[0]
    cand = trained_candidate(ctx.cfg)
    best = get("linear-probe")(ctx).run(cand, bench)
    singles = {}
    for lr in grid:  # the same probe at each rate alone: the grid must report the better one, and its rate
        one = EvalContext(eval_config(eval_run, f"eval.probe.lr={lr}", "eval.probe.epochs=2"), ctx.cache, ctx.out_dir)
        singles[lr] = get("linear-probe")(one).run(cand, bench).value("seg_miou")
    chosen = max(singles, key=singles.get)
    assert singles[1e-6] != singles[3e-2]
    assert best.value("seg_lr") == chosen and best.value("seg_miou") == pytest.approx(singles[chosen])
    assert best.value("seg_miou_28px") is not None  # the extra resolution's probe


def test_training_evaluator_runs_as_its_own_launched_job(eval_run: Path) -> None:
    """The pipeline's step for a training-type evaluator launches stage eval-<name> through the launcher (torchrun
    here), which writes the results the report step reads. vqa with eval.vqa.processes 2: two processes train the
    MLLM data-parallel under DeepSpeed ZeRO-2 (versavit.eval.vqa.parallel) and end with the same weights; the first
    one writes."""
    from versavit.eval.jobs import EVAL_STAGE_PREFIX, job_config
    from versavit.eval.vqa.predictions import read_predictions
    from versavit.eval.vqa.protocol import load_result
    from versavit.launch.base import EVAL_STAGE_PREFIX as LAUNCH_PREFIX
    from versavit.launch.base import entry_module
    from versavit.stages import stage_evaluator

    assert EVAL_STAGE_PREFIX == LAUNCH_PREFIX and entry_module("eval-finetune-depth") == "versavit.eval.entry"
    cfg = eval_config(eval_run, "eval.vqa={processes: 2, stage1_steps: 2, stage2_steps: 3, batch_size: 4, "
                      "max_questions: 6, log_every: 1, lmms_tasks: [local]}", "eval.finetune_depth.max_steps=2")
    assert (job_config(cfg, "finetune-depth").launch.nnodes, job_config(cfg, "finetune-depth").launch.nproc_per_node,
            job_config(cfg).launch.nproc_per_node) == (1, 1, 1)
    assert job_config(cfg, "vqa").launch.nproc_per_node == 2
    export = str(eval_run / "stages" / "multitask" / "export")
    manifest = eval_run / "stages" / "multitask" / "stage.json"
    manifest.write_text(json.dumps({"variant": "", "export_url": export}))
    url = stage_evaluator(cfg, [str(manifest)], "vqa")
    data = json.loads(Path(url).read_text())
    rows = {(r["backbone"], r["evaluator"]) for r in data["results"]}
    assert rows == {("baseline", "vqa"), ("trained", "vqa")}
    done = json.loads((eval_run / "stages" / "eval-vqa" / "stage.json").read_text())
    assert done["results_url"] == url
    files = sorted((eval_run / "reports" / "eval-vqa" / "vqa").glob("vqa-synthetic-*.json"))
    assert [f.name for f in files] == ["vqa-synthetic-baseline.json", "vqa-synthetic-trained.json"]
    for file in files:
        result = load_result(file)
        assert result.artifacts["processes"] == 2 and result.artifacts["replicas_identical"] is True
        assert result.artifacts["backbone_unchanged"] is True
        assert len(result.curves["stage1_loss"]) == 2 and len(result.curves["stage2_loss"]) == 3
        rows = read_predictions(Path(result.artifacts["predictions"]))
        assert [int(r["index"]) for r in rows] == list(range(6))  # both processes' answers, gathered in order
        # lmms-eval inside the two-process job scores the whole task in each process, as the evaluator does
        assert result.value("lmms_versavit_synthetic_vqa_exact_match") == pytest.approx(result.value("accuracy"))


def test_probe_and_zero_shot_metrics_perfect_vs_shuffled() -> None:
    """The linear probe's mIoU and the zero-shot protocol's aligned AbsRel / delta1 cannot pass broken: the truth
    scores perfectly, the same values shuffled over the pixels score near chance."""
    import torch

    from versavit.eval.metrics import DepthMeter, SegmentationMeter
    from versavit.eval.zeroshot import aligned_depth

    gen = torch.Generator().manual_seed(0)
    classes = 6
    seg = torch.randint(0, classes, (4, 32, 32), generator=gen)
    perfect, shuffled = SegmentationMeter(classes), SegmentationMeter(classes)
    perfect.update(seg, seg)
    shuffled.update(seg.flatten()[torch.randperm(seg.numel(), generator=gen)].view_as(seg), seg)
    assert perfect.compute()["miou"] == pytest.approx(1.0)
    assert shuffled.compute()["miou"] < 1.5 / (2 * classes - 1) + 0.05  # chance IoU of uniform labels: 1/(2C-1)

    yy, xx = torch.meshgrid(torch.linspace(1, 8, 32), torch.linspace(0, 1, 32), indexing="ij")
    gt = (yy + xx).float()  # metres, a smooth scene
    valid = torch.ones_like(gt, dtype=torch.bool)
    for space, pred in (("depth", 3.0 * gt + 0.5), ("disparity", 2.0 / gt + 0.1)):  # right up to scale and shift
        good, bad = DepthMeter(), DepthMeter()
        good.update(aligned_depth(pred, gt, valid, space, 1e-3, 10.0), gt, valid)
        mixed = pred.flatten()[torch.randperm(pred.numel(), generator=gen)].view_as(pred)
        bad.update(aligned_depth(mixed, gt, valid, space, 1e-3, 10.0), gt, valid)
        g, b = good.compute(), bad.compute()
        assert g["absrel"] < 1e-4 and g["delta1"] == pytest.approx(1.0), space
        assert b["absrel"] > 0.2 and b["delta1"] < 0.7, (space, b)
