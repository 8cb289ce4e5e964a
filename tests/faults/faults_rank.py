"""A light stand-in for `versavit.train.entry` under a real torchrun (a fault-injection helper of
test_rank_failures.py; the local launcher runs it as `python -m faults_rank` in place of the entry module).

Each rank installs the real lifeline and failure reporting (`lifeline.follow_parent`, `failures.reported`),
as the entry point does, without the seconds of model imports. Then, by FAULTS_RANK_MODE:

    storage  rank 1 reads from an S3 endpoint nobody listens on (a real StorageError); rank 0 waits for
             torchrun to stop it (SIGTERM), as a healthy rank does when a peer fails
    sigkill  rank 1 kills itself with SIGKILL (no record left); rank 0 waits
"""

from __future__ import annotations

import logging
import os
import signal
import time

from versavit import storage
from versavit.train import failures, lifeline


def main() -> None:
    lifeline.follow_parent()
    rank = int(os.environ.get("RANK", 0))
    mode = os.environ["FAULTS_RANK_MODE"]
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    with lifeline.quick_exit_when_signalled(), failures.reported(rank):
        logging.getLogger("faults_rank").info("rank %d started", rank)
        if rank == 1:
            time.sleep(0.2)  # rank 0 is waiting by now
            if mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            storage.read_bytes(os.environ["FAULTS_RANK_URL"])
        time.sleep(120)


if __name__ == "__main__":
    main()
