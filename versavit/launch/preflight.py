"""Preflight of a cluster run (`versavit cluster check`): would the jobs of this config start, and reach
their data and MLflow? Run it before submitting the pipeline.

    checks = run_checks(cfg)          # against the in-cluster service account or the current kubeconfig
    print_report(checks, console)     # a table of ✓ / ✗ / ?, then one fix line per ✗ (and how to verify a ?)

It only reads: CRDs, nodes, storage classes, the secrets the pods name (only which keys they hold: their
values are dropped unread), and it asks the API server SelfSubjectAccessReviews (answered, never stored).
Nothing is created on the cluster or in S3. A check this identity is not allowed to make (reading nodes or
secrets is often an admin's right) is `?`: not a failure, and its line says how an admin can verify it.

What the launcher needs from the API is stated once, in `required_access` (tests/launch/test_preflight.py
runs both launchers against an API stub that grants exactly that list).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any

from versavit.config import RunConfig
from versavit.launch import pytorchjob, trainjob
from versavit.launch.base import resources

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
SYMBOLS = {OK: "✓", FAIL: "✗", UNKNOWN: "?"}
STYLES = {OK: "green", FAIL: "red", UNKNOWN: "yellow"}
TIMEOUT_S = 10.0  # per API / HTTP request

# The operator releases whose CRDs manifests/crds vendors (manifests/crds/README.md): PyTorchJob as in
# Training Operator v1.9.3; TrainJob with spec.podSpecOverrides as in Trainer v2.0.x (v2.1 renamed it
# podTemplateOverrides, v2.2 replaced it with runtimePatches: the API server would drop it unread).
INSTALL = {
    "pytorchjob": 'kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/'
                  'standalone?ref=v1.9.3"',
    "trainjob": 'kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/manager'
                '?ref=v2.0.1"',
    "runtimes": 'kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/runtimes'
                '?ref=v2.0.1"',
}
PROJECT_RUNTIME = "versavit-torch"  # manifests/components/trainer-runtime
BASE_NAMESPACE = "versavit"  # manifests/base (its Role: versavit-runner)
PROFILE_ROLE = "versavit-launcher"  # manifests/components/profile-namespace, bound to PROFILE_BOUND there
PROFILE_BOUND = ("default-editor", "pipeline-runner")
PVCS_OF_MANIFESTS = "MinIO's minio-data and MLflow's mlflow-data PVCs (manifests/base/minio.yaml, mlflow.yaml)"
DEFAULT_CLASS_ANNOTATIONS = ("storageclass.kubernetes.io/is-default-class",
                             "storageclass.beta.kubernetes.io/is-default-class")


@dataclass
class Check:
    """One line of the report. `fix`: for a ✗ the command or manifest that fixes it; for a ? how to verify."""

    area: str
    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass(frozen=True)
class Access:
    """One permission the launcher uses in its namespace."""

    verb: str
    group: str  # "" = the core API
    resource: str  # plural, or plural/subresource
    why: str
    optional: bool = False  # the launcher works without it (a denial is reported, not a failure)

    @property
    def resource_label(self) -> str:
        plural, _, sub = self.resource.partition("/")
        return f"{plural}.{self.group}" + (f"/{sub}" if sub else "") if self.group else self.resource


@dataclass(frozen=True)
class JobApi:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"


JOB_APIS = {
    "pytorchjob": JobApi(*pytorchjob.API_VERSION.split("/"), f"{pytorchjob.KIND.lower()}s", pytorchjob.KIND),
    "trainjob": JobApi(trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL, trainjob.KIND),
}


def job_api(cfg: RunConfig) -> JobApi:
    if cfg.launch.backend not in JOB_APIS:
        from versavit.config import ConfigError

        raise ConfigError(f"launch.backend={cfg.launch.backend!r}: the cluster check is for a cluster backend "
                          f"({', '.join(JOB_APIS)}); set launch.backend")
    return JOB_APIS[cfg.launch.backend]


def required_access(cfg: RunConfig) -> list[Access]:
    """Every API call a cluster launcher (versavit.launch.base.ClusterLauncher and its two backends) makes, as
    the permission it needs in the jobs' namespace. The one place this is stated: `cluster check` asks a
    SelfSubjectAccessReview for each, the tests grant exactly these to the launchers (manifests/base/rbac.yaml
    grants them, plus list/watch of the jobs for kubectl users)."""
    api = job_api(cfg)
    return [
        Access("create", api.group, api.plural, "to create the job"),  # ClusterLauncher._create
        Access("get", api.group, api.plural, "to poll its status"),  # _read
        Access("delete", api.group, api.plural, "to delete it on cancel, timeout or a stuck pod"),  # _delete
        Access("list", "", "pods", "to find the job's pods"),  # _pods
        Access("get", "", "pods/log", "to stream the master's log"),  # _open_log
        # _read_pod (versavit.launch.identity.with_uid): without it, no owner reference
        Access("get", "", "pods", "the driver pod's uid for the job's owner reference, unless the downward API "
               "gives it", optional=True),
    ]


# --------------------------------------------------------------------------------------------
# the API connection


@dataclass
class _Cluster:
    api: Any  # kubernetes.client.ApiClient
    namespace: str
    where: str  # "https://host (context x)"
    identity: str  # "the current identity" or the impersonated user
    impersonate: str | None = None


def connect(client_configuration: Any = None, context: str | None = None,
            impersonate: str | None = None) -> tuple[Any, str]:
    """An ApiClient: for `client_configuration` if given, else the in-cluster service account (in a pod, no
    --context), else the kubeconfig ($KUBECONFIG or ~/.kube/config; its current context or `context`).
    Returns it and a description of where it points (host, context; never a credential)."""
    from kubernetes import client, config

    conf = client_configuration
    where = ""
    if conf is None:
        conf = client.Configuration()
        conf.retries = 1  # a dead API server: one clear line soon, not minutes of retries
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
            config.load_incluster_config(client_configuration=conf)
            where = " (in-cluster service account)"
        else:
            # $KUBECONFIG read now (the client reads it once, at import), a ':'-separated list as for kubectl
            path = os.environ.get("KUBECONFIG") or None
            config.load_kube_config(config_file=path, context=context, client_configuration=conf)
            try:
                active = context or config.list_kube_config_contexts(config_file=path)[1]["name"]
            except Exception:
                active = None
            where = f" (context {active})" if active else ""
    api = client.ApiClient(conf)
    if impersonate:
        api.set_default_header("Impersonate-User", impersonate)
    return api, f"{_redact(conf.host)}{where}"


def _redact(url: str) -> str:
    """`url` without user:password@."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _get_json(api: Any, path: str) -> Any:
    """GET `path` as plain JSON (no model deserialisation: CRDs are large, and only a few fields matter)."""
    resp = api.call_api(path, "GET", header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                        _return_http_data_only=True, _preload_content=False, _request_timeout=TIMEOUT_S)
    return json.loads(resp.data)


def _api_error(exc: BaseException) -> str:
    status = _status(exc)
    if status is None:
        text = str(getattr(exc, "reason", None) or exc).splitlines()
        return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
    try:
        message = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
    except ValueError:
        message = ""
    return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".rstrip() + (f": {message}" if message else "")


# --------------------------------------------------------------------------------------------
# the checks


def run_checks(cfg: RunConfig, client_configuration: Any = None, context: str | None = None,
               impersonate: str | None = None, stage: str | None = None, namespace: str | None = None) -> list[Check]:
    """Every check, in order: API, CRDs (and the TrainJob runtime), gang scheduling, access, secrets, nodes,
    storage class, S3 buckets, MLflow. The Kubernetes checks are skipped when the API cannot be reached (one ✗
    says why). `namespace`: where the jobs go; default as the launcher decides (`identity.job_namespace`: this
    pod's namespace when run in a pod, else launch.namespace)."""
    from versavit import storage

    api_kind = job_api(cfg)
    storage.configure(cfg.storage)
    checks: list[Check] = []
    job, build_error = _build_job(cfg, stage)
    if build_error:
        checks.append(Check("config", "job spec", FAIL, f"cannot build the {api_kind.kind}: {build_error}",
                            "change the config field the error names"))
    cluster = _connect_check(cfg, checks, client_configuration, context, impersonate, namespace)
    if cluster is not None:
        checks += check_crds(cluster, cfg, job)
        checks += check_scheduling(cluster, cfg)
        checks += check_access(cluster, cfg)
        checks += check_secrets(cluster, cfg)
        checks += check_nodes(cluster, cfg)
        checks += check_storage_class(cluster)
    checks += check_buckets(cfg)
    checks.append(check_mlflow(cfg))
    return checks


def _build_job(cfg: RunConfig, stage: str | None) -> tuple[dict[str, Any] | None, str]:
    """The job a launch would create (the first stage of the recipe unless `stage`), as a dict."""
    from versavit.layout import launch_config_url

    try:
        stage = stage or cfg.train.stages()[0].name
        name = f"preflight-{stage}"
        config_ref = launch_config_url(cfg, stage, name)
        if cfg.launch.backend == "pytorchjob":
            return pytorchjob.build_pytorchjob(cfg, stage, config_ref, name), ""
        return trainjob.build_trainjob(cfg, stage, config_ref, name), ""
    except Exception as exc:  # a LaunchError names the config field
        return None, str(exc)


def _connect_check(cfg: RunConfig, checks: list[Check], client_configuration: Any, context: str | None,
                   impersonate: str | None, namespace: str | None) -> _Cluster | None:
    from versavit.launch.identity import job_namespace

    try:
        api, where = connect(client_configuration, context, impersonate)
    except Exception as exc:  # no kubeconfig, unknown context, ...
        checks.append(Check("cluster", "Kubernetes API", FAIL, f"no cluster configured: {exc}",
                            "kubectl config use-context <cluster> (or set $KUBECONFIG)"))
        return None
    try:
        version = _get_json(api, "/version").get("gitVersion", "?")
    except Exception as exc:
        checks.append(Check("cluster", "Kubernetes API", FAIL, f"{where} does not answer: {_api_error(exc)}",
                            "kubectl cluster-info (check the context, VPN, credentials)"))
        return None
    identity = f"user {impersonate} (impersonated)" if impersonate else "the current identity"
    ns = namespace or job_namespace(cfg)
    checks.append(Check("cluster", "Kubernetes API", OK, f"{version} at {where}, as {identity}; jobs go to "
                        f"namespace {ns}"))
    return _Cluster(api, ns, where, identity, impersonate)


# -- CRDs ------------------------------------------------------------------------------------


def check_crds(cluster: _Cluster, cfg: RunConfig, job: dict[str, Any] | None) -> list[Check]:
    """The job's CRD serves the version the launcher creates, and its schema knows every field the launcher
    sets (unknown fields of a custom object are dropped without an error); a TrainJob's runtime exists."""
    api = job_api(cfg)
    out = [_check_crd(cluster, api, job, INSTALL[cfg.launch.backend])]
    if cfg.launch.backend == "trainjob" and job is not None and out[0].status != FAIL:
        out.append(_check_runtime(cluster, job))
    return out


def _check_crd(cluster: _Cluster, api: JobApi, job: dict[str, Any] | None, install: str) -> Check:
    name = api.kind
    try:
        crd = _get_json(cluster.api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{api.crd}")
    except Exception as exc:
        if _status(exc) == 404:
            return Check("CRD", name, FAIL, f"{api.crd} is not installed (its operator is missing)", install)
        if _status(exc) == 403:
            return _check_served(cluster, api, install)
        return Check("CRD", name, FAIL, f"cannot read {api.crd}: {_api_error(exc)}", install)
    versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions") or []}
    served = [v for v, spec in versions.items() if spec.get("served", True)]
    storage_version = next((v for v, spec in versions.items() if spec.get("storage")), "?")
    if api.version not in served:
        return Check("CRD", name, FAIL, f"{api.crd} serves {', '.join(served) or 'no version'}, the launcher creates "
                     f"{api.group}/{api.version}", install)
    conditions = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
    if conditions and conditions.get("Established") != "True":
        return Check("CRD", name, FAIL, f"{api.crd} is not Established yet", f"kubectl get crd {api.crd} -o yaml")
    schema = ((versions[api.version].get("schema") or {}).get("openAPIV3Schema")) or {}
    unknown = unknown_fields(job, schema) if job is not None and schema else []
    if unknown:
        shown = ", ".join(unknown[:4]) + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else "")
        return Check("CRD", name, FAIL, f"{api.crd} {api.version} has no field {shown}: the API server would drop "
                     "what the launcher sets there (another operator release than manifests/crds)", install)
    compared = "; every field the launcher sets is in its schema" if job is not None and schema else ""
    return Check("CRD", name, OK, f"{api.crd}: {api.version} served (storage version {storage_version}){compared}")


def _check_served(cluster: _Cluster, api: JobApi, install: str) -> Check:
    """Without the right to read CRDs (cluster-scoped): API discovery, which every authenticated user may read."""
    name = api.kind
    try:
        found = _get_json(cluster.api, f"/apis/{api.group}/{api.version}")
    except Exception as exc:
        if _status(exc) == 404:
            return Check("CRD", name, FAIL, f"{api.group}/{api.version} is not served (operator missing)", install)
        return Check("CRD", name, FAIL, f"API discovery of {api.group}/{api.version}: {_api_error(exc)}", install)
    if api.plural not in {r.get("name") for r in found.get("resources") or []}:
        return Check("CRD", name, FAIL, f"{api.group}/{api.version} does not serve {api.plural}", install)
    return Check("CRD", name, OK, f"{api.plural} served at {api.group}/{api.version} (API discovery: this identity "
                 "may not read CRDs, so their schema was not compared)")


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Dotted paths of `obj` that `schema` (an openAPIV3Schema) does not declare: what a structural CRD prunes."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for key, value in obj.items():
                    out += unknown_fields(value, extra, f"{path}.{key}")
            return _unique(out)
        for key, value in obj.items():
            here = f"{path}.{key}" if path else key
            if key in props:
                out += unknown_fields(value, props[key], here)
            else:
                out.append(here)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            out += unknown_fields(item, schema["items"], f"{path}[]")
    return _unique(out)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_runtime(cluster: _Cluster, job: dict[str, Any]) -> Check:
    """The training runtime the TrainJob names (its spec.runtimeRef, from launch.trainjob_runtime[_kind])."""
    ref = job["spec"].get("runtimeRef") or {}
    kind, name = ref.get("kind", "ClusterTrainingRuntime"), ref.get("name", trainjob.RUNTIME)
    plural, ns, api = f"{kind.lower()}s", cluster.namespace, f"/apis/{trainjob.GROUP}/{trainjob.VERSION}"
    if kind == "ClusterTrainingRuntime":
        return _check_object(cluster, "runtime", f"{kind} {name}", f"{api}/{plural}/{name}",
                             INSTALL["runtimes"] if name == trainjob.RUNTIME else f"create the {kind} {name}",
                             f"kubectl get {plural}.{trainjob.GROUP} {name}")
    fix = (f"kubectl -n {ns} apply -f manifests/components/trainer-runtime/trainingruntime.yaml"
           if name == PROJECT_RUNTIME else f"create the {kind} {name} in namespace {ns}")
    return _check_object(cluster, "runtime", f"{kind} {name} in {ns}", f"{api}/namespaces/{ns}/{plural}/{name}",
                         fix, f"kubectl -n {ns} get {plural}.{trainjob.GROUP} {name}")


# -- gang scheduling -------------------------------------------------------------------------

SCHEDULERS = {  # kind -> (API group/version, plural of the object the scheduler works with, how to install it)
    "volcano": ("scheduling.volcano.sh/v1beta1", "podgroups",
                "install Volcano (kubectl apply -f https://raw.githubusercontent.com/volcano-sh/volcano/master/"
                "installer/volcano-development.yaml) and run the training operator with --gang-scheduler-name=volcano"),
    "kueue": ("kueue.x-k8s.io/v1beta1", "localqueues",
              "install Kueue (https://kueue.sigs.k8s.io/docs/installation/) with its kubeflow.org/pytorchjob / "
              "trainer.kubeflow.org/trainjob integration enabled"),
    "coscheduling": ("scheduling.x-k8s.io/v1alpha1", "podgroups",
                     "install scheduler-plugins as a second scheduler and run the training operator with "
                     "--gang-scheduler-name=<launch.scheduling.scheduler_name>"),
}


def check_scheduling(cluster: _Cluster, cfg: RunConfig) -> list[Check]:
    """launch.scheduling: the gang scheduler's API is served (discovery, readable by everyone), its queue
    exists (Volcano Queue, Kueue LocalQueue in the jobs' namespace) and so does the priority class."""
    sched = cfg.launch.scheduling
    if sched.kind == "none":
        return []
    group_version, plural, install = SCHEDULERS[sched.kind]
    name = sched.kind
    try:
        found = _get_json(cluster.api, f"/apis/{group_version}")
        served = plural in {r.get("name") for r in found.get("resources") or []}
    except Exception as exc:
        if _status(exc) != 404:
            return [Check("scheduling", name, FAIL, f"API discovery of {group_version}: {_api_error(exc)}", install)]
        served = False
    if not served:
        return [Check("scheduling", name, FAIL, f"{plural}.{group_version.split('/')[0]} is not served "
                      f"(launch.scheduling.kind={sched.kind})", install)]
    out = [Check("scheduling", name, OK, f"{plural} served at {group_version}")]
    group = group_version.split("/")[0]
    ns = cluster.namespace
    if sched.kind == "volcano":
        queue = sched.queue or "default"
        out.append(_check_object(cluster, "scheduling", f"Volcano Queue {queue}", f"/apis/{group_version}/queues/"
                                 f"{queue}", f"create the Volcano Queue {queue} (kind: Queue, {group_version})",
                                 f"kubectl get queues.{group} {queue}"))
    elif sched.kind == "kueue":
        out.append(_check_object(cluster, "scheduling", f"LocalQueue {sched.queue} in {ns}",
                                 f"/apis/{group_version}/namespaces/{ns}/localqueues/{sched.queue}",
                                 f"kubectl -n {ns} apply -f <a LocalQueue {sched.queue} with spec.clusterQueue: "
                                 "<a ClusterQueue with GPU quota>>",
                                 f"kubectl -n {ns} get localqueues.{group} {sched.queue}"))
    if sched.priority_class:
        if sched.kind == "kueue":
            path = f"/apis/{group_version}/workloadpriorityclasses/{sched.priority_class}"
            label, fix = f"WorkloadPriorityClass {sched.priority_class}", \
                f"create the WorkloadPriorityClass {sched.priority_class} ({group_version})"
            verify = f"kubectl get workloadpriorityclasses.{group} {sched.priority_class}"
        else:
            path = f"/apis/scheduling.k8s.io/v1/priorityclasses/{sched.priority_class}"
            label = f"PriorityClass {sched.priority_class}"
            fix = f"kubectl create priorityclass {sched.priority_class} --value=1000"
            verify = f"kubectl get priorityclass {sched.priority_class}"
        out.append(_check_object(cluster, "scheduling", label, path, fix, verify))
    return out


def _check_object(cluster: _Cluster, area: str, name: str, path: str, fix: str, verify: str) -> Check:
    """One object exists (✓), is missing (✗, `fix`), or may not be read by this identity (?, `verify`)."""
    try:
        _get_json(cluster.api, path)
    except Exception as exc:
        if _status(exc) == 404:
            return Check(area, name, FAIL, "not found", fix)
        if _status(exc) == 403:
            return Check(area, name, UNKNOWN, "this identity may not read it", f"an admin: {verify}")
        return Check(area, name, FAIL, f"cannot read it: {_api_error(exc)}", verify)
    return Check(area, name, OK, "present")


# -- access ----------------------------------------------------------------------------------


def check_access(cluster: _Cluster, cfg: RunConfig) -> list[Check]:
    """A SelfSubjectAccessReview per permission of `required_access`, one line per resource."""
    from kubernetes import client

    authz = client.AuthorizationV1Api(cluster.api)
    ns = cluster.namespace
    by_resource: dict[tuple[str, str], list[tuple[Access, bool, str]]] = {}
    for access in required_access(cfg):
        plural, _, sub = access.resource.partition("/")
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=ns, verb=access.verb, group=access.group,
                                                            resource=plural, subresource=sub or None)))
        try:
            status = authz.create_self_subject_access_review(review, _request_timeout=TIMEOUT_S).status
            allowed, reason = bool(status.allowed), status.reason or ""
        except Exception as exc:
            allowed, reason = False, f"the review itself failed: {_api_error(exc)}"
        by_resource.setdefault((access.group, access.resource), []).append((access, allowed, reason))
    out = []
    for results in by_resource.values():
        label = results[0][0].resource_label
        verbs = " ".join(a.verb for a, allowed, _ in results if allowed)
        denied = [(a, reason) for a, allowed, reason in results if not allowed and not a.optional]
        skipped = [a for a, allowed, _ in results if not allowed and a.optional]
        if not denied:
            note = "".join(f"; may not {a.verb} (optional: {a.why})" for a in skipped)
            out.append(Check("access", f"{label} in {ns}", OK, f"may {verbs}{note}"))
            continue
        why = "; ".join(f"{a.verb} ({a.why})" for a, _ in denied)
        reason = next((r for _, r in denied if r), "")
        out.append(Check("access", f"{label} in {ns}", FAIL,
                         f"{cluster.identity} may not {why}" + (f": {reason}" if reason else ""),
                         _rbac_fix(cluster)))
    return out


def _rbac_fix(cluster: _Cluster) -> str:
    """The launcher's Role in the namespace (manifests/base/rbac.yaml in `versavit`, the profile-namespace
    component elsewhere), bound to the identity that was checked unless the component binds it already."""
    ns = cluster.namespace
    subject = cluster.impersonate or ""
    if ns == BASE_NAMESPACE:
        apply, role, note = f"kubectl -n {ns} apply -f manifests/base/rbac.yaml", "versavit-runner", ""
    else:
        apply, role = f"kubectl apply -k profiles/{ns}", PROFILE_ROLE
        note = f"  # profiles/{ns}: a kustomization of manifests/components/profile-namespace (manifests/README.md)"
    if subject.startswith("system:serviceaccount:"):
        sa_ns, _, sa = subject.removeprefix("system:serviceaccount:").partition(":")
        if ns != BASE_NAMESPACE and sa_ns == ns and sa in PROFILE_BOUND:
            return apply + note  # the component's RoleBinding names it
        bind = f"--serviceaccount={sa_ns}:{sa}"
    else:
        bind = f"--user={subject or '<you>'}"
    return f"{apply} && kubectl -n {ns} create rolebinding {role}-{_dns(subject or 'user')} --role={role} {bind}{note}"


def _dns(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "user"


# -- secrets ---------------------------------------------------------------------------------


def secret_refs(cfg: RunConfig) -> tuple[dict[str, dict[str, str]], list[str]]:
    """secret name -> {key: who uses it}, and the malformed references."""
    refs: dict[str, dict[str, str]] = {}
    bad = []
    wanted = [(env, ref, "launch.secret_env") for env, ref in cfg.launch.secret_env.items()]
    if cfg.weights.hub_token_secret:
        wanted.append((cfg.weights.hub_token_env, cfg.weights.hub_token_secret, "weights.hub_token_secret"))
    for env, ref, field_name in wanted:
        secret, sep, key = ref.partition("/")
        if not (sep and secret and key):
            bad.append(f"{field_name} {ref!r} (expected 'secret-name/key')")
            continue
        refs.setdefault(secret, {})[key] = env
    return refs, bad


def check_secrets(cluster: _Cluster, cfg: RunConfig) -> list[Check]:
    """Each secret the pods name exists in launch.namespace with every key they read, non-empty. Only key names
    and emptiness are kept; the values are never decoded."""
    ns = cluster.namespace
    refs, bad = secret_refs(cfg)
    out = [Check("secret", ref, FAIL, "malformed secret reference", "write it as secret-name/key") for ref in bad]
    for secret, keys in refs.items():
        uses = ", ".join(f"{key} -> ${env}" for key, env in keys.items())
        literal = " ".join(f"--from-literal={key}=<value>" for key in keys)
        try:
            obj = _get_json(cluster.api, f"/api/v1/namespaces/{ns}/secrets/{secret}")
        except Exception as exc:
            if _status(exc) == 404:
                out.append(Check("secret", f"{secret} in {ns}", FAIL, f"not found (the pods read {uses})",
                                 f"kubectl -n {ns} create secret generic {secret} {literal}"))
            elif _status(exc) == 403:
                out.append(Check("secret", f"{secret} in {ns}", UNKNOWN, f"this identity may not read secrets in {ns} "
                                 f"(the pods read {uses})", f"an admin: kubectl -n {ns} describe secret {secret}"))
            else:
                out.append(Check("secret", f"{secret} in {ns}", FAIL, f"cannot read it: {_api_error(exc)}",
                                 f"kubectl -n {ns} describe secret {secret}"))
            continue
        data = obj.get("data") or {}
        held, present = set(data), {k for k, v in data.items() if v}
        del obj, data  # only key names leave this loop, never a value
        missing = [k for k in keys if k not in held]
        empty = [k for k in keys if k in held and k not in present]
        if missing or empty:
            problem = "; ".join(p for p in (f"no key {', '.join(missing)}" if missing else "",
                                            f"empty key {', '.join(empty)}" if empty else "") if p)
            patch = json.dumps({"stringData": {k: "<value>" for k in missing + empty}})
            out.append(Check("secret", f"{secret} in {ns}", FAIL, f"{problem} (the pods read {uses})",
                             f"kubectl -n {ns} patch secret {secret} --type merge -p '{patch}'"))
        else:
            out.append(Check("secret", f"{secret} in {ns}", OK, f"keys {', '.join(keys)} present ({uses})"))
    return out


# -- nodes -----------------------------------------------------------------------------------


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    """Kubernetes' rule: a toleration matches a taint by effect (empty: any) and key/value (Exists: any value;
    Exists without a key: every taint)."""
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        operator = tol.get("operator") or "Equal"
        if not tol.get("key"):
            if operator == "Exists":
                return True
            continue
        if tol["key"] != taint.get("key"):
            continue
        if operator == "Exists" or (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def node_misfit(node: dict[str, Any], cfg: RunConfig, requests: dict[str, str]) -> str | None:
    """Why one training pod of `cfg` cannot go on `node` (None: it fits): selector, cordon, readiness, a taint
    it does not tolerate, or allocatable below the pod's requests (GPUs, CPU, memory, RDMA devices)."""
    from kubernetes.utils import parse_quantity

    labels = (node.get("metadata") or {}).get("labels") or {}
    spec, status = node.get("spec") or {}, node.get("status") or {}
    if any(labels.get(k) != v for k, v in cfg.launch.node_selector.items()):
        return "selector"
    if spec.get("unschedulable"):
        return "cordoned"
    ready = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if ready and ready.get("Ready") != "True":
        return "not Ready"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(cfg.launch.tolerations, taint):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"taint {taint.get('key')}{value}:{taint.get('effect')}"
    allocatable = status.get("allocatable") or {}
    for name, want in requests.items():
        have = allocatable.get(name)
        if have is None or parse_quantity(have) < parse_quantity(want):
            return f"{name} < {want}"
    return None


def check_nodes(cluster: _Cluster, cfg: RunConfig) -> list[Check]:
    """At least launch.nnodes schedulable nodes match launch.node_selector, tolerate their taints with
    launch.tolerations, and have allocatable (not: free) at least one pod's requests."""
    launch = cfg.launch
    requests = resources(cfg)["requests"]
    selector = ",".join(f"{k}={v}" for k, v in launch.node_selector.items())
    name = selector or "any (no launch.node_selector)"
    want = ", ".join(f"{v} {k}" for k, v in requests.items())
    try:
        nodes = _get_json(cluster.api, "/api/v1/nodes").get("items") or []
    except Exception as exc:
        if _status(exc) == 403:
            return [Check("nodes", name, UNKNOWN, "this identity may not list nodes (cluster-scoped)",
                          f"an admin: kubectl get nodes -l '{selector}' -o "
                          f"custom-columns=NAME:.metadata.name,ALLOCATABLE:.status.allocatable" if selector else
                          "an admin: kubectl get nodes -o custom-columns=NAME:.metadata.name,"
                          "ALLOCATABLE:.status.allocatable")]
        return [Check("nodes", name, FAIL, f"cannot list nodes: {_api_error(exc)}", "kubectl get nodes")]
    misfits = Counter(node_misfit(n, cfg, requests) for n in nodes)
    fit = misfits.pop(None, 0)
    if fit >= launch.nnodes:
        return [Check("nodes", name, OK, f"{fit} node(s) fit one pod ({want}, allocatable), {launch.nnodes} needed")]
    reasons = ", ".join(f"{count} {reason}" for reason, count in misfits.most_common())
    detail = (f"{fit} of {len(nodes)} node(s) fit one pod ({want}, allocatable), launch.nnodes={launch.nnodes} "
              f"needed" + (f"; the others: {reasons}" if reasons else ""))
    return [Check("nodes", name, FAIL, detail, _nodes_fix(cfg, misfits, fit))]


def _nodes_fix(cfg: RunConfig, misfits: Counter, fit: int) -> str:
    launch = cfg.launch
    matched = {r: c for r, c in misfits.items() if r != "selector"}
    if not matched and not fit:
        pairs = " ".join(f"{k}={v}" for k, v in launch.node_selector.items())
        return f"kubectl label node <node> {pairs} (or change launch.node_selector)"
    top = max(matched, key=matched.get) if matched else ""
    if top.startswith("taint "):
        key, _, effect = top.removeprefix("taint ").partition(":")
        key = key.split("=", 1)[0]
        return f"add to launch.tolerations: {{key: {key}, operator: Exists, effect: {effect}}}"
    if top == "cordoned":
        return "kubectl uncordon <node>"
    if " < " in top:
        resource = top.split(" < ", 1)[0]
        return (f"kubectl describe node <node> | grep -A10 Allocatable (is the {resource} device plugin running?); "
                "or lower the request (launch.resources, launch.network.rdma_resources)")
    return f"add nodes that fit, or lower launch.nnodes to {fit}" if fit else "kubectl describe nodes"


# -- storage ---------------------------------------------------------------------------------


def check_storage_class(cluster: _Cluster) -> list[Check]:
    """The config names no PVC; the manifests' PVCs name no class: a default StorageClass must provision them."""
    try:
        classes = _get_json(cluster.api, "/apis/storage.k8s.io/v1/storageclasses").get("items") or []
    except Exception as exc:
        if _status(exc) == 403:
            return [Check("storage", "default StorageClass", UNKNOWN, "this identity may not list storage classes",
                          "an admin: kubectl get storageclass")]
        return [Check("storage", "default StorageClass", FAIL, f"cannot list storage classes: {_api_error(exc)}",
                      "kubectl get storageclass")]
    default = [c for c in classes if any(((c.get("metadata") or {}).get("annotations") or {}).get(a) == "true"
                                         for a in DEFAULT_CLASS_ANNOTATIONS)]
    if default:
        c = default[-1]
        return [Check("storage", "default StorageClass", OK, f"{c['metadata']['name']} ({c.get('provisioner')}): "
                      f"provisions {PVCS_OF_MANIFESTS}")]
    names = [c["metadata"]["name"] for c in classes]
    patch = ("kubectl patch storageclass {} -p '{{\"metadata\":{{\"annotations\":{{\"storageclass.kubernetes.io/"
             "is-default-class\":\"true\"}}}}}}'")
    if names:
        return [Check("storage", "default StorageClass", FAIL, f"none of {', '.join(names)} is the default: "
                      f"{PVCS_OF_MANIFESTS} name no class and would stay Pending", patch.format(names[0]))]
    return [Check("storage", "default StorageClass", FAIL, f"no StorageClass at all: {PVCS_OF_MANIFESTS} would "
                  "stay Pending", "install a storage provisioner (CSI driver), then " + patch.format("<class>"))]


# -- S3 --------------------------------------------------------------------------------------

_S3_URL = re.compile(r"s3://[^\s,;'\"]+")


def s3_urls(cfg: RunConfig) -> list[tuple[str, str]]:
    """(dotted config path, URL) of every s3:// URL in the config."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, str):
            out.extend((path, url) for url in _S3_URL.findall(value))

    walk(cfg.model_dump(mode="json"), "")
    return out


def _written_prefixes(cfg: RunConfig) -> list[str]:
    """URLs the run writes before it reads them: the workdir, staged weights, prepared and labelled datasets."""
    out = [cfg.workdir, cfg.weights.url or ""]
    for ds in cfg.data.datasets.values():
        out += [ds.url if ds.input else "", ds.labelled or ""]
    return [u.rstrip("/") for u in out if u.startswith("s3://")]


def _bucket(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def check_buckets(cfg: RunConfig) -> list[Check]:
    """The S3 endpoint answers with the configured credentials ($access_key_env / $secret_key_env of this
    shell), and every bucket the config names exists, except those the run creates itself."""
    from versavit import storage

    out: list[Check] = []
    if not storage.is_remote(cfg.workdir):
        out.append(Check("S3", "workdir", FAIL, f"workdir {cfg.workdir} is a local path: the cluster's pods cannot "
                         "reach it", "set workdir=s3://<bucket>/<prefix>"))
    buckets: dict[str, list[str]] = {}
    for path, url in s3_urls(cfg):
        buckets.setdefault(_bucket(url), []).append(path)
    if not buckets:
        return out
    endpoint = storage.s3_endpoint(cfg.storage)
    if not endpoint:
        return out + [Check("S3", "endpoint", FAIL, "no S3 endpoint configured", "set storage.s3_endpoint_url "
                            "(the in-cluster MinIO of manifests/base: http://minio.versavit:9000)")]
    key_env, secret_env = cfg.storage.access_key_env, cfg.storage.secret_key_env
    unset = [e for e in (key_env, secret_env) if not os.environ.get(e)]
    if unset:
        return out + [Check("S3", f"credentials for {_redact(endpoint)}", FAIL, f"${' and $'.join(unset)} not set in "
                            "this shell", f"export {key_env}=... {secret_env}=... (MinIO's credentials, as in the "
                            f"secret of launch.secret_env)")]
    written = _written_prefixes(cfg)
    client = storage._minio_client(cfg.storage)
    for bucket, paths in sorted(buckets.items()):
        shown = ", ".join(paths[:3]) + (f" +{len(paths) - 3} more" if len(paths) > 3 else "")
        name = f"bucket s3://{bucket}"
        try:
            exists = client.bucket_exists(bucket)
        except Exception as exc:
            err = storage.describe_error(f"s3://{bucket}", exc)
            fix = {"auth": f"export {key_env} and {secret_env} with MinIO's credentials (those of the secret the "
                           "pods read)",
                   "unreachable": "check storage.s3_endpoint_url; outside the cluster: kubectl -n versavit "
                                  "port-forward svc/minio 9000:9000 and storage.s3_endpoint_url=http://127.0.0.1:9000"
                   }.get(err.kind, "check storage.s3_endpoint_url and the credentials")
            out.append(Check("S3", name, FAIL, str(err), fix))
            if err.fatal:  # every other bucket fails the same way
                break
            continue
        if exists:
            out.append(Check("S3", name, OK, f"reachable at {_redact(endpoint)} ({shown})"))
            continue
        read_first = [p for p, u in s3_urls(cfg) if _bucket(u) == bucket
                      and not any(u.rstrip("/") == w or u.startswith(w + "/") for w in written)]
        if cfg.storage.create_buckets and not read_first:
            out.append(Check("S3", name, OK, f"absent: the run creates it (storage.create_buckets) ({shown})"))
        else:
            why = f"read by {', '.join(read_first[:3])}" if read_first else "storage.create_buckets is false"
            out.append(Check("S3", name, FAIL, f"does not exist at {_redact(endpoint)} ({why})",
                             f"aws --endpoint-url {_redact(endpoint)} s3 mb s3://{bucket} (and upload its data)"))
    return out


# -- MLflow ----------------------------------------------------------------------------------


def check_mlflow(cfg: RunConfig) -> Check:
    """GET <tracking.uri>/health, then one REST call (experiments/get-by-name) with the MLflow credentials of this
    shell (MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN), as the stages will."""
    import requests

    uri = cfg.tracking.uri
    if not cfg.tracking.enabled:
        return Check("MLflow", "tracking", OK, "tracking.enabled is false: nothing to reach")
    local = not uri or "://" not in uri or uri.split("://", 1)[0] in ("file", "sqlite")
    if local:
        return Check("MLflow", "tracking.uri", FAIL, f"{uri or 'unset (a SQLite file in the workdir)'}: the cluster's "
                     "pods need the MLflow server", "set tracking.uri=http://mlflow.versavit:5000 "
                     "(manifests/base/mlflow.yaml)")
    if not uri.startswith(("http://", "https://")):
        return Check("MLflow", "tracking.uri", UNKNOWN, f"{_redact(uri)}: only http(s) servers are checked",
                     "mlflow experiments search")
    base = uri.rstrip("/")
    shown = _redact(base)
    fix = ("check tracking.uri and that MLflow runs (kubectl -n versavit rollout status deploy/mlflow); outside the "
           "cluster: kubectl -n versavit port-forward svc/mlflow 5000:5000 and tracking.uri=http://127.0.0.1:5000")
    try:
        health = requests.get(f"{base}/health", timeout=TIMEOUT_S / 2)
    except Exception as exc:
        return Check("MLflow", shown, FAIL, f"not reachable: {type(exc).__name__}", fix)
    if health.status_code != 200:
        return Check("MLflow", shown, FAIL, f"/health answered HTTP {health.status_code}", fix)
    auth: Any = None
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    try:
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                   params={"experiment_name": cfg.tracking.experiment}, auth=auth, headers=headers,
                   timeout=TIMEOUT_S / 2)
    except Exception as exc:
        return Check("MLflow", shown, FAIL, f"/health answered, the REST API did not: {type(exc).__name__}", fix)
    if resp.status_code in (401, 403):
        return Check("MLflow", shown, FAIL, f"the REST API refused this shell's credentials (HTTP {resp.status_code})",
                     "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (MLflow's basic auth)")
    if resp.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in resp.text:
        return Check("MLflow", shown, OK, f"healthy; experiment {cfg.tracking.experiment!r} is created by the first "
                     "run")
    if resp.status_code != 200:
        return Check("MLflow", shown, FAIL, f"the REST API answered HTTP {resp.status_code}", fix)
    return Check("MLflow", shown, OK, f"healthy; experiment {cfg.tracking.experiment!r} exists")


# --------------------------------------------------------------------------------------------
# the report


def print_report(checks: list[Check], console: Any) -> None:
    """A table of the checks, then one line per ✗ with its fix and per ? with how to verify it."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="cluster check", show_lines=False)
    for col in ("", "area", "check", "result"):
        table.add_column(col, overflow="fold")
    for c in checks:
        style = STYLES[c.status]
        table.add_row(f"[{style}]{SYMBOLS[c.status]}[/{style}]", escape(c.area), escape(c.name), escape(c.detail))
    console.print(table)
    for c in checks:
        if c.fix and c.status != OK:
            style = STYLES[c.status]
            verb = "fix" if c.failed else "verify"
            console.print(f"[{style}]{SYMBOLS[c.status]}[/{style}] {escape(c.area)} {escape(c.name)}: {verb}: "
                          f"{escape(c.fix)}", soft_wrap=True, highlight=False)
    counts = Counter(c.status for c in checks)
    console.print(f"{len(checks)} checks: {counts[OK]} {SYMBOLS[OK]}, {counts[FAIL]} {SYMBOLS[FAIL]}, "
                  f"{counts[UNKNOWN]} {SYMBOLS[UNKNOWN]}", highlight=False)
