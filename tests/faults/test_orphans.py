"""No orphaned ranks: killing `versavit train multitask` stops torchrun and both ranks within 10 s.

torchrun starts each rank in a session of its own, so nothing but the ranks' own lifeline (PDEATHSIG,
a parent watchdog) and the launcher's (PDEATHSIG for torchrun, SIGTERM passed on) can stop them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))  # train_helpers: the tiny world and run config

from train_helpers import add_embeddings, tiny_overrides  # noqa: E402

from versavit.config import load_config  # noqa: E402
from versavit.config.schema import SyntheticConfig  # noqa: E402
from versavit.data.build import build_synthetic  # noqa: E402
from versavit.layout import synthetic_root  # noqa: E402

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data stage's output: 48 + 8 synthetic scenes at 56 px with text embeddings."""
    workdir = tmp_path_factory.mktemp("orphans-world")
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(workdir))
    root = synthetic_root(cfg.workdir)
    build_synthetic(root, SyntheticConfig(**cfg.data.synthetic.model_dump()), workers=0)
    for split in ("train", "val"):
        add_embeddings(f"{root}/{split}")
    return workdir / "data"


def processes_of(marker: str) -> dict[int, str]:
    """Live processes whose command line contains `marker` (zombies have none): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found[int(entry.name)] = cmdline
    return found


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (its lifeline, for a rank)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def wait_until_gone(marker: str, timeout: float) -> tuple[float, dict[int, str]]:
    """Seconds until no process of `marker` is left (or the timeout), and what is left."""
    t0 = time.monotonic()
    while True:
        left = processes_of(marker)
        if not left or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, left
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("kill", ["launcher-sigkill", "launcher-sigterm"])
def test_killing_the_launcher_stops_torchrun_and_every_rank(kill: str, tiny_data: Path, tmp_path: Path) -> None:
    """The signal goes to the launcher's pid alone. (SIGKILL of its whole process group, launcher and torchrun,
    leaves the ranks to notice their parent's death: test_lifeline.py covers that link without torchrun.)

    SIGKILL lands while both ranks train: torchrun gets SIGTERM from the kernel and stops them, the ranks'
    SIGTERM handling running mid-step. SIGTERM lands as soon as both ranks have their lifeline (a SIGTERM
    handler), still importing torch: what it adds is the launcher's part (SIGTERM passed on to torchrun, waited
    for, exit status 143), which does not depend on what the ranks do; so it spares the ~20 s of start-up."""
    workdir = tmp_path / f"run-{kill}"
    shutil.copytree(tiny_data, workdir / "data")
    marker = str(workdir)
    log = (tmp_path / "launcher.log").open("w")
    cmd = [sys.executable, "-m", "versavit.cli", "train", "multitask", "--config", "configs/tiny.yaml",
           *tiny_overrides(workdir), "train.multitask.max_steps=100000", "train.multitask.checkpoint_interval=100000",
           "train.precision=fp32", "tracking.enabled=false"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = workdir / "reports" / "multitask" / "metrics.jsonl"
    try:
        end = time.monotonic() + 240

        def ranks_of(running: dict[int, str]) -> list[int]:
            return [p for p, c in running.items() if "versavit.train.entry" in c and "torch.distributed.run" not in c]

        def ready() -> bool:
            if kill == "launcher-sigkill":  # both ranks train
                return metrics.exists() and metrics.read_text().count("\n") >= 1
            ranks = ranks_of(processes_of(marker))  # both ranks have their lifeline
            return len(ranks) >= 2 and all(catches_sigterm(p) for p in ranks)

        while not ready():
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < end, "not ready within 240 s"
            time.sleep(0.1)
        running = processes_of(marker)
        ranks = ranks_of(running)
        torchrun = [p for p, c in running.items() if "torch.distributed.run" in c]
        # launcher, torchrun, 2 ranks (and maybe, for an instant, a child a rank forks before its exec)
        assert launcher.pid in running and len(torchrun) == 1 and len(ranks) >= 2, running
        os.kill(launcher.pid, signal.SIGKILL if kill == "launcher-sigkill" else signal.SIGTERM)
        took, left = wait_until_gone(marker, DEADLINE_S + 5)
        code = launcher.wait(5)
        print(f"\n{kill}: all {len(running)} processes gone {took:.1f} s after the signal; launcher exit {code}")
        assert not left, f"still running {took:.1f} s after {kill}: {left}"
        assert took < DEADLINE_S
        if kill == "launcher-sigterm":
            assert code == 128 + signal.SIGTERM  # it waited for torchrun, then exited as if by the signal
        steps = metrics.read_text().count("\n") if metrics.exists() else 0
        time.sleep(1.0)
        assert (metrics.read_text().count("\n") if metrics.exists() else 0) == steps  # nobody trains on
        assert not (workdir / "stages" / "multitask" / "stage.json").exists()
    finally:
        for pid in processes_of(marker):  # never leave a run behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()
