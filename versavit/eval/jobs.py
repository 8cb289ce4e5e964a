"""Training-type evaluators (fine-tuned depth, referring-segmentation fine-tune, VQA, retrieval) as jobs of their own.

A pipeline's evaluator step for such a protocol does not train in its own pod: it leaves the backbones to compare
in `<workdir>/stages/eval-<evaluator>/backbones.json` and has the launcher (versavit.stages) run stage
`eval-<evaluator>`: torchrun on this machine, a PyTorchJob / TrainJob on a cluster, one process on one GPU
(`job_config`; for vqa, `eval.vqa.processes` data-parallel processes). The job (`python -m versavit.eval.entry`:
`run_job` there) runs the evaluator on every backbone and writes the results where the report step reads them, then
`stage.json`, which the launchers wait for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from versavit import storage
from versavit.config import RunConfig
from versavit.layout import stage_manifest_url, stage_url

EVAL_STAGE_PREFIX = "eval-"  # = versavit.launch.base.EVAL_STAGE_PREFIX (a test holds them equal)


def results_url(cfg: RunConfig, evaluator: str) -> str:
    """Where an evaluator step (or job) leaves its results for the report step (shared storage: steps are pods)."""
    return storage.join(cfg.workdir, "stages", "eval", "results", f"{evaluator}.json")


def backbones_url(cfg: RunConfig, evaluator: str) -> str:
    return storage.join(stage_url(cfg, f"{EVAL_STAGE_PREFIX}{evaluator}"), "backbones.json")


def job_processes(cfg: RunConfig, evaluator: str | None = None) -> int:
    """Processes of an evaluation job: `eval.vqa.processes` for vqa (data-parallel, versavit.eval.vqa.parallel),
    else one."""
    return cfg.eval.vqa.processes if evaluator == "vqa" else 1


def job_config(cfg: RunConfig, evaluator: str | None = None) -> RunConfig:
    """The config of an evaluation job: one node; one process on `eval.gpus` GPUs (0 = a CPU node), or, for a
    data-parallel evaluator (`job_processes`), that many processes with `eval.gpus` GPUs each."""
    launch = cfg.launch
    nproc = job_processes(cfg, evaluator)
    resources = launch.resources.model_copy(update={"gpus_per_node": min(launch.resources.gpus_per_node,
                                                                         cfg.eval.gpus * nproc)})
    return cfg.model_copy(update={"launch": launch.model_copy(update={"nnodes": 1, "nproc_per_node": nproc,
                                                                      "resources": resources})})


def prepare_job(cfg: RunConfig, exports: Mapping[str, str], evaluator: str) -> str:
    """Leave the backbones for the job (a small manifest); clears a finished job's stage.json so that the launcher
    waits for this one. Returns the stage name to launch."""
    storage.write_text(backbones_url(cfg, evaluator), json.dumps(dict(exports)))
    manifest = stage_manifest_url(cfg, f"{EVAL_STAGE_PREFIX}{evaluator}")
    if storage.exists(manifest):
        fs, path = storage.get_fs(manifest)
        fs.rm(path)
    return f"{EVAL_STAGE_PREFIX}{evaluator}"
