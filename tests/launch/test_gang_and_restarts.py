"""Gang scheduling and fault tolerance in the generated jobs (issue 13, items 2 and 3), validated against the
vendored CRDs; the launcher's transient / permanent classification of a failed job, shown in its message, the
permanent-failure record that stops a KFP retry, and the schedule timeout."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_stub import KubeApiStub, Step
from launch_helpers import ROOT, cluster_overrides, strict, validate_crd

from versavit import storage
from versavit.config import ConfigError, RunConfig, load_config
from versavit.launch import (
    JobFailed,
    LaunchError,
    PyTorchJobLauncher,
    build_pytorchjob,
    build_trainjob,
    faults,
)
from versavit.launch.errors import TransientJobFailed, TransientLaunchError
from versavit.launch.scheduling import runtime_pod_group_policy

URL = "s3://versavit/runs/paper/launch/multitask/job.yaml"
GANG = ["launch.scheduling.queue=research", "launch.scheduling.priority_class=training-high",
        "launch.scheduling.schedule_timeout_s=900"]


def paper(*overrides: str) -> RunConfig:
    return load_config(ROOT / "configs/paper.yaml", list(overrides))


def pods_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


# --------------------------------------------------------------------------------------------
# gang scheduling


def test_volcano_pytorchjob() -> None:
    job = build_pytorchjob(paper("launch.scheduling.kind=volcano", *GANG), "multitask", URL, name="j")
    validate_crd(job, "PyTorchJob")
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 16, "queue": "research",
                                                            "priorityClass": "training-high",
                                                            "scheduleTimeoutSeconds": 900}
    for template in pods_of(job):  # Master and Workers
        assert template["spec"]["schedulerName"] == "volcano"
        assert template["spec"]["priorityClassName"] == "training-high"
        assert not any(k.startswith("kueue.x-k8s.io/") for k in template["metadata"]["labels"])


def test_coscheduling_pytorchjob_and_trainjob_runtime() -> None:
    cfg = paper("launch.scheduling.kind=coscheduling", "launch.scheduling.priority_class=training-high",
                "launch.scheduling.schedule_timeout_s=600")
    job = build_pytorchjob(cfg, "multitask", URL, name="j")
    validate_crd(job, "PyTorchJob")
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 16, "priorityClass": "training-high",
                                                            "scheduleTimeoutSeconds": 600}
    assert {t["spec"]["schedulerName"] for t in pods_of(job)} == {"scheduler-plugins-scheduler"}
    # TrainJob: the runtime carries it; the README's patch is exactly this stanza, and the patched runtime is valid
    policy = runtime_pod_group_policy(cfg)
    assert policy == {"coscheduling": {"scheduleTimeoutSeconds": 600}}
    readme = (ROOT / "manifests/README.md").read_text()
    patch = yaml.safe_load(re.search(r"```yaml\n(patches:\n  - target: \{kind: TrainingRuntime.*?)```", readme,
                                     re.S).group(1))["patches"][0]
    assert yaml.safe_load(patch["patch"])[0]["value"] == policy
    runtime = yaml.safe_load((ROOT / "manifests/components/trainer-runtime/trainingruntime.yaml").read_text())
    runtime["kind"] = "ClusterTrainingRuntime"
    runtime["spec"]["podGroupPolicy"] = policy
    crd = yaml.load((ROOT / "manifests/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = strict(copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    jsonschema.validators.validator_for(schema)(schema).validate(runtime)  # (the CRD's own schema: not re-checked)


@pytest.mark.parametrize("builder,kind", [(build_pytorchjob, "PyTorchJob"), (build_trainjob, "TrainJob")])
def test_kueue_labels_the_job_only(builder: Callable[..., dict[str, Any]], kind: str) -> None:
    cfg = paper("launch.scheduling.kind=kueue", "launch.scheduling.queue=team-a-gpus",
                "launch.scheduling.priority_class=high", *(["launch.backend=trainjob"] if kind == "TrainJob" else []))
    job = builder(cfg, "multitask", URL, name="j")
    validate_crd(job, kind)
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a-gpus" and labels["kueue.x-k8s.io/priority-class"] == "high"
    # never on the pods (Kueue's pod integration would manage them one by one) nor on the derived JobSet
    inner = json.dumps(job["spec"])
    assert "kueue.x-k8s.io" not in inner
    if kind == "PyTorchJob":
        assert "schedulingPolicy" not in job["spec"]["runPolicy"]
        assert not any("schedulerName" in t["spec"] or "priorityClassName" in t["spec"] for t in pods_of(job))


def test_trainjob_refuses_volcano_and_configs_are_checked() -> None:
    with pytest.raises(LaunchError, match="podGroupPolicy.coscheduling"):
        build_trainjob(paper("launch.backend=trainjob", "launch.scheduling.kind=volcano"), "multitask", URL)
    with pytest.raises(ConfigError, match="kind kueue needs queue"):
        paper("launch.scheduling.kind=kueue")
    with pytest.raises(ConfigError, match="queue is for kind volcano or kueue"):
        paper("launch.scheduling.kind=coscheduling", "launch.scheduling.queue=q")
    # none: nothing added (the default)
    job = build_pytorchjob(paper(), "multitask", URL, name="j")
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert not any("schedulerName" in t["spec"] for t in pods_of(job))


# --------------------------------------------------------------------------------------------
# elastic restarts


def test_multi_node_pytorchjob_is_elastic() -> None:
    job = build_pytorchjob(paper("launch.max_restarts=5"), "multitask", URL, name="vp-multitask-a1b2c3")
    validate_crd(job, "PyTorchJob")
    assert job["spec"]["elasticPolicy"] == {
        "minReplicas": 16, "maxReplicas": 16, "rdzvBackend": "c10d", "rdzvHost": "vp-multitask-a1b2c3-master-0",
        "rdzvPort": 23456, "rdzvId": "vp-multitask-a1b2c3", "maxRestarts": 5,
        "rdzvConf": [{"key": "join_timeout", "value": "1800"}]}
    for template in pods_of(job):
        cmd = " ".join(template["spec"]["containers"][0]["command"])
        assert "--nnodes 16 --nproc-per-node 8 --rdzv-backend c10d --max-restarts 5 -m versavit.train.entry" in cmd
        assert template["spec"]["containers"][0]["ports"] == [
            {"containerPort": 23456, "name": "pytorchjob-port", "protocol": "TCP"}]  # the rendezvous port, Workers too
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a rejoining node's rendezvous (pytorchjob.py)
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3


def test_single_node_and_trainjob_rendezvous() -> None:
    tiny = load_config(ROOT / "configs/tiny.yaml", cluster_overrides("pytorchjob"))
    job = build_pytorchjob(tiny, "warmup", URL)
    assert "elasticPolicy" not in job["spec"]  # the operator's webhook requires a Worker for one
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in {e["name"] for e in env}
    cmd = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--nproc-per-node") + 2:cmd.index("-m", 3)] == ["--standalone", "--max-restarts", "3"]
    trainjob = build_trainjob(paper("launch.backend=trainjob"), "multitask", URL)
    validate_crd(trainjob, "TrainJob")
    command = trainjob["spec"]["trainer"]["command"]
    assert "--max-restarts" in command and command[command.index("--max-restarts") + 1] == "0"
    assert "--rdzv-backend" not in command


# --------------------------------------------------------------------------------------------
# classification and the permanent-failure record


def evicted_pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j-worker-3"}, "status": {"phase": "Failed", **status}}


@pytest.mark.parametrize("pod,transient,words", [
    (evicted_pod(reason="Evicted", message="The node was low on resource: memory."), True, "Evicted"),
    (evicted_pod(reason="Terminated", message="Pod was terminated in response to imminent node shutdown."), True,
     "node shutdown"),
    (evicted_pod(conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                              "message": "preempted by a higher priority pod"}]), True, "PreemptionByScheduler"),
    (evicted_pod(containerStatuses=[{"name": "pytorch", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]),
     True, "ImagePullBackOff"),
    (evicted_pod(containerStatuses=[{"name": "pytorch", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]),
     False, "Error, exit code 1"),
    (evicted_pod(containerStatuses=[{"name": "pytorch", "lastState": {"terminated": {"exitCode": 137,
                                                                                     "reason": "OOMKilled"}}}]),
     False, "OOMKilled"),
    (evicted_pod(), False, "no sign of eviction"),
])
def test_classify_pods(pod: dict[str, Any], transient: bool, words: str) -> None:
    verdict = faults.classify_pods([pod])
    assert verdict.transient is transient and words in verdict.reason
    assert verdict.tag().startswith("[transient:" if transient else "[permanent:")


def _launcher(kube_config: Any, status: list[str] | None = None, **kw: Any) -> PyTorchJobLauncher:
    return PyTorchJobLauncher(client_configuration=kube_config, poll_interval_s=0.02, timeout_s=30,
                              log_sink=lambda line: None, status_sink=(status if status is not None else []).append,
                              **kw)


def test_a_job_failed_by_node_loss_is_transient_and_retried(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cluster_cfg("pytorchjob")
    monkeypatch.setenv("KFP_RUN_ID", "run-node-lost")
    lost = [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
             "message": "Taint manager: deleting due to NoExecute taint"}]
    failed = {"type": "Failed", "reason": "PyTorchJobFailed", "message": "job failed: backoff limit"}
    kube.steps = [Step(["Created"]), Step(["Created", "Running"], "Running"),
                  Step(["Created", failed], "Failed", {"terminated": {"exitCode": 143, "reason": "Error"}},
                       pod_conditions=lost)]
    with pytest.raises(TransientJobFailed) as err:
        _launcher(kube_config).launch(cfg, "multitask")
    assert isinstance(err.value, JobFailed) and err.value.transient
    assert "[transient: pod " in str(err.value) and "DeletionByTaintManager" in str(err.value)
    assert not storage.exists(faults.record_url(cfg, "multitask", "", "run-node-lost"))  # nothing stops a retry
    kube.steps, kube.on_get = [Step(["Created"]), Step(["Created", "Succeeded"], "Succeeded",
                                                       {"terminated": {"exitCode": 0, "reason": "Completed"}})], None
    assert _launcher(kube_config).launch(cfg, "multitask").outputs["stage"] == "multitask"  # the retry runs


def test_a_code_error_is_permanent_and_the_retry_does_not_run_it(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cluster_cfg("pytorchjob")
    monkeypatch.setenv("KFP_RUN_ID", "run-code-error")
    failed = {"type": "Failed", "reason": "PyTorchJobFailed", "message": "1 Master replica(s) failed"}
    kube.steps = [Step(["Created"]), Step(["Created", failed], "Failed",
                                          {"terminated": {"exitCode": 1, "reason": "Error",
                                                          "message": "ValueError: bad shard"}}, restart_count=3)]
    status: list[str] = []
    with pytest.raises(JobFailed) as err:
        _launcher(kube_config, status).launch(cfg, "multitask")
    assert not err.value.transient and not isinstance(err.value, TransientLaunchError)
    message = str(err.value)
    assert "[permanent: container pytorch of pod" in message and "Error, exit code 1" in message
    url = faults.record_url(cfg, "multitask", "", "run-code-error")
    assert json.loads(storage.read_text(url))["message"] == message
    assert any("permanent failure recorded" in s for s in status)

    before = list(kube.requests)
    with pytest.raises(LaunchError) as again:  # the KFP retry of the same run
        _launcher(kube_config).launch(cfg, "multitask")
    assert str(again.value).startswith(message) and "does not run the job again" in str(again.value)
    assert kube.requests == before and len(kube.created) == 1  # nothing created, nothing asked
    monkeypatch.setenv("KFP_RUN_ID", "another-run")  # a new run of the pipeline is not stopped by it
    kube.steps = [Step(["Created"]), Step(["Created", "Succeeded"], "Succeeded",
                                          {"terminated": {"exitCode": 0, "reason": "Completed"}})]
    _launcher(kube_config).launch(cfg, "multitask")


@pytest.mark.parametrize("reason,transient", [("ImagePullBackOff", True), ("CreateContainerConfigError", False)])
def test_stuck_pods_are_classified(reason: str, transient: bool, kube: KubeApiStub, kube_config: Any,
                                   cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("pytorchjob")
    kube.steps = [Step(["Created"]), Step(["Created"], "Pending", {"waiting": {"reason": reason, "message": "x"}})]
    with pytest.raises(JobFailed) as err:
        _launcher(kube_config, stuck_grace_s=0.05).launch(cfg, "multitask")
    assert err.value.transient is transient
    assert ("[transient: " if transient else "[permanent: ") + reason in str(err.value)


def test_a_job_not_scheduled_in_time_is_deleted_as_transient(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("pytorchjob")
    cfg = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={
        "scheduling": cfg.launch.scheduling.model_copy(update={"schedule_timeout_s": 1})})})
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]
    kube.steps = [Step(["Created"]), Step(["Created"], "Pending", {"waiting": {"reason": "ContainerCreating"}},
                                          pod_conditions=unschedulable)]
    with pytest.raises(TransientLaunchError) as err:
        _launcher(kube_config).launch(cfg, "multitask")
    message = str(err.value)
    assert "0 of 1 pod(s) running at launch.scheduling.schedule_timeout_s" in message
    assert "[transient: not scheduled in time" in message and "Insufficient nvidia.com/gpu" in message
    assert len(kube.deleted) == 1 and kube.objects == {}


def test_a_retry_deletes_the_job_its_dead_predecessor_left_running(
        kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's pod was evicted mid-run: its job runs on (the evicted pod object stays, so does the owner).
    The KFP retry holds the stage's lease, deletes that job (same run, stage, variant, KFP run), then creates
    its own; a sibling variant's job and another run's are left alone."""
    from versavit.launch.base import job_labels

    cfg = cluster_cfg("pytorchjob")

    def job(name: str, variant: str = "", run_id: str = "run-evicted") -> tuple[str, str, str]:
        monkeypatch.setenv("KFP_RUN_ID", run_id)
        kube.objects[("pytorchjobs", "versavit", name)] = {
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": "versavit", "labels": job_labels(cfg, "multitask", variant)}}
        return ("pytorchjobs", "versavit", name)

    left, sibling, other = job("tiny-multitask-old111"), job("tiny-multitask-all-222", "all"), job("x", "", "run-2")
    monkeypatch.setenv("KFP_RUN_ID", "run-evicted")
    kube.steps = [Step(["Created"]), Step(["Created", "Succeeded"], "Succeeded",
                                          {"terminated": {"exitCode": 0, "reason": "Completed"}})]
    status: list[str] = []
    _launcher(kube_config, status).launch(cfg, "multitask")
    assert kube.deleted == [left] and sibling in kube.objects and other in kube.objects
    assert any("tiny-multitask-old111: left running by an earlier attempt of KFP run run-evicted" in s for s in status)


@pytest.mark.parametrize("phase,taken", [("Failed", True), ("Running", False)])
def test_a_retry_takes_over_the_lease_of_its_evicted_predecessor(
        phase: str, taken: bool, kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The evicted step pod's lease is not renewed but not yet expired (10 min): the retry's launcher reads the
    holder, a pod of its namespace; ended (Failed, as an evicted pod stays) -> taken over; running -> held."""
    import time as _time

    from versavit.layout import lease_url
    from versavit.train.lease import LeaseHeldError

    cfg = cluster_cfg("pytorchjob")
    monkeypatch.setenv("VERSAVIT_POD_NAMESPACE", "versavit")
    monkeypatch.setenv("VERSAVIT_POD_NAME", "step-attempt-2")
    monkeypatch.setenv("VERSAVIT_POD_UID", "uid-2")
    kube.add_pod("versavit", "step-attempt-1", "uid-1", phase=phase)
    kube.add_pod("versavit", "step-attempt-2", "uid-2")
    now = _time.time()
    storage.write_text(lease_url(cfg, "multitask"), json.dumps(
        {"host": "step-attempt-1", "pid": 7, "since": now - 60, "renewed": now - 30, "expires_s": 600, "token": "t1"}))
    kube.steps = [Step(["Created"]), Step(["Created", "Succeeded"], "Succeeded",
                                          {"terminated": {"exitCode": 0, "reason": "Completed"}})]
    status: list[str] = []
    if taken:
        _launcher(kube_config, status).launch(cfg, "multitask")
        assert any("held by pod versavit/step-attempt-1, which has ended (Failed): taking it over" in s
                   for s in status)
        assert len(kube.created) == 1 and not storage.exists(lease_url(cfg, "multitask"))
    else:
        with pytest.raises(LeaseHeldError, match="step-attempt-1"):
            _launcher(kube_config, status).launch(cfg, "multitask")
        assert kube.created == []
