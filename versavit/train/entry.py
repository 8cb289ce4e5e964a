"""torchrun entry point: `python -m versavit.train.entry --stage multitask --config resolved.yaml`.

`--stage` names a stage of the config's recipe (`train.recipe`, or VersaViT's warmup / multitask).

Every rank runs this; the same file is the command of a PyTorchJob's containers. The rank's lifeline
comes first, before the seconds of torch / transformers imports (a launcher killed meanwhile takes the
rank with it). A failure leaves a record naming its cause for the launcher (`versavit.train.failures`);
an expected one (storage, corrupt data, config) ends the rank with exit status 1, its traceback in the
rank's log only.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

from versavit.train import failures, lifeline


def main() -> None:
    lifeline.follow_parent()  # no orphaned ranks: end with torchrun; SIGTERM runs the finally blocks
    from torch.distributed.elastic.multiprocessing.errors import record

    # a rank failing with an unexpected error leaves its traceback in torchrun's error file too
    record(_run)()


def _run() -> None:
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
    with lifeline.quick_exit_when_signalled(), failures.reported(rank):
        from versavit import storage, weights
        from versavit.config import load_config
        from versavit.train.loop import run_stage

        cfg = load_config(storage.localize_config(args.config), args.overrides)  # a pod gets an s3:// URL
        cfg = weights.resolve(cfg)  # models from their staged copies (weights.url); a resolved config stays as is
        run_stage(cfg, args.stage, args.variant)


if __name__ == "__main__":
    main()
