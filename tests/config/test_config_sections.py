"""A home for everything: shared training sections, the warm-up / multi-task presets of the one stage type,
removed keys, benchmark names checked when the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from versavit.config import BENCHMARK_NAMES, ConfigError, load_config
from versavit.config.schema import LossConfig, MultitaskStage, OptimConfig, RecipeStage, TrainConfig, WarmupStage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny.yaml"


def test_shared_training_sections() -> None:
    train = TrainConfig()
    assert train.optim == OptimConfig() and train.loss == LossConfig()
    assert (train.optim.weight_decay, train.optim.betas, train.optim.warmup_ratio, train.optim.schedule,
            train.optim.grad_clip) == (0.05, (0.9, 0.999), 0.03, "cosine", 1.0)
    assert "lr_backbone" not in OptimConfig.model_fields and "lr_heads" not in OptimConfig.model_fields
    assert (train.resolution.caption_max, train.resolution.caption_min, train.resolution.depth,
            train.resolution.refseg) == (896, 56, 532, 560)
    assert train.loss.model_dump() == {"depth_ssi": 1.0, "depth_gm": 0.5, "gm_scales": 4, "seg_bce": 2.0,
                                       "seg_dice": 0.5}
    cfg = load_config(TINY, ["train.optim.weight_decay=0.1", "train.loss.seg_bce=3", "train.resolution.depth=196"])
    assert (cfg.train.optim.weight_decay, cfg.train.loss.seg_bce, cfg.train.resolution.depth) == (0.1, 3.0, 196)
    # a stage without its own weight decay takes the shared one; the warm-up has its own (0)
    from versavit.train.loop import plan_stage

    assert plan_stage(cfg, "multitask").weight_decay == 0.1 and plan_stage(cfg, "warmup").weight_decay == 0.0


def test_preset_defaults() -> None:
    warm, multi = WarmupStage(), MultitaskStage()
    assert isinstance(warm, RecipeStage) and isinstance(multi, RecipeStage)
    assert (warm.name, warm.enabled, warm.tasks, warm.trainable) == ("warmup", True, ["caption"], ["projector"])
    assert (warm.lr_backbone, warm.lr_heads, warm.weight_decay) == (1e-3, 1e-3, 0.0)
    assert (warm.batch_size, warm.global_batch, warm.loss_weights, warm.init_from) == (
        {"caption": 8}, 1024, {"caption": 1.0}, None)
    assert (multi.name, multi.tasks, multi.trainable) == ("multitask", ["caption", "depth", "refseg"], ["*"])
    assert (multi.lr_backbone, multi.lr_heads, multi.weight_decay, multi.global_batch) == (1e-5, 1e-4, None, None)
    assert multi.batch_size == {"caption": 8, "depth": 32, "refseg": 32}
    assert multi.loss_weights == {"caption": 1 / 3, "depth": 1 / 3, "refseg": 1 / 3}
    assert (multi.init_from, multi.synergy.enabled) == ("auto", False)
    assert not hasattr(multi, "enabled")
    train = TrainConfig()
    assert [s.name for s in train.stages()] == ["warmup", "multitask"]
    assert train.stages()[0] is train.warmup and train.stages()[1] is train.multitask
    assert [s.name for s in TrainConfig(warmup={"enabled": False}).stages()] == ["multitask"]


def test_preset_names_are_fixed() -> None:
    with pytest.raises(ConfigError, match=r"train\.warmup\.name = 'coarse'.*'warmup'"):
        load_config(TINY, ["train.warmup.name=coarse"])
    with pytest.raises(ConfigError, match=r"train\.multitask\.name"):
        load_config(TINY, ["train.multitask.name=other"])
    assert load_config(TINY, ["train.multitask.name=multitask"]).train.multitask.name == "multitask"


@pytest.mark.parametrize(("stage", "where"), [
    ("train.warmup", "train.warmup"),
    ("train.multitask", "train.multitask"),
    ("train.recipe.0", "train.recipe.0"),
])
@pytest.mark.parametrize(("change", "expect"), [
    ("tasks=[caption, depth]|batch_size={caption: 2}", "batch_size has no entry for active task(s) ['depth']"),
    ("tasks=[caption, depth]|batch_size={caption: 2, depth: 2}|global_batch=null|loss_weights={caption: 1.0}",
     "loss_weights has no entry for active task(s) ['depth']"),
    ("tasks=[caption, caption]", "lists a task twice"),
    ("tasks=[caption]|batch_size={caption: 2}|synergy={enabled: true}", "synergy needs at least two tasks"),
    ("tasks=[caption, depth]|batch_size={caption: 2, depth: 2}|global_batch=8", "single-task stages"),
    ("trainable=[]", "at least 1 item"),
    ("batch_size={caption: 0, depth: 1, refseg: 1}", "batch size of task 'caption' must be >= 1"),
    ("lr_heads=0", "greater than 0"),
])
def test_presets_and_recipe_stages_share_validators(stage: str, where: str, change: str, expect: str) -> None:
    """One stage type, one set of checks: the same mistake fails the same way in either preset and in a
    `train.recipe` stage."""
    recipe = ("train.recipe=[{name: one, tasks: [caption, depth, refseg], trainable: ['*'], "
              "batch_size: {caption: 1, depth: 1, refseg: 1}}]")
    overrides = [recipe] if stage == "train.recipe.0" else []
    overrides += [f"{stage}.{part}" for part in change.split("|")]
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    msg = str(info.value)
    assert f"  {where}" in msg and expect in msg, msg


@pytest.mark.parametrize(("override", "path", "moved_to"), [
    ("train.warmup.lr=0.001", "train.warmup.lr", "train.warmup.lr_backbone"),
    ("train.warmup.micro_batch=8", "train.warmup.micro_batch", "train.warmup.batch_size.caption"),
    ("train.multitask.optim.lr_backbone=1e-5", "train.multitask.optim", "train.optim"),
    ("train.multitask.resolution.depth=224", "train.multitask.resolution", "train.resolution"),
    ("train.multitask.loss_weights.depth_ssi=1.0", "train.multitask.loss_weights.depth_ssi", "train.loss.depth_ssi"),
    ("seed=1", "seed", "train.seed"),
    ("train.optim.lr_backbone=1e-5", "train.optim.lr_backbone", None),
    ("train.multitask.enabled=false", "train.multitask.enabled", None),
    ("data.tasks.caption.weight=2", "data.tasks.caption.weight", None),
    ("train.multitask.batch_size.segmentation=2", "train.multitask.batch_size.segmentation", None),
])
def test_removed_keys_fail_as_unknown(override: str, path: str, moved_to: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    line = next(ln for ln in str(info.value).splitlines() if ln.startswith(f"  {path}"))
    assert "unknown key" in line
    assert (f"moved to {moved_to}" in line) if moved_to else "check spelling" in line


def test_an_old_layout_file_names_every_moved_key(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("seed: 0\ntrain:\n  warmup: {lr: 1.0e-3, micro_batch: 8}\n  multitask:\n"
                   "    loss_weights: {caption: 0.3, depth_ssi: 1.0}\n    optim: {lr_backbone: 1.0e-5}\n"
                   "    resolution: {depth: 532}\n")
    with pytest.raises(ConfigError) as info:
        load_config(old)
    msg = str(info.value)
    assert "6 problem(s)" in msg and msg.count("unknown key: moved to") == 6


def test_benchmark_names_match_the_evaluator() -> None:
    from versavit.eval.datasets import BENCHMARKS

    assert tuple(BENCHMARKS) == BENCHMARK_NAMES


@pytest.mark.parametrize(("entry", "suggestion"), [
    ("voc2012", "'voc'"), ("nyuv2", "'nyu'"), ("cityscape", "'cityscapes'"), ("imagenet", None),
])
def test_unknown_benchmark_fails_with_the_valid_names(entry: str, suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"eval.benchmarks=[synthetic, {entry}]"])
    msg = str(info.value)
    assert f"  eval.benchmarks.1 = {entry!r}: unknown benchmark" in msg
    assert ", ".join(BENCHMARK_NAMES) in msg
    assert (f"did you mean {suggestion}?" in msg) if suggestion else "did you mean" not in msg


def test_benchmark_entries_may_name_a_root() -> None:
    """`name=root` (versavit.eval.datasets.parse_benchmark): only the name part is checked here."""
    cfg = load_config(TINY, ["eval.benchmarks=['ade20k=/data/ade', ' KITTI = /data/kitti', refcoco+]"])
    assert cfg.eval.benchmarks == ["ade20k=/data/ade", " KITTI = /data/kitti", "refcoco+"]
    with pytest.raises(ConfigError, match="unknown benchmark 'ade'"):
        load_config(TINY, ["eval.benchmarks=['ade=/data/ade']"])


@pytest.mark.parametrize("name", ["paper.yaml", "tiny.yaml", "recipes/sailvit.yaml"])
def test_shipped_configs_name_known_benchmarks(name: str) -> None:
    from versavit.eval.datasets import parse_benchmark

    cfg = load_config(ROOT / "configs" / name)
    assert all(parse_benchmark(spec) for spec in cfg.eval.benchmarks)  # what the evaluator would accept
