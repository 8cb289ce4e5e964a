"""Shard datasets at local and s3:// URLs: round trip, atomicity, splitting, resampling, bad data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from versavit import storage
from versavit.data import codecs
from versavit.data.loader import CorruptDataError, CorruptionStats, make_loader, shard_pipeline
from versavit.data.shards import ShardWriter, read_manifest, resolve_shards


def make_sample(i: int, size: int = 32) -> dict:
    rng = np.random.default_rng(i)
    depth = rng.uniform(1, 20, (size, size)).astype(np.float32)
    png, scale = codecs.encode_depth(depth)
    return {
        "__key__": f"s{i:05d}",
        "rgb.png": codecs.encode_image(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "png"),
        "depth.png": png,
        "inst.png": codecs.encode_png(rng.integers(0, 4, (size, size)).astype(np.uint16)),
        "json": codecs.encode_json({"index": i, "depth": {"scale": scale, "kind": "depth"}}),
        "emb.npy": codecs.encode_npy(rng.standard_normal((2, 8))),
    }


def write_dataset(url: str, n: int = 25, per_shard: int = 10) -> None:
    with ShardWriter(url, samples_per_shard=per_shard, name="test") as w:
        for i in range(n):
            w.write(make_sample(i))


def read_indices(urls: list[str], **kw) -> list[int]:
    return [s["json"]["index"] for s in shard_pipeline(resolve_shards(urls), **kw)]


def test_local_round_trip(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url)
    m = read_manifest(url)
    assert m.num_samples == 25 and [s.num_samples for s in m.shards] == [10, 10, 5]
    assert {"rgb.png", "depth.png", "inst.png", "json", "emb.npy"} == set(m.fields)
    samples = list(shard_pipeline(m.shard_urls()))
    assert [s["json"]["index"] for s in samples] == list(range(25))
    s = samples[3]
    ref = make_sample(3)
    assert np.array_equal(s["rgb.png"], codecs.decode_image(ref["rgb.png"]))
    assert s["depth"].dtype == np.float32 and s["depth_valid"].all()
    assert s["inst.png"].dtype == np.uint16 and s["emb.npy"].dtype == np.float16
    # no temp files left behind, only shards + manifest
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_failed_write_leaves_no_partial_shard_or_manifest(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(url, samples_per_shard=10) as w:
        for i in range(15):
            w.write(make_sample(i))
        raise RuntimeError("boom")
    # the finished shard stays (no work lost); the half-written one and the manifest never appear
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["shard-000000.tar"]
    with pytest.raises(storage.StorageError, match="manifest.json is missing"):
        read_manifest(url)


def test_split_by_node_and_worker_cover_everything_once(tmp_path: Path, monkeypatch) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=40, per_shard=5)
    shards = resolve_shards([url])
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        part = [s["json"]["index"] for s in make_loader(shard_pipeline(shards), num_workers=2)]
        assert 0 < len(part) < 40
        seen += part
    assert sorted(seen) == list(range(40))


def test_resampling_is_endless_and_deterministic(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=12, per_shard=4)
    shards = resolve_shards([url])

    def take(seed: int, n: int = 50) -> list[int]:
        it = iter(shard_pipeline(shards, resampled=True, seed=seed, shuffle_buffer=8))
        return [next(it)["json"]["index"] for _ in range(n)]

    a = take(1)
    assert len(a) == 50 and set(a) <= set(range(12))  # a 12-sample task feeds 50 steps
    assert a == take(1)
    assert a != take(2)


def test_shuffle_buffer_is_seeded(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=30, per_shard=30)
    plain = read_indices([url])
    s1 = read_indices([url], shuffle_buffer=16, seed=3)
    assert sorted(s1) == plain and s1 != plain
    assert s1 == read_indices([url], shuffle_buffer=16, seed=3)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_member(path: Path, key: str, field: str) -> None:
    """Rewrite a shard with one member's bytes replaced by garbage."""
    members = []
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            data = tf.extractfile(info).read()
            if info.name == f"{key}.{field}":
                data = b"garbage" * 10
            members.append((info.name, data))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=40, per_shard=10)
    _corrupt_member(tmp_path / "ds" / "shard-000000.tar", "s00003", "rgb.png")  # decode stage
    _corrupt_member(tmp_path / "ds" / "shard-000001.tar", "s00012", "json")  # json decode
    _truncate(tmp_path / "ds" / "shard-000002.tar")  # tar stage: rest of the shard unreadable
    stats = CorruptionStats(max_fraction=0.5, min_samples=1)
    got = read_indices([url], stats=stats)
    assert 3 not in got and 12 not in got
    assert set(range(30, 40)) <= set(got)  # the shard after the truncated one is read in full
    assert 20 <= len(got) < 38
    assert stats.good == len(got) and stats.skipped >= 3


def test_corrupt_counts_add_up_across_workers_and_stop_the_run(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=40, per_shard=10)
    for shard, key in [(0, "s00001"), (1, "s00011"), (2, "s00021"), (3, "s00031")]:
        _corrupt_member(tmp_path / "ds" / f"shard-{shard:06d}.tar", key, "depth.png")
    stats = CorruptionStats(max_fraction=0.5, min_samples=1)
    got = [s for s in make_loader(shard_pipeline(resolve_shards([url]), stats=stats), num_workers=2)]
    assert len(got) == 36 and stats.skipped == 4 and stats.good == 36  # seen from the main process

    strict = CorruptionStats(max_fraction=0.05, min_samples=10)
    with pytest.raises(CorruptDataError, match=r"data.max_corrupt_fraction=0.05"):
        read_indices([url], stats=strict)


def test_a_transform_decodes_only_the_fields_it_reads(tmp_path: Path) -> None:
    """Corrupt depth PNGs cost an image-only task nothing; a task that reads depth skips those samples."""
    url = str(tmp_path / "ds")
    write_dataset(url, n=20, per_shard=10)
    for shard, key in [(0, "s00002"), (1, "s00015")]:
        _corrupt_member(tmp_path / "ds" / f"shard-{shard:06d}.tar", key, "depth.png")
    with pytest.MonkeyPatch.context() as mp:
        decoded: list[str] = []
        png = codecs.DECODERS["inst.png"]
        mp.setitem(codecs.DECODERS, "inst.png", lambda b: decoded.append("inst.png") or png(b))
        image_only = CorruptionStats(max_fraction=0.5, min_samples=1)
        got = [s for s in shard_pipeline(resolve_shards([url]), stats=image_only,
                                         transform=lambda s: (s["json"]["index"], s["rgb.png"].shape))]
        assert [i for i, _ in got] == list(range(20)) and image_only.skipped == 0 and not decoded
    with_depth = CorruptionStats(max_fraction=0.5, min_samples=1)
    got = [s for s in shard_pipeline(resolve_shards([url]), stats=with_depth,
                                     transform=lambda s: (s["json"]["index"], float(s["depth"].mean())))]
    assert [i for i, _ in got] == [i for i in range(20) if i not in (2, 15)] and with_depth.skipped == 2


def test_shards_have_plain_ustar_headers(tmp_path: Path) -> None:
    """An int mtime: no PAX header per member (reading them costs ~15% of the tar stage)."""
    url = str(tmp_path / "ds")
    write_dataset(url, n=3, per_shard=3)
    data = (tmp_path / "ds" / "shard-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert len(members) == 15 and all(not m.pax_headers for m in members)
    assert b"PaxHeader" not in data


def test_missing_shard_counts_as_unreadable(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset(url, n=20, per_shard=10)
    (tmp_path / "ds" / "shard-000001.tar").unlink()
    stats = CorruptionStats(max_fraction=0.5, min_samples=1)
    assert read_indices([url], stats=stats) == list(range(10))
    assert stats.skipped == 10  # its 10 samples (manifest.json), not one error


# ------------------------------------------------------------------------------------------ S3


def test_s3_round_trip_creates_bucket(s3: str) -> None:
    url = "s3://versavit-test/datasets/ds"
    storage.ensure_bucket(url)
    write_dataset(url, n=12, per_shard=5)
    m = read_manifest(url)
    assert m.num_samples == 12 and len(m.shards) == 3
    assert all(u.startswith("s3://versavit-test/datasets/ds/shard-") for u in m.shard_urls())
    got = read_indices([url])
    assert got == list(range(12))
    # credentials never land in the manifest
    text = storage.read_text(f"{url}/manifest.json")
    assert "testing-secret" not in text and "testing" not in json.loads(text)["meta"]
    # worker processes reach S3 too
    loaded = [s["json"]["index"] for s in make_loader(shard_pipeline(m.shard_urls()), num_workers=2)]
    assert sorted(loaded) == list(range(12))


def test_s3_wrong_secret_is_refused_with_one_clear_error(s3: str, monkeypatch) -> None:
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=s3, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="y")
    iam.create_user(UserName="versavit")
    iam.put_user_policy(UserName="versavit", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="versavit")["AccessKey"]
    requests.post(f"{s3}/moto-api/reset-auth", data=b"0")  # from now on moto checks signatures
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage.ensure_bucket("s3://authed/ds")
        storage.write_text("s3://authed/ds/hello.txt", "hi")
        assert storage.read_text("s3://authed/ds/hello.txt") == "hi"

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        for call in (lambda: storage.ensure_bucket("s3://authed/ds"),
                     lambda: storage.read_text("s3://authed/ds/hello.txt"),
                     lambda: read_indices(["s3://authed/ds/shard-000000.tar"])):
            with pytest.raises(storage.StorageError) as info:
                call()
            msg = str(info.value)
            assert info.value.kind == "auth" and "AWS_SECRET_ACCESS_KEY" in msg
            assert "wrong-secret-value" not in msg
    finally:
        requests.post(f"{s3}/moto-api/reset-auth", data=b"inf")


def test_unreachable_endpoint_is_one_clear_error(monkeypatch, free_tcp_port: int) -> None:
    from versavit.config.schema import StorageConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    storage.configure(StorageConfig(s3_endpoint_url=f"http://127.0.0.1:{free_tcp_port}"))
    try:
        with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint") as info:
            storage.ensure_bucket("s3://nowhere/x")
        assert info.value.fatal
        with pytest.raises(storage.StorageError, match="cannot reach") as info:
            read_manifest("s3://nowhere/x")
        assert info.value.kind == "unreachable"
    finally:
        storage.configure(StorageConfig())


def test_loader_workers_auto_is_none_for_cpu_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.data.loader import loader_workers

    assert loader_workers(3, training=True) == 3 and loader_workers(0, training=False) == 0
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert loader_workers("auto", training=True) == 0
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert loader_workers("auto", training=True) == 2
    assert loader_workers("auto", training=False) >= 1
    with pytest.raises(ValueError, match="data.num_workers"):
        loader_workers(-1, training=True)
