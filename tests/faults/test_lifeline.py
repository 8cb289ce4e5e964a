"""The ranks' lifeline, process by process (no torch, no torchrun): a rank dies with its parent, refuses to
start under a parent that is no longer the launcher's child, and a signal ends it even if cleanup hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from versavit.train import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG and /proc are Linux's")

RANK = """
import os, sys, time
from pathlib import Path
from versavit.train import lifeline
if "--no-prctl" in sys.argv:
    lifeline._prctl = lambda: None  # the parent watchdog alone
lifeline.follow_parent(grace_s=2.0, poll_s=0.1)
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_file(path: Path, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < end, f"{path} not written"
        time.sleep(0.02)
    return path.read_text()


@pytest.mark.parametrize("how", ["pdeathsig", "watchdog"])
def test_a_rank_dies_with_its_parent(how: str, tmp_path: Path) -> None:
    """The parent (standing in for torchrun) is SIGKILLed: the rank ends by PDEATHSIG, or by its watchdog."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    pidfile = tmp_path / "rank.pid"
    args = [sys.executable, str(script), str(pidfile)] + (["--no-prctl"] if how == "watchdog" else [])
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, time
        subprocess.Popen({args!r})
        time.sleep(120)
    """)])
    rank = int(wait_for_file(pidfile))
    try:
        assert alive(rank)
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        while alive(rank) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        assert not alive(rank), f"{how}: the rank outlived its parent by 10 s"
        assert time.monotonic() - t0 < 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank, signal.SIGKILL)


@pytest.mark.parametrize("launcher_is_grandparent", [True, False])
def test_a_rank_whose_parent_is_not_the_launchers_child_stops_at_once(launcher_is_grandparent: bool,
                                                                        tmp_path: Path) -> None:
    """The race PDEATHSIG alone misses: torchrun died before the rank's prctl call. The rank's parent is then
    a reaper, not a child of the launcher named in VERSAVIT_LAUNCHER_PID, and the rank exits."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    launcher = os.getppid() if launcher_is_grandparent else os.getpid()  # the rank's parent is this process
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "rank.pid")], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, lifeline.LAUNCHER_PID_ENV: str(launcher)})
    try:
        if launcher_is_grandparent:
            wait_for_file(tmp_path / "rank.pid")
            assert proc.poll() is None
        else:
            assert proc.wait(30) == 1
            assert "already exited; stopping" in proc.stderr.read()
            assert not (tmp_path / "rank.pid").exists()
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_runs_the_finally_blocks_and_a_hung_one_is_cut_short(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from versavit.train import lifeline
        lifeline.exit_on_signals(grace_s=1.0)
        Path(sys.argv[1]).write_text("ready")
        try:
            time.sleep(120)
        finally:
            Path(sys.argv[2]).write_text("cleaned")
            if sys.argv[3] == "hang":
                while True:  # a finaliser that never returns (a second SIGTERM must not help either)
                    pass
    """))
    for mode, expected in (("ok", 128 + signal.SIGTERM), ("hang", -signal.SIGKILL)):  # SystemExit, deadline
        ready, cleaned = tmp_path / f"ready-{mode}", tmp_path / f"cleaned-{mode}"
        proc = subprocess.Popen([sys.executable, str(script), str(ready), str(cleaned), mode])
        wait_for_file(ready)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if mode == "hang":
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == expected, mode
        assert cleaned.read_text() == "cleaned"
        if mode == "hang":
            assert 1.0 <= time.monotonic() - t0 < 5.0  # killed by the deadline, grace_s after the first signal


def test_a_signal_during_teardown_ends_the_rank_without_a_stray_traceback() -> None:
    """A rank whose work failed is tearing down (atexit finalisers) when torchrun's SIGTERM arrives, as the survivor
    of a peer's death does: it exits at once with 128 + 15, its log holding the failure's traceback only, not a
    `Signalled` raised inside an atexit callback."""
    script = (
        "import atexit, os, signal, time\n"
        "from versavit.train import lifeline\n"
        "lifeline.exit_on_signals(grace_s=10)\n"
        "def teardown():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(3)\n"
        "atexit.register(teardown)\n"
        "with lifeline.quick_exit_when_signalled():\n"
        "    raise RuntimeError('peer gone')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert res.stderr.count("Traceback") == 1 and "RuntimeError: peer gone" in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr and "Signalled" not in res.stderr, res.stderr
