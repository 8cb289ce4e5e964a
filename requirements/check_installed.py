"""`pip check`, except for the dependencies requirements/overrides.txt deliberately leaves out of the lock.

Run by `make setup` after installing the lock with --no-deps: every other broken or missing requirement fails set-up,
as a plain `pip check` would.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

OVERRIDES = Path(__file__).with_name("overrides.txt")
MISSING = re.compile(r"^(?P<pkg>\S+) \S+ requires (?P<dep>[A-Za-z0-9_.\-]+), which is not installed\.$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def left_out(path: Path = OVERRIDES) -> set[str]:
    """The packages the overrides drop (a requirement whose marker never holds)."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "sys_platform == 'never'" in line:
            out.add(normalise(line.split(";", 1)[0].strip()))
    return out


def main() -> int:
    run = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                         capture_output=True, text=True)
    dropped = left_out()
    lines = run.stdout.splitlines() if run.returncode else []  # 0: "No broken requirements found."
    problems = [line for line in lines if line.strip() and not (
        (m := MISSING.match(line.strip())) and normalise(m.group("dep")) in dropped)]
    if problems or (run.returncode and not run.stdout.strip()):
        print("\n".join(problems) or run.stderr, file=sys.stderr)
        print("error: the environment does not satisfy its requirements (above); `make clean setup` reinstalls the "
              "lock", file=sys.stderr)
        return 1
    print(f"pip check: no broken requirements ({len(dropped)} left out on purpose: requirements/overrides.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
