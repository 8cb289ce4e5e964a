"""Recipes as data: each stage trains exactly its pattern set; tiny in-process runs of every recipe train.

The runs are single-process (world 1, gloo) calls of the real `run_stage` (DeepSpeed engine, export,
stage.json), so they take seconds; the 2-process ZeRO-2 path is covered by test_train.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from train_helpers import ROOT, tiny_overrides

from versavit.config import load_config
from versavit.config.schema import RunConfig
from versavit.data.synthetic import render_sample
from versavit.data.tasks import DENSE_PROMPT, text_pairs
from versavit.models.multitask import VersaViT
from versavit.train.loop import TRAINED_STATE, _init_weights_from, plan_stage, resolve_init, run_stage, stage_url

SAILVIT = ROOT / "configs/recipes/sailvit.yaml"
TINY = ROOT / "configs/tiny.yaml"


def config(path: Path, workdir: Path, *extra: str) -> RunConfig:
    return load_config(path, [*tiny_overrides(workdir), *extra])


def trainable_names(model: VersaViT, patterns: list[str]) -> set[str]:
    model.set_trainable(patterns)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_sets_follow_the_recipe_file(tmp_path: Path) -> None:
    cfg = config(SAILVIT, tmp_path)
    depth = cfg.model.backbone.depth  # 3 in the test sizes
    model = VersaViT.build(cfg.model, tasks=["caption"])
    names = {n for n, _ in model.named_parameters()}
    projector = {n for n in names if n.startswith("heads.caption.projector.")}
    llm = {n for n in names if n.startswith("heads.caption.llm.")}
    merger = {n for n in names if n.startswith("backbone.tower.merger.")}
    vit = {n for n in names if n.startswith("backbone.")} - merger

    def block(i: int) -> set[str]:
        return {n for n in names if n.startswith(f"backbone.tower.blocks.{i}.")}

    sets = {s.name: trainable_names(model, s.trainable) for s in cfg.train.stages()}
    assert sets["coarse"] == projector  # the connector alone
    assert sets["fine-top1"] == projector | block(depth - 1)  # + exactly the top block
    assert sets["fine-top2"] == projector | block(depth - 2) | block(depth - 1)  # + exactly the top 2
    assert sets["knowledge"] == projector | vit  # the whole ViT
    assert all(not s & (llm | merger) for s in sets.values())  # LLM frozen throughout, merger never trains

    versavit = config(TINY, tmp_path)
    full = VersaViT.build(versavit.model)
    all_names = {n for n, _ in full.named_parameters()}
    warm, multi = versavit.train.stages()
    assert trainable_names(full, warm.trainable) == {n for n in all_names if n.startswith("heads.caption.projector.")}
    assert trainable_names(full, multi.trainable) == {n for n in all_names if ".merger." not in n}


def test_text_sources() -> None:
    s = render_sample(0, "train", 2, 64, 3, 5)
    meta = {"caption": s.caption, "qa": s.qa, "objects": s.objects}
    assert text_pairs(meta, "caption") == [("Describe the image.", s.caption)]
    assert text_pairs(meta, "vqa") == [(q["question"], q["answer"]) for q in s.qa]
    assert len(text_pairs(meta, "mixed")) == 1 + len(s.qa)
    [(question, dense)] = text_pairs(meta, "dense")
    assert question == DENSE_PROMPT
    left_to_right = sorted(s.objects, key=lambda o: o["center_uv"][0])
    positions = [dense.lower().index(o["expression"].lower() + ":") for o in left_to_right]
    assert positions == sorted(positions)  # one statement per region, left to right
    assert text_pairs({"caption": "x"}, "dense") == [] and text_pairs({"caption": "x"}, "vqa") == []


def test_auto_init_is_the_previous_stage_same_variant_else_plain(tmp_path: Path) -> None:
    cfg = config(SAILVIT, tmp_path)
    assert resolve_init(cfg, "coarse", "v") is None  # the first stage: init_from null
    assert resolve_init(cfg, "fine-top1", "v") is None  # nothing exported yet
    plain = Path(stage_url(cfg, "coarse")) / "export"
    plain.mkdir(parents=True)
    (plain / TRAINED_STATE).write_bytes(b"")
    assert resolve_init(cfg, "fine-top1", "v") == str(plain)
    own = Path(stage_url(cfg, "coarse", "v")) / "export"
    own.mkdir(parents=True)
    (own / TRAINED_STATE).write_bytes(b"")
    assert resolve_init(cfg, "fine-top1", "v") == str(own)
    assert resolve_init(config(TINY, tmp_path, "train.multitask.init_from=s3://b/x"), "multitask") == "s3://b/x"


def test_global_batch_accumulates_single_task_stages(tmp_path: Path) -> None:
    cfg = config(SAILVIT, tmp_path, "train.recipe.coarse.batch_size={caption: 2}", "train.recipe.coarse.global_batch=8")
    assert plan_stage(cfg, "coarse", world=2).micro_steps == ["caption"] * 2
    assert plan_stage(cfg, "coarse", world=1).micro_steps == ["caption"] * 4
    assert plan_stage(cfg, "knowledge").weights == {"caption": 1.0}


def _state_before(cfg: RunConfig, stage: str, variant: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The weights `stage` starts from (seeded init + what earlier stages trained) and its trainable set."""
    rs = cfg.train.stage(stage)
    torch.manual_seed(cfg.train.seed)  # as Trainer.setup: the synergy module is built last, so it changes nothing
    model = VersaViT.build(cfg.model, tasks=rs.tasks, loss=cfg.train.loss)
    init = resolve_init(cfg, stage, variant)
    if init:
        _init_weights_from(model, init)
    trainable = trainable_names(model, rs.trainable)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainable


def _run_recipe(cfg: RunConfig, variant: str) -> dict[str, dict]:
    """Run every stage in order; check each changed exactly its trainable set. Returns metrics per stage."""
    metrics = {}
    for rs in cfg.train.stages():
        before, trainable = _state_before(cfg, rs.name, variant)
        result = run_stage(cfg, rs.name, variant)
        assert result["variant"] == variant and result["steps"] == rs.max_steps
        after = dict(VersaViT.from_export(result["export_url"], cfg.model).named_parameters())
        changed = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
        assert changed == trainable, (rs.name, sorted(changed ^ trainable)[:8])
        path = Path(cfg.workdir) / "reports" / f"{rs.name}-{variant}" / "metrics.jsonl"
        points = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(points) == rs.max_steps
        assert all(math.isfinite(v) for p in points for k, v in p.items() if k.startswith("loss/"))
        metrics[rs.name] = points
    return metrics


def _fast(workdir: Path) -> list[str]:
    return ["tracking.enabled=false", "train.precision=fp32", f"workdir={workdir}"]


def test_tiny_versavit_recipe_with_synergy_trains(tiny_world: Path, world_of_one: None) -> None:
    cfg = config(TINY, tiny_world, *_fast(tiny_world), "train.warmup.max_steps=2", "train.multitask.max_steps=3",
                 "train.multitask.synergy.enabled=true")
    metrics = _run_recipe(cfg, "synergy")
    for point in metrics["multitask"]:
        assert 0 <= point["synergy/disc_acc"] <= 1 and math.isfinite(point["synergy/disc_loss"])
        assert {"parts/depth/ssi", "parts/refseg/dice", "synergy/spec_acc", "synergy/orth"} <= set(point)
    assert "synergy/disc_acc" not in metrics["warmup"][0]
    stage = json.loads((tiny_world / "stages" / "multitask-synergy" / "stage.json").read_text())
    assert stage["init_from"].endswith("stages/warmup-synergy/export") and stage["plan"]["synergy"] is True


def test_tiny_sailvit_recipe_trains(tiny_world: Path, world_of_one: None) -> None:
    short = [f"train.recipe.{i}.{k}" for i in range(4) for k in ("max_steps=2", "batch_size={caption: 2}",
                                                                  "global_batch=4")]
    cfg = config(SAILVIT, tiny_world, *_fast(tiny_world), *short)
    metrics = _run_recipe(cfg, "sailvit")
    assert list(metrics) == ["coarse", "fine-top1", "fine-top2", "knowledge"]
    stage = json.loads((tiny_world / "stages" / "knowledge-sailvit" / "stage.json").read_text())
    assert stage["init_from"].endswith("stages/fine-top2-sailvit/export")
    assert stage["plan"]["caption_source"] == "vqa" and stage["plan"]["micro_steps"] == ["caption", "caption"]
