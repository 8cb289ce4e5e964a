"""The lock: one per supported Python, installed exactly by `make setup`, covering pyproject.toml."""

from __future__ import annotations

import re
import sys
from importlib import metadata

import pytest
import tomllib
from env_helpers import ROOT, locked_versions, normalise

LOCKS = sorted((ROOT / "requirements").glob("lock-py3.*.txt"))


def test_a_lock_for_every_supported_python() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.10"
    makefile = (ROOT / "Makefile").read_text()
    supported = re.search(r"^LOCK_PYTHONS := (.+)$", makefile, re.M).group(1).split()
    assert [p.name for p in LOCKS] == [f"lock-py{v}.txt" for v in supported]
    assert supported[0] == "3.10"


def test_the_running_python_installed_exactly_its_lock() -> None:
    """What `make setup` installed is what the lock says, package by package (torch: its CPU or CUDA
    build of the locked version, e.g. 2.13.0+cpu)."""
    lock = ROOT / "requirements" / f"lock-py{sys.version_info.major}.{sys.version_info.minor}.txt"
    assert lock.is_file(), f"no lock for this Python: {lock.name}"
    wrong = {}
    for name, version in locked_versions(lock).items():
        installed = metadata.version(name)
        if installed.split("+")[0] != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from {lock.name} (locked, installed): {wrong}"


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.stem)
def test_locks_pin_every_dependency_and_torch(lock) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pyproject["dependencies"] + pyproject["optional-dependencies"]["dev"]
    names = {normalise(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)) for req in wanted}
    pins = locked_versions(lock)
    assert names <= set(pins), f"{lock.name} lacks {sorted(names - set(pins))}: run `make lock`"
    assert pins["torch"] == (ROOT / "requirements/torch.txt").read_text().split("==")[1].strip()
    # the CUDA libraries come with a GPU build of torch, never from the lock (a CPU box would fetch GBs)
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]


def test_the_lock_leaves_out_exactly_what_the_overrides_drop() -> None:
    """lmms-eval's dependencies of other vendors' models and tasks are out of every lock, and `make setup`'s check
    accepts only those as missing (requirements/check_installed.py)."""
    import subprocess

    sys.path.insert(0, str(ROOT / "requirements"))
    try:
        from check_installed import left_out
    finally:
        sys.path.pop(0)
    dropped = left_out()
    assert {"torchvision", "wandb", "latex2sympy2"} <= dropped
    for lock in LOCKS:
        pins = locked_versions(lock)
        assert not dropped & set(pins), f"{lock.name} holds {sorted(dropped & set(pins))}"
        assert pins["lmms-eval"] == "0.7.3" and int(pins["filelock"].split(".")[0]) < 4
    run = subprocess.run([sys.executable, str(ROOT / "requirements/check_installed.py")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
