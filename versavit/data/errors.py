"""What reading data raises, without torch behind it (the CLI imports these to report them)."""

from __future__ import annotations

from typing import Any


class CorruptDataError(RuntimeError):
    """Too much of the data could not be read.

    Raised in a DataLoader worker, torch re-raises it in the main process as `CorruptDataError(<its
    "Caught ... in DataLoader worker process N. Original Traceback ..." text>)`: the constructor takes
    the worker's own one-line message back out of that text, so the run stops with that line.
    """

    def __init__(self, message: str = "", *args: Any):
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = _worker_message(message, type(self).__name__)
        super().__init__(message, *args)


class DatasetChangedError(CorruptDataError):
    """A shard is not the one its dataset's manifest.json lists (rewritten under the manifest)."""


def _worker_message(text: str, name: str) -> str:
    """The `<module>.<Name>: message` line at the end of a worker's traceback text."""
    for line in reversed(text.strip().splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return rest.strip()
    return text.strip().splitlines()[-1]
