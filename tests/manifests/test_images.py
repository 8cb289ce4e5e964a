"""images/: Dockerfiles that pin their base images and packages and run as non-root; .dockerignore
keeps local state and secrets out of the build context. (No Docker engine here: parsed, not built.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from env_helpers import locked_versions

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


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN command (shell lists split at && ; ||)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c[2:] for c in commands if c[:2] == ["pip", "install"]]


def pip_requirements(args: list[str]) -> list[str]:
    """Requirement specs of one `pip install` (options, their values and local paths skipped)."""
    reqs, skip_next = [], False
    for w in args:
        if skip_next:
            skip_next = False
        elif w in ("-c", "-r", "--index-url", "--extra-index-url", "-i"):
            skip_next = True
        elif not w.startswith("-") and w not in (".",) and not w.startswith(("/", "./")):
            reqs.append(w)
    return reqs


def lock_of(dockerfile: Path) -> tuple[str, dict[str, str]]:
    """(Python minor, {package: version}) of the lock the image copies in."""
    copies = [rest.split() for op, rest in resolved(dockerfile) if op == "COPY" and "requirements/lock-py" in rest]
    assert len(copies) == 1, f"{dockerfile}: expected one COPY of requirements/lock-py3.X.txt"
    src = copies[0][0]
    minor = re.fullmatch(r"requirements/lock-py(3\.\d+)\.txt", src).group(1)
    return minor, locked_versions(ROOT / src)


def base_python(dockerfile: Path) -> str:
    """The Python minor of the image's base (python:X.Y tags, or the distribution's python3)."""
    image = [rest.split()[0] for op, rest in resolved(dockerfile) if op == "FROM"][-1]
    if m := re.match(r"python:(3\.\d+)", image):
        return m.group(1)
    distro_python = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
    for distro, minor in distro_python.items():
        if image.endswith(distro):
            return minor
    raise AssertionError(f"unknown Python of base image {image}")


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
def test_images_install_from_the_lock_of_their_python(dockerfile: Path) -> None:
    """Each image copies the lock of its own Python minor, and every pip install goes through it: the
    images get exactly the versions the test suite ran with (requirements/lock-py3.X.txt)."""
    minor, lock = lock_of(dockerfile)
    base = base_python(dockerfile)
    assert minor == base, f"{dockerfile.parent.name}: lock for {minor} on a {base} base"
    installs = [args for op, rest in resolved(dockerfile) if op == "RUN" for args in pip_installs(rest)]
    assert installs
    for args in installs:
        assert "-c" in args and args[args.index("-c") + 1] == "/tmp/lock.txt", f"not through the lock: {args}"
        for req in pip_requirements(args):
            name, _, version = req.partition("==")
            assert name.lower() in lock, f"{dockerfile.parent.name}: {name} is not in the lock"
            assert not version or version == lock[name.lower()], \
                f"{dockerfile.parent.name}: {name}=={version}, locked {lock[name.lower()]}"


def test_trainer_has_the_training_stack() -> None:
    text = "\n".join(rest for _, rest in resolved(ROOT / "images/trainer/Dockerfile"))
    assert "torch==2.13.0" in text
    installed = {r.partition("==")[0] for _, rest in resolved(ROOT / "images/trainer/Dockerfile")
                 for args in pip_installs(rest) for r in pip_requirements(args)}
    assert {"torch", "deepspeed", "transformers"} <= installed
    assert "nvidia/cuda:" in text


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
