"""`versavit data sources` and `versavit data prepare` without SOURCE (every data.datasets entry of a config)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from versavit.config import ConfigError
from versavit.data.prepare import SOURCES
from versavit.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[3]


def test_sources_lists_every_source_with_its_layout() -> None:
    from versavit.cli import app

    out = CliRunner().invoke(app, ["data", "sources"], env={"COLUMNS": "400"}).output
    for name, src in SOURCES.items():
        assert f"{name} ({src.kind}" in out
    assert "ADEChallengeData2016" in out and "zhiyuan_objv2" in out


def test_prepare_without_source_prepares_the_configs_datasets(tmp_path: Path) -> None:
    from versavit.cli import app

    SOURCES["images"].write_fixture(tmp_path / "raw", 0)
    overrides = [f"workdir={tmp_path}/run", "tracking.enabled=false",
                 f"data.datasets={{imgs: {{source: images, input: {tmp_path}/raw, url: {tmp_path}/imgs}}}}"]
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", "--config", str(ROOT / "configs/tiny.yaml"), *overrides])
    assert res.exit_code == 0, res.output
    assert read_manifest(str(tmp_path / "imgs")).num_samples == 8 and "imgs: 1 shard(s) written" in res.output
    again = runner.invoke(app, ["data", "prepare", "--config", str(ROOT / "configs/tiny.yaml"), *overrides])
    assert "imgs: 0 shard(s) written" in again.output  # done: nothing redone
    none = runner.invoke(app, ["data", "prepare", "--config", str(ROOT / "configs/tiny.yaml")])
    assert isinstance(none.exception, ConfigError) and "no entry with an `input`" in str(none.exception)
