"""`versavit cluster check` (versavit.launch.preflight) against the Kubernetes API stub (CRDs, RBAC answered by
SelfSubjectAccessReview, nodes, secrets, storage classes), moto S3 and a tiny MLflow stub: a healthy cluster is
all ✓ and exit 0; each missing piece is its ✗ with the fix line and exit 1; what this identity may not read is ?
(exit 0). The launchers themselves run under exactly the permissions `required_access` lists."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_stub import SSAR_PATH, KubeApiStub, Step, request_attributes
from launch_helpers import CRD_DIR, CRD_FILES, ROOT, cluster_overrides
from rich.console import Console

from versavit import storage
from versavit.config import RunConfig, load_config
from versavit.config.schema import StorageConfig
from versavit.launch import PyTorchJobLauncher, TrainJobLauncher
from versavit.launch import preflight as pf

NS = "versavit"
TINY = ROOT / "configs/tiny.yaml"
CLI_ARGS: dict[int, list[str]] = {}  # id(config) -> the CLI arguments that make it (see `world`)
SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H20"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GPU_NODE = {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1600Gi"}
SECRET_VALUES = {"access-key": "AKIA-preflight-test", "secret-key": "s3cr3t-preflight-value"}
TOKEN = "stub-bearer-token-do-not-print"
# what the preflight itself reads (granted in the healthy cluster, withheld in the "may not read" case)
READS = {("get", "apiextensions.k8s.io", "customresourcedefinitions", ""), ("list", "", "nodes", ""),
         ("list", "storage.k8s.io", "storageclasses", ""), ("get", "", "secrets", NS),
         ("get", "trainer.kubeflow.org", "clustertrainingruntimes", "")}


@functools.cache
def vendored_crd(kind: str) -> str:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return json.dumps(yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader))


def crd(kind: str) -> dict[str, Any]:
    return json.loads(vendored_crd(kind))


def granted(cfg: RunConfig, ns: str = NS) -> set[tuple[str, str, str, str]]:
    return {(a.verb, a.group, a.resource, ns) for a in pf.required_access(cfg)}


# --------------------------------------------------------------------------------------------
# the world: a healthy cluster, S3 with the run's buckets, MLflow


class MlflowStub:
    """/health and experiments/get-by-name on 127.0.0.1 (free port); `password`: basic auth required."""

    def __init__(self, password: str | None = None) -> None:
        stub = self
        self.password = password

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                import base64

                if self.path == "/health":
                    code, body = 200, b"OK"
                elif stub.password and self.headers.get("Authorization") != "Basic " + base64.b64encode(
                        f"admin:{stub.password}".encode()).decode():
                    code, body = 401, b"You are not authenticated."
                elif self.path.startswith("/api/2.0/mlflow/experiments/get-by-name"):
                    code, body = 404, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST"}).encode()
                else:
                    code, body = 404, b"{}"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def mlflow() -> Iterator[MlflowStub]:
    server = MlflowStub()
    yield server
    server.stop()


@pytest.fixture
def world(s3: str, kube: KubeApiStub, mlflow: MlflowStub, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Callable[..., RunConfig]:
    """make(backend, *overrides): a config for a 2-node GPU run whose cluster, buckets and MLflow are all in
    place; the kubeconfig ($KUBECONFIG) points at the API stub with a bearer token."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": kube.url}}],
        "users": [{"name": "stub", "user": {"token": TOKEN}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": NS}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("COLUMNS", "220")

    def make(backend: str, *overrides: str) -> RunConfig:
        run, data = f"pf-run-{uuid.uuid4().hex[:8]}", f"pf-data-{uuid.uuid4().hex[:8]}"
        args = [
            f"workdir=s3://{run}/tiny", f"storage.s3_endpoint_url={s3}", *cluster_overrides(backend),
            "launch.nnodes=2", "launch.resources.gpus_per_node=8", "launch.resources.cpu='16'",
            "launch.resources.memory=64Gi", f"launch.node_selector={json.dumps(SELECTOR)}",
            'launch.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]',
            f"eval.benchmarks=[synthetic=s3://{data}/bench]", f"tracking.uri={mlflow.url}", *overrides]
        cfg = load_config(TINY, args)
        CLI_ARGS[id(cfg)] = ["--config", str(TINY), *args]
        for bucket in (run, data):
            storage.ensure_bucket(f"s3://{bucket}", StorageConfig(s3_endpoint_url=s3))
        kube.add_crd(crd("PyTorchJob" if backend == "pytorchjob" else "TrainJob"))
        if backend == "trainjob":
            kube.add("clustertrainingruntimes", {"apiVersion": "trainer.kubeflow.org/v1alpha1",
                                                 "kind": "ClusterTrainingRuntime",
                                                 "metadata": {"name": "torch-distributed"}})
        for i in range(2):
            kube.add_node(f"h20-{i}", {**SELECTOR, "kubernetes.io/hostname": f"h20-{i}"}, GPU_NODE, [GPU_TAINT])
        kube.add_node("cpu-0", {"kubernetes.io/hostname": "cpu-0"}, {"cpu": "32", "memory": "128Gi"})
        kube.add_secret(NS, "minio-credentials", SECRET_VALUES)
        kube.add_storage_class("local-path", default=True)
        kube.rbac = granted(cfg) | READS
        return cfg

    return make


def report(checks: list[pf.Check]) -> str:
    buf = io.StringIO()
    pf.print_report(checks, Console(file=buf, width=220, soft_wrap=True))
    return buf.getvalue()


def cli(*args: str) -> Any:
    """`versavit cluster check ...` in this process (the kubeconfig is the world's)."""
    from typer.testing import CliRunner

    from versavit.cli import app

    return CliRunner().invoke(app, ["cluster", "check", *args])


def cli_args(cfg: RunConfig) -> list[str]:
    """--config and the overrides `world` made `cfg` from."""
    return CLI_ARGS[id(cfg)]


def by_area(checks: list[pf.Check], area: str) -> list[pf.Check]:
    return [c for c in checks if c.area == area]


def failed(checks: list[pf.Check]) -> list[pf.Check]:
    return [c for c in checks if c.failed]


def assert_no_credential(text: str) -> None:
    for value in (*SECRET_VALUES.values(), TOKEN, "testing-secret"):
        assert value not in text


# --------------------------------------------------------------------------------------------
# healthy


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_everything_present_is_all_ok(backend: str, world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world(backend)
    checks = pf.run_checks(cfg)
    assert failed(checks) == [] and all(c.status == pf.OK for c in checks), report(checks)
    areas = [c.area for c in checks]
    expected = ["cluster", "CRD", *(["runtime"] if backend == "trainjob" else []), "access", "access", "access",
                "secret", "nodes", "storage", "S3", "S3", "MLflow"]
    assert areas == expected
    crd_check = by_area(checks, "CRD")[0]
    assert "every field the launcher sets is in its schema" in crd_check.detail
    if backend == "trainjob":
        assert by_area(checks, "runtime")[0].name == "ClusterTrainingRuntime torch-distributed"
    nodes = by_area(checks, "nodes")[0].detail
    assert nodes == "2 node(s) fit one pod (16 cpu, 64Gi memory, 8 nvidia.com/gpu, allocatable), 2 needed"
    assert "minio-data" in by_area(checks, "storage")[0].detail  # what the default class is for
    # one SelfSubjectAccessReview per permission the launcher uses, in its namespace
    reviewed = {(r["verb"], r.get("group", ""), r["resource"] + (f"/{r['subresource']}" if r.get("subresource")
                                                                  else ""), r["namespace"])
                for r in kube.access_reviews}
    assert reviewed == granted(cfg) and len(kube.access_reviews) == len(pf.required_access(cfg))
    assert kube.denied == []  # nothing it read was refused
    assert {(m, p) for m, p in kube.requests if m != "GET"} == {("POST", SSAR_PATH)}  # it reads, and asks SSARs

    result = cli(*cli_args(cfg))
    assert result.exit_code == 0, result.output
    assert f"{len(checks)} checks: {len(checks)} ✓, 0 ✗, 0 ?" in result.output
    assert_no_credential(result.output)


# --------------------------------------------------------------------------------------------
# each missing piece: its ✗, the fix, exit 1


def run_cli_failing(cfg: RunConfig, *args: str) -> str:
    result = cli(*cli_args(cfg), *args)
    assert result.exit_code == 1, result.output
    assert_no_credential(result.output)
    return result.output


def test_denied_verb(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world("pytorchjob")
    kube.rbac = (granted(cfg) - {("delete", "kubeflow.org", "pytorchjobs", NS)}) | READS
    checks = pf.run_checks(cfg)
    (bad,) = failed(checks)
    assert bad.area == "access" and bad.name == "pytorchjobs.kubeflow.org in versavit"
    assert bad.detail == "the current identity may not delete (to delete it on cancel, timeout or a stuck pod): " \
                         "no RBAC rule allows it"
    assert bad.fix == ("kubectl -n versavit apply -f manifests/base/rbac.yaml && kubectl -n versavit create "
                       "rolebinding versavit-runner-user --role=versavit-runner --user=<you>")
    assert [c.status for c in by_area(checks, "access")].count(pf.OK) == 2  # pods, pods/log
    out = run_cli_failing(cfg)
    assert f"✗ access pytorchjobs.kubeflow.org in versavit: fix: {bad.fix}\n" in out

    # the pipeline's service account, impersonated (--as), has no rights in the namespace
    sa = "system:serviceaccount:kubeflow:pipeline-runner"
    kube.rbac_as[sa] = set(READS)
    checks = pf.run_checks(cfg, impersonate=sa)
    assert {c.name for c in failed(checks)} == {"pytorchjobs.kubeflow.org in versavit", "pods in versavit",
                                                "pods/log in versavit"}
    assert all(c.fix.endswith("--role=versavit-runner --serviceaccount=kubeflow:pipeline-runner")
               for c in failed(checks))
    assert {r["user"] for r in kube.access_reviews[-5:]} == {sa}
    out = run_cli_failing(cfg, "--as", sa)
    assert "--serviceaccount=kubeflow:pipeline-runner" in out

    # another namespace (--namespace: the KFP run's): no rights there, and no secret; the profile-namespace
    # component binds the Role to KFP's service accounts
    out = run_cli_failing(cfg, "--namespace", "team-a")
    for line in ("✗ access pytorchjobs.kubeflow.org in team-a: fix: kubectl apply -k profiles/team-a && kubectl -n "
                 "team-a create rolebinding versavit-launcher-user --role=versavit-launcher --user=<you>  # "
                 "profiles/team-a: a kustomization of manifests/components/profile-namespace (manifests/README.md)",
                 "✗ access pods in team-a", "✗ access pods/log in team-a",
                 "? secret minio-credentials in team-a: verify: an admin: kubectl -n team-a describe secret"):
        assert line in out
    kube.rbac_as["system:serviceaccount:team-a:default-editor"] = set()
    checks = pf.run_checks(cfg, namespace="team-a", impersonate="system:serviceaccount:team-a:default-editor")
    assert by_area(checks, "access")[0].fix == "kubectl apply -k profiles/team-a  # profiles/team-a: a " \
        "kustomization of manifests/components/profile-namespace (manifests/README.md)"


def test_missing_secret_or_key(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world("pytorchjob", "weights.hub_token_secret=hub-token/token", "launch.secret_env.WANDB_API_KEY=wandb/key")
    kube.add_secret(NS, "minio-credentials", {"access-key": SECRET_VALUES["access-key"]})  # no secret-key
    kube.add_secret(NS, "wandb", {"key": ""})  # present, but empty
    checks = pf.run_checks(cfg)
    key, empty, hub = failed(checks)
    assert (key.name, empty.name, hub.name) == ("minio-credentials in versavit", "wandb in versavit",
                                                "hub-token in versavit")
    assert empty.detail == "empty key key (the pods read key -> $WANDB_API_KEY)"
    assert key.detail.startswith("no key secret-key") and "secret-key -> $AWS_SECRET_ACCESS_KEY" in key.detail
    assert key.fix == ("kubectl -n versavit patch secret minio-credentials --type merge -p "
                       "'{\"stringData\": {\"secret-key\": \"<value>\"}}'")
    assert hub.detail == "not found (the pods read token -> $HF_TOKEN)"
    assert hub.fix == "kubectl -n versavit create secret generic hub-token --from-literal=token=<value>"
    out = run_cli_failing(cfg)
    assert ("✗ secret minio-credentials in versavit: fix: kubectl -n versavit patch secret minio-credentials "
            "--type merge -p '{\"stringData\": {\"secret-key\": \"<value>\"}}'\n") in out


def test_too_few_gpu_nodes(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world("pytorchjob", "launch.nnodes=4")
    kube.add_node("h20-small", SELECTOR, {**GPU_NODE, "nvidia.com/gpu": "4"}, [GPU_TAINT])
    kube.add_node("h20-cordoned", SELECTOR, GPU_NODE, [GPU_TAINT], unschedulable=True)
    kube.add_node("h20-small-memory", SELECTOR, {**GPU_NODE, "memory": "32Gi"}, [GPU_TAINT])
    kube.add_node("h20-not-ready", SELECTOR, GPU_NODE, [GPU_TAINT], ready=False)
    checks = pf.run_checks(cfg)
    (bad,) = failed(checks)
    assert bad.area == "nodes" and bad.name == "nvidia.com/gpu.product=NVIDIA-H20"
    assert bad.detail.startswith("2 of 7 node(s) fit one pod (16 cpu, 64Gi memory, 8 nvidia.com/gpu, "
                                 "allocatable), launch.nnodes=4 needed")
    for reason in ("1 selector", "1 nvidia.com/gpu < 8", "1 memory < 64Gi", "1 cordoned", "1 not Ready"):
        assert reason in bad.detail
    out = run_cli_failing(cfg)
    assert "✗ nodes nvidia.com/gpu.product=NVIDIA-H20: fix:" in out

    # the GPU nodes' taint not tolerated: the fix names the toleration to add
    checks = pf.run_checks(cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"tolerations": []})}))
    (bad,) = failed(checks)
    assert "taint nvidia.com/gpu=present:NoSchedule" in bad.detail
    assert bad.fix == "add to launch.tolerations: {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}"


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_crd_missing(backend: str, world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world(backend)
    api = pf.JOB_APIS[backend]
    del kube.resources[("customresourcedefinitions", "", api.crd)]
    checks = pf.run_checks(cfg)
    (bad,) = failed(checks)
    assert bad.name == api.kind and bad.detail == f"{api.crd} is not installed (its operator is missing)"
    assert bad.fix == pf.INSTALL[backend] and bad.fix.startswith("kubectl apply --server-side -k ")
    out = run_cli_failing(cfg)
    assert f"✗ CRD {api.kind}: fix: {pf.INSTALL[backend]}" in out


def test_crd_of_another_release_or_version(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    # Trainer v2.1 renamed spec.podSpecOverrides: the API server would silently drop the launcher's
    # node selector, tolerations and /dev/shm
    cfg = world("trainjob")
    newer = crd("TrainJob")
    for version in newer["spec"]["versions"]:
        props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        props["podTemplateOverrides"] = props.pop("podSpecOverrides")
    kube.add_crd(newer)
    (bad,) = failed(pf.run_checks(cfg))
    assert "trainjobs.trainer.kubeflow.org v1alpha1 has no field spec.podSpecOverrides" in bad.detail
    assert bad.fix == pf.INSTALL["trainjob"]

    # a CRD that does not serve the launcher's version; the runtime missing
    cfg = world("pytorchjob")
    old = crd("PyTorchJob")
    old["spec"]["versions"][0]["name"] = "v1beta1"
    kube.add_crd(old)
    (bad,) = failed(pf.run_checks(cfg))
    assert bad.detail == "pytorchjobs.kubeflow.org serves v1beta1, the launcher creates kubeflow.org/v1"

    cfg = world("trainjob", "launch.trainjob_runtime=versavit-torch", "launch.trainjob_runtime_kind=TrainingRuntime")
    kube.rbac |= {("get", "trainer.kubeflow.org", "trainingruntimes", NS)}
    (bad,) = failed(pf.run_checks(cfg))
    assert (bad.area, bad.name, bad.detail) == ("runtime", "TrainingRuntime versavit-torch in versavit", "not found")
    assert bad.fix == "kubectl -n versavit apply -f manifests/components/trainer-runtime/trainingruntime.yaml"


def test_gang_scheduler_queue_missing(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world("pytorchjob", "launch.scheduling.kind=kueue", "launch.scheduling.queue=gpu-queue")
    (bad,) = failed(pf.run_checks(cfg))  # Kueue is not installed
    assert bad.area == "scheduling" and bad.detail == "localqueues.kueue.x-k8s.io is not served " \
                                                      "(launch.scheduling.kind=kueue)"
    assert bad.fix.startswith("install Kueue")
    kube.add_crd({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                  "metadata": {"name": "localqueues.kueue.x-k8s.io"},
                  "spec": {"group": "kueue.x-k8s.io", "scope": "Namespaced",
                           "names": {"plural": "localqueues", "singular": "localqueue", "kind": "LocalQueue"},
                           "versions": [{"name": "v1beta1", "served": True, "storage": True}]}})
    kube.rbac |= {("get", "kueue.x-k8s.io", "localqueues", NS)}
    (bad,) = failed(pf.run_checks(cfg))  # installed, but the namespace has no such LocalQueue
    assert (bad.name, bad.detail) == ("LocalQueue gpu-queue in versavit", "not found")
    kube.add("localqueues", {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
                             "metadata": {"name": "gpu-queue"}, "spec": {"clusterQueue": "gpus"}}, NS)
    checks = pf.run_checks(cfg)
    assert failed(checks) == [] and [c.name for c in by_area(checks, "scheduling")] == [
        "kueue", "LocalQueue gpu-queue in versavit"]


def test_bucket_missing_or_wrong_credentials(world: Callable[..., RunConfig], s3: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    import requests

    cfg = world("pytorchjob")
    data_bucket = cfg.eval.benchmarks[0].split("s3://", 1)[1].split("/", 1)[0]
    boto3.client("s3", endpoint_url=s3, region_name="us-east-1").delete_bucket(Bucket=data_bucket)
    checks = pf.run_checks(cfg)
    (bad,) = failed(checks)
    assert bad.name == f"bucket s3://{data_bucket}" and "read by eval.benchmarks[0]" in bad.detail
    assert bad.fix == f"aws --endpoint-url {s3} s3 mb s3://{data_bucket} (and upload its data)"
    run_cli_failing(cfg)

    # the workdir's bucket may be absent: the run creates it (storage.create_buckets), unless told not to
    cfg = world("pytorchjob", "workdir=s3://pf-not-yet/run")
    checks = pf.run_checks(cfg)
    assert failed(checks) == [] and "absent: the run creates it" in by_area(checks, "S3")[1].detail
    assert "pf-not-yet" not in {b["Name"] for b in boto3.client("s3", endpoint_url=s3).list_buckets()["Buckets"]}
    cfg = world("pytorchjob", "workdir=s3://pf-not-yet/run", "storage.create_buckets=false")
    (bad,) = failed(pf.run_checks(cfg))
    assert bad.name == "bucket s3://pf-not-yet" and "storage.create_buckets is false" in bad.detail

    # wrong credentials: moto checks signatures for this part
    iam = boto3.client("iam", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="y")
    iam.create_user(UserName="preflight")
    iam.put_user_policy(UserName="preflight", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="preflight")["AccessKey"]
    cfg = world("pytorchjob")
    requests.post(f"{s3}/moto-api/reset-auth", data=b"0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        assert failed(pf.run_checks(cfg)) == []
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")  # wrong
        checks = pf.run_checks(cfg)
        (bad,) = failed(checks)  # one line: every other bucket would be refused the same way
        assert bad.area == "S3" and "was refused (wrong or missing credentials" in bad.detail
        assert bad.fix.startswith("export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        out = run_cli_failing(cfg)
        assert key["SecretAccessKey"] not in out
    finally:
        requests.post(f"{s3}/moto-api/reset-auth", data=b"inf")


def test_mlflow_down_or_refusing(world: Callable[..., RunConfig], free_tcp_port: int,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = world("pytorchjob", f"tracking.uri=http://127.0.0.1:{free_tcp_port}")
    (bad,) = failed(pf.run_checks(cfg))
    assert bad.area == "MLflow" and bad.detail == "not reachable: ConnectionError"
    assert "kubectl -n versavit port-forward svc/mlflow 5000:5000" in bad.fix
    out = run_cli_failing(cfg)
    assert f"✗ MLflow http://127.0.0.1:{free_tcp_port}: fix:" in out

    guarded = MlflowStub(password="mlflow-pass-do-not-print")
    try:
        cfg = world("pytorchjob", f"tracking.uri={guarded.url}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        (bad,) = failed(pf.run_checks(cfg))
        assert bad.detail == "the REST API refused this shell's credentials (HTTP 401)"
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-pass-do-not-print")
        checks = pf.run_checks(cfg)
        assert failed(checks) == [] and "mlflow-pass-do-not-print" not in report(checks)
        # credentials in the URI: used, never shown
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        cfg = world("pytorchjob", f"tracking.uri={guarded.url.replace('//', '//admin:mlflow-pass-do-not-print@')}")
        checks = pf.run_checks(cfg)
        assert failed(checks) == [] and by_area(checks, "MLflow")[0].name == guarded.url
        assert "mlflow-pass-do-not-print" not in report(checks)
    finally:
        guarded.stop()

    cfg = world("pytorchjob", "tracking.uri=null")
    (bad,) = failed(pf.run_checks(cfg))
    assert bad.fix == "set tracking.uri=http://mlflow.versavit:5000 (manifests/base/mlflow.yaml)"


def test_api_unreachable_skips_cluster_checks(world: Callable[..., RunConfig], free_tcp_port: int,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = world("pytorchjob")
    bad_config = tmp_path / "dead-kubeconfig"
    bad_config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"http://127.0.0.1:{free_tcp_port}"}}],
        "users": [{"name": "dead", "user": {"token": TOKEN}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(bad_config))
    checks = pf.run_checks(cfg)
    (bad,) = failed(checks)
    assert bad.name == "Kubernetes API" and f"127.0.0.1:{free_tcp_port} (context dead) does not answer" in bad.detail
    assert {c.area for c in checks} == {"cluster", "S3", "MLflow"}  # the rest still ran
    assert_no_credential(report(checks))


def test_local_backend_is_a_config_error() -> None:
    from versavit.config import ConfigError

    with pytest.raises(ConfigError, match="the cluster check is for a cluster backend"):
        pf.run_checks(load_config(TINY))


# --------------------------------------------------------------------------------------------
# what this identity may not read: ?, not a failure


def test_forbidden_reads_are_unknown_not_failures(world: Callable[..., RunConfig], kube: KubeApiStub) -> None:
    cfg = world("trainjob")
    kube.rbac = granted(cfg)  # a namespace user: the launcher's rights, nothing cluster-wide, no secrets
    checks = pf.run_checks(cfg)
    assert failed(checks) == [], report(checks)
    unknown = {c.name: c for c in checks if c.status == pf.UNKNOWN}
    assert set(unknown) == {"ClusterTrainingRuntime torch-distributed", "minio-credentials in versavit",
                            "nvidia.com/gpu.product=NVIDIA-H20", "default StorageClass"}
    assert unknown["minio-credentials in versavit"].fix == "an admin: kubectl -n versavit describe secret " \
                                                           "minio-credentials"
    # the CRD was found through API discovery, which every identity may read
    assert "API discovery" in by_area(checks, "CRD")[0].detail and by_area(checks, "CRD")[0].status == pf.OK
    result = cli(*cli_args(cfg))
    assert result.exit_code == 0, result.output
    assert ("? nodes nvidia.com/gpu.product=NVIDIA-H20: verify: an admin: kubectl get nodes -l "
            "'nvidia.com/gpu.product=NVIDIA-H20' -o custom-columns=NAME:.metadata.name,"
            "ALLOCATABLE:.status.allocatable\n") in result.output


# --------------------------------------------------------------------------------------------
# required_access is what the launchers use: both run (read the driver pod, create, poll, list pods, stream
# the log, delete on cancel) under exactly those permissions, and every request they make is one of them


@pytest.mark.parametrize("launcher_cls", [PyTorchJobLauncher, TrainJobLauncher])
def test_launchers_need_exactly_required_access(launcher_cls: type, kube: KubeApiStub, kube_config: Any,
                                                cluster_cfg: Callable[..., RunConfig],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.launch import identity

    cfg = cluster_cfg(launcher_cls.backend)
    kube.rbac = granted(cfg)
    # as the KFP step's pod whose uid the downward API did not give: the launcher reads it (get pods)
    monkeypatch.setenv(identity.POD_NAMESPACE_ENV, NS)
    monkeypatch.setenv(identity.POD_NAME_ENV, "driver-0")
    monkeypatch.delenv(identity.POD_UID_ENV, raising=False)
    kube.add_pod(NS, "driver-0", "uid-driver-0")
    kube.steps, kube.log_text = [Step(["Created"]), Step(["Created", "Running"], "Running")], "step 1\n"
    cancelled: list[int] = []

    def cancel_once_the_log_streams(index: int) -> None:  # as KFP cancels a step: SIGTERM, the job is deleted
        if kube.log_requests and not cancelled:
            cancelled.append(index)
            os.kill(os.getpid(), signal.SIGTERM)

    kube.on_get = cancel_once_the_log_streams
    launcher = launcher_cls(client_configuration=kube_config, log_sink=lambda line: None,
                            status_sink=lambda line: None, poll_interval_s=0.02, timeout_s=60)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch(cfg, "multitask")
    assert kube.deleted and kube.objects == {}
    assert kube.denied == []
    used = {request_attributes(m, path, {})[:3] for m, path in kube.requests}
    assert used == {(a.verb, a.group, a.resource) for a in pf.required_access(cfg)}
    (created,) = kube.created
    assert created["metadata"]["ownerReferences"][0]["uid"] == "uid-driver-0"  # what `get pods` was for
