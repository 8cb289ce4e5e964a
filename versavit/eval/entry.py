"""A training-type evaluator's job: `python -m versavit.eval.entry --stage eval-<evaluator> --config resolved.yaml`.

What the launchers run for `eval-<evaluator>` stages (versavit.launch.base.entry_module): locally under torchrun,
on a cluster as a PyTorchJob / TrainJob of one process on one GPU, sized like the evaluate steps (`eval.gpus`);
the vqa evaluator's with `eval.vqa.processes` processes (data-parallel, versavit.eval.vqa.parallel).
The backbones come from the small manifest the pipeline step left in the stage folder (`backbones.json`:
variant -> export URL); the results go where the report step reads them (versavit.eval.jobs.results_url), and
`stage.json` says the job finished (what the launchers wait for).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from typing import Any

from versavit import storage
from versavit.config import RunConfig
from versavit.eval.jobs import EVAL_STAGE_PREFIX, backbones_url
from versavit.layout import stage_manifest_url


def run_job(cfg: RunConfig, evaluator: str, rank: int = 0) -> dict[str, Any]:
    """The job's work (inside versavit.eval.entry): the evaluator on the manifest's backbones, results written,
    then stage.json. In a data-parallel job every process does the work and the first one (`rank` 0) writes."""
    from versavit.eval.run import evaluate_one

    storage.configure(cfg.storage)
    exports = json.loads(storage.read_text(backbones_url(cfg, evaluator)))
    url = evaluate_one(cfg, exports, evaluator, publish=rank == 0)
    if rank:
        return {"stage": f"{EVAL_STAGE_PREFIX}{evaluator}", "rank": rank}
    done = {"stage": f"{EVAL_STAGE_PREFIX}{evaluator}", "variant": "", "results_url": url, "evaluator": evaluator}
    storage.write_text(stage_manifest_url(cfg, f"{EVAL_STAGE_PREFIX}{evaluator}"), json.dumps(done))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, help="eval-<evaluator>, e.g. eval-finetune-depth")
    ap.add_argument("--config", required=True, help="resolved run config (YAML; an s3:// URL on a cluster)")
    ap.add_argument("--variant", default="", help="unused: evaluation jobs have none")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not args.stage.startswith(EVAL_STAGE_PREFIX):
        ap.error(f"--stage must be {EVAL_STAGE_PREFIX}<evaluator>, got {args.stage!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    from versavit import weights
    from versavit.config import load_config
    from versavit.eval.jobs import job_processes

    evaluator = args.stage.removeprefix(EVAL_STAGE_PREFIX)
    cfg = weights.resolve(load_config(storage.localize_config(args.config), args.overrides))
    if world != job_processes(cfg, evaluator):
        raise SystemExit(f"{args.stage}: this evaluation job runs {job_processes(cfg, evaluator)} process(es), got "
                         f"WORLD_SIZE={world}; launch it with versavit.eval.jobs.job_config")
    if world > 1:  # data-parallel (vqa): the process group its DeepSpeed engines use
        from versavit.train.engine import init_distributed

        init_distributed(cfg.train)
    print(json.dumps(run_job(cfg, evaluator, rank=rank)))


if __name__ == "__main__":
    main()
