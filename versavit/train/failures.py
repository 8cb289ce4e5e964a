"""A failing rank's last word: one small JSON record per rank, which the local launcher reads.

torchrun knows how each rank ended (an exit code, a signal), not why; and once one rank fails it stops the
others with SIGTERM, so "rank 0: killed by SIGTERM" may be all it says about a run whose rank 1 lost its
S3 endpoint. So every rank (`versavit.train.entry`) runs its work inside `reported(rank)`: if the work
raises, the rank writes `rank-<N>.json` ({rank, type, message, time, expected, host, pid}) into the folder
named by `VERSAVIT_FAILURE_DIR` (the launcher sets it; without it nothing is written), and the launcher
names the rank that failed first, with its cause, in one line (`versavit.launch.local.rank_failure`). A rank
stopped by a signal (torchrun's SIGTERM after a peer failed) writes nothing.

Expected errors (`expected_errors`: storage, corrupt data, config, a non-finite loss) end the rank with
exit status 1, their traceback in the rank's own log (its stderr) and in torchrun's error file (so a pod's
log ends with the cause); anything else is re-raised as it is (a bug). No torch imports here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

FAILURE_DIR_ENV = "VERSAVIT_FAILURE_DIR"


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a rank raises when its inputs or surroundings are wrong, each with a message that says so."""
    from versavit import storage
    from versavit.config import ConfigError
    from versavit.data.errors import CorruptDataError

    return (storage.StorageError, CorruptDataError, ConfigError, FloatingPointError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line; from a DataLoader worker (torch re-raises it as "Caught X in
    DataLoader worker process N. Original Traceback ..."), the worker's own message."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        from versavit.data.errors import _worker_message

        text = _worker_message(text, type(exc).__name__)
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip()) or repr(exc)


@dataclass
class FailureRecord:
    rank: int
    type: str
    message: str
    time: float
    expected: bool
    host: str = ""
    pid: int = 0

    def describe(self) -> str:
        return f"rank {self.rank}: {self.type}: {self.message}"


def write_record(exc: BaseException, rank: int, folder: str | Path | None = None) -> Path | None:
    """Write this rank's failure record (atomically) into `folder` (default: `$VERSAVIT_FAILURE_DIR`)."""
    folder = folder or os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return None
    record = FailureRecord(rank=rank, type=type(exc).__name__, message=one_line(exc), time=time.time(),
                           expected=isinstance(exc, expected_errors()), host=socket.gethostname(),
                           pid=os.getpid())
    path = Path(folder) / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)
    return path


def read_records(folder: str | Path) -> list[FailureRecord]:
    """The failure records in `folder`, first failure first (unreadable ones are skipped)."""
    out = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(FailureRecord(**json.loads(path.read_text())))
    return sorted(out, key=lambda r: (r.time, r.rank))


def first_failure(folder: str | Path) -> FailureRecord | None:
    records = read_records(folder)
    return records[0] if records else None


def clear(folder: str | Path) -> None:
    """Remove the records of an earlier launch (the caller holds the stage's lease)."""
    for path in Path(folder).glob("rank-*.json"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def reported(rank: int) -> Iterator[None]:
    """Around a rank's work: a failure leaves its record (see the module doc). An expected error prints its
    traceback to stderr (the rank's log) and exits at once with status 1; anything else is re-raised."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):  # the record must never hide the error itself
            write_record(exc, rank)
        if not isinstance(exc, expected_errors()):
            raise
        traceback.print_exc(file=sys.stderr)
        # under torchrun (whose imports the rank has made): its summary shows the cause too, e.g. in a pod's log
        if os.environ.get("TORCHELASTIC_ERROR_FILE") and "torch.distributed.elastic" in sys.modules:
            with contextlib.suppress(Exception):
                from torch.distributed.elastic.multiprocessing.errors import get_error_handler

                get_error_handler().record_exception(exc)
        from versavit.train.lifeline import exit_now

        exit_now(1)
