"""A mini training operator: runs a generated PyTorchJob (the dict `build_pytorchjob` returns) on this machine,
the way the Kubeflow Training Operator v1 runs it on a cluster, as far as one machine can.

What it does as the operator does (kubeflow/training-operator, release-1.9, commit 078ec30ff):
- one replica per `pytorchReplicaSpecs` entry and index (Master 0, Worker 0..n-1), named `<job>-<type>-<i>`;
- each replica runs the container's `command` and `args` as written (after Kubernetes' `$(VAR)` expansion), with
  the container's `env` (secretKeyRef values from `secrets`) followed by exactly the variables the operator
  appends: `operator_env` re-implements pkg/controller.v1/pytorch/envvar.go `setPodEnv`, master.go
  `MasterEnvVarGenerator` and elastic.go `ElasticEnvVarGenerator` line by line (PYTHONUNBUFFERED; with a Master:
  MASTER_PORT, PET_MASTER_PORT, MASTER_ADDR, PET_MASTER_ADDR, WORLD_SIZE, RANK, PET_NODE_RANK; PET_NPROC_PER_NODE;
  with an elasticPolicy PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, PET_NNODES="min:max", PET_MAX_RESTARTS, PET_RDZV_ID,
  PET_RDZV_CONF, else PET_NNODES = the replica count);
- `restartPolicy: OnFailure`: a replica whose process exits non-zero (or is killed) is restarted in place, its
  restart count kept; the job fails once the restarts summed over the replicas reach `runPolicy.backoffLimit`
  (pkg/core/job.go `PastBackoffLimit`: `result >= backoffLimit`, or `> 0` when it is 0);
- the job succeeds when the Master succeeds (with no Master: every Worker), and `cleanPodPolicy: Running`
  stops what still runs.

What one machine changes, and only this:
- cluster DNS: the per-replica Services `<job>-<type>-<i>` all resolve to 127.0.0.1, so the operator's host
  names in MASTER_ADDR / PET_MASTER_ADDR / PET_RDZV_ENDPOINT are written as 127.0.0.1;
- pod IPs: each pod has its own IP, here all share one, so the job's container port (`pytorchjob-port`) is
  mapped to a free local port wherever the operator's variables name it;
- the image: `python` is this virtualenv's (a wrapper script first on PATH); the image's own environment is this
  process's (HOME with its caches: DeepSpeed JIT-builds its CPU communication op there, and a different
  environment would rebuild it) without what a launcher, an operator or a secret would set (PET_*,
  TORCHELASTIC_*, MASTER_*, RANK, WORLD_SIZE, VERSAVIT_*, KFP_*, AWS credentials), plus OMP_NUM_THREADS=1;
  the working directory is `workdir` (the repo);
- volumes: each `emptyDir` gets a fresh local folder (`volume_dirs`); a process cannot see it at its
  mountPath without a mount namespace, so /dev/shm is the host's (what the only shipped volume is for);
- the Master starts first and the Workers once its port listens (on a cluster only the master pod's hostname
  matches the rendezvous endpoint, so it hosts the c10d store; here every replica matches 127.0.0.1 and the
  first to bind would host it).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versavit.train import lifeline

_LAUNCH_ENV_PREFIXES = ("PET_", "TORCHELASTIC_", "VERSAVIT_", "KFP_")
_LAUNCH_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"}
CONTAINER, PORT_NAME = "pytorch", "pytorchjob-port"  # kubeflowv1.PyTorchJobDefaultContainerName / PortName
ORDER = ("Master", "Worker")


def replica_name(job: str, rtype: str, index: int) -> str:
    return f"{job}-{rtype.lower()}-{index}".replace("/", "-")  # envvar.go replicaName


def _container(job: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(c for c in job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]
                if c["name"] == CONTAINER)


def _port(job: dict[str, Any], rtype: str) -> int:
    """envvar.go getPortFromPyTorchJob: the `pytorchjob-port` of the `pytorch` container."""
    for port in _container(job, rtype).get("ports") or []:
        if port.get("name") == PORT_NAME:
            return int(port["containerPort"])
    raise ValueError("port not found")


def operator_env(job: dict[str, Any], rtype: str, index: int) -> list[tuple[str, str]]:
    """The variables the operator appends to the container's env of replica (rtype, index), in its order."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    name = job["metadata"]["name"]
    out = [("PYTHONUNBUFFERED", "1")]
    total = sum(int(r["replicas"]) for r in replicas.values())  # getTotalReplicas
    nproc = spec.get("nprocPerNode")
    nproc_int = int(nproc) if nproc is not None and str(nproc).isdigit() else 1  # getNprocPerNodeInt
    if "Master" in replicas:
        port = _port(job, "Master")
        addr = replica_name(name, "Master", 0)
        out += [("MASTER_PORT", str(port)), ("PET_MASTER_PORT", str(port)), ("MASTER_ADDR", addr),
                ("PET_MASTER_ADDR", addr)]
        rank = index + 1 if rtype == "Worker" else index
        out += [("WORLD_SIZE", str(total * nproc_int)), ("RANK", str(rank)), ("PET_NODE_RANK", str(rank))]
    if nproc is not None:
        out.append(("PET_NPROC_PER_NODE", str(nproc)))
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        out.append(("PET_NNODES", str(total)))
        return out
    host = elastic.get("rdzvHost") or f"{name}-worker-0"
    port = elastic.get("rdzvPort") or _port(job, "Worker")
    out.append(("PET_RDZV_ENDPOINT", f"{host}:{port}"))
    out.append(("PET_RDZV_BACKEND", elastic.get("rdzvBackend") or "c10d"))
    if elastic.get("minReplicas") is None and elastic.get("maxReplicas") is None:
        out.append(("PET_NNODES", str(replicas["Worker"]["replicas"])))
    else:
        out.append(("PET_NNODES", f"{elastic['minReplicas']}:{elastic['maxReplicas']}"))
    if elastic.get("maxRestarts") is not None:
        out.append(("PET_MAX_RESTARTS", str(elastic["maxRestarts"])))
    if elastic.get("nProcPerNode") is not None:
        out.append(("PET_NPROC_PER_NODE", str(elastic["nProcPerNode"])))
    if elastic.get("rdzvId") is not None:
        out.append(("PET_RDZV_ID", elastic["rdzvId"]))
    if elastic.get("rdzvConf"):
        out.append(("PET_RDZV_CONF", ",".join(f"{c['key']}={c['value']}" for c in elastic["rdzvConf"])))
    if elastic.get("standalone"):
        out.append(("PET_STANDALONE", ""))
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args ($$ escapes; unknown references stay as written)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    rtype: str
    index: int
    name: str
    env: dict[str, str]
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    succeeded: bool = False


class MiniOperator:
    """Runs one PyTorchJob dict: `start()`, then `wait()` (or `kill(...)` a replica meanwhile)."""

    def __init__(self, job: dict[str, Any], workdir: Path, log_dir: Path,
                 secrets: dict[str, dict[str, str]] | None = None, base_env: dict[str, str] | None = None):
        self.job, self.workdir, self.log_dir = job, Path(workdir), Path(log_dir)
        self.secrets = secrets or {}
        self.name = job["metadata"]["name"]
        self.port = _free_port()  # this job's "pod IP": see the module docstring
        self.volume_dirs: dict[str, Path] = {}
        self.phase = "Created"
        self.message = ""
        self.events: list[str] = []
        self._lock = threading.RLock()
        self.replicas: list[Replica] = []
        # `python` is this virtualenv's, and nothing else of its bin/ is put first on PATH: e.g. its ninja
        # (1.13) keeps a build log other ninjas read as changed, so DeepSpeed's JIT op would be rebuilt in
        # the shared ~/.cache by every process that finds the other ninja
        bin_dir = self.log_dir / "image-bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):  # a script, not a symlink: the venv is found from the path run
            script = bin_dir / name
            script.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
            script.chmod(0o755)
        # the image's own environment: this process's, without anything a launcher or operator sets
        image_env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_ENV_PREFIXES)
                     and k not in _LAUNCH_ENV}
        self.base_env = {**image_env, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "/usr/bin:/bin")]),
                         "OMP_NUM_THREADS": "1", **(base_env or {})}
        for rtype in ORDER:
            spec = job["spec"]["pytorchReplicaSpecs"].get(rtype)
            if spec is None:
                continue
            assert spec.get("restartPolicy") == "OnFailure", "this mini operator implements OnFailure only"
            for index in range(int(spec["replicas"])):
                self.replicas.append(self._replica(rtype, index, spec))

    # -- the pod a replica would be ----------------------------------------------------------
    def _dns(self, value: str) -> str:
        """Service names -> 127.0.0.1, the job's container port -> this job's local port."""
        value = re.sub(rf"\b{re.escape(self.name)}-(master|worker)-\d+\b", "127.0.0.1", value)
        ports = {str(_port(self.job, rtype)) for rtype in ORDER if rtype in self.job["spec"]["pytorchReplicaSpecs"]}
        for port in ports:
            value = re.sub(rf"^{port}$|(?<=:){port}$", str(self.port), value)
        return value

    def _replica(self, rtype: str, index: int, spec: dict[str, Any]) -> Replica:
        pod = spec["template"]["spec"]
        container = _container(self.job, rtype)
        for vol in pod.get("volumes") or []:
            if "emptyDir" in vol and vol["name"] not in self.volume_dirs:
                self.volume_dirs[vol["name"]] = self.log_dir / "volumes" / vol["name"]
                self.volume_dirs[vol["name"]].mkdir(parents=True, exist_ok=True)
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                env[item["name"]] = _expand(item.get("value", ""), env)
        for key, value in operator_env(self.job, rtype, index):
            env[key] = self._dns(value)
        argv = [_expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
        name = replica_name(self.name, rtype, index)
        return Replica(rtype, index, name, env, argv, self.log_dir / f"{name}.log")

    def _spawn(self, rep: Replica) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with rep.log.open("a") as log:
            log.write(f"==== {rep.name} start (restarts: {rep.restarts}) ====\n")
            log.flush()
            # a session of its own: killing the "container" takes torchrun and its ranks, as a cgroup kill does;
            # and it dies with this process (a test that fails or is interrupted leaves nothing running)
            rep.proc = subprocess.Popen(rep.argv, cwd=self.workdir, env={**self.base_env, **rep.env}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=lifeline.die_with_parent_preexec(signal.SIGKILL))
        self.events.append(f"started {rep.name} (restarts {rep.restarts})")

    # -- the controller ------------------------------------------------------------------------
    def start(self, listen_timeout_s: float = 120.0) -> MiniOperator:
        masters = [r for r in self.replicas if r.rtype == "Master"]
        for rep in masters:
            self._spawn(rep)
        if masters and len(self.replicas) > 1:
            end = time.monotonic() + listen_timeout_s
            while not self._listening() and time.monotonic() < end:
                if masters[0].proc is not None and masters[0].proc.poll() is not None:
                    break
                time.sleep(0.1)
        for rep in self.replicas:
            if rep.proc is None:
                self._spawn(rep)
        self.phase = "Running"
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self, rtype: str, index: int, sig: int = signal.SIGKILL) -> Replica:
        """The container of a replica dies (node loss, OOM, a kill): every process of it gets `sig`."""
        rep = next(r for r in self.replicas if (r.rtype, r.index) == (rtype, index))
        assert rep.proc is not None and rep.proc.poll() is None, f"{rep.name} is not running"
        os.killpg(rep.proc.pid, sig)
        self.events.append(f"killed {rep.name} with {signal.Signals(sig).name}")
        return rep

    def _backoff_limit_reached(self) -> bool:
        limit = self.job["spec"].get("runPolicy", {}).get("backoffLimit")
        if limit is None:
            return False
        total = sum(r.restarts for r in self.replicas)
        return total > 0 if limit == 0 else total >= limit

    def reconcile(self) -> str:
        """One pass: restart failed replicas (OnFailure), decide the job's phase."""
        with self._lock:
            for rep in self.replicas:
                if rep.succeeded or rep.proc is None or (code := rep.proc.poll()) is None:
                    continue
                rep.exits.append(code)
                if code == 0:
                    rep.succeeded = True
                    rep.proc = None
                    self.events.append(f"{rep.name} succeeded")
                    continue
                rep.restarts += 1
                self.events.append(f"{rep.name} exited {code}: restart {rep.restarts}")
                if self._backoff_limit_reached():
                    self._finish("Failed", f"{self.name} has reached the specified backoff limit")
                    return self.phase
                self._spawn(rep)
            masters = [r for r in self.replicas if r.rtype == "Master"]
            if (masters and all(r.succeeded for r in masters)) or (not masters and all(r.succeeded for r in
                                                                                       self.replicas)):
                self._finish("Succeeded", "")
            return self.phase

    def _finish(self, phase: str, message: str) -> None:
        self.phase, self.message = phase, message
        for rep in self.replicas:  # cleanPodPolicy Running: what still runs is stopped
            if rep.proc is not None and rep.proc.poll() is None:
                os.killpg(rep.proc.pid, signal.SIGKILL)
                rep.proc.wait()

    def wait(self, timeout_s: float, poll_s: float = 0.1) -> str:
        end = time.monotonic() + timeout_s
        while self.reconcile() == "Running":
            if time.monotonic() > end:
                self._finish("Failed", f"mini operator: not done within {timeout_s:g} s")
                break
            time.sleep(poll_s)
        return self.phase

    def stop(self) -> None:
        if self.phase == "Running":
            self._finish("Failed", "stopped")

    def logs(self) -> str:
        return "\n".join(r.log.read_text(errors="replace") for r in self.replicas if r.log.exists())
