"""End to end: `run_eval` / `compare_backbones` / `versavit eval` on a tiny workdir, MLflow in SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import ROOT, eval_config, eval_overrides, save_export
from PIL import Image

from versavit.eval import compare_backbones, run_eval
from versavit.eval.run import baseline_candidate
from versavit.tracking import tracking_uri


def _mlflow_run(cfg, run_id: str):  # noqa: ANN001, ANN202
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    return client, client.get_run(run_id)


def _png_ok(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_run_eval_end_to_end(eval_run: Path) -> None:
    cfg = eval_config(eval_run)
    stage_reports = eval_run / "reports" / "multitask"
    stage_reports.mkdir(parents=True, exist_ok=True)
    (stage_reports / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "loss/depth": 1 / s, "loss/refseg": 2 / s, "loss/total": 3 / s}) for s in (1, 2, 3)))
    res = run_eval(cfg)

    base, trained = res["metrics"]["baseline"]["synthetic"], res["metrics"]["trained"]["synthetic"]
    for key in ("linear-probe/seg_miou", "linear-probe/depth_rmse", "linear-probe/depth_absrel",
                "linear-probe/depth_delta1"):
        assert 0 <= base[key] < 100 and 0 <= trained[key] < 100
    assert {"zero-shot-depth/absrel", "zero-shot-depth/delta1", "refseg/ciou", "refseg/miou"} <= set(trained)
    assert not any(k.startswith(("zero-shot-depth", "refseg")) for k in base)  # a bare backbone has no heads
    assert res["backbones"]["baseline"]["source"].startswith("random init")

    out = eval_run / "reports" / "eval"
    assert res["out_dir"] == str(out)
    md = (out / "comparison.md").read_text()
    assert "| baseline |" in md and "| trained |" in md and "Synthetic mIoU ↑" in md and "Synthetic RMSE ↓" in md
    table = json.loads((out / "comparison.json").read_text())["table"]
    probe = next(s for s in table["sections"] if s["key"] == "linear-probe")
    delta = probe["deltas"]["trained"]["linear-probe/synthetic/seg_miou"]
    assert delta == pytest.approx(trained["linear-probe/seg_miou"] - base["linear-probe/seg_miou"])
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"probe_depth_synthetic.png", "probe_seg_synthetic.png", "zero-shot-depth_synthetic.png",
            "refseg_synthetic.png", "probe_loss_synthetic.png", "training_losses.png"} <= figures
    for name in figures:
        assert min(_png_ok(out / "figures" / name)) > 100

    client, run = _mlflow_run(cfg, res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["versavit.stage"] == "eval"
    m = run.data.metrics
    for key in ("baseline/linear-probe/synthetic/seg_miou", "trained/linear-probe/synthetic/seg_miou",
                "baseline/linear-probe/synthetic/depth_rmse", "trained/zero-shot-depth/synthetic/absrel",
                "trained/zero-shot-depth/synthetic/delta1", "trained/refseg/synthetic/ciou",
                "trained/refseg/synthetic/miou", "delta/trained/linear-probe/synthetic/seg_miou"):
        assert key in m, key
    # in %, as shown
    assert m["trained/linear-probe/synthetic/seg_miou"] == pytest.approx(100 * trained["linear-probe/seg_miou"])
    steps = client.get_metric_history(run.info.run_id, "trained/linear-probe/synthetic/seg_loss")
    assert len(steps) == cfg.eval.probe.epochs * 3  # 24 samples / batch 8
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/comparison.md", "eval/comparison.json", "eval/figures"} <= artifacts


def test_baseline_is_what_training_starts_from(eval_run: Path) -> None:
    from versavit.models.multitask import VersaViT
    from versavit.models.precision import precision_dtype

    cfg = eval_config(eval_run)
    torch.manual_seed(cfg.train.seed)  # exactly what the multi-task stage does before building its model
    model = VersaViT.build(cfg.model, tasks=cfg.train.multitask.tasks, dtype=precision_dtype(cfg.train.precision))
    baseline = baseline_candidate(cfg).backbone
    expected, got = model.backbone.state_dict(), baseline.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    pinned = baseline_candidate(eval_config(eval_run, f"eval.baseline_backbone={eval_run}/stages/multitask/export"))
    assert pinned.export is not None and pinned.heads == ("depth", "refseg")


def test_compare_named_exports_table4(eval_run: Path, tmp_path: Path) -> None:
    cfg = eval_config(eval_run, "eval.probe.epochs=1", "eval.evaluators=[linear-probe, zero-shot-depth, refseg]")
    urls = {}
    for seed, (name, tasks) in enumerate((("caption", ("caption",)), ("caption+depth", ("caption", "depth")),
                                          ("all", ("caption", "depth", "refseg"))), start=5):
        urls[name] = str(tmp_path / name)
        save_export(cfg, urls[name], seed=seed, tasks=tasks)
    res = compare_backbones(urls, cfg, out_dir=tmp_path / "report")
    table = res["table"]
    assert table["reference"] == "caption" and table["backbones"] == ["caption", "caption+depth", "all"]
    probe = next(s for s in table["sections"] if s["key"] == "linear-probe")
    assert set(probe["deltas"]) == {"caption+depth", "all"}
    zeroshot = next(s for s in table["sections"] if s["key"] == "zero-shot-depth")
    assert zeroshot["rows"]["caption"]["zero-shot-depth/synthetic/absrel"] is None
    assert zeroshot["rows"]["caption+depth"]["zero-shot-depth/synthetic/absrel"] is not None
    assert "refseg/ciou" in res["metrics"]["all"]["synthetic"]
    assert "refseg/ciou" not in res["metrics"]["caption+depth"]["synthetic"]
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "| caption+depth |" in md and "against **caption**" in md
    _, run = _mlflow_run(cfg, res["mlflow_run_id"])
    # MLflow keys allow [A-Za-z0-9_-. /:] only: the tracker writes caption+depth as caption_depth
    assert {"caption/linear-probe/synthetic/seg_miou", "caption_depth/linear-probe/synthetic/seg_miou",
            "delta/all/linear-probe/synthetic/seg_miou"} <= set(run.data.metrics)


def test_refseg_without_embeddings_is_skipped(tmp_path: Path) -> None:
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic
    from versavit.layout import synthetic_root

    cfg = eval_config(tmp_path, "eval.probe.epochs=1", "tracking.enabled=false")
    build_synthetic(synthetic_root(cfg.workdir), SyntheticConfig(num_train=4, num_val=2, image_size=56))
    save_export(cfg, str(tmp_path / "stages/multitask/export"))
    res = run_eval(cfg)
    assert "refseg/ciou" not in res["metrics"]["trained"]["synthetic"]
    assert "zero-shot-depth/absrel" in res["metrics"]["trained"]["synthetic"]
    assert any("skipped" in n and "emb.npy" in n for n in res["notes"])
    assert "emb.npy" in (tmp_path / "reports/eval/comparison.md").read_text()


def test_cli_eval(eval_run: Path, tmp_path: Path, cli_main) -> None:
    from typer.testing import CliRunner

    from versavit.cli import app

    overrides = [*eval_overrides(eval_run), "eval.probe.epochs=1", "tracking.enabled=false"]
    export = f"{eval_run}/stages/multitask/export"
    result = CliRunner().invoke(app, ["eval", "--config", str(ROOT / "configs/tiny.yaml"), "--export",
                                      f"mine={export}", "--out", str(tmp_path / "cli"), *overrides])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "comparison.md").is_file()
    assert "| mine |" in (tmp_path / "cli" / "comparison.md").read_text()

    # a missing export is one clear error (exit 1), not a traceback: through the CLI's main(), in this process
    # (a fresh one would spend ~8 s importing the evaluation stack again)
    code, err = cli_main("eval", "--config", str(ROOT / "configs/tiny.yaml"), *eval_overrides(tmp_path / "empty"),
                         "tracking.enabled=false")
    assert code == 1, err
    assert "no trained backbone" in err and "Traceback" not in err


def test_published_layouts_end_to_end(eval_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ADE20k (seg probe), NYUv2 (depth probe + zero-shot) and RefCOCO (refseg through the run's embedder)."""
    from eval_helpers import bag_of_words, write_ade20k, write_nyu, write_refer

    import versavit.labeling.embed as embed_module

    write_ade20k(tmp_path / "ade")
    write_nyu(tmp_path / "nyu")
    write_refer(tmp_path / "refer")

    class FakeEmbedder:  # the real one needs model weights; the head was built for EMB_DIM-d embeddings
        def __init__(self, model_id: str, device: str = "auto") -> None:
            self.model_id = model_id

        def encode(self, texts: list[str]):  # noqa: ANN201
            import numpy as np

            return np.stack([bag_of_words(t) for t in texts])

    monkeypatch.setattr(embed_module, "TextEmbedder", FakeEmbedder)
    cfg = eval_config(eval_run, "eval.probe.epochs=1", "tracking.enabled=false",
                      "eval.evaluators=[linear-probe, zero-shot-depth, refseg]")  # the readers' test: the others
                                                                                  # have theirs (tests/eval)
    specs = [f"ade20k={tmp_path / 'ade'}", f"nyu={tmp_path / 'nyu'}", f"refcoco={tmp_path / 'refer'}"]
    res = compare_backbones({"trained": f"{eval_run}/stages/multitask/export"}, cfg, benchmarks=specs,
                            out_dir=tmp_path / "report")
    m = res["metrics"]["trained"]
    assert 0 <= m["ade20k"]["linear-probe/seg_miou"] <= 1 and len(res["per_class_iou"]["ade20k"]["trained"]) == 150
    assert {"linear-probe/depth_rmse", "zero-shot-depth/absrel", "zero-shot-depth/delta1"} <= set(m["nyu"])
    assert "zero-shot-depth/absrel" not in m["ade20k"]
    assert 0 <= m["refcoco"]["refseg/ciou"] <= 1 and "refseg/miou" in m["refcoco"]
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "ADE20k mIoU" in md and "NYUv2 RMSE" in md and "RefCOCO val cIoU" in md and "RefCOCO testA cIoU" in md
    figures = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert {"probe_seg_ade20k.png", "probe_depth_nyu.png", "zero-shot-depth_nyu.png", "refseg_refcoco.png"} <= figures

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError("no weights here")

    monkeypatch.setattr(embed_module, "TextEmbedder", broken)
    res = compare_backbones({"trained": f"{eval_run}/stages/multitask/export"}, cfg, benchmarks=[specs[2]],
                            out_dir=tmp_path / "report2")
    assert "refseg/ciou" not in res["metrics"]["trained"].get("refcoco", {})
    assert any("cannot be loaded" in n for n in res["notes"])


def test_run_eval_with_stage_exports(eval_run: Path, tmp_path: Path) -> None:
    """What the pipeline's evaluation component passes: variant -> export URL of each training stage."""
    import shutil

    workdir = tmp_path / "ablation"
    shutil.copytree(eval_run / "data", workdir / "data")
    cfg = eval_config(workdir, "eval.probe.epochs=1", "tracking.enabled=false",
                      "eval.evaluators=[linear-probe, zero-shot-depth, refseg]")
    exports = {}
    for seed, (variant, tasks) in enumerate((("caption", ("caption",)), ("all", ("caption", "depth", "refseg")))):
        exports[variant] = str(workdir / "stages" / f"multitask-{variant}" / "export")
        save_export(cfg, exports[variant], seed=seed, tasks=tasks)
        metrics = workdir / "reports" / f"multitask-{variant}" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True)
        metrics.write_text("\n".join(json.dumps({"step": s, "loss/caption": (seed + 1) / s}) for s in (1, 2)))
    res = run_eval(cfg, exports=exports)
    assert res["table"]["backbones"] == ["baseline", "caption", "all"] and res["reference"] == "baseline"
    assert res["report_dir"] == str(workdir / "reports" / "eval")
    assert (workdir / "reports/eval/figures/training_losses.png").is_file()
    assert run_eval(cfg, exports={"": exports["all"]})["table"]["backbones"] == ["baseline", "trained"]
