"""Corrupt data is counted in lost samples against the manifest, per task, once per shard, and a real training
run reports them in stage.json, metrics.jsonl and MLflow; past the threshold the run stops with one line (also
from a DataLoader worker); `versavit data check` reports a tampered dataset, per task the samples it cannot use,
and with --sample-fraction 0 checks presence and sizes only; two writers of one dataset (local or S3) never
leave a manifest that disagrees with its shards."""

from __future__ import annotations

import hashlib
import json
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
from faults_data_helpers import flip_bytes, sample, truncate_in_sample, write
from tiny_model import TINY_MODEL
from typer.testing import CliRunner

from versavit import storage
from versavit.data.loader import CorruptDataError, CorruptionStats, make_loader, shard_pipeline
from versavit.data.shards import DatasetLockedError, ShardWriter, read_manifest, resolve_shards
from versavit.data.tasks import _image, depth_view, image_tensor

ROOT = Path(__file__).resolve().parents[2]

# 48 samples in 3 shards of 16: samples 2 and 5 lack depth.png, sample 20 has an undecodable image,
# shard 2 is cut inside sample 42 (it yields 10 of its 16 samples)
DAMAGE = {2: {"drop": ("depth.png",)}, 5: {"drop": ("depth.png",)}, 20: {"bad_image": True}}
TASKS = {
    "depth": lambda s: depth_view(s, 32)["target"].shape,  # reads image, depth, json
    "image": lambda s: tuple(image_tensor(_image(s), (32, 32)).shape),  # reads the image only
}
LOST = {"depth": 2 + 1 + 6, "image": 1 + 6}


@pytest.fixture
def damaged(tmp_path: Path) -> str:
    url = str(tmp_path / "ds")
    write(url, damage=DAMAGE)
    truncate_in_sample(tmp_path / "ds" / "shard-000002.tar", keep=10)
    return url


@pytest.mark.parametrize("task", sorted(TASKS))
def test_lost_samples_per_task_equal_the_samples_removed(damaged: str, task: str) -> None:
    stats = CorruptionStats(max_fraction=0.5, min_samples=1, name=task)
    got = list(shard_pipeline(resolve_shards([damaged]), stats=stats, transform=TASKS[task]))
    assert len(got) == 48 - LOST[task] and stats.good == len(got)
    assert stats.lost == stats.skipped == LOST[task] and stats.seen == 48
    by_shard = stats.summary()["lost_by_shard"]
    assert by_shard["shard-000002.tar"] == 6
    assert by_shard.get("shard-000000.tar", 0) == (2 if task == "depth" else 0)
    assert by_shard["shard-000001.tar"] == 1
    assert stats.metrics() == {f"data/{task}_lost_samples": LOST[task],
                               f"data/{task}_lost_fraction": pytest.approx(LOST[task] / 48)}


def test_counts_add_up_across_two_workers(damaged: str) -> None:
    stats = CorruptionStats(max_fraction=0.5, min_samples=1, name="depth")
    got = list(make_loader(shard_pipeline(resolve_shards([damaged]), stats=stats, transform=TASKS["depth"]),
                           num_workers=2))
    assert len(got) == 39 and stats.lost == 9 and stats.seen == 48  # read from the main process


def test_a_resampled_stream_counts_a_broken_shard_once(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write(url, n=32, per_shard=16)
    truncate_in_sample(tmp_path / "ds" / "shard-000001.tar", keep=10)
    stats = CorruptionStats(max_fraction=0.5, min_samples=1, name="depth")
    stream = iter(shard_pipeline(resolve_shards([url]), stats=stats, resampled=True, transform=TASKS["depth"]))
    got = [next(stream) for _ in range(200)]  # ~8 passes, several over the broken shard
    assert len(got) == 200 and stats._next_pass >= 8
    assert stats.lost == 6 and stats.seen == 32  # once per shard, not once per pass


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Caught" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("workers", [0, 1])
def test_past_the_threshold_the_run_stops_with_one_line(damaged: str, workers: int) -> None:
    stats = CorruptionStats(max_fraction=0.1, min_samples=1, name="depth")
    loader = make_loader(shard_pipeline(resolve_shards([damaged]), stats=stats, transform=TASKS["depth"]),
                         num_workers=workers)
    with pytest.raises(CorruptDataError) as exc:
        list(loader)
    text = _one_line_error(exc)
    assert text.startswith("depth: ") and "data.max_corrupt_fraction=0.1" in text and "lost" in text
    assert "shard-000000.tar (2 of 16)" in text or "shard-000002.tar (6 of 16)" in text


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Env for an in-process process group of one (gloo, a free port; one initialised earlier is reused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)


def test_a_training_run_reports_the_lost_samples_in_stage_json_metrics_and_mlflow(tmp_path: Path,
                                                                                  world_of_one: None) -> None:
    """A real depth stage (one process, in this one: `run_stage` as every rank runs it; 3 steps) on one shard of
    48 with 9 samples removed or damaged: 2 lack depth.png, 1 has an undecodable image, 6 are cut off."""
    from mlflow.tracking import MlflowClient

    from versavit.config import load_config
    from versavit.train.loop import run_stage

    url = str(tmp_path / "ds")
    write(url, n=48, per_shard=48, damage=DAMAGE)
    truncate_in_sample(tmp_path / "ds" / "shard-000000.tar", keep=42)
    # 39 good samples: steps 1-2 take 32; step 3 ends the first pass over the shard (its last 6 are missing)
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"workdir={tmp_path / 'run'}", *TINY_MODEL, "train.resolution={caption_max: 56, caption_min: 28, depth: 28, "
        "refseg: 56}", "data.source=shards", f"data.tasks={{depth: {{urls: ['{url}']}}}}", "train.warmup.enabled=false",
        "train.multitask.tasks=[depth]", "train.multitask.loss_weights={depth: 1.0}",
        "train.multitask.batch_size={depth: 16}", "train.multitask.max_steps=3",
        "train.multitask.checkpoint_interval=3",
        "data.num_workers=0", "data.shuffle_buffer=0", "data.max_corrupt_fraction=0.5", "train.precision=fp32",
        "tracking.experiment=faults-lost-samples"])
    result = run_stage(cfg, "multitask")

    stage = json.loads((tmp_path / "run" / "stages" / "multitask" / "stage.json").read_text())
    assert stage["data"]["depth"]["lost_samples"] == LOST["depth"] == 9
    assert stage["data"]["depth"]["samples"] == 48
    assert stage["data"]["depth"]["lost_by_shard"] == {"shard-000000.tar": 9}
    points = [json.loads(line) for line in (tmp_path / "run" / "reports" / "multitask" / "metrics.jsonl").open()]
    assert [p["step"] for p in points] == [1, 2, 3]
    assert points[0]["data/depth_lost_samples"] == 2  # the 2 samples without depth.png, met in step 1
    assert points[-1]["data/depth_lost_samples"] == 9
    assert points[-1]["data/depth_lost_fraction"] == pytest.approx(9 / 48)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    history = client.get_metric_history(result["mlflow_run_id"], "data/depth_lost_samples")
    assert history and history[-1].step == 3 and history[-1].value == 9


def _check(url: str, *extra: str) -> tuple[int, list[str]]:
    from versavit.cli import app

    result = CliRunner().invoke(app, ["data", "check", url, *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def test_data_check_clean_and_tampered(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write(url, n=64, per_shard=16)
    code, lines = _check(url)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok: ")
    assert "4 read and checked; 0 missing, 0 changed under the manifest, 0 of 64 samples lost" in lines[0]

    (tmp_path / "ds" / "shard-000000.tar").unlink()
    flip_bytes(tmp_path / "ds" / "shard-000001.tar")  # same size, other bytes (and an undecodable image)
    truncate_in_sample(tmp_path / "ds" / "shard-000002.tar", keep=10)
    code, lines = _check(url)
    assert code == 1
    assert lines[0] == "missing shard: shard-000000.tar (16 samples)"
    assert lines[1] == "dataset changed under its manifest: shard-000001.tar sha256 differs from manifest.json"
    assert lines[2].startswith("dataset changed under its manifest: shard-000002.tar is ")
    assert any(line.startswith("lost samples: shard-000001.tar yields 15 of its 16 samples") for line in lines)
    assert any(line.startswith("lost samples: shard-000002.tar yields 10 of its 16 samples") for line in lines)
    assert lines[-1].startswith("PROBLEMS: ") and "1 missing, 2 changed under the manifest, 7 of 48 samples lost" \
        in lines[-1]


def test_data_check_at_sample_fraction_0_checks_presence_and_sizes_only(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write(url, n=48, per_shard=16)
    code, lines = _check(url, "--sample-fraction", "0")
    assert code == 0 and lines == [f"ok: {url}: 3 shard(s), 0 read and checked (sample fraction 0: presence and "
                                   "sizes only); 0 missing, 0 changed under the manifest, no samples read"]
    flip_bytes(tmp_path / "ds" / "shard-000001.tar")  # same size, other bytes: only reading the shard tells
    assert _check(url, "--sample-fraction", "0")[0] == 0 and _check(url)[0] == 1
    (tmp_path / "ds" / "shard-000000.tar").unlink()
    truncate_in_sample(tmp_path / "ds" / "shard-000002.tar", keep=10)
    code, lines = _check(url, "--sample-fraction", "0")
    assert code == 1 and len(lines) == 3
    assert lines[0] == "missing shard: shard-000000.tar (16 samples)"
    assert lines[1].startswith("dataset changed under its manifest: shard-000002.tar is ")
    assert lines[2].startswith("PROBLEMS: ") and "1 missing, 1 changed under the manifest, no samples read" in lines[2]


# 32 samples for depth and refseg in 2 shards: each lacks (or breaks) a member one task or both need
TASK_DAMAGE = {2: {"drop": ("depth.png",)}, 7: {"drop": ("emb.npy",)}, 9: {"drop": ("mask.png",)},
               12: {"bad_image": True}}
BAD_IMAGE = ("1 undecodable rgb.png (UnidentifiedImageError: cannot identify image file <_io.BytesIO object>) "
             "(e.g. s00012)")


def test_data_check_reports_per_task_the_samples_it_cannot_use(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write(url, n=32, per_shard=16, damage=TASK_DAMAGE, refseg=True)
    code, lines = _check(url)  # the tasks the samples carry data for: depth (depth.png), refseg (emb.npy, mask.png)
    assert code == 1
    assert f"task depth: 2 of 32 samples unusable: 1 lack depth.png (e.g. s00002), {BAD_IMAGE}" in lines
    assert ("task refseg: 3 of 32 samples unusable: 1 lack emb.npy (text embeddings: run `versavit label embed`) "
            f"(e.g. s00007), 1 lack masks (inst.png + json objects, or mask.png) (e.g. s00009), {BAD_IMAGE}") in lines
    assert not any(line.startswith("task caption") for line in lines)  # no sample has caption text
    assert lines[-1].endswith("4 of 32 samples lost; usable samples per task: depth 30/32, refseg 29/32")

    code, lines = _check(url, "--task", "depth")
    assert code == 1 and [ln for ln in lines if ln.startswith("task ")] == [
        f"task depth: 2 of 32 samples unusable: 1 lack depth.png (e.g. s00002), {BAD_IMAGE}"]
    code, lines = _check(url, "--task", "caption")
    assert code == 1 and [ln for ln in lines if ln.startswith("task ")] == [
        "task caption: 32 of 32 samples unusable: 32 have no caption or question/answer text in json (e.g. s00000)"]
    assert _check(url, "--task", "segmentation")[0] == 2  # a usage error

    whole = str(tmp_path / "whole")
    write(whole, n=32, per_shard=16, refseg=True)
    code, lines = _check(whole, "--task", "depth", "--task", "refseg")
    assert code == 0 and len(lines) == 1 and lines[0].endswith("usable samples per task: depth 32/32, refseg 32/32")


def test_a_second_writer_of_an_s3_dataset_fails_at_once_naming_the_first(s3: str) -> None:
    """The writer lock on S3 is a conditional put (If-None-Match: *) on moto: the second writer is refused."""
    import os

    url = "s3://locks/ds"
    storage.ensure_bucket(url)
    first = ShardWriter(url, samples_per_shard=2, name="first", meta={"seed": 0})
    first.write(sample(0))
    t0 = time.monotonic()
    with pytest.raises(DatasetLockedError) as err:
        ShardWriter(url, samples_per_shard=2, name="second", meta={"seed": 1})
    took = time.monotonic() - t0
    print(f"\nsecond S3 writer refused after {took:.2f} s: {err.value}")
    assert took < 2.0  # at once
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{url} is being written by another writer (host "
                                                      f"{socket.gethostname()}, pid {os.getpid()}, started 20")
    assert f"{url}/.writer.lock" in message
    first.write(sample(1))
    assert first.close().num_samples == 2
    assert not storage.exists(f"{url}/.writer.lock")  # released
    assert read_manifest(url).meta == {"seed": 0} and read_manifest(url).name == "first"  # the first one's dataset
    with ShardWriter(url, samples_per_shard=2, name="third") as w:  # free again
        w.write(sample(0, seed=3))
    assert read_manifest(url).name == "third"


def test_a_sampled_sha_check_in_training_stops_on_a_replaced_shard(tmp_path: Path) -> None:
    """A shard that reads whole but is not the one manifest.json lists: the dataset changed under it."""
    url, other = str(tmp_path / "ds"), str(tmp_path / "other")
    write(url, n=32, per_shard=16, seed=0)
    write(other, n=32, per_shard=16, seed=1)
    (tmp_path / "ds" / "shard-000001.tar").write_bytes((tmp_path / "other" / "shard-000001.tar").read_bytes())
    sizes_equal = (tmp_path / "other" / "shard-000001.tar").stat().st_size == read_manifest(url).shards[1].bytes
    stats = CorruptionStats(max_fraction=0.5, min_samples=1)
    with pytest.raises(CorruptDataError) as exc:  # size differs: always caught; same size: by the sha check
        list(shard_pipeline(resolve_shards([url]), stats=stats, verify_fraction=1.0))
    text = _one_line_error(exc)
    assert text.startswith("dataset changed under its manifest: ") and "shard-000001.tar" in text, sizes_equal


def _shards_agree_with_manifest(url: str) -> tuple[bool, str]:
    m = read_manifest(url)
    for s, shard_url in zip(m.shards, m.shard_urls(), strict=True):
        data = Path(shard_url).read_bytes()
        if hashlib.sha256(data).hexdigest() != s.sha256:
            return False, f"{s.name}: sha256 differs"
        with tarfile.open(shard_url) as tf:
            seeds = {json.loads(tf.extractfile(x).read())["seed"] for x in tf.getmembers() if x.name.endswith("json")}
        if seeds != {m.meta["seed"]}:
            return False, f"{s.name}: seeds {seeds}, manifest seed {m.meta['seed']}"
    return m.num_samples == 12, "complete"


def _race_writer(url: str, seed: int, start: threading.Barrier, errors: dict[int, BaseException]) -> None:
    from faults_data_helpers import sample

    start.wait()
    try:
        with ShardWriter(url, samples_per_shard=2, name="race", meta={"seed": seed}) as w:
            for i in range(12):
                w.write(sample(i, seed))
    except DatasetLockedError as exc:
        errors[seed] = exc


def test_twenty_races_of_two_writers_leave_no_mixed_dataset(tmp_path: Path) -> None:
    refused = 0
    for race in range(20):
        url = str(tmp_path / f"race{race}")
        start = threading.Barrier(2)
        errors: dict[int, BaseException] = {}
        threads = [threading.Thread(target=_race_writer, args=(url, seed, start, errors)) for seed in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) <= 1, errors  # never both refused
        ok, why = _shards_agree_with_manifest(url)
        assert ok, f"race {race}: {why}"
        for seed, exc in errors.items():
            refused += 1
            assert read_manifest(url).meta["seed"] == 1 - seed  # the first writer's dataset stands
            assert "is being written by another writer (host " in str(exc) and "pid" in str(exc)
        assert not (Path(url) / ".writer.lock").exists()
    assert refused >= 1  # the races did overlap (the second writer was refused at once)
