"""Local launcher: `torchrun --nproc_per_node N -m versavit.train.entry` on this machine.

Each rank's output goes to its own log file, and torchrun's own output to `torchrun.log` beside them
(`<reports>/<stage>/logs/<time>/`). The console shows rank 0's log lines and progress, never a traceback
nor torchrun's error summary. If a rank fails, torchrun stops the others; the launcher then raises one
`RankFailed` line naming the rank that failed first with its real cause (from the ranks' failure records,
`versavit.train.failures`; never a rank torchrun stopped afterwards: see `rank_failure`), and where the
logs are. A rank that failed first without a record (killed by a signal) is reported with how it ended
and the last lines of its log.

No orphaned ranks: torchrun gets SIGTERM from the kernel when the launcher dies, even by SIGKILL
(`lifeline.die_with_parent_preexec`), and each rank ends with torchrun (`lifeline.follow_parent`).
SIGTERM or SIGHUP to the launcher (and Ctrl-C) is passed on to torchrun as SIGTERM, which the
launcher then waits for (`STOP_GRACE_S`, then SIGKILL) before it exits (128 + the signal number).
"""

from __future__ import annotations

import collections
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
from versavit.launch.base import Launcher, LaunchResult, entry_module
from versavit.launch.errors import LaunchError, RankFailed
from versavit.layout import lease_url, reports_dir, run_name, stage_manifest_url, stage_url
from versavit.train import failures, lease, lifeline, resume

STOP_GRACE_S = 8.0  # how long a stopped launcher waits for torchrun to stop its ranks
ENTRY_MODULE = "versavit.train.entry"  # what each rank of a training stage runs (`python -m`; base.entry_module)
TORCHRUN_LOG = "torchrun.log"


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


# how torchrun (or the launcher) stops ranks: a rank that ended by one of these signals (or exited 128 + it, as a
# rank's lifeline makes it) was stopped, it did not fail
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOP_CODES = {-int(s) for s in _STOPS} | {128 + int(s) for s in _STOPS}


def _describe_exit(code: int) -> str:
    if code > 128 and code - 128 in {int(s) for s in _STOPS}:
        return f"stopped by {signal.Signals(code - 128).name} (exit code {code})"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*exitcode\s*:\s*(-?\d+)")


def failed_ranks(torchrun_output: str) -> dict[int, int]:
    """rank -> exit code of the ranks torchrun's summary lists as failed: those that ended before it stopped the
    rest, and any it stopped that had ended by the time it looked (`_STOP_CODES`: they did not fail)."""
    return {int(rank): int(code) for rank, code in _FAILED_RANK.findall(torchrun_output)}


def failure_report(stage: str, log_dir: Path, torchrun_output: str) -> str:
    """Which ranks failed, how, and the tail of each one's log."""
    failed = failed_ranks(torchrun_output)
    if not failed:
        return f"stage {stage!r} failed before any rank reported (torchrun output):\n" + \
            "\n".join("    " + ln for ln in torchrun_output.strip().splitlines()[-15:])
    parts = [f"stage {stage!r} failed:"]
    for rank, code in failed.items():
        logs = sorted(log_dir.rglob(f"attempt_*/{rank}/stderr.log"))
        where = logs[-1] if logs else "-"
        parts.append(f"  rank {rank}: {_describe_exit(code)}; last lines of its log ({where}):")
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
    failure_dir = log_dir / "failures"
    failures.clear(failure_dir)  # a launch of the same second: its records are not ours (we hold the lease)
    nproc = cfg.launch.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0",
           "--log-dir", str(log_dir), "--redirects", "3", "--tee", "0:3" if stream_output else "0",
           "-m", _entry(stage), "--stage", stage, "--config", str(config_path), "--variant", variant]
    run_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))), "PYTHONUNBUFFERED": "1",
        lifeline.LAUNCHER_PID_ENV: str(os.getpid()), failures.FAILURE_DIR_ENV: str(failure_dir)}
    captured: collections.deque[str] = collections.deque(maxlen=400)
    console = _ConsoleFilter()
    with _signals_exit(), (log_dir / TORCHRUN_LOG).open("w") as torchrun_log:  # before the Popen: see _stop
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lifeline.die_with_parent_preexec())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                captured.append(line)
                torchrun_log.write(line)
                if stream_output and (shown := console.show(line)) is not None:
                    sys.stderr.write(shown)
            code = proc.wait()
        finally:
            _stop(proc)
    if code != 0:
        raise rank_failure(name, log_dir, "".join(captured))
    return json.loads(storage.read_text(stage_manifest_url(cfg, stage, variant)))


def _entry(stage: str) -> str:
    """What each rank runs: ENTRY_MODULE for training stages (tests put a stand-in there), the evaluation's entry
    for `eval-<evaluator>` jobs."""
    return ENTRY_MODULE if entry_module(stage) == "versavit.train.entry" else entry_module(stage)


def rank_failure(stage: str, log_dir: Path, torchrun_output: str) -> LaunchError:
    """What a failed torchrun run raises: `RankFailed`, one line naming the first failure and its real cause, or,
    when that first failure is a rank that left no record (killed by a signal: SIGKILL, an OOM kill, a crash),
    the multi-line `failure_report` of the failed ranks with their logs' tails.

    Which failure comes first: among the ranks torchrun saw fail (not those it stopped afterwards), an expected
    error (storage, corrupt data, config: a cause in itself), else a rank killed by a signal (its peers' errors,
    e.g. gloo's "Connection closed by peer", follow from it), else any other error; by time within each."""
    where = f"logs: {log_dir}"
    failed = failed_ranks(torchrun_output)
    records = [r for r in failures.read_records(log_dir / "failures") if not failed or r.rank in failed]
    recorded = {r.rank for r in records}
    killed = [rank for rank, code in failed.items() if rank not in recorded and code < 0 and code not in _STOP_CODES]
    expected = [r for r in records if r.expected]
    if expected or (records and not killed):
        first = (expected or records)[0]
        logs = sorted(log_dir.rglob(f"attempt_*/{first.rank}/stderr.log"))
        if not first.expected and logs:
            where = f"its traceback: {logs[-1]}; {where}"
        others = len({rank for rank, code in failed.items() if code not in _STOP_CODES} | recorded) - 1
        more = f"; {others} other rank(s) failed too" if others > 0 else ""
        return RankFailed(f"stage {stage!r} failed on {first.describe()} ({where}{more})", rank=first.rank,
                          error_type=first.type, cause=first.message, log_dir=str(log_dir))
    return LaunchError(f"{failure_report(stage, log_dir, torchrun_output)}\n  ({where})")


class _ConsoleFilter:
    """Which lines of torchrun's output reach the console: rank 0's (tee'd, "[default0]:" prefix) without
    tracebacks (a failure is reported in one line; the traceback stays in the rank's log) and noise.
    torchrun's own lines (its warnings, its error summary) go to torchrun.log only."""

    _RANK0 = "[default0]:"
    _PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch's excepthook prefixes a rank's traceback lines
    _CHAIN = ("During handling of the above exception", "The above exception was the direct cause")

    def __init__(self) -> None:
        self.in_traceback = False

    def show(self, line: str) -> str | None:
        if not line.startswith(self._RANK0):
            return None
        text = line[len(self._RANK0):]
        bare = self._PREFIX.sub("", text).rstrip("\n")
        if bare.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
            return None
        if self.in_traceback:
            # frames are indented; the first line at column 0 is the exception itself, which ends the block
            if bare and not bare[0].isspace() and not bare.startswith(self._CHAIN):
                self.in_traceback = False
            return None
        if not bare.strip() or bare.startswith(self._CHAIN) or _is_noise(text):
            return None
        return text


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
