"""KFP v2 components: one per stage, thin wrappers over `versavit.stages` (no logic of their own).

Inputs and outputs are strings: the resolved run config (JSON, no credentials: only the names of
the env variables that hold them), URLs, and the MLflow parent run id. On the cluster each step
runs in the image of its kind (below: the defaults; the pipelines set each task's image, CPU and
memory from the config's launch section); locally KFP's SubprocessRunner runs them in this Python.
Function bodies import what they need: KFP ships each body to its own process.
"""


import os

from kfp import dsl

# Default images of the components (read at import, when the components are defined). The pipelines
# override each task's image from the config (pipelines._step_settings: launch.driver_image,
# launch.labeler_image, launch.image), so a compiled pipeline follows its config whatever these are.
IMAGE = os.environ.get("VERSAVIT_COMPONENT_IMAGE", "ghcr.io/versavit/trainer:0.1.0")
LABELER_IMAGE = os.environ.get("VERSAVIT_LABELER_IMAGE", "ghcr.io/versavit/labeler:0.1.0")
DRIVER_IMAGE = os.environ.get("VERSAVIT_DRIVER_IMAGE", "ghcr.io/versavit/driver:0.1.0")


def _component(func):  # noqa: ANN001, ANN202 - decorator: a CPU step, in the small driver image (images/driver)
    return dsl.component(func, base_image=DRIVER_IMAGE, install_kfp_package=False)


def _labeler_component(func):  # noqa: ANN001, ANN202 - decorator: a GPU step (labelling, evaluation)
    return dsl.component(func, base_image=LABELER_IMAGE, install_kfp_package=False)


@_component
def open_run(config_json: str, kfp_run_id: str) -> str:
    """Create the pipeline's MLflow parent run; returns its id."""
    from versavit.config import load_config_text
    from versavit.stages import open_pipeline_run

    return open_pipeline_run(load_config_text(config_json), kfp_run_id)


@_component
def close_run(config_json: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> None:
    """Exit handler: mark the parent run (found by its KFP run id tag) FINISHED or FAILED."""
    from versavit.config import load_config_text
    from versavit.stages import close_pipeline_run

    state = "FINISHED" if status.state == "SUCCEEDED" else "FAILED"
    close_pipeline_run(load_config_text(config_json), kfp_run_id=kfp_run_id, status=state)


@_component
def data(config_json: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Render the synthetic world into train/val shards; returns the dataset root URL."""
    from versavit.config import load_config_text
    from versavit.stages import stage_data

    return stage_data(load_config_text(config_json), parent_run_id, kfp_run_id)


@_component
def data_check(config_json: str, dataset_url: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Read the shards back through the training reader; returns statistics (JSON)."""
    from versavit.config import load_config_text
    from versavit.stages import stage_data_check

    return stage_data_check(load_config_text(config_json), dataset_url, parent_run_id, kfp_run_id)


@_labeler_component
def label(config_json: str, dataset_url: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Pseudo-label the dataset (text embeddings; teacher depth/masks if configured)."""
    from versavit.config import load_config_text
    from versavit.stages import stage_label

    return stage_label(load_config_text(config_json), dataset_url, parent_run_id, kfp_run_id)


@_component
def weights(config_json: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Copy every checkpoint the run loads (backbone, LLM, teachers, baseline) to weights.url once; returns it."""
    from versavit.config import load_config_text
    from versavit.stages import stage_weights

    return stage_weights(load_config_text(config_json), parent_run_id, kfp_run_id)


@_component
def prepare(config_json: str, shard_index: int, num_shards: int, parent_run_id: str, kfp_run_id: str) -> str:
    """One worker's slice of every data.datasets entry with a raw input: published layout -> versavit shards."""
    from versavit.config import load_config_text
    from versavit.stages import stage_prepare

    return stage_prepare(load_config_text(config_json), shard_index, num_shards, parent_run_id, kfp_run_id)


@_labeler_component
def label_datasets(config_json: str, kind: str, shard_index: int, num_shards: int, parent_run_id: str,
                   kfp_run_id: str) -> str:
    """One worker's slice of pseudo-label step `kind` on every data.datasets entry that lists it."""
    from versavit.config import load_config_text
    from versavit.stages import stage_label_datasets

    return stage_label_datasets(load_config_text(config_json), kind, shard_index, num_shards, parent_run_id,
                                kfp_run_id)


@_component
def train(config_json: str, stage: str, variant: str, upstream: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Train a stage (torchrun locally, a PyTorchJob/TrainJob on the cluster); returns its stage.json URL.

    `stage` names a stage of the config's recipe; `upstream` is the URL this stage depends on (data or the
    previous stage): it orders the DAG.
    """
    from versavit.config import load_config_text
    from versavit.stages import stage_train

    return stage_train(load_config_text(config_json), stage, variant, parent_run_id, kfp_run_id)


@_labeler_component
def evaluator(config_json: str, name: str, parent_run_id: str, kfp_run_id: str, manifest_1: str,
              manifest_2: str = "", manifest_3: str = "") -> str:
    """One evaluator (eval.evaluators) on the baseline and each trained stage (up to three stage.json URLs);
    a training-type one launches its own job. Returns its results URL."""
    from versavit.config import load_config_text
    from versavit.stages import stage_evaluator

    manifests = [m for m in (manifest_1, manifest_2, manifest_3) if m]
    return stage_evaluator(load_config_text(config_json), manifests, name, parent_run_id, kfp_run_id)


@_labeler_component
def evaluate(config_json: str, parent_run_id: str, kfp_run_id: str, manifest_1: str, manifest_2: str = "",
             manifest_3: str = "") -> str:
    """The comparison report of every evaluator step's results: tables with the paper's numbers, figures, the
    headline metrics on the parent run. Returns the report URL."""
    from versavit.config import load_config_text
    from versavit.stages import stage_eval_report

    manifests = [m for m in (manifest_1, manifest_2, manifest_3) if m]
    return stage_eval_report(load_config_text(config_json), manifests, parent_run_id, kfp_run_id)
