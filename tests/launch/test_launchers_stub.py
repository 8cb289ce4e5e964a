"""The cluster launchers against an HTTP stub of the Kubernetes API: success with the master's log
streamed, failure with the job's own reason, timeout and cancel (job deleted), for both backends; the
stage lease held (and renewed) while the job runs, released however it ends, refusing a second launch."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_stub import KubeApiStub, Step
from launch_helpers import crd_schema

from versavit import storage
from versavit.config import RunConfig
from versavit.launch import JobFailed, LaunchError, LaunchTimeout, PyTorchJobLauncher, TrainJobLauncher
from versavit.layout import lease_url
from versavit.train import lease
from versavit.train.lease import LeaseHeldError

BACKENDS = {"pytorchjob": (PyTorchJobLauncher, "PyTorchJob", "pytorchjobs", "pytorch"),
            "trainjob": (TrainJobLauncher, "TrainJob", "trainjobs", "node")}
POLL = 0.02
LOG = "[rank 0] INFO versavit.train: step 1/60 loss 2.31\n[rank 0] INFO versavit.train: step 60/60 loss 0.87\ndone"


def success_steps(backend: str) -> list[Step]:
    done = "Succeeded" if backend == "pytorchjob" else "Complete"
    return [Step(["Created"]), Step(["Created"], "Pending", {"waiting": {"reason": "ContainerCreating"}}),
            Step(["Created", "Running"], "Running"),
            Step(["Created", done], "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}})]


def failure_steps() -> list[Step]:
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                          "message": "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory. "
                                     "Tried to allocate 2.00 GiB"}}
    failed = {"type": "Failed", "reason": "JobFailed", "message": "1 Master replica(s) failed after 3 restarts"}
    return [Step(["Created"]), Step(["Created", "Running"], "Running"),
            Step(["Created", failed], "Failed", oom, restart_count=3)]


def make_launcher(backend: str, kube_config: Any, lines: list[str], status: list[str], **kw: Any) -> Any:
    cls = BACKENDS[backend][0]
    return cls(client_configuration=kube_config, log_sink=lines.append, status_sink=status.append,
               **{"poll_interval_s": POLL, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
def test_success_streams_master_log(backend: str, kube: KubeApiStub, kube_config: Any,
                                    cluster_cfg: Callable[..., RunConfig]) -> None:
    _, kind, plural, container = BACKENDS[backend]
    cfg = cluster_cfg(backend)
    kube.steps, kube.log_text = success_steps(backend), LOG
    lines: list[str] = []
    status: list[str] = []
    result = make_launcher(backend, kube_config, lines, status, timeout_s=30).launch(cfg, "multitask")

    assert result.outputs == {"stage": "multitask", "steps": 60}  # the stage.json the pods wrote
    assert result.backend == backend and result.namespace == "versavit"
    assert lines == LOG.splitlines()  # the master's log, line by line
    (query,) = kube.log_requests
    assert query["container"] == [container] and query["follow"][0].lower() == "true"
    assert kube.deleted == []  # a finished job stays for inspection (TTL / cleanPodPolicy clean up)
    assert any("Running" in s for s in status) and any("created" in s for s in status)
    # what reached the API server is a valid object that names the published config
    (created,) = kube.created
    jsonschema.validate(created, crd_schema(kind))
    assert created["metadata"]["name"] == result.job_name
    assert result.config_url and result.config_url in str(created["spec"])
    published = yaml.safe_load(storage.read_text(result.config_url))
    assert published["name"] == cfg.name and published["launch"]["backend"] == backend
    assert ("POST", f"/apis/{created['apiVersion']}/namespaces/versavit/{plural}") in kube.requests


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_carries_the_jobs_reason(backend: str, kube: KubeApiStub, kube_config: Any,
                                         cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg(backend)
    kube.steps, kube.log_text = failure_steps(), LOG
    launcher = make_launcher(backend, kube_config, [], [], timeout_s=30)
    with pytest.raises(JobFailed) as err:
        launcher.launch(cfg, "multitask")
    msg = str(err.value)
    assert "1 Master replica(s) failed after 3 restarts" in msg  # the failed condition
    assert "OOMKilled, exit code 137" in msg and "(restarts: 3)" in msg  # the container's end
    assert "CUDA out of memory" in msg  # its termination message (log tail on error)
    assert isinstance(err.value, LaunchError)
    assert not storage.exists(lease_url(cfg, "multitask"))  # released on failure


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_without_termination_message_shows_log_tail(backend: str, kube: KubeApiStub, kube_config: Any,
                                                            cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg(backend)
    steps = failure_steps()
    steps[-1].container_state = {"terminated": {"exitCode": 1, "reason": "Error"}}
    kube.steps, kube.log_text = steps, "loading shards\nValueError: bad shard s3://x/0001.tar"
    with pytest.raises(JobFailed, match=r"(?s)exit code 1.*last lines of the master's log.*bad shard"):
        make_launcher(backend, kube_config, [], [], timeout_s=30).launch(cfg, "multitask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_deletes_the_job(backend: str, kube: KubeApiStub, kube_config: Any,
                                 cluster_cfg: Callable[..., RunConfig]) -> None:
    _, kind, plural, _ = BACKENDS[backend]
    cfg = cluster_cfg(backend)
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]
    kube.steps = [Step(["Created"]), Step(["Created"], "Pending", {"waiting": {"reason": "ContainerCreating"}},
                                          pod_conditions=unschedulable)]
    launcher = make_launcher(backend, kube_config, [], [], timeout_s=0.3)
    with pytest.raises(LaunchTimeout) as err:
        launcher.launch(cfg, "multitask")
    msg = str(err.value)
    assert "did not finish within 0.3 s" in msg and "the job was deleted" in msg
    assert "Insufficient nvidia.com/gpu" in msg  # why it never ran
    assert [(p, ns) for p, ns, _ in kube.deleted] == [(plural, "versavit")]
    assert kube.objects == {}
    assert not storage.exists(lease_url(cfg, "multitask"))  # released on timeout


@pytest.mark.parametrize("backend", BACKENDS)
def test_unrecoverable_pending_fails_fast(backend: str, kube: KubeApiStub, kube_config: Any,
                                          cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg(backend)
    missing = {"waiting": {"reason": "CreateContainerConfigError",
                           "message": 'secret "minio-credentials" not found'}}
    kube.steps = [Step(["Created"]), Step(["Created"], "Pending", missing)]
    launcher = make_launcher(backend, kube_config, [], [], timeout_s=30, stuck_grace_s=0.1)
    with pytest.raises(JobFailed, match='cannot start.*secret "minio-credentials" not found'):
        launcher.launch(cfg, "multitask")
    assert len(kube.deleted) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_cancels_and_deletes(backend: str, kube: KubeApiStub, kube_config: Any,
                                     cluster_cfg: Callable[..., RunConfig]) -> None:
    """KFP cancels a step with SIGTERM: the launcher deletes the job, then lets the interrupt through."""
    cfg = cluster_cfg(backend)
    kube.steps = [Step(["Created"]), Step(["Created", "Running"], "Running")]
    kube.on_get = lambda index: index >= 1 and os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    launcher = make_launcher(backend, kube_config, [], [], timeout_s=20)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch(cfg, "multitask")
    assert len(kube.deleted) == 1 and kube.objects == {}
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert not storage.exists(lease_url(cfg, "multitask"))  # released on cancel


def test_keyboard_interrupt_deletes(kube: KubeApiStub, kube_config: Any,
                                    cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("pytorchjob")
    kube.steps = [Step(["Created"]), Step(["Created", "Running"], "Running")]

    def status(msg: str) -> None:
        if msg.endswith(": Running"):
            raise KeyboardInterrupt

    launcher = PyTorchJobLauncher(client_configuration=kube_config, poll_interval_s=POLL, timeout_s=20,
                                  log_sink=lambda line: None, status_sink=status)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch(cfg, "multitask")
    assert len(kube.deleted) == 1


def test_transient_api_errors_are_tolerated(kube: KubeApiStub, kube_config: Any,
                                            cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("trainjob")
    kube.steps, kube.fail_next_gets = success_steps("trainjob"), 2
    result = make_launcher("trainjob", kube_config, [], [], timeout_s=30).launch(cfg, "multitask")
    assert result.outputs["stage"] == "multitask"


def test_job_deleted_elsewhere_is_reported(kube: KubeApiStub, kube_config: Any,
                                           cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("pytorchjob")
    kube.steps = [Step(["Created"]), Step(["Created", "Running"], "Running")]
    kube.on_get = lambda index: index >= 1 and kube.objects.clear()
    with pytest.raises(LaunchError, match="disappeared"):
        make_launcher("pytorchjob", kube_config, [], [], timeout_s=20).launch(cfg, "multitask")


def test_create_refused_explains(kube: KubeApiStub, kube_config: Any, cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg("pytorchjob")
    launcher = make_launcher("pytorchjob", kube_config, [], [], timeout_s=5, job_name="taken-name")
    kube.objects[("pytorchjobs", "versavit", "taken-name")] = {"metadata": {"name": "taken-name"}}
    with pytest.raises(LaunchError, match="exists already"):
        launcher.launch(cfg, "multitask")


def test_local_workdir_is_refused_for_cluster_backends(kube_config: Any) -> None:
    from launch_helpers import ROOT, cluster_overrides

    from versavit.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", cluster_overrides("trainjob"))
    with pytest.raises(LaunchError, match="s3://"):
        TrainJobLauncher(client_configuration=kube_config).launch(cfg, "warmup")


def test_the_stage_lease_is_held_and_renewed_while_the_job_runs(kube: KubeApiStub, kube_config: Any,
                                                                cluster_cfg: Callable[..., RunConfig]) -> None:
    """Taken before the job is created, renewed while it is watched, released at the end; meanwhile a second
    launch of the same stage fails at once naming this one, and creates nothing. (The life cycle is the base
    class's: one backend here, both in the refusal test below.)"""
    backend = "pytorchjob"
    cfg = cluster_cfg(backend)
    url = lease_url(cfg, "multitask")
    steps = success_steps(backend)
    kube.steps = steps[:3] + [steps[2]] * 8 + steps[3:]  # running for 8 polls
    seen: list[dict[str, Any]] = []
    second: list[BaseException] = []

    def on_get(index: int) -> None:
        seen.append(json.loads(storage.read_text(url)))
        if index == 3:
            t0 = time.monotonic()
            try:
                make_launcher(backend, kube_config, [], [], timeout_s=5).launch(cfg, "multitask")
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions below
                second.append(exc)
            seen[-1]["second_s"] = time.monotonic() - t0

    kube.on_get = on_get
    launcher = make_launcher(backend, kube_config, [], [], timeout_s=30, poll_interval_s=0.05, lease_renew_s=0.05)
    launcher.launch(cfg, "multitask")
    assert len(seen) >= 11 and {r["token"] for r in seen} == {seen[0]["token"]}  # one holder throughout: us
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert seen[-1]["renewed"] > seen[0]["renewed"]  # renewed while the job ran
    (refused,) = second
    assert isinstance(refused, LeaseHeldError) and f"pid {os.getpid()}" in str(refused)
    assert "in use by another run" in str(refused) and "\n" not in str(refused)
    refused_s = max(r.get("second_s", 0) for r in seen)
    print(f"\nsecond launch refused after {refused_s:.2f} s: {refused}")
    assert refused_s < 2.0  # at once
    assert len(kube.created) == 1  # the refused launch created no job
    assert not storage.exists(url)  # released at the end


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_held_lease_refuses_the_launch_before_anything_is_created(backend: str, kube: KubeApiStub,
                                                                    kube_config: Any,
                                                                    cluster_cfg: Callable[..., RunConfig]) -> None:
    cfg = cluster_cfg(backend)
    # another run (here: this process) holds the stage
    with lease.hold(lease_url(cfg, "multitask")), pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}"):
        make_launcher(backend, kube_config, [], [], timeout_s=5).launch(cfg, "multitask")
    assert kube.requests == []  # the API server never heard of it
    assert storage.list_files(storage.join(cfg.workdir, "launch", "multitask")) == []  # no config published
