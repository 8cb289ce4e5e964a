"""One message per failure: an s3:// URL without a bucket fails `config validate` naming the field (not later
inside the ranks), and `data synth` takes dotted overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from versavit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("override", "field"), [
    ("workdir=s3://", "workdir"),
    ("workdir=s3:///prefix", "workdir"),
    ("workdir=s3:/data", "workdir"),
    ("data.tasks={depth: {urls: ['s3:///shards']}}", "data.tasks.depth.urls.0"),
    ("data.tasks={depth: {urls: ['s3://b/x'], val_urls: ['s3://']}}", "data.tasks.depth.val_urls.0"),
    ("train.multitask.init_from=s3:///export", "train.multitask.init_from"),
    ("train.recipe=[{name: a, tasks: [depth], trainable: ['*'], batch_size: {depth: 2}, init_from: 's3://'}]",
     "train.recipe.0.init_from"),
    ("model.backbone.pretrained=s3://", "model.backbone.pretrained"),
    ("model.heads.caption.llm=s3:///llm", "model.heads.caption.llm"),
    ("eval.baseline_backbone=s3:///b", "eval.baseline_backbone"),
    ("labeling.teachers.depth=s3:///teacher", "labeling.teachers.depth"),
    ("eval.benchmarks=['synthetic=s3:///eval']", "eval.benchmarks.0"),
])
def test_an_s3_url_without_a_bucket_fails_validation_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].strip().startswith(f"{field} = "), str(err.value)
    assert "s3://bucket/prefix" in problems[0]


def test_s3_urls_with_a_bucket_and_other_strings_still_pass() -> None:
    cfg = load_config(None, ["workdir=s3://bucket/run", "model.backbone.pretrained=Qwen/Qwen2-VL-2B-Instruct",
                             "data.tasks={depth: {urls: ['s3://b/depth', '/local/shards']}}"])
    assert cfg.workdir == "s3://bucket/run"


def test_config_validate_cli_names_the_field_in_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "versavit.cli", "config", "validate", "workdir=s3:///prefix"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "workdir = 's3:///prefix': an s3 URL needs a bucket" in res.stderr and "Traceback" not in res.stderr


def test_data_synth_applies_dotted_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.cli import app

    monkeypatch.chdir(ROOT)  # configs/tiny.yaml is the default config
    out = tmp_path / "world"
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "-n", "4", "--workers", "0",
                                   "data.synthetic.image_size=56", "data.synthetic.seed=7"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "train" / "manifest.json").read_text())["meta"]
    assert (meta["num_train"], meta["num_val"], meta["image_size"], meta["seed"]) == (4, 1, 56, 7)

    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--seed", "3", "data.synthetic.seed=7",
                                   "data.synthetic.image_size=56", "-n", "2", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "train" / "manifest.json").read_text())["meta"]["seed"] == 3  # an option wins

    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "data.synthetic.image_sise=56"])
    assert isinstance(res.exception, ConfigError) and "data.synthetic.image_sise" in str(res.exception)
