"""Fine-tuned metric depth (versavit.eval.finetune.depth, evaluator "finetune-depth"): the scoring, the training's
effect on a tiny backbone in the tiny synthetic world, determinism, and which benchmarks it applies to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from eval_helpers import eval_config

from versavit.eval.candidates import Candidate
from versavit.eval.datasets import open_benchmark
from versavit.eval.evaluators import EvalContext, get
from versavit.eval.finetune.depth import (
    FinetuneSettings,
    MetricDepthScorer,
    build_depth_model,
    evaluate_metric_depth,
    finetune_depth,
    load_result,
    train_metric_depth,
)
from versavit.models.backbone import VisionBackbone

# one worker runs the module (make test: xdist), so its trained models (module fixtures) are built once
pytestmark = pytest.mark.xdist_group("finetune_depth")

SCHEDULE = ("eval.finetune_depth={resolution: 56, batch_size: 8, epochs: 20, max_steps: 36, lr_backbone: 1.0e-3, "
            "lr_head: 3.0e-3, log_every: 12}")


def _depth_field(seed: int, shape: tuple[int, int] = (40, 52)) -> torch.Tensor:
    """A smooth depth map in metres (1-6 m: 1.5x of it stays below max_depth 10) with some structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 5, 6, generator=g)
    return (1 + 5 * torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear", align_corners=False))[0, 0]


def _score(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    scorer = MetricDepthScorer(min_depth=1e-3, max_depth=10.0)
    scorer.update(pred, gt, valid)
    return scorer.compute()


# ---------------------------------------------------------------------------------------------- (a) scoring


def test_scorer_perfect_shuffled_scaled_and_upsampled() -> None:
    gt = _depth_field(0)
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[:4] = False  # e.g. an evaluation crop
    perfect = _score(gt.clone(), gt, valid)
    assert perfect["absrel"] == pytest.approx(0.0, abs=1e-7) and perfect["delta1"] == 1.0
    assert perfect["rmse"] == pytest.approx(0.0, abs=1e-6) and perfect["images"] == 1

    shuffled = gt.reshape(-1)[torch.randperm(gt.numel(), generator=torch.Generator().manual_seed(1))].reshape(gt.shape)
    bad = _score(shuffled, gt, valid)
    assert bad["absrel"] > 0.25 and bad["delta1"] < 0.6 and bad["rmse"] > 1.0

    # metric depth: no scale alignment, so 1.5x the truth is wrong everywhere (an aligned metric would say 0)
    scaled = _score(1.5 * gt, gt, valid)
    assert scaled["absrel"] == pytest.approx(0.5, abs=1e-5) and scaled["delta1"] == 0.0

    # a prediction at the network's resolution is upsampled to the label's size before scoring
    low = torch.nn.functional.interpolate(gt[None, None], size=(20, 26), mode="bilinear", align_corners=False)[0, 0]
    up = _score(low, gt, valid)
    assert up["absrel"] < 0.03 and up["delta1"] > 0.99
    # pixels outside (min_depth, max_depth) or not valid never count
    far = gt.clone()
    far[:4] = 1000.0
    assert _score(gt.clone(), far, valid | True)["absrel"] == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- (b, c) training


@pytest.fixture(scope="module")
def world(eval_run: Path) -> dict[str, Any]:
    cfg = eval_config(eval_run, SCHEDULE, "tracking.enabled=false")
    bench = open_benchmark("synthetic", cfg.workdir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        backbone = VisionBackbone.build(cfg.model.backbone)
    return {"cfg": cfg, "bench": bench, "cand": Candidate("tiny", "in-memory tiny backbone", backbone=backbone),
            "initial": {k: v.clone() for k, v in backbone.state_dict().items()}}


@pytest.fixture(scope="module")
def tuned(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("finetune-depth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: built before the autouse one-thread fixture applies
    try:
        result = finetune_depth(world["cand"], world["bench"], world["cfg"], device="cpu", out_dir=out)
    finally:
        torch.set_num_threads(threads)
    return {"result": result, "out": out}


def test_finetuning_lowers_absrel_and_moves_the_backbone(world: dict[str, Any], tuned: dict[str, Any]) -> None:
    cfg, bench, cand = world["cfg"], world["bench"], world["cand"]
    model, origin = build_depth_model(cand, cfg, bench.eval.max_depth)  # the same start as the fine-tune's
    assert origin == "fresh"
    before, _ = evaluate_metric_depth(model, bench.eval, 56, 8, torch.device("cpu"))
    result = tuned["result"]
    after = result.as_dict()
    assert set(after) == {"absrel", "delta1", "rmse"}
    assert before["images"] == 8 == result.artifacts["eval_images"]
    assert after["absrel"] < 0.6 * before["absrel"], (before, after)
    assert after["delta1"] > before["delta1"] + 0.2 and after["rmse"] < before["rmse"]
    losses = result.curves["train_loss"]
    assert len(losses) == 36 and np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6])
    assert result.artifacts["backbone_update"] > 1e-3
    # the candidate's own in-memory backbone was copied, never trained in place
    state = cand.backbone.state_dict()
    assert all(torch.equal(state[k], world["initial"][k]) for k in state)
    # figure inputs: images, truths, valid masks and predictions at the label's size
    ex = result.artifacts["examples"]
    assert len(ex["pred"]) == 4 and ex["pred"][0].shape == ex["gt"][0].shape == ex["valid"][0].shape
    # the result as JSON (and the examples as .npz) in out_dir, read back whole
    files = sorted(p.name for p in tuned["out"].iterdir())
    assert files == ["finetune-depth-synthetic-tiny.json", "finetune-depth-synthetic-tiny.npz"]
    doc = json.loads((tuned["out"] / files[0]).read_text())
    metrics = {m["name"]: m for m in doc["metrics"]}
    assert metrics["absrel"]["value"] == after["absrel"] and doc["artifacts"]["head"] == "fresh"
    back = load_result(tuned["out"] / files[0])
    assert back.as_dict() == after and back.curves == result.curves
    assert np.array_equal(back.artifacts["examples"]["pred"][1], ex["pred"][1])


def test_lr_backbone_is_the_backbones_learning_rate(world: dict[str, Any]) -> None:
    """Direct check of the weights: lr_backbone 1e-3 moves the backbone, 1e-12 leaves it as it was (while the head,
    at lr_head, trains either way)."""
    cfg, bench, cand = world["cfg"], world["bench"], world["cand"]
    base = dataclasses.replace(FinetuneSettings.from_config(cfg), max_steps=6)
    moved = {}
    for lr in (1e-3, 1e-12):
        model, _ = build_depth_model(cand, cfg, bench.eval.max_depth)
        b0 = {k: v.detach().clone() for k, v in model.backbone.named_parameters() if v.requires_grad}
        h0 = {k: v.detach().clone() for k, v in model.head.named_parameters()}
        with torch.random.fork_rng(devices=[]):
            train_metric_depth(model, bench.train, dataclasses.replace(base, lr_backbone=lr), torch.device("cpu"))
        # largest change of any backbone weight (AdamW moves each by about lr per step, 6 steps here)
        moved[lr] = max(float((p.detach() - b0[k]).abs().max()) for k, p in model.backbone.named_parameters()
                        if k in b0)
        assert max(float((p.detach() - h0[k]).abs().max()) for k, p in model.head.named_parameters()) > 1e-3
    assert moved[1e-3] > 1e-3 and moved[1e-12] < 1e-9, moved


def test_same_seed_same_result(eval_run: Path, world: dict[str, Any]) -> None:
    cfg = eval_config(eval_run, SCHEDULE, "eval.finetune_depth.max_steps=5", "tracking.enabled=false")
    first, again = (finetune_depth(world["cand"], world["bench"], cfg, device="cpu") for _ in range(2))
    assert len(first.curves["train_loss"]) == 5
    assert again.as_dict() == first.as_dict() and again.curves["train_loss"] == first.curves["train_loss"]
    assert np.array_equal(again.artifacts["examples"]["pred"][0], first.artifacts["examples"]["pred"][0])


def test_export_candidate_keeps_its_depth_head(eval_run: Path, world: dict[str, Any]) -> None:
    export = eval_run / "stages/multitask/export"
    cand = Candidate("trained", str(export), export=export, heads=("depth", "refseg"))
    model, origin = build_depth_model(cand, world["cfg"], 10.0)
    assert origin == "export"
    saved = torch.load(export / "depth/head.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.head.state_dict().items())
    assert model.layers == json.loads((export / "versavit.json").read_text())["depth_layers"]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 56, 56), (56, 56))
    assert out.shape == (2, 56, 56) and float(out.min()) > 0 and float(out.max()) < 10.0  # metres in (0, max_depth)


# ---------------------------------------------------------------------------------------------- (d) evaluator


def test_evaluator_applies_to_depth_with_train_split_and_errors(world: dict[str, Any], tuned: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    cls = get("finetune-depth")
    assert cls.name == "finetune-depth" and cls.kind == "training"
    ev = cls(EvalContext(world["cfg"], tmp_path / "cache", tmp_path / "report", "cpu"))
    bench = world["bench"]
    no_train = dataclasses.replace(bench, train=None)
    no_depth = dataclasses.replace(bench, tasks=("seg", "refseg"))
    assert ev.applies_to(bench) and not ev.applies_to(no_train) and not ev.applies_to(no_depth)
    with pytest.raises(ValueError, match="no train split"):
        finetune_depth(world["cand"], no_train, world["cfg"], device="cpu")
    with pytest.raises(ValueError, match="no depth task"):
        finetune_depth(world["cand"], no_depth, world["cfg"], device="cpu")
    note = ev.protocol_note()
    assert "lr 0.001" in note and "lr 0.003" in note and "batch 8" in note and "20 epochs" in note and "56 px" in note
    assert ev.settings()["lr_backbone"] == 1e-3 and list(ev.columns()) == ["absrel", "delta1"]
    (tmp_path / "figures").mkdir()
    files = ev.figures([tuned["result"]], tmp_path / "figures")
    assert [f.name for f in files] == ["finetune-depth_synthetic.png", "finetune-depth_loss_synthetic.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_published_layout_split_is_read_by_index(tmp_path: Path, eval_run: Path, world: dict[str, Any]) -> None:
    """A file-layout benchmark (NYUv2, BTS layout) is permuted whole each epoch (random access), not streamed."""
    from eval_helpers import write_nyu

    from versavit.eval.finetune import depth as ft
    from versavit.eval.finetune.common import random_access

    write_nyu(tmp_path / "nyu", per_split=3)
    bench = open_benchmark(f"nyu={tmp_path / 'nyu'}", str(tmp_path))
    assert random_access(bench.train) and not random_access(world["bench"].train)
    settings = dataclasses.replace(FinetuneSettings.from_config(world["cfg"]), batch_size=2, flip=False)
    keys = [[float(p.depth.sum()) for p in ft._epoch_pairs(bench.train, settings, torch.Generator().manual_seed(s))]
            for s in (0, 1)]
    assert len(keys[0]) == 3 and sorted(keys[0]) == sorted(keys[1]) and keys[0] != keys[1]  # each sample once
    cfg = eval_config(eval_run, SCHEDULE, "eval.finetune_depth.epochs=3", "tracking.enabled=false")
    result = finetune_depth(world["cand"], bench, cfg, device="cpu")
    assert len(result.curves["train_loss"]) == 3  # 3 epochs of ceil(3 / 8) = 1 step (max_steps 36 not reached)
    assert result.artifacts["eval_images"] == 3 and all(np.isfinite(v) for v in result.as_dict().values())
