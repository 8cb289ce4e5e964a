"""Run identity, lineage helpers, `versavit compare` and the quiet local pipeline's console, without a pipeline run
(a SQLite store of a few runs made here)."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from pipeline_run import PipelineRun

from versavit.config import config_hash, load_config
from versavit.tracking import Tracker, identity_tags, model_version_meta, parent_run_name, readable_params
from versavit.tracking.identity import (
    OVERRIDES_ENV,
    RUN_NAME_ENV,
    compare_url,
    config_changes,
    describe,
    experiment_url,
    headline_view,
    overrides_env,
    ui_base,
)
from versavit.tracking.runs import upstream_runs

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_parent_name_description_and_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    base = load_config(TINY, [])
    cfg = load_config(TINY, ["train.multitask.max_steps=50", "train.multitask.tasks=[caption, depth]",
                             "train.multitask.loss_weights={caption: 0.5, depth: 0.5}"])
    monkeypatch.delenv(RUN_NAME_ENV, raising=False)
    name = parent_run_name(cfg, now=0)
    assert re.fullmatch(rf"tiny-{config_hash(cfg)[:8]}-19700101-\d{{6}}", name)
    monkeypatch.setenv(RUN_NAME_ENV, "my-run")
    assert parent_run_name(cfg) == "my-run"

    changes = config_changes(base, cfg)
    assert changes["train.multitask.max_steps"] == ["200", "50"]
    assert changes["train.multitask.tasks"] == ["caption,depth,refseg", "caption,depth"]
    monkeypatch.setenv(OVERRIDES_ENV, overrides_env("configs/tiny.yaml", changes))
    tags = identity_tags(cfg, "versavit-ablation-tasks")
    assert tags["versavit.pipeline_kind"] == "ablation" and tags["versavit.pipeline"] == "true"
    assert tags["versavit.tasks"] == "caption,depth" and tags["versavit.recipe"] == "warmup>multitask"
    assert tags["versavit.backbone"] == "qwen2_vl random init 64d x4"
    note = tags["mlflow.note.content"]
    assert "**ablation** pipeline" in note and "warmup → multitask-{caption, caption-depth, all} → eval" in note
    assert "`train.multitask.max_steps`: 200 → **50**" in note and "Overrides of `configs/tiny.yaml` (5)" in note
    monkeypatch.delenv(OVERRIDES_ENV)
    assert "not recorded" in describe(cfg, "versavit")
    assert "uri" not in readable_params(cfg)["tracking"]


def test_urls_and_saved_view() -> None:
    assert ui_base("sqlite:////x/mlflow.db", 5001) == "http://127.0.0.1:5001"
    assert ui_base("https://alice:pw@mlflow.example:443/") == "https://mlflow.example:443"
    assert experiment_url("http://h:1", "7") == \
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=versavit-headline"
    url = compare_url("http://h:1", ["a" * 32, "b" * 32], ["7", "7"])
    runs, exps = re.fullmatch(r"http://h:1/#/compare-runs\?runs=([^&]*)&experiments=([^&]*)"
                              r"&workflowType=machine_learning", url).groups()
    assert json.loads(urllib.parse.unquote(runs)) == ["a" * 32, "b" * 32]
    assert json.loads(urllib.parse.unquote(exps)) == ["7"]
    view = headline_view(["linear-probe/synthetic/seg_miou/baseline", "linear-probe/synthetic/seg_miou/caption+depth"])
    assert view["selectedColumns"][-2:] == ["metrics.`linear-probe/synthetic/seg_miou/baseline`",  # MLflow's cleaning
                                            "metrics.`linear-probe/synthetic/seg_miou/caption_depth`"]
    assert view["columnWidths"]["metrics.`linear-probe/synthetic/seg_miou/baseline`"] == 8 * 40 + 28
    assert view["orderByKey"] == "attributes.start_time" and not view["orderByAsc"]


def test_training_and_eval_upstream_from_stage_json(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"workdir={tmp_path}"])
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "t")
    for stage, variant, run_id in (("warmup", "", "1" * 32), ("multitask", "caption", "2" * 32)):
        folder = tmp_path / "stages" / (f"{stage}-{variant}" if variant else stage)
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text(json.dumps({"stage": stage, "variant": variant, "mlflow_run_id": run_id}))
    # multitask of variant "caption" starts from warmup of variant "" (no warmup-caption)
    assert upstream_runs(cfg, "multitask-caption", {}, tracker, None) == {"warmup": "1" * 32}
    export = str(tmp_path / "stages" / "multitask-caption" / "export")
    assert upstream_runs(cfg, "eval", {"versavit.eval.source.caption": export,
                                       "versavit.eval.source.baseline": "random init"}, tracker, None) == {
        "multitask-caption": "2" * 32}
    assert upstream_runs(cfg, "warmup", {}, tracker, None) == {}  # its upstream (label) is found under a parent
    tracker.close()


def test_model_version_meta(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"workdir={tmp_path}"])
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 1, "loss/depth": 2.0}) + "\n" + json.dumps({"step": 2, "loss/depth": 1.5,
                                                                                  "loss/total": 1.5}) + "\n")
    meta = model_version_meta(cfg, "multitask", ["depth"], 2, "/w/stages/multitask/exports/abc-2/backbone", log)
    assert meta["tags"]["versavit.config_hash"] == config_hash(cfg)
    assert meta["tags"]["versavit.final.loss/depth"] == "1.5"
    assert "2 steps on depth; final losses depth 1.5, total 1.5" in meta["description"]


@pytest.mark.slow
@pytest.mark.xdist_group("local_pipeline")  # one worker builds the session's pipeline run (make test: xdist)
def test_compare_prints_differences_side_by_side(local_pipeline: PipelineRun, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's parent run against a second one (in a copy of its store: a new store costs a minute of
    migrations on this machine) that differs in one param and one headline figure."""
    from typer.testing import CliRunner

    from versavit.cli import app

    assert local_pipeline.returncode == 0, local_pipeline.stderr[-4000:]
    shutil.copy(local_pipeline.workdir / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("versavit-tiny")
    (first,) = client.search_runs([exp.experiment_id], "tags.`versavit.pipeline` = 'true'")
    other = client.create_run(exp.experiment_id, run_name="tiny-other-run", tags={"versavit.pipeline": "true"})
    params = {**first.data.params, "train.multitask.max_steps": "50"}
    client.log_batch(other.info.run_id, params=[Param(k, v) for k, v in params.items()])
    miou = first.data.metrics["linear-probe/synthetic/seg_miou"]
    for key, value in first.data.metrics.items():
        client.log_metric(other.info.run_id, key, value + 2.5 if key == "linear-probe/synthetic/seg_miou" else value)

    from versavit.progress import console

    # wide enough for the table: COLUMNS alone does not do it where the console was made with COLUMNS set
    # (pytest-xdist's workers), as rich reads it once then
    monkeypatch.setattr(console, "_width", 250)
    res = CliRunner().invoke(app, ["compare", first.info.run_name[:12], "tiny-other", "--config", str(TINY),
                                   f"tracking.uri={uri}"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = re.sub(r"[│┃]", " ", res.output)
    assert re.search(r"train\.multitask\.max_steps\s+6\s+50", out)  # the one param that differs
    assert f"params that differ (1; {len(params) - 1} the same)" in out
    assert re.search(rf"linear-probe/synthetic/seg_miou\s+{miou:.4g}\s+{miou + 2.5:.4g}\s+2\.5", out), out
    assert re.search(r"linear-probe/synthetic/seg_miou/baseline\s+\S+\s+\S+\s+0\n", out)
    assert re.search(r"pipeline_kind\s+versavit\s+-", out)
    url = re.search(r"MLflow compare page: (\S+)", res.output).group(1)
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    assert json.loads(urllib.parse.unquote(url.split("runs=")[1].split("&")[0])) == [
        first.info.run_id, other.info.run_id]

    res = CliRunner().invoke(app, ["compare", "tiny-", first.info.run_id, "--config", str(TINY),
                                   f"tracking.uri={uri}"])
    assert res.exit_code == 1 and "'tiny-' names 2 runs" in res.output  # ambiguous: one line, exit 1

    # a parent run named like one the experiment has (`--run-name` given twice) gets a suffix
    from versavit.stages import open_pipeline_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RUN_NAME_ENV, first.info.run_name)
        run_id = open_pipeline_run(load_config(TINY, [f"workdir={tmp_path}", f"tracking.uri={uri}"]))
    assert client.get_run(run_id).info.run_name == f"{first.info.run_name}-2"


def test_local_console_shows_progress_and_warnings_only(tmp_path: Path) -> None:
    from rich.console import Console

    from versavit.kfp.local import _StepReporter

    reporter = _StepReporter(Console(file=open(tmp_path / "c.txt", "w"), width=200), tmp_path, str(tmp_path))  # noqa: SIM115
    assert reporter.step_name("comp-train-2", {"stage": "multitask", "variant": "caption"}) == "train multitask-caption"
    assert reporter.step_name("comp-label-datasets", {"kind": "embed", "shard_index": 0, "num_shards": 2}) == \
        "label-embed 1/2"
    assert reporter.step_name("comp-prepare", {"shard_index": 0.0, "num_shards": 1.0}) == "prepare 1/1"  # as KFP passes
    assert reporter.step_name("comp-data-check", {}) == "data-check"
    assert reporter.short(f"{tmp_path}/data/synthetic") == "data/synthetic"
    assert reporter.show("[KFP Executor 2026-11-29 08:03:40,088 INFO]: Got executor_input:\n") is None
    assert reporter.show('    "config_json": "{\\"name\\":\\"tiny\\"}",\n') is None
    assert reporter.show("/x/y.py:81: RuntimeWarning: You may be attemping ...\n") is None
    assert reporter.show("[rank 0] INFO versavit.train.loop: initialised 6 tensors\n") is None
    line = "multitask step 3/6  loss 3.210 (caption=6.350 depth=2.593 refseg=1.810)  4.1 samples/s  ETA 0:12"
    assert reporter.show(line + "\n") == line
    assert reporter.show("[KFP Executor 2026-11-29 08:03:40,088 WARNING]: MLflow tracking at x failed\n") == \
        "MLflow tracking at x failed"


@pytest.mark.slow
@pytest.mark.xdist_group("local_pipeline")  # one worker builds the session's pipeline run (make test: xdist)
def test_local_pipeline_console_is_one_line_per_step_and_live(local_pipeline: PipelineRun) -> None:
    """`versavit pipeline run --local` as the user saw it: no executor input, no KFP warnings, one line per step,
    training progress while it trained, the steps again as a table and where to look next; the rest in step logs."""
    assert local_pipeline.returncode == 0, local_pipeline.stderr[-4000:]
    out = local_pipeline.stdout + local_pipeline.stderr
    assert "executor_input" not in out and "non-Python base image" not in out and "KFP Executor" not in out
    steps = re.findall(r"^✓ (\S+(?: \S+)?)\s+[\d.:]+ (?:s|min)", out, flags=re.M)
    evaluators = [f"evaluate {n}" for n in ("linear-probe", "da2k", "refseg")]
    assert sorted(steps) == sorted(["open-run", "data", "data-check", "label", "train warmup", "train multitask",
                                    *evaluators, "evaluate", "close-run"]), steps  # one line each (KFP orders
    assert steps[0] == "open-run" and steps[-1] == "close-run"                   # data-check freely)
    assert steps.index("label") < steps.index("train warmup") < steps.index("train multitask") < steps.index("evaluate")
    assert all(steps.index("train multitask") < steps.index(e) < steps.index("evaluate") for e in evaluators)
    assert re.search(r"^✓ open-run .*MLflow run tiny-[0-9a-f]{8}-\d{8}-\d{6} \([0-9a-f]{32}\)$", out, flags=re.M)
    progress = re.findall(r"train multitask │ multitask step (\d+)/6  loss [\d.]+ \(caption=[\d.]+ depth=[\d.]+ "
                          r"refseg=[\d.]+\)  [\d.]+ samples/s  ETA \d+:\d\d", out)
    assert progress[0] == "1" and progress[-1] == "6"  # live: rank 0's lines as it trained, through the step
    # the order on the console: the multi-task step's progress lines come before its own line
    assert out.index("multitask step 6/6") < out.index("✓ train multitask")
    assert re.search(r"pipeline versavit finished in [\d.:]+ (s|min)", out) and "Where to look next" in out
    assert "versavit compare tiny-" in out and "workflowType=machine_learning" in out
    logs = {p.name: p for p in (local_pipeline.workdir / "reports" / "pipeline").glob("*/*.log")}
    assert {"open-run.log", "train_multitask.log", "evaluate.log"} <= set(logs)
    assert "Got executor_input" in logs["data.log"].read_text()  # all of it is in the step's log


def test_headline_metrics_of_several_trained_backbones() -> None:
    from versavit.eval.evaluators import EvalContext, EvalResult, get
    from versavit.eval.report import backbone_figures, comparison_table, headline_metrics

    probe = get("linear-probe")(EvalContext(load_config("configs/tiny.yaml"), Path("."), Path(".")))
    values = {"baseline": (0.20, 2.5), "caption": (0.25, 2.4), "all": (0.33333, 2.45678)}
    results = []
    for name, (miou, rmse) in values.items():
        r = EvalResult("linear-probe", "synthetic", name)
        r.add("seg_miou", miou, probe.metric_specs["seg_miou"])
        r.add("depth_rmse", rmse, probe.metric_specs["depth_rmse"])
        results.append(r)
    table = comparison_table(results, "baseline", list(values), [probe], ["synthetic"])
    assert headline_metrics(table) == {
        "linear-probe/synthetic/seg_miou/baseline": 20.0, "linear-probe/synthetic/seg_miou/caption": 25.0,
        "linear-probe/synthetic/seg_miou/caption/delta": 5.0, "linear-probe/synthetic/seg_miou/all": 33.33,
        "linear-probe/synthetic/seg_miou/all/delta": 13.33, "linear-probe/synthetic/depth_rmse/baseline": 2.5,
        "linear-probe/synthetic/depth_rmse/caption": 2.4, "linear-probe/synthetic/depth_rmse/caption/delta": -0.1,
        "linear-probe/synthetic/depth_rmse/all": 2.4568, "linear-probe/synthetic/depth_rmse/all/delta": -0.0432}
    one = comparison_table([r for r in results if r.backbone != "caption"], "baseline", ["baseline", "all"], [probe],
                           ["synthetic"])
    assert headline_metrics(one)["linear-probe/synthetic/seg_miou"] == 33.33  # one trained backbone: the bare key
    assert backbone_figures(one, "all") == {"linear-probe/synthetic/seg_miou": 33.33,
                                            "delta/linear-probe/synthetic/seg_miou": 13.33,
                                            "linear-probe/synthetic/depth_rmse": 2.4568,
                                            "delta/linear-probe/synthetic/depth_rmse": -0.0432}
