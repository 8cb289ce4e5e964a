"""versavit.weights: checkpoints staged once (to a folder or S3), loaded offline from a node-local copy, clear
one-line errors for the hub's failures, and no hub token anywhere it could be read back."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import DryRunFileInfo
from huggingface_hub.utils import filter_repo_objects

from versavit import layout, storage, weights
from versavit.config import ConfigError, RunConfig, config_hash, dump_yaml

TOKEN = "hf_LeakCheckTokenValue0123456789abcdef"  # must never be written anywhere
SHA1, SHA2 = "1" * 40, "2" * 40


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local checkpoint folders: a tiny Depth-Anything and a tiny vision tower (loaded back in the tests), and
    two stand-ins (staged, never loaded)."""
    from versavit.config.schema import BackboneConfig
    from versavit.labeling.tiny import save_tiny_depth
    from versavit.models.backbone import VisionBackbone

    root = tmp_path_factory.mktemp("ckpts")
    out = {"depth": save_tiny_depth(root / "depth")}
    VisionBackbone.build(BackboneConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)).save_pretrained(
        str(root / "tower"))
    out["backbone"] = str(root / "tower")
    for name in ("sam", "embedder"):
        folder = root / name
        (folder / "1_Pooling").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": name}))
        (folder / "model.safetensors").write_bytes(os.urandom(2048))
        (folder / "1_Pooling" / "config.json").write_text("{}")
        out[name] = str(folder)
    return out


def make_cfg(tmp_path: Path, url: str | None, ckpts: dict[str, str], **extra: Any) -> RunConfig:
    data: dict[str, Any] = {
        "name": "weights-test", "workdir": str(tmp_path / "run"), "tracking": {"enabled": False},
        "weights": {"url": url},
        "model": {"backbone": {"pretrained": ckpts["backbone"]}, "heads": {"caption": {"llm": None}}},
        # teacher labels replace the synthetic ground truth: the depth and mask teachers are used, so staged
        "labeling": {"use_ground_truth": False,
                     "teachers": {"depth": ckpts["depth"], "masks": ckpts["sam"], "embedder": ckpts["embedder"],
                                  "describer": None}},
    }
    for key, value in extra.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return RunConfig.model_validate(data)


# --------------------------------------------------------------------------------------------
# refs, staged URLs, resolve


def test_teachers_of_label_steps_the_run_skips_are_not_staged(tmp_path: Path, ckpts: dict[str, str]) -> None:
    from versavit.weights import model_refs

    cfg = make_cfg(tmp_path, str(tmp_path / "w"), ckpts, **{"labeling.use_ground_truth": True})
    refs = model_refs(cfg)  # the synthetic world with exact ground truth labels embeddings only
    assert "labeling.teachers.embedder" in refs
    assert "labeling.teachers.depth" not in refs and "labeling.teachers.masks" not in refs


def test_model_refs_staged_urls_and_resolve(tmp_path: Path, ckpts: dict[str, str]) -> None:
    cfg = make_cfg(tmp_path, "s3://store/weights", ckpts, **{
        "model.heads.caption.llm": "Qwen/Qwen3-1.7B", "eval.baseline_backbone": "Qwen/Qwen2-VL-7B-Instruct",
        "labeling.teachers.describer": "class-label"})
    refs = weights.model_refs(cfg)
    assert refs == {"model.backbone.pretrained": ckpts["backbone"], "model.heads.caption.llm": "Qwen/Qwen3-1.7B",
                    "labeling.teachers.depth": ckpts["depth"], "labeling.teachers.masks": ckpts["sam"],
                    "labeling.teachers.embedder": ckpts["embedder"],
                    "eval.baseline_backbone": "Qwen/Qwen2-VL-7B-Instruct"}  # no None, no class-label
    assert weights.staged_url(cfg, "Qwen/Qwen3-1.7B") == "s3://store/weights/Qwen/Qwen3-1.7B"
    local = weights.staged_url(cfg, ckpts["depth"])
    assert local.startswith("s3://store/weights/local/depth-") and len(local.rsplit("-", 1)[1]) == 8
    assert weights.staged_url(cfg, ckpts["depth"] + "/") == local  # the same folder, the same place

    resolved = weights.resolve(cfg)
    for field, ref in refs.items():
        value = resolved
        for part in field.split("."):
            value = getattr(value, part)
        assert value == weights.staged_url(cfg, ref), field
    assert resolved.labeling.teachers.describer == "class-label" and resolved.model.heads.caption.tokenizer is None
    assert weights.model_refs(resolved) == {}  # already staged: nothing left to stage or rewrite
    assert config_hash(weights.resolve(resolved)) == config_hash(resolved)  # idempotent, as pods resolve again
    assert cfg.model.heads.caption.llm == "Qwen/Qwen3-1.7B"  # a copy: the input is untouched

    plain = make_cfg(tmp_path, None, ckpts)
    assert weights.resolve(plain) is plain and weights.pod_env(plain) == {}
    assert weights.pod_env(cfg) == {"HF_HUB_OFFLINE": "1"}
    with pytest.raises(ConfigError, match="weights.url is not set"):
        weights.stage_weights(plain)

    # a shared folder as weights.url: staged refs are local paths, still recognised as staged
    shared = make_cfg(tmp_path, str(tmp_path / "pvc" / "weights"), ckpts)
    assert weights.model_refs(weights.resolve(shared)) == {}


# --------------------------------------------------------------------------------------------
# staging local folders


def test_stage_local_folders_to_a_folder_once(tmp_path: Path, ckpts: dict[str, str]) -> None:
    url = str(tmp_path / "weights")
    cfg = make_cfg(tmp_path, url, ckpts)
    seen: list[tuple[str, int, int]] = []
    rows = weights.stage_weights(cfg, progress=lambda ref, done, total: seen.append((ref, done, total)))
    assert [r["status"] for r in rows] == ["copied"] * 4
    by_ref = {r["ref"]: r for r in rows}
    depth = by_ref[ckpts["depth"]]
    assert depth["revision"] == "local" and depth["fields"] == ["labeling.teachers.depth"]
    src = Path(ckpts["depth"])
    assert depth["bytes"] == sum(f.stat().st_size for f in src.iterdir()) and depth["files"] == 2
    staged = Path(depth["url"])
    assert (staged / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    record = json.loads((staged / layout.WEIGHTS_RECORD).read_text())
    assert record["source"] == str(src) and set(record["files"]) == {"config.json", "model.safetensors"}
    assert not (staged / weights.PARTIAL).exists()
    assert (Path(by_ref[ckpts["sam"]]["url"]) / "1_Pooling" / "config.json").is_file()  # subfolders too
    assert seen[-1][1] == seen[-1][2] and any(ref == ckpts["depth"] for ref, _, _ in seen)

    again = weights.stage_weights(cfg)
    assert [r["status"] for r in again] == ["skipped"] * 4
    assert [r["bytes"] for r in again] == [r["bytes"] for r in rows]

    # a changed checkpoint (same sizes, new content) is copied again; the others stay
    blob = Path(ckpts["sam"]) / "model.safetensors"
    blob.write_bytes(os.urandom(2048))
    third = {r["ref"]: r["status"] for r in weights.stage_weights(cfg)}
    assert third[ckpts["sam"]] == "copied" and list(third.values()).count("skipped") == 3
    assert (Path(by_ref[ckpts["sam"]]["url"]) / "model.safetensors").read_bytes() == blob.read_bytes()

    listed = {r["ref"]: r for r in weights.list_staged(cfg)}
    assert {r["status"] for r in listed.values()} == {"staged"}
    assert listed[ckpts["depth"]]["fields"] == ["labeling.teachers.depth"]


def test_an_interrupted_upload_is_never_taken_for_a_checkpoint(tmp_path: Path, ckpts: dict[str, str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts)
    real_put, calls = weights._put, []

    def dying_put(src: Path, url: str) -> None:
        calls.append(url)
        if len(calls) == 2:
            raise OSError("killed mid-upload")
        real_put(src, url)

    monkeypatch.setattr(weights, "_put", dying_put)
    with pytest.raises(OSError, match="killed"):
        weights.stage_weights(cfg)
    first = weights.staged_url(cfg, ckpts["backbone"])
    assert not Path(first, layout.WEIGHTS_RECORD).exists()  # files first, the record last
    assert {r["ref"]: r["status"] for r in weights.list_staged(cfg)}[ckpts["backbone"]] == "incomplete"
    monkeypatch.setattr(weights, "_put", real_put)
    rows = weights.stage_weights(cfg)
    assert [r["status"] for r in rows] == ["copied"] * 4
    assert Path(first, layout.WEIGHTS_RECORD).is_file() and not Path(first, weights.PARTIAL).exists()


# --------------------------------------------------------------------------------------------
# S3, and loading offline from the node's cache


def test_stage_to_s3_and_load_offline_through_the_node_cache(s3: str, tmp_path: Path, ckpts: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from versavit.labeling.depth import DepthTeacher
    from versavit.models.backbone import VisionBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(layout.MODEL_CACHE_ENV, str(tmp_path / "node-cache"))
    cfg = make_cfg(tmp_path, "s3://weights-bucket/staged", ckpts, **{"storage.s3_endpoint_url": s3})
    rows = weights.stage_weights(cfg)
    assert [r["status"] for r in rows] == ["copied"] * 4
    assert all(r["url"].startswith("s3://weights-bucket/staged/local/") for r in rows)
    assert [r["status"] for r in weights.stage_weights(cfg)] == ["skipped"] * 4

    copies: list[str] = []
    real = weights._download_folder
    monkeypatch.setattr(weights, "_download_folder", lambda url, dest: (copies.append(url), real(url, dest)))
    resolved = weights.resolve(cfg)
    teacher = DepthTeacher(resolved.labeling.teachers.depth, device="cpu")
    assert teacher.model_id == resolved.labeling.teachers.depth  # the signature names the staged URL
    (disparity,) = teacher.predict([np.zeros((42, 56, 3), np.uint8)])
    assert disparity.shape == (42, 56)

    tower = VisionBackbone.build(resolved.model.backbone)
    original = VisionBackbone.from_pretrained(ckpts["backbone"])
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), original.state_dict().values(),
                                                 strict=True))
    assert copies == [resolved.labeling.teachers.depth, resolved.model.backbone.pretrained]

    # copied once: later loads (other ranks, other stages on this node) reuse the folder
    local = weights.local_model_path(resolved.labeling.teachers.depth)
    stamp = Path(local, weights.COMPLETE).stat().st_mtime_ns
    assert weights.local_model_path(resolved.labeling.teachers.depth) == local
    assert Path(local, weights.COMPLETE).stat().st_mtime_ns == stamp and len(copies) == 2
    assert Path(local).parent == tmp_path / "node-cache"

    # eight ranks asking at once: one copies, the others wait and reuse it
    results: list[str] = []
    masks = resolved.labeling.teachers.masks
    threads = [threading.Thread(target=lambda: results.append(weights.local_model_path(masks))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8 and copies.count(masks) == 1

    # re-staged (a new checkpoint at the same ref): the node copies it again
    os.utime(Path(ckpts["depth"], "config.json"), ns=(1, 1))
    assert {r["ref"]: r["status"] for r in weights.stage_weights(cfg)}[ckpts["depth"]] == "copied"
    assert weights.local_model_path(resolved.labeling.teachers.depth) == local
    assert copies.count(resolved.labeling.teachers.depth) == 2 and len(copies) == 4

    # local paths and hub ids go through unchanged; a URL with nothing staged says what to run
    assert weights.local_model_path(ckpts["depth"]) == ckpts["depth"]
    assert weights.local_model_path("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    with pytest.raises(weights.WeightsError, match="versavit weights stage") as err:
        weights.local_model_path("s3://weights-bucket/staged/Qwen/Qwen3-1.7B")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# the hub: a fake one (snapshot_download's dry run and download), and its real exception classes


class FakeHub:
    """snapshot_download over a folder per commit: `repo_id -> {sha: folder}`; records the tokens it was given."""

    def __init__(self, root: Path) -> None:
        self.root, self.head, self.tokens, self.offline, self.cached = root, SHA1, [], False, True
        self.local_dirs: list[Path] = []

    def commit(self, sha: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            path = self.root / "models--org--model" / "snapshots" / sha / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.head = sha

    def __call__(self, repo_id: str, *, revision: str | None = None, token: Any = None, allow_patterns: Any = None,
                 ignore_patterns: Any = None, dry_run: bool = False, local_dir: Any = None, **_: Any) -> Any:
        self.tokens.append(token)
        sha = self.head if revision in (None, "main") else revision
        folder = self.root / "models--org--model" / "snapshots" / sha
        if self.offline:
            if dry_run:
                raise DryRunError("Dry run cannot be performed") from OfflineModeIsEnabled("offline")
            if not folder.is_dir():
                raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
            return str(folder)
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        if dry_run:
            return [DryRunFileInfo(commit_hash=sha, file_size=(folder / n).stat().st_size, filename=n,
                                   local_path=str(folder / n), is_cached=self.cached,
                                   will_download=not self.cached) for n in chosen]
        if local_dir is None:
            return str(folder)
        self.local_dirs.append(Path(local_dir))
        for name in chosen:  # a download into a scratch folder, with the metadata the hub client leaves there
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_bytes((folder / name).read_bytes())
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        (Path(local_dir) / ".cache" / "huggingface" / "x.metadata").write_text(sha)
        return str(local_dir)


def test_stage_from_the_hub_once_per_revision_without_leaking_the_token(
        tmp_path: Path, ckpts: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    hub = FakeHub(tmp_path / "hub")
    hub.commit(SHA1, {"config.json": b"{}", "model.safetensors": b"w" * 100, "pytorch_model.bin": b"b" * 100,
                      "tokenizer.json": b"{}", "onnx/model.onnx": b"o" * 50, "README.md": b"readme"})
    monkeypatch.setattr(weights, "snapshot_download", hub)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    cfg = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts, **{"model.heads.caption.llm": "org/model",
                                                                  "weights.hub_token_secret": "hf-token/token"})
    rows = {r["ref"]: r for r in weights.stage_weights(cfg)}
    hubrow = rows["org/model"]
    assert hubrow["status"] == "copied" and hubrow["revision"] == SHA1
    staged = Path(hubrow["url"])
    assert staged == tmp_path / "weights" / "org" / "model"
    record = json.loads((staged / layout.WEIGHTS_RECORD).read_text())
    # what from_pretrained reads, safetensors over .bin, no onnx, no README
    assert set(record["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert record["requested_revision"] == "main" and hubrow["bytes"] == 104
    assert set(hub.tokens) == {TOKEN}  # the token is passed to the hub...

    assert {r["ref"]: r["status"] for r in weights.stage_weights(cfg)}["org/model"] == "skipped"
    hub.commit(SHA2, {"config.json": b'{"v": 2}', "model.safetensors": b"w" * 100, "tokenizer_config.json": b"{}"})
    hub.cached = False  # not in this machine's hub cache: downloaded into scratch, removed after the upload
    moved = {r["ref"]: r for r in weights.stage_weights(cfg)}["org/model"]
    assert (moved["status"], moved["revision"]) == ("copied", SHA2)
    assert (staged / "config.json").read_bytes() == b'{"v": 2}'
    assert len(hub.local_dirs) == 1 and not hub.local_dirs[0].exists()
    assert not (staged / ".cache").exists()  # the hub client's metadata stays behind
    assert not (staged / "tokenizer.json").exists()  # a file of the old revision is not left over

    # the hub unreachable: a finished copy of the same request stands
    hub.offline = True
    assert {r["ref"]: r["status"] for r in weights.stage_weights(cfg)}["org/model"] == "skipped"
    # pinned to a revision this machine's hub cache holds: staged from the cache, offline
    pinned = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts, **{"model.heads.caption.llm": "org/model",
                                                                     "weights.revisions": {"org/model": SHA1}})
    row = {r["ref"]: r for r in weights.stage_weights(pinned)}["org/model"]
    assert (row["status"], row["revision"]) == ("copied", SHA1)
    assert set(json.loads((staged / layout.WEIGHTS_RECORD).read_text())["files"]) == {
        "config.json", "model.safetensors", "tokenizer.json"}

    # ...and never written: records, rows, logs, config dumps, the CLI's tables
    from versavit.cli import weights_list

    weights_list(config=_write_config(tmp_path, pinned), overrides=[])
    texts = [p.read_text() for p in (tmp_path / "weights").rglob("*.json")]
    texts += [json.dumps(rows), caplog.text, dump_yaml(weights.resolve(cfg)), capsys.readouterr().out]
    assert texts and not any(TOKEN in t for t in texts)
    assert weights.token_secret(cfg) == ("HF_TOKEN", "hf-token", "token")


def _write_config(tmp_path: Path, cfg: RunConfig) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/model"))


@pytest.mark.parametrize("exc,words", [
    (GatedRepoError("Access to model org/gated is restricted.", response=_response(401)),
     ("org/gated", "gated", "$HF_TOKEN", "weights.hub_token_secret")),
    (RepositoryNotFoundError("Repository Not Found for url", response=_response(404)),
     ("org/gated", "not found", "$HF_TOKEN")),
    (LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"),
     ("org/gated", "cannot reach the hub", "local folder")),
])
def test_hub_failures_are_one_line(tmp_path: Path, ckpts: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                   exc: Exception, words: tuple[str, ...]) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(weights, "snapshot_download", failing)
    cfg = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts, **{"eval.baseline_backbone": "org/gated"})
    with pytest.raises(weights.WeightsError) as err:
        weights.stage_weights(cfg)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert isinstance(err.value, storage.StorageError)  # the CLI prints it as one line, exit 1


def test_unreachable_hub_and_missing_folder(tmp_path: Path, ckpts: dict[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too: the real hub client, offline
    cfg = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts,
                   **{"eval.baseline_backbone": "versavit-tests/no-such-model-anywhere"})
    with pytest.raises(weights.WeightsError) as err:
        weights.stage_weights(cfg)
    assert "\n" not in str(err.value) and err.value.kind == "unreachable"
    assert "versavit-tests/no-such-model-anywhere" in str(err.value) and "local folder" in str(err.value)

    gone = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts,
                    **{"labeling.teachers.masks": str(tmp_path / "no-such-folder")})
    with pytest.raises(weights.WeightsError) as err:
        weights.stage_weights(gone)
    assert str(err.value) == f"labeling.teachers.masks = {tmp_path / 'no-such-folder'}: no such folder (a local " \
                             "checkpoint is a folder in from_pretrained layout)"


# --------------------------------------------------------------------------------------------
# pods, the tracked stage, the CLI


def test_training_pods_run_with_the_hub_offline_when_weights_are_staged(ckpts: dict[str, str]) -> None:
    from versavit.launch.pytorchjob import build_pytorchjob
    from versavit.launch.trainjob import build_trainjob

    def env(cfg: RunConfig, kind: str) -> dict[str, Any]:
        if kind == "trainjob":
            obj = build_trainjob(cfg, "warmup", "s3://b/c.yaml")
            return {e["name"]: e.get("value") for e in obj["spec"]["trainer"]["env"]}
        obj = build_pytorchjob(cfg, "warmup", "s3://b/c.yaml")
        pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}

    for kind in ("pytorchjob", "trainjob"):
        staged = RunConfig.model_validate({"weights": {"url": "s3://store/weights"}, "launch": {"backend": kind}})
        assert env(staged, kind)["HF_HUB_OFFLINE"] == "1"
        assert "HF_HUB_OFFLINE" not in env(RunConfig.model_validate({"launch": {"backend": kind}}), kind)


def test_stage_weights_is_a_tracked_stage(tmp_path: Path, ckpts: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from versavit import stages

    logged: dict[str, Any] = {"params": {}, "metrics": {}}

    class Tracker:  # what stage_run yields, recording what the stage logs (MLflow itself: tests/tracking)
        def log_config(self, run: Any, config: dict) -> None:
            logged["params"].update(config)

        def log_metrics(self, run: Any, metrics: dict, step: int) -> None:
            logged["metrics"].update(metrics)

    @contextlib.contextmanager
    def fake_stage_run(cfg: RunConfig, name: str, tags: dict | None = None) -> Any:
        logged["stage"], logged["tags"] = name, tags
        yield Tracker(), None

    monkeypatch.setattr(stages, "stage_run", fake_stage_run)
    cfg = make_cfg(tmp_path, str(tmp_path / "weights"), ckpts)
    assert stages.stage_weights(cfg, parent_run_id="parent") == str(tmp_path / "weights")
    assert logged["stage"] == "weights" and logged["tags"] == {"versavit.weights.url": str(tmp_path / "weights")}
    depth = Path(ckpts["depth"])
    assert logged["params"]["weights"][str(depth)] == {"revision": "local", "url": weights.staged_url(cfg, str(depth)),
                                                       "fields": "labeling.teachers.depth"}
    key = str(depth).strip("/").replace("/", "_")
    assert logged["metrics"][f"weights/{key}_bytes"] == sum(f.stat().st_size for f in depth.iterdir())
    assert logged["metrics"]["weights/total_bytes"] == sum(
        f.stat().st_size for c in ckpts.values() for f in Path(c).rglob("*") if f.is_file())
    assert logged["metrics"]["weights/copied"] == 4
    stages.stage_weights(cfg)
    assert logged["metrics"]["weights/copied"] == 0  # a rerun copies nothing
    assert stages.stage_weights(make_cfg(tmp_path, None, ckpts)) == ""  # nothing to stage: models load as configured


def test_cli_weights_stage_and_list(tmp_path: Path, ckpts: dict[str, str], capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from versavit import cli

    monkeypatch.setenv("COLUMNS", "250")
    config = _write_config(tmp_path, make_cfg(tmp_path, str(tmp_path / "weights"), ckpts))

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["versavit", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = run("weights", "list", "--config", str(config))
    assert code == 1 and "4 model(s) of this run not staged" in out
    code, out = run("weights", "stage", "--config", str(config))
    assert code == 0 and "4 model(s): 4 copied, 0 already staged" in out and "depth" in out
    code, out = run("weights", "stage", "--config", str(config))
    assert code == 0 and "0 copied, 4 already staged" in out and "skipped" in out
    code, out = run("weights", "list", "--config", str(config))
    assert code == 0 and out.count("staged") >= 4
    code, out = run("weights", "stage", "--config", str(config), f"labeling.teachers.masks={tmp_path}/gone")
    assert code == 1 and f"error: labeling.teachers.masks = {tmp_path}/gone: no such folder" in out
