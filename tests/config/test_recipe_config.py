"""Recipes as config: VersaViT's stages are the warmup/multitask presets, `base:` files, list overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from versavit.config import ConfigError, load_config
from versavit.config.loader import deep_merge

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_recipe_the_stages_are_versavits_two() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.train.recipe is None
    warm, multi = cfg.train.stages()
    assert (warm.name, warm.tasks, warm.trainable) == ("warmup", ["caption"], ["projector"])
    assert warm is cfg.train.warmup and multi is cfg.train.multitask  # the presets are the stages
    assert (warm.global_batch, warm.batch_size, warm.max_steps) == (16, {"caption": 8}, 20)
    assert (warm.lr_backbone, warm.lr_heads, warm.weight_decay, warm.init_from) == (1e-3, 1e-3, 0.0, None)
    assert (multi.name, multi.tasks, multi.trainable, multi.init_from) == (
        "multitask", ["caption", "depth", "refseg"], ["*"], "auto")
    assert (multi.lr_backbone, multi.lr_heads, multi.synergy.enabled, multi.max_steps) == (3e-4, 1e-3, False, 200)
    no_warm = load_config(ROOT / "configs/tiny.yaml", ["train.warmup.enabled=false"])
    assert [s.name for s in no_warm.train.stages()] == ["multitask"]
    with pytest.raises(ValueError, match="unknown stage 'coarse'"):
        cfg.train.stage("coarse")


def test_sailvit_recipe_file_builds_on_tiny() -> None:
    cfg = load_config(ROOT / "configs/recipes/sailvit.yaml")
    tiny = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.model == tiny.model and cfg.data == tiny.data and cfg.name == "tiny-sailvit"
    stages = cfg.train.stages()
    assert [s.name for s in stages] == ["coarse", "fine-top1", "fine-top2", "knowledge"]
    assert [s.caption_source for s in stages] == ["caption", "dense", "dense", "vqa"]
    assert all("llm" not in s.trainable and "*" not in s.trainable for s in stages)  # the LLM stays frozen


def test_list_overrides_by_index_or_name() -> None:
    cfg = load_config(ROOT / "configs/recipes/sailvit.yaml",
                      ["train.recipe.coarse.max_steps=3", "train.recipe.-1.max_steps=4", "train.recipe.1.lr_heads=0.5"])
    assert [s.max_steps for s in cfg.train.stages()] == [3, 40, 40, 4]
    assert cfg.train.stage("fine-top1").lr_heads == 0.5
    with pytest.raises(ConfigError, match="neither an index nor the name"):
        load_config(ROOT / "configs/recipes/sailvit.yaml", ["train.recipe.nope.max_steps=3"])


def test_base_chain_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\ntrain: {seed: 3, warmup: {lr_backbone: 0.5}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain: {warmup: {max_steps: 7}}\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml")
    assert (cfg.name, cfg.train.seed, cfg.train.warmup.lr_backbone, cfg.train.warmup.max_steps) == ("a", 3, 0.5, 7)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


RECIPE = ("train.recipe=[{name: one, tasks: [caption, depth], trainable: ['*'], "
          "batch_size: {caption: 2, depth: 2}}]")


@pytest.mark.parametrize(("override", "expect"), [
    ("train.recipe=[]", "at least one stage"),
    ("train.recipe=[{name: A, tasks: [caption], trainable: ['*'], batch_size: {caption: 1}}]", "name"),
    ("train.recipe=[{name: a, tasks: [caption, depth], trainable: ['*'], batch_size: {caption: 1, depth: 1}, "
     "global_batch: 8}]", "single-task"),
    ("train.recipe=[{name: a, tasks: [caption], trainable: ['*'], batch_size: {}}]", "no entry for active"),
    ("train.recipe=[{name: a, tasks: [caption], trainable: ['backbone.blocks[x:]'], batch_size: {caption: 1}}]",
     "index or a slice"),
    ("train.recipe=[{name: a, tasks: [caption], trainable: ['*'], batch_size: {caption: 1}, "
     "synergy: {enabled: true}}]", "two tasks"),
    ("train.multitask.synergy.enabled=true", None),
])
def test_recipe_validation(override: str, expect: str | None) -> None:
    if expect is None:
        assert load_config(ROOT / "configs/tiny.yaml", [override]).train.stage("multitask").synergy.enabled
        return
    with pytest.raises(ConfigError, match=expect):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_duplicate_stage_names_are_rejected() -> None:
    stage = "{name: a, tasks: [caption], trainable: ['*'], batch_size: {caption: 1}}"
    with pytest.raises(ConfigError, match="more than once"):
        load_config(ROOT / "configs/tiny.yaml", [f"train.recipe=[{stage}, {stage}]"])
    cfg = load_config(ROOT / "configs/tiny.yaml", [RECIPE])
    assert cfg.train.stage_path("one") == "train.recipe[0]"
