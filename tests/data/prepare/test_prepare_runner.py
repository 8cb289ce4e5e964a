"""The `data prepare` runner: sharded workers, done records, reruns, the corrupt-fraction stop, S3, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from prepare_helpers import read, truncate
from typer.testing import CliRunner

from versavit import storage
from versavit.config import ConfigError
from versavit.data import codecs
from versavit.data.convert import synth
from versavit.data.done import done_url
from versavit.data.errors import CorruptDataError
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.shards import read_manifest


def test_two_workers_equal_one_and_reruns_redo_only_whats_missing(fixtures_root: Path, tmp_path: Path) -> None:
    src = str(fixtures_root / "sa1b")  # 8 images, 3 per shard -> shards of 3, 3, 2
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    s1 = prepare_dataset("sa1b", src, one, units_per_shard=3)
    assert (s1["shards_total"], s1["shards_processed"], s1["samples"]) == (3, [0, 1, 2], 8)

    w0 = prepare_dataset("sa1b", src, two, shard_index=0, num_shards=2, units_per_shard=3)
    assert (w0["shards_processed"], w0["manifest"], w0["shards_missing"]) == ([0, 2], None, [1])
    w1 = prepare_dataset("sa1b", src, two, shard_index=1, num_shards=2, units_per_shard=3)
    assert w1["shards_processed"] == [1] and w1["manifest"]  # the last worker to finish writes it
    m1, m2 = read_manifest(one), read_manifest(two)
    assert m1.digest == m2.digest and [s.name for s in m1.shards] == [s.name for s in m2.shards]
    assert m1.meta["prepare"]["counts"] == {"records": 8, "samples": 8}

    # a killed worker: shard 1's record never made it; the rerun redoes that shard only
    Path(done_url(one, 1)).unlink()
    (Path(one) / "shard-000001.tar").write_bytes(b"half a shard")
    again = prepare_dataset("sa1b", src, one, units_per_shard=3)
    assert again["shards_processed"] == [1] and again["shards_already_done"] == 2 and not again["noop"]
    assert read_manifest(one).digest == m1.digest
    # everything done with the same settings: a no-op that lists nothing
    noop = prepare_dataset("sa1b", src, one, units_per_shard=3, shard_index=1, num_shards=2)
    assert noop["noop"] and noop["shards_processed"] == [] and noop["shards_mine"] == 1
    relisted = prepare_dataset("sa1b", src, one, units_per_shard=3, relist=True)
    assert relisted["shards_processed"] == [] and not relisted["noop"] and relisted["manifest"]
    # other settings (here the shard size) make every record stale
    other = prepare_dataset("sa1b", src, one, units_per_shard=4)
    assert other["shards_processed"] == [0, 1] and read_manifest(one).meta["prepare"]["units_per_shard"] == 4
    assert len(read(one)) == 8


def test_too_much_corrupt_input_stops_with_one_line(fixture_copy, tmp_path: Path) -> None:
    root = fixture_copy("objects365")
    for i in (0, 3):
        truncate(root / "train" / "patch0" / f"objects365_v1_{i:08d}.jpg")
    out = str(tmp_path / "out")
    with pytest.raises(CorruptDataError, match=r"2 of 6 input records are corrupt \(33.3% > max_corrupt_fraction "
                       r"10.0%\): bad_image 2"):
        prepare_dataset("objects365", str(root), out, max_corrupt_fraction=0.1)
    assert not (Path(out) / "manifest.json").exists()
    # with a higher limit the rerun keeps the shard already written and finishes the dataset
    summary = prepare_dataset("objects365", str(root), out, max_corrupt_fraction=0.5)
    assert summary["manifest"] and summary["shards_processed"] == [] and summary["num_samples"] == 4
    assert read_manifest(out).meta["prepare"]["counts"]["bad_image"] == 2


def test_unknown_split_and_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no split 'testA'"):
        prepare_dataset("refcocog", str(tmp_path), str(tmp_path / "out"), split="testA")
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.StorageError, match="nothing to prepare"):
        prepare_dataset("sa1b", str(tmp_path / "empty"), str(tmp_path / "out"))


def test_s3_round_trip(s3: str, fixtures_root: Path) -> None:
    """Input and output on S3: the JSONL is read by ranged GETs, the SA-1B images it names one by one."""
    storage.ensure_bucket("s3://prep-in")
    fs, _ = storage.get_fs("s3://prep-in")
    fs.put(str(fixtures_root / "sa1b-internvl"), "prep-in/sa1b-internvl", recursive=True)
    summary = prepare_dataset("sa1b-internvl", "s3://prep-in/sa1b-internvl", "s3://prep-out/sa1b-internvl")
    assert summary["manifest"] == "s3://prep-out/sa1b-internvl/manifest.json" and summary["samples"] == 8
    assert prepare_dataset("sa1b-internvl", "s3://prep-in/sa1b-internvl", "s3://prep-out/sa1b-internvl")["noop"]
    samples = read("s3://prep-out/sa1b-internvl")
    assert sorted(s["json"]["caption"] for s in samples) == sorted(synth.scene(0, i).caption for i in range(8))
    first = next(s for s in samples if s["__key__"].endswith("-0"))
    assert np.array_equal(first["rgb.jpg"], codecs.decode_image(synth.jpeg(synth.scene(0, 0))))


def test_cli_unknown_source_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from versavit.cli import main

    monkeypatch.setattr(sys, "argv", ["versavit", "data", "prepare", "refcoc", "--input", "x", "--output", "y"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown source 'refcoc' (did you mean 'refcoco'" in lines[0]


def test_cli_prepare_splits_workers_and_fixtures(fixtures_root: Path, tmp_path: Path) -> None:
    from versavit.cli import app

    runner = CliRunner()
    out = tmp_path / "refcoco"
    args = ["data", "prepare", "refcoco", "--input", str(fixtures_root / "refcoco"), "--output", str(out),
            "--split", "val,testA", "--num-shards", "2"]
    first = runner.invoke(app, args, env={"JOB_COMPLETION_INDEX": "1"})  # worker 1 of 2 has no shard of 1
    assert first.exit_code == 0, first.output
    assert not (out / "val" / "manifest.json").exists()
    second = runner.invoke(app, [*args, "--shard-index", "0"])
    assert second.exit_code == 0, second.output
    assert read_manifest(str(out / "val")).num_samples == sum(len(synth.scene(0, i).objects) for i in (4, 5))
    assert read_manifest(str(out / "testA")).meta["split"] == "testA"

    fixtures = runner.invoke(app, ["data", "fixtures", "--out", str(tmp_path / "fx"), "--only", "sa1b,pixmo-cap",
                                       "--no-weights"])
    assert fixtures.exit_code == 0, fixtures.output
    assert sorted(p.name for p in (tmp_path / "fx").iterdir()) == ["pixmo-cap", "sa1b"]
    assert json.loads((tmp_path / "fx" / "sa1b" / "sa_000000" / "sa_1.json").read_text())["image"]["image_id"] == 1
    bad = runner.invoke(app, ["data", "fixtures", "--out", str(tmp_path / "fx"), "--only", "sa1bb"])
    assert isinstance(bad.exception, ConfigError) and "did you mean 'sa1b'" in str(bad.exception)
