"""No orphaned ranks: a training process dies with the process that started it.

The local launcher starts torchrun, and torchrun starts each rank in a session of its own, so a
signal to the launcher's process group never reaches the ranks. Two links hold the chain together:

* `die_with_parent_preexec()`: the launcher's `preexec_fn` for torchrun, which asks the kernel
  (`prctl(PR_SET_PDEATHSIG)`) to send torchrun SIGTERM when the launcher dies; torchrun then stops
  its ranks.
* `follow_parent()`: called first thing by every rank (`versavit.train.entry`). The rank gets SIGTERM
  when torchrun dies (even by SIGKILL), and a watchdog thread sends it SIGTERM if its parent pid
  changes anyway. SIGTERM (SIGHUP, SIGINT) raises `Signalled`, a SystemExit, so `finally` blocks
  (staging folders) run; then `quick_exit_when_signalled` ends the process without the seconds of
  interpreter teardown, and a timer kills it `grace_s` after the signal if it is still there.

PDEATHSIG fires when the *thread* that forked the child ends; torchrun starts its ranks (subprocess
Popen) from its main thread, and the launcher waits for torchrun in the thread that started it.
Each side compares its parent pid after the prctl call with the pid it expects: a parent that died
before the call would otherwise go unnoticed. The launcher exports its pid (`LAUNCHER_PID_ENV`),
so a rank checks that its parent (torchrun) is still the launcher's child.

Linux only; elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LAUNCHER_PID_ENV = "VERSAVIT_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
_EXIT_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")  # torchrun passes on the one it got


class Signalled(SystemExit):
    """Raised in the main thread by SIGTERM / SIGHUP / SIGINT once `exit_on_signals` is installed."""


# Set once the rank's work has ended (`quick_exit_when_signalled` left), however it ended: a signal after that
# (torchrun stopping the survivors of a failed rank) ends the process at once instead of raising `Signalled`
# into the interpreter's teardown, where an atexit finaliser would print it as a stray traceback.
_work_ended = threading.Event()


def _prctl() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (from /proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the calling thread ends.

    Call it in the thread that starts the child (and waits for it). None where prctl is unavailable.
    """
    prctl = _prctl()  # resolved here: the forked child only makes the call
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the prctl call
            os._exit(1)

    return preexec


def exit_on_signals(grace_s: float = 5.0) -> None:
    """SIGTERM / SIGHUP / SIGINT raise `Signalled(128 + signum)` (a SystemExit) in the main thread, so `finally`
    blocks run;
    `grace_s` later the process kills itself if it has not exited yet (a hung finaliser, a collective
    waiting for a dead peer). Later signals only leave that deadline running. Main thread only.

    Python runs signal handlers only when the main thread is between bytecodes, so the deadline is
    also armed by a thread reading the signal wakeup fd: a main thread stuck in C still dies.
    """
    deadline = _Deadline(grace_s)
    numbers = {int(getattr(signal, name)) for name in _EXIT_SIGNALS}

    raised = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        deadline.arm()
        if _work_ended.is_set():  # tearing down already: nothing left for finally blocks to do
            exit_now(128 + signum)
        if not raised.is_set():  # once: a second signal must not break the finally blocks of the first
            raised.set()
            raise Signalled(128 + signum)

    for name in _EXIT_SIGNALS:
        signal.signal(getattr(signal, name), handler)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    if signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False) != -1:  # someone else's (asyncio): keep it
        signal.set_wakeup_fd(-1)
        os.close(read_fd)
        os.close(write_fd)
        return

    def wake() -> None:
        while True:
            if numbers & set(os.read(read_fd, 64)):
                deadline.arm()

    threading.Thread(target=wake, name="versavit-signal-deadline", daemon=True).start()
    os.register_at_fork(after_in_child=_forget_signals)  # forked helpers (DataLoader workers): as before


def _forget_signals() -> None:
    """In a forked child: the usual SIGTERM/SIGHUP/SIGINT handling and no wakeup fd (the parent's deadline
    is not its own)."""
    try:
        signal.set_wakeup_fd(-1)
        for name in _EXIT_SIGNALS:
            signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
    except ValueError:  # forked from a thread other than the main one: it cannot change handlers
        pass


@contextlib.contextmanager
def quick_exit_when_signalled() -> Iterator[None]:
    """Around a rank's work: once a signal's `Signalled` has run the `finally` blocks inside, end the process
    at once (`os._exit`, after flushing the logs) instead of tearing the interpreter down (seconds of torch
    finalisation that would delay torchrun and the launcher)."""
    try:
        yield
    except Signalled as exc:
        exit_now(exc.code if isinstance(exc.code, int) else 1)
    finally:
        _work_ended.set()


def exit_now(code: int) -> None:
    """Flush the logs and stdio, then end the process at once (`os._exit`): no seconds of interpreter and
    torch teardown once the `finally` blocks have run. For a rank that is done (signalled, or failed)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _Deadline:
    """Kill this process `seconds` after the first `arm()` (later calls change nothing)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._armed = False

    def arm(self) -> None:
        with self._lock:
            if self._armed:
                return
            self._armed = True
        timer = threading.Timer(self.seconds, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


def follow_parent(grace_s: float = 5.0, poll_s: float = 0.5) -> None:
    """Make this process (a torchrun rank) end when its parent does; call it first, in the main thread.

    Installs `exit_on_signals(grace_s)`, asks for SIGTERM on the parent's death, exits at once if the
    parent is already gone (or, under the local launcher, if the parent is no longer the launcher's
    child), and starts a watchdog thread that sends SIGTERM if the parent pid changes.
    """
    parent = os.getppid()
    exit_on_signals(grace_s)
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if os.getppid() != parent or (launcher and _parent_of(parent) != int(launcher)):
        sys.stderr.write(f"process {os.getpid()}: its parent (pid {parent}) or launcher ({launcher}) has "
                         "already exited; stopping\n")
        os._exit(1)
    if parent <= 1:
        return  # started by init itself (e.g. a container's entry point): nothing to watch

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="versavit-parent-watchdog", daemon=True).start()
