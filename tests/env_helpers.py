"""Reading the locks (requirements/lock-py3.X.txt): a module, not conftest, so any test can import it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def locked_versions(lock: Path) -> dict[str, str]:
    """{normalised package name: version} of a lock file (markers and comments dropped)."""
    out: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line)
        assert m, f"{lock.name}: not an exact pin: {line!r}"
        out[normalise(m.group(1))] = m.group(3)
    return out


def normalise(name: str) -> str:
    """PEP 503 name normalisation (Flask == flask, docstring_parser == docstring-parser)."""
    return re.sub(r"[-_.]+", "-", name).lower()
