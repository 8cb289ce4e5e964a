"""images/: Dockerfiles that pin their base images and packages and run as non-root; .dockerignore
keeps local state and secrets out of the build context. (No Docker engine here: parsed, not built.)"""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def resolved(path: Path) -> list[tuple[str, str]]:
    """Instructions with ARG defaults substituted (what a plain `docker build` uses)."""
    args: dict[str, str] = {}
    out = []
    for op, rest in instructions(path):
        if op == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        out.append((op, expand(rest, args)))
    return out


def pip_requirements(command: str) -> list[str]:
    """Requirement specs of every `pip install` in a RUN command (options and local paths skipped)."""
    reqs = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for w in words[2:]:
            if skip_next:
                skip_next = False
            elif w in ("-c", "-r", "--index-url", "--extra-index-url", "-i"):
                skip_next = True
            elif not w.startswith("-") and w not in (".",) and not w.startswith(("/", "./")):
                reqs.append(w)
    return reqs


def test_images_exist() -> None:
    names = {p.parent.name for p in DOCKERFILES}
    assert {"trainer", "labeler"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    froms = [rest.split()[0] for op, rest in resolved(dockerfile) if op == "FROM"]
    assert froms
    for image in froms:
        assert "$" not in image, f"unresolved {image}"
        name = image.split("@")[0]
        assert "@sha256:" in image or ":" in name.rsplit("/", 1)[-1], f"{image} has no tag or digest"
        assert not name.endswith(":latest"), image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_non_root(dockerfile: Path) -> None:
    users = [rest for op, rest in resolved(dockerfile) if op == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    # numeric, so the kubelet can verify runAsNonRoot without the image's /etc/passwd
    assert user.isdigit() and int(user) != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_python_packages_are_pinned(dockerfile: Path) -> None:
    runs = [rest for op, rest in resolved(dockerfile) if op == "RUN"]
    reqs = [r for cmd in runs for r in pip_requirements(cmd)]
    assert reqs
    for req in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][0-9A-Za-z.+\-]*", req), f"unpinned: {req}"
    # and every install beyond the explicitly pinned ones goes through the constraints file
    for cmd in runs:
        if "pip install" in cmd and " . " in f"{cmd} ":
            assert "-c /tmp/constraints.txt" in cmd


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pins_match_the_tested_environment(dockerfile: Path) -> None:
    """The images install the versions the test suite runs with (torch 2.13.0, DeepSpeed 0.19.8, ...)."""
    runs = [rest for op, rest in resolved(dockerfile) if op == "RUN"]
    for req in (r for cmd in runs for r in pip_requirements(cmd)):
        name, version = req.split("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"{dockerfile.parent.name}: {name}=={version}, tested {installed}"


def test_trainer_has_the_training_stack() -> None:
    text = "\n".join(rest for _, rest in resolved(ROOT / "images/trainer/Dockerfile"))
    for pin in ("torch==2.13.0", "deepspeed==0.19.8", "transformers==5.23.0"):
        assert pin in text
    assert "nvidia/cuda:" in text


def test_constraints_are_pinned() -> None:
    lines = [ln for ln in (ROOT / "images/constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", ln) for ln in lines)
    names = {ln.split("==")[0].lower() for ln in lines}
    assert "torch" not in names  # installed from PyTorch's CUDA index, not pinned to the CPU build


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for needed in (".git", "**/.venv", "runs", "mlruns", "**/__pycache__", ".pytest_cache", "**/secrets",
                   "**/*.env", "manifests", "tests"):
        assert needed in patterns, needed
    # what the Dockerfiles copy must stay in the context
    copied = {rest.split()[0] for df in DOCKERFILES for op, rest in resolved(df) if op == "COPY"}
    for src in copied:
        assert src not in patterns, f"{src} is copied but ignored"
