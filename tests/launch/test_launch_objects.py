"""Generated PyTorchJob / TrainJob objects: valid against the CRD schemas, shaped as the cluster needs,
and free of credential values."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from launch_helpers import ROOT, cluster_overrides, crd_schema

from versavit.config import RunConfig, load_config
from versavit.launch import LaunchError
from versavit.launch.pytorchjob import build_pytorchjob
from versavit.launch.trainjob import build_trainjob

CONFIG_URL = "s3://versavit/runs/paper/launch/multitask/versavit-paper-multitask-abc123.yaml"
# what credentials would look like if they leaked from the launching process into the spec
FAKE_KEY, FAKE_SECRET = "AKIAFAKELEAKCHECK0001", "fake/Secret+LeakCheck/0123456789abcdefXYZ"


def paper() -> RunConfig:
    return load_config(ROOT / "configs/paper.yaml")


def tiny(backend: str) -> RunConfig:
    return load_config(ROOT / "configs/tiny.yaml", cluster_overrides(backend))


BUILDERS = {"PyTorchJob": build_pytorchjob, "TrainJob": build_trainjob}
CASES = [("PyTorchJob", "paper"), ("PyTorchJob", "tiny"), ("TrainJob", "paper"), ("TrainJob", "tiny")]


def build(kind: str, which: str, stage: str = "multitask") -> dict[str, Any]:
    cfg = paper() if which == "paper" else tiny(kind.lower())
    return BUILDERS[kind](cfg, stage, CONFIG_URL)


def env_of(kind: str, obj: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "TrainJob":
        return obj["spec"]["trainer"]["env"]
    return obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]


@pytest.mark.parametrize("kind,which", CASES)
def test_validates_against_crd_schema(kind: str, which: str) -> None:
    obj = build(kind, which)
    jsonschema.validate(obj, crd_schema(kind))
    assert obj["kind"] == kind


def test_strict_schema_catches_unknown_fields() -> None:
    obj = build("TrainJob", "tiny")
    obj["spec"]["trainer"]["nodes"] = 2  # a plausible typo the API server would silently drop
    with pytest.raises(jsonschema.ValidationError, match="nodes"):
        jsonschema.validate(obj, crd_schema("TrainJob"))


@pytest.mark.parametrize("kind,which", CASES)
def test_no_credential_values(kind: str, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("KFP_RUN_ID", "0f4b9a56-1111-2222-3333-444455556666")
    obj = build(kind, which)
    text = json.dumps(obj)
    assert FAKE_KEY not in text and FAKE_SECRET not in text
    env = {e["name"]: e for e in env_of(kind, obj)}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    assert env["KFP_RUN_ID"]["value"].startswith("0f4b9a56")  # plain run ids are forwarded
    # nothing credential-like travels as a plain value
    for e in env.values():
        if "value" in e:
            assert not any(w in e["name"].upper() for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY"))


def test_credential_like_extra_env_is_refused() -> None:
    with pytest.raises(LaunchError, match="secret_env"):
        build_pytorchjob(tiny("pytorchjob"), "warmup", CONFIG_URL, env={"MLFLOW_TRACKING_PASSWORD": "x"})


def test_malformed_secret_ref_is_refused() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["launch.secret_env.AWS_ACCESS_KEY_ID=no-slash"])
    with pytest.raises(LaunchError, match="secret-name/key"):
        build_trainjob(cfg, "warmup", CONFIG_URL)


def test_pytorchjob_shape_for_the_paper_run() -> None:
    obj = build("PyTorchJob", "paper")
    spec = obj["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert spec["runPolicy"]["ttlSecondsAfterFinished"] > 0
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}  # Master + Workers, no launcher (no SSH/MPI)
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 15  # 16 nodes
    for rep in replicas.values():
        assert rep["restartPolicy"] == "OnFailure"
        pod = rep["template"]["spec"]
        assert rep["template"]["metadata"]["labels"]["versavit.io/stage"] == "multitask"
        assert pod["serviceAccountName"] == "versavit-runner"
        assert pod["automountServiceAccountToken"] is False
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H20"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the operator and TrainingClient find the container by name
        assert c["image"] == "ghcr.io/versavit/trainer:0.1.0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert c["command"][:3] == ["python", "-m", "torch.distributed.run"]
        cmd = " ".join(c["command"])
        assert "--nnodes 16 --nproc-per-node 8" in cmd
        assert cmd.endswith(f"-m versavit.train.entry --stage multitask --config {CONFIG_URL}")
    assert obj["metadata"]["labels"]["versavit.io/run"] == "versavit-paper"
    assert obj["metadata"]["namespace"] == "versavit"


def test_single_node_pytorchjob_has_only_a_master() -> None:
    obj = build("PyTorchJob", "tiny", stage="warmup")
    assert set(obj["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]  # CPU-only config
    assert "--stage warmup" in " ".join(pod["containers"][0]["command"])


def test_trainjob_shape_for_the_paper_run() -> None:
    obj = build("TrainJob", "paper")
    spec = obj["spec"]
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 16 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"][-2:] == ["--config", CONFIG_URL]
    (override,) = spec["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["serviceAccountName"] == "versavit-runner"
    assert override["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H20"}
    assert override["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert override["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_job_names_are_dns_labels_and_unique() -> None:
    from versavit.launch.base import make_job_name

    cfg = load_config(ROOT / "configs/tiny.yaml", ["name=7 Über_Long Experiment Name With Spaces And More"])
    names = {make_job_name(cfg, "multitask") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert len(name) <= 40 and name[0].isalpha() and name.replace("-", "").isalnum() and name == name.lower()


def test_get_launcher_picks_the_backend() -> None:
    from versavit.launch import LocalLauncher, PyTorchJobLauncher, TrainJobLauncher, get_launcher

    assert isinstance(get_launcher(load_config(ROOT / "configs/tiny.yaml")), LocalLauncher)
    assert isinstance(get_launcher(tiny("pytorchjob"), timeout_s=5), PyTorchJobLauncher)
    assert isinstance(get_launcher(tiny("trainjob")), TrainJobLauncher)


def test_local_launcher_wraps_launch_local(monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.launch import LocalLauncher, local

    calls = []
    monkeypatch.setattr(local, "launch_local", lambda cfg, stage, env=None, stream_output=True, variant="":
                        calls.append((stage, env)) or {"stage": stage})
    result = LocalLauncher().launch(load_config(ROOT / "configs/tiny.yaml"), "warmup", env={"A": "1"})
    assert calls == [("warmup", {"A": "1"})]
    assert result.backend == "local" and result.outputs == {"stage": "warmup"} and result.job_name is None


def test_localize_config_fetches_urls(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit import storage
    from versavit.config.schema import StorageConfig
    from versavit.storage import localize_config

    assert localize_config("runs/x/config.yaml") == "runs/x/config.yaml"  # local paths pass through
    url = f"s3://launch-tests/localize/{tmp_path.name}.yaml"
    storage.ensure_bucket(url)
    storage.write_text(url, "name: fetched\n")
    storage.configure(StorageConfig())  # a fresh pod: only the env knows where S3 is
    monkeypatch.setenv("VERSAVIT_STORAGE", StorageConfig(s3_endpoint_url=s3).model_dump_json())
    path = localize_config(url)
    assert Path(path).read_text() == "name: fetched\n"
    assert load_config(path).name == "fetched"


# --------------------------------------------------------------------------------------------
# the fast network (launch.network): NCCL env, RDMA devices, IPC_LOCK, hostNetwork

RDMA = "rdma/rdma_shared_device_a"
NETWORK = ["launch.network.nccl_env.NCCL_IB_HCA=mlx5_0,mlx5_1", "launch.network.nccl_env.NCCL_SOCKET_IFNAME=eth0",
           f"launch.network.rdma_resources={{{RDMA}: 1}}", "launch.network.ipc_lock=true",
           "launch.network.host_network=true"]


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator of crd_schema(kind): jsonschema.validate would check the (large) schema itself on every call,
    which test_validates_against_crd_schema already does."""
    return jsonschema.Draft7Validator(crd_schema(kind))


def network_cfg(kind: str) -> RunConfig:
    runtime = ["launch.trainjob_runtime=versavit-torch", "launch.trainjob_runtime_kind=TrainingRuntime"]
    return load_config(ROOT / "configs/paper.yaml", NETWORK + (runtime if kind == "TrainJob" else []))


def k8s_validate_pod_template(template: dict[str, Any]) -> None:
    """A job's pod template as a core v1 PodTemplate through kubernetes-validate (strict: unknown fields fail)."""
    import kubernetes_validate

    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, "1.33.0", strict=True)


def test_network_knobs_reach_the_pytorchjob_pods() -> None:
    obj = build_pytorchjob(network_cfg("PyTorchJob"), "multitask", CONFIG_URL)
    crd_validator("PyTorchJob").validate(obj)
    for rep in obj["spec"]["pytorchReplicaSpecs"].values():
        pod = rep["template"]["spec"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert c["resources"]["requests"][RDMA] == c["resources"]["limits"][RDMA] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"  # the GPUs stay
        assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
        k8s_validate_pod_template(rep["template"])


def test_network_knobs_reach_the_trainjob() -> None:
    obj = build_trainjob(network_cfg("TrainJob"), "multitask", CONFIG_URL)
    crd_validator("TrainJob").validate(obj)
    spec = obj["spec"]
    # hostNetwork and IPC_LOCK: a TrainJob has no field for them, the named runtime carries them
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                  "name": "versavit-torch"}
    env = {e["name"]: e.get("value") for e in spec["trainer"]["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    res = spec["trainer"]["resourcesPerNode"]
    assert res["requests"][RDMA] == res["limits"][RDMA] == "1"


def test_trainjob_refuses_host_network_on_the_stock_runtime() -> None:
    cfg = load_config(ROOT / "configs/paper.yaml", ["launch.network.host_network=true"])
    with pytest.raises(LaunchError, match="trainjob_runtime"):
        build_trainjob(cfg, "multitask", CONFIG_URL)
    # NCCL env and RDMA devices need no runtime support
    cfg = load_config(ROOT / "configs/paper.yaml", NETWORK[:3])
    assert build_trainjob(cfg, "multitask", CONFIG_URL)["spec"]["runtimeRef"]["name"] == "torch-distributed"


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_network_knobs_are_absent_by_default(kind: str) -> None:
    obj = build(kind, "tiny")
    text = json.dumps(obj)
    for absent in ("hostNetwork", "dnsPolicy", "IPC_LOCK", "NCCL_", "rdma"):
        assert absent not in text, absent
    if kind == "PyTorchJob":
        template = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        assert template["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        k8s_validate_pod_template(template)
    else:
        assert obj["spec"]["runtimeRef"]["name"] == "torch-distributed"


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_the_papers_vqa_job_is_one_node_of_eight_processes(kind: str) -> None:
    """paper.yaml's vqa evaluator (Table 2, Qwen3-8B) trains data-parallel in its own job: one node, 8 processes,
    8 GPUs (eval.vqa.processes); the other evaluation jobs stay one process on one GPU."""
    from versavit.eval.jobs import job_config

    cfg = paper()
    vqa = BUILDERS[kind](job_config(cfg, "vqa"), "eval-vqa", CONFIG_URL)
    depth = BUILDERS[kind](job_config(cfg, "finetune-depth"), "eval-finetune-depth", CONFIG_URL)
    for obj in (vqa, depth):
        jsonschema.validate(obj, crd_schema(kind))
    if kind == "PyTorchJob":
        assert vqa["spec"]["nprocPerNode"] == "8" and depth["spec"]["nprocPerNode"] == "1"
        assert set(vqa["spec"]["pytorchReplicaSpecs"]) == {"Master"}
        limits = vqa["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
        assert limits["limits"]["nvidia.com/gpu"] == "8"
    else:
        assert vqa["spec"]["trainer"]["numNodes"] == 1 and vqa["spec"]["trainer"]["numProcPerNode"] == 8
        assert vqa["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
        assert depth["spec"]["trainer"]["numProcPerNode"] == 1
