"""data.datasets (prepare + pseudo-label specs) and per-stage data: what the config accepts and refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from versavit.config import ConfigError, load_config
from versavit.config.schema import SOURCE_NAMES
from versavit.data.prepare import SOURCES

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs/paper.yaml"


def test_source_names_are_the_prepare_registry() -> None:
    assert set(SOURCE_NAMES) == set(SOURCES)


def test_an_unknown_source_fails_config_validate_with_exit_2_and_a_suggestion() -> None:
    res = subprocess.run([sys.executable, "-m", "versavit.cli", "config", "validate", "--config", str(PAPER),
                          "data.datasets.grit.source=objects356"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "data.datasets.grit.source" in res.stderr and "did you mean 'objects365'" in res.stderr
    assert "Traceback" not in res.stderr


def test_labels_run_in_their_order_and_need_an_output() -> None:
    cfg = load_config(PAPER, ["data.datasets.grit.labels=[embed, masks]"])
    assert cfg.data.datasets["grit"].labels == ["masks", "embed"]  # describe reads masks, embed the texts
    with pytest.raises(ConfigError, match="labelled"):
        load_config(PAPER, ["data.datasets.grit.labelled=null"])


def test_training_on_unlabelled_shards_of_a_labelled_dataset_is_refused() -> None:
    with pytest.raises(ConfigError, match="unlabelled shards of data.datasets.grit"):
        load_config(PAPER, ["data.tasks.refseg.urls=[s3://versavit/data/grit]"])


def test_each_stage_reads_its_own_caption_sets() -> None:
    cfg = load_config(PAPER)
    warm = cfg.stage_source("warmup", "caption").urls
    multi = cfg.stage_source("multitask", "caption").urls
    assert [u.rsplit("/", 1)[1] for u in warm] == ["pixmo-cap", "idl-wds", "sa1b-internvl"]
    assert multi == ["s3://versavit/data/finevision-single-image"]
    assert cfg.stage_source("multitask", "depth").urls == cfg.data.tasks["depth"].urls  # the shared default
    with pytest.raises(ConfigError, match="no urls are configured for train.multitask caption"):
        load_config(PAPER, ["train.multitask.data={}"])
