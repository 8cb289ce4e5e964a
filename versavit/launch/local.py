"""Local launcher: `torchrun --nproc_per_node N -m versavit.train.entry` on this machine.

Each rank's output goes to its own log file (and rank 0's to the console). If a rank dies, the
launcher raises one `LaunchError` naming the rank, how it ended, and the last lines of its log;
torchrun stops the other ranks, so nothing hangs.

No orphaned ranks: torchrun gets SIGTERM from the kernel when the launcher dies, even by SIGKILL
(`lifeline.die_with_parent_preexec`), and each rank ends with torchrun (`lifeline.follow_parent`).
SIGTERM or SIGHUP to the launcher (and Ctrl-C) is passed on to torchrun as SIGTERM, which the
launcher then waits for (`STOP_GRACE_S`, then SIGKILL) before it exits (128 + the signal number).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from versavit import storage
from versavit.config import RunConfig, config_to_dict
from versavit.launch.base import Launcher, LaunchResult
from versavit.launch.errors import LaunchError
from versavit.layout import lease_url, reports_dir, run_name, stage_manifest_url, stage_url
from versavit.train import lease, lifeline, resume

STOP_GRACE_S = 8.0  # how long a stopped launcher waits for torchrun to stop its ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    keep = [ln for ln in text if ln.strip() and "Warning" not in ln][-lines:]
    return "\n".join("    " + ln for ln in keep) or "(empty log)"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def failure_report(stage: str, log_dir: Path, torchrun_output: str) -> str:
    """Which ranks failed, how, and the tail of each one's log."""
    failed = re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*exitcode\s*:\s*(-?\d+)", torchrun_output)
    if not failed:
        return f"stage {stage!r} failed before any rank reported (torchrun output):\n" + \
            "\n".join("    " + ln for ln in torchrun_output.strip().splitlines()[-15:])
    parts = [f"stage {stage!r} failed:"]
    for rank, code in dict(failed).items():
        logs = sorted(log_dir.rglob(f"attempt_*/{rank}/stderr.log"))
        where = logs[-1] if logs else "-"
        parts.append(f"  rank {rank}: {_describe_exit(int(code))}; last lines of its log ({where}):")
        parts.append(_tail(logs[-1]) if logs else "    (no log)")
    return "\n".join(parts)


def write_resolved_config(cfg: RunConfig, stage: str, variant: str = "") -> Path:
    """The exact config every rank loads (no credentials: the schema holds only env var names)."""
    path = reports_dir(cfg, run_name(stage, variant)) / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def launch_local(cfg: RunConfig, stage: str, env: dict[str, str] | None = None,
                 stream_output: bool = True, variant: str = "") -> dict[str, Any]:
    """Run `stage` under torchrun with `cfg.launch.nproc_per_node` processes; return its stage.json.

    This process holds the stage folder's lease (`versavit.train.lease`) while torchrun runs: a second
    launch on the same stage fails at once naming the holder. A checkpoint made under another config
    fails here too (`resume.check_resumable`), before torchrun starts; the ranks check it again.
    """
    with lease.hold(lease_url(cfg, stage, variant)):
        if not cfg.train.restart:
            resume.check_resumable(storage.join(stage_url(cfg, stage, variant), "checkpoints"), cfg)
        return _launch_local(cfg, stage, env, stream_output, variant)


def _launch_local(cfg: RunConfig, stage: str, env: dict[str, str] | None, stream_output: bool,
                  variant: str) -> dict[str, Any]:
    name = run_name(stage, variant)
    config_path = write_resolved_config(cfg, stage, variant)
    log_dir = reports_dir(cfg, name) / "logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    nproc = cfg.launch.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0",
           "--log-dir", str(log_dir), "--redirects", "3", "--tee", "0:3" if stream_output else "0",
           "-m", "versavit.train.entry", "--stage", stage, "--config", str(config_path), "--variant", variant]
    run_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))), "PYTHONUNBUFFERED": "1",
        lifeline.LAUNCHER_PID_ENV: str(os.getpid())}
    captured: list[str] = []
    with _signals_exit():  # before the Popen: a SIGTERM from now on still stops torchrun
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lifeline.die_with_parent_preexec())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                captured.append(line)
                if stream_output and not _is_noise(line):
                    sys.stderr.write(line)
            code = proc.wait()
        finally:
            _stop(proc)
    if code != 0:
        raise LaunchError(failure_report(name, log_dir, "".join(captured[-400:])))
    return json.loads(storage.read_text(stage_manifest_url(cfg, stage, variant)))


@contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM / SIGHUP raise SystemExit(128 + signum) here (main thread only), so `_stop` runs; once:
    a repeated signal does not cut `_stop` short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not raised:
            raised.append(signum)
            raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a still running torchrun: SIGTERM (it stops its ranks), SIGKILL after `STOP_GRACE_S`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=STOP_GRACE_S)  # drained meanwhile: a full pipe would block its shutdown
    except subprocess.TimeoutExpired:
        proc.kill()  # its ranks get SIGTERM from the kernel (PDEATHSIG) and stop themselves
        proc.wait()


_NOISE = ("Warning", "warnings.warn", "[W", "*****", "Setting OMP_NUM_THREADS", "real_accelerator",
          "torch.distributed.run", "deepspeed_shm_comm_op", "return func(")


def _is_noise(line: str) -> bool:
    return any(s in line for s in _NOISE)


class LocalLauncher(Launcher):
    """torchrun on this machine (`launch_local`); it writes and uses its own resolved config copy."""

    backend = "local"

    def __init__(self, stream_output: bool = True):
        self.stream_output = stream_output

    def launch(self, cfg: RunConfig, stage: str, config_url: str | None = None,
               env: dict[str, str] | None = None, variant: str = "") -> LaunchResult:
        start = time.monotonic()
        outputs = launch_local(cfg, stage, env=env, stream_output=self.stream_output, variant=variant)
        return LaunchResult("local", stage, outputs, elapsed_s=time.monotonic() - start)
