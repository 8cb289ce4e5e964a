"""A checkpoint save that never finishes (a fault-injection helper of test_staging.py, run as a script).

    python faults_slow_save.py <checkpoint url> <staging root> <ready file> [--exit-on-signals]

The fake engine writes a 5 MB shard into the staging folder, writes the staging folder's path to
<ready file>, and sleeps: the test then kills the process mid-save. `--exit-on-signals` installs the
ranks' SIGTERM handling (`lifeline.exit_on_signals`), as `versavit.train.entry` does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


class SlowEngine:
    def __init__(self, ready: Path):
        self.ready = ready

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        shard = Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"\0" * (5 << 20))
        self.ready.write_text(save_dir)
        time.sleep(600)


if __name__ == "__main__":
    from versavit.train import checkpoint, lifeline

    url, root, ready = sys.argv[1:4]
    if "--exit-on-signals" in sys.argv:
        lifeline.exit_on_signals(grace_s=5.0)
    checkpoint.save(SlowEngine(Path(ready)), url, 4, {"step": 4}, rank=0, staging_root=root)
