"""torchrun entry point: `python -m versavit.train.entry --stage multitask --config resolved.yaml`.

`--stage` names a stage of the config's recipe (`train.recipe`, or VersaViT's warmup / multitask).

Every rank runs this; the same file is the command of a PyTorchJob's containers.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from versavit import storage
from versavit.config import load_config
from versavit.train import lifeline
from versavit.train.loop import run_stage


@record  # a failing rank leaves its traceback in torchrun's error file, so the launcher can show it
def main() -> None:
    lifeline.follow_parent()  # no orphaned ranks: end with torchrun; SIGTERM runs the finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, help="a stage name of the config's recipe")
    ap.add_argument("--config", required=True, help="resolved run config (YAML)")
    ap.add_argument("--variant", default="", help="output folder suffix: stages/<stage>-<variant>")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "alembic", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(storage.localize_config(args.config), args.overrides)  # a pod gets an s3:// URL
    with lifeline.quick_exit_when_signalled():
        run_stage(cfg, args.stage, args.variant)


if __name__ == "__main__":
    main()
