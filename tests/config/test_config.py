"""Config loading: the shipped configs validate; every kind of bad config exits 2 naming the path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from versavit.config import ConfigError, config_hash, load_config

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "versavit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.train.multitask.tasks == ["caption", "depth", "refseg"]


def test_paper_config_has_recipe_numbers() -> None:
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    mt, warm, tr = cfg.train.multitask, cfg.train.warmup, cfg.train
    assert (mt.lr_backbone, mt.lr_heads, warm.lr_backbone, warm.lr_heads) == (1e-5, 1e-4, 1e-3, 1e-3)
    assert mt.batch_size == {"caption": 8, "depth": 32, "refseg": 32} and warm.batch_size == {"caption": 8}
    assert (tr.resolution.depth, tr.resolution.refseg, tr.resolution.caption_max) == (532, 560, 896)
    assert (tr.loss.seg_bce, tr.loss.seg_dice, tr.loss.depth_gm, tr.loss.gm_scales) == (2.0, 0.5, 0.5, 4)
    assert (tr.optim.weight_decay, tr.optim.warmup_ratio, tr.optim.grad_clip) == (0.05, 0.03, 1.0)
    assert mt.loss_weights == pytest.approx({"caption": 1 / 3, "depth": 1 / 3, "refseg": 1 / 3})
    assert [b.split("=")[0] for b in cfg.eval.benchmarks] == ["ade20k", "cityscapes", "voc", "nyu", "kitti", "refcoco",
                                                           "da2k", "navi", "spair", "coco-karpathy", "mmbench",
                                                           "mmstar", "mmmu", "mathvista", "hallusionbench", "ai2d",
                                                           "ocrbench", "mmvet"]  # Table 2: the OpenCompass suite
    assert cfg.eval.probe.extra_seg_resolutions == [448] and cfg.eval.probe.seg_resolution == 560  # Tables 14, 3
    ft, rs = cfg.eval.finetune_depth, cfg.eval.refseg_finetune
    assert (ft.epochs, ft.lr_backbone, ft.lr_head, ft.batch_size) == (5, 1e-5, 1e-4, 32)
    assert (rs.epochs, rs.lr_backbone, rs.lr_rest, rs.lora_rank, rs.lora_alpha) == (50, 1e-5, 1e-4, 8, 8)
    # read from the shards the pipeline prepares (data.datasets), in object storage
    prepared = {d.url for d in cfg.data.datasets.values()}
    assert all(b.split("=", 1)[1] in prepared and b.split("=", 1)[1].startswith("s3://") for b in cfg.eval.benchmarks)
    assert cfg.model.backbone.embed_dim == 1280 and cfg.model.backbone.depth == 32
    assert cfg.train.zero_stage == 2 and cfg.train.precision == "bf16"
    assert cfg.launch.backend == "pytorchjob" and cfg.launch.nnodes * cfg.launch.nproc_per_node == 128
    assert cfg.train.warmup.global_batch == 1024


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.multitask.max_steps=50",
                                                   "train.multitask.tasks=[caption, depth]",
                                                   "tracking.enabled=false"])
    assert cfg.train.multitask.max_steps == 50
    assert cfg.train.multitask.tasks == ["caption", "depth"]
    assert cfg.tracking.enabled is False


def test_config_hash_changes_with_content() -> None:
    a = load_config(ROOT / "configs/tiny.yaml")
    b = load_config(ROOT / "configs/tiny.yaml", ["train.seed=1"])
    assert config_hash(a) == config_hash(load_config(ROOT / "configs/tiny.yaml"))
    assert config_hash(a) != config_hash(b)


@pytest.mark.parametrize(
    ("override", "path", "expect"),
    [
        ("train.multitask.max_stepz=3", "train.multitask.max_stepz", "unknown key"),
        ("data.num_workers=abc", "data.num_workers", "valid integer"),
        ("data.num_workers=-1", "data.num_workers", "greater than or equal to 0"),
        ("train.resolution.depth=530", "train.resolution.depth", "multiple of 28"),
        ("eval.probe.seg_resolution=500", "eval.probe.seg_resolution", "multiple of 28"),
        ("train.multitask.loss_weights.depth=-0.5", "train.multitask.loss_weights.depth",
         "greater than or equal to 0"),
        ("train.multitask.tasks=[caption, segmentation]", "train.multitask.tasks.1", "'caption', 'depth'"),
        ("launch.backend=slurm", "launch.backend", "'local', 'pytorchjob' or 'trainjob'"),
        ("model.backbone.num_heads=5", "model.backbone", "divisible by num_heads"),
        ("workdir=s3://key:secret@bucket/x", "workdir", "must not carry credentials"),
    ],
)
def test_bad_config_fails_with_path(override: str, path: str, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/tiny.yaml", [override])
    msg = str(info.value)
    assert f"  {path}" in msg and expect in msg
    assert "key:secret" not in msg  # a credential in a URL is never echoed back


def test_cli_bad_config_exit_2_no_traceback(tmp_path: Path) -> None:
    res = cli("config", "validate", "--config", "configs/tiny.yaml", "train.resolution.refseg=561")
    assert res.returncode == 2
    assert "train.resolution.refseg = 561" in res.stderr and "multiple of 28" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  multitask:\n    loss_weights: {depth: -1}\n  warmup: [\n")
    res = cli("config", "validate", "--config", str(bad))
    assert res.returncode == 2 and "not valid YAML at line" in res.stderr and "Traceback" not in res.stderr

    bad.write_text("train:\n  multitask:\n    loss_weights: {depth: -1}\n")
    res = cli("config", "validate", "--config", str(bad))
    assert res.returncode == 2 and "train.multitask.loss_weights.depth = -1" in res.stderr

    res = cli("config", "validate", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr

    res = cli("config", "validate", "--config", "configs/tiny.yaml", "not_an_override")
    assert res.returncode == 2 and "dotted.path=value" in res.stderr


def test_cli_show_prints_resolved_yaml() -> None:
    import yaml

    res = cli("config", "show", "--config", "configs/tiny.yaml", "train.multitask.max_steps=7")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["train"]["multitask"]["max_steps"] == 7
    assert shown["train"]["optim"]["betas"] == [0.9, 0.999]  # defaults filled in
    assert shown["train"]["warmup"]["trainable"] == ["projector"]
    load_config(None, [])  # the defaults alone are valid too
