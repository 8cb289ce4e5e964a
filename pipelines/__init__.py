"""KFP v2 pipeline definitions: the VersaViT run, the paper's Table 4 ablation, and the recipe comparison.

All are built from a resolved `RunConfig` (`make_*_pipeline(cfg)`): the config travels as a JSON
string parameter, so the compiled pipeline is self-contained and holds no credential values
(secrets reach the pods as env variables by secret name, through kfp-kubernetes). Training tasks
follow the config's recipe (`cfg.train.stages()`): one `train` task per stage, in order.
"""


import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from kfp import dsl

from versavit.config import RunConfig, config_to_dict, load_config, load_config_text

RETRIES = 2  # stages that can fail transiently (storage, scheduling, preemption): retried with back-off
ABLATION = {  # Table 4 of the paper: task subsets of the multi-task stage
    "caption": ["caption"],
    "caption-depth": ["caption", "depth"],
    "all": ["caption", "depth", "refseg"],
}
# The recipe comparison's third branch: SAILViT-style gradual refinement, unless the config has its own recipe.
SAILVIT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "sailvit.yaml"


def config_json(cfg: RunConfig) -> str:
    """The resolved config as one line of JSON: KFP copies parameter defaults into a YAML comment
    header of the compiled file, where a multi-line value would break the YAML."""
    return json.dumps(config_to_dict(cfg), separators=(",", ":"))


def _with_overrides(text: str, overrides: list[str]) -> str:
    return config_json(load_config_text(text, overrides))


STEPS = ("driver", "prepare", "label", "eval", "report", "train")  # the kinds of step `_cluster_settings` sizes


def _step_settings(cfg: RunConfig, step: str) -> tuple[str, dict[str, str | None], int]:
    """(image, {cpu, memory, cpu_limit}, GPUs) of a kind of step, all from the config:

    - driver: MLflow parent run, weights, synthetic data, and `train` on a cluster backend (it only creates and
      watches the PyTorchJob/TrainJob): launch.driver_image, launch.step_resources.driver, no GPU;
    - prepare: each prepare worker (CPU): launch.driver_image, launch.step_resources.prepare;
    - label: each label worker: launch.labeler_image, launch.step_resources.gpu, labeling.gpus_per_worker GPUs;
    - eval: launch.labeler_image, launch.step_resources.gpu, eval.gpus GPUs (each inference evaluator);
    - report: the evaluation report (tables, figures, MLflow): launch.labeler_image (the evaluation's packages),
      launch.step_resources.driver, no GPU;
    - train: a cluster backend makes it a driver step; launch.backend local trains in the step's own pod:
      launch.image, launch.resources, launch.resources.gpus_per_node GPUs.
    """
    launch, steps = cfg.launch, cfg.launch.step_resources
    if step == "train" and launch.backend == "local":
        res = launch.resources
        return launch.image, {"cpu": res.cpu, "memory": res.memory, "cpu_limit": None}, res.gpus_per_node
    if step in ("driver", "train"):
        return launch.driver_image, steps.driver.model_dump(), 0
    if step == "prepare":
        return launch.driver_image, steps.prepare.model_dump(), 0
    if step == "label":
        return launch.labeler_image, steps.gpu.model_dump(), cfg.labeling.gpus_per_worker
    if step == "eval":
        return launch.labeler_image, steps.gpu.model_dump(), cfg.eval.gpus
    if step == "report":
        return launch.labeler_image, steps.driver.model_dump(), 0
    raise ValueError(f"unknown step kind {step!r}; expected one of {STEPS}")


# The downward API on every step (versavit.launch.identity.DOWNWARD_ENV, which a test holds equal): a train step
# creates its job in its own namespace, owned by its pod.
POD_FIELD_ENV = {"VERSAVIT_POD_NAMESPACE": "metadata.namespace", "VERSAVIT_POD_NAME": "metadata.name",
                 "VERSAVIT_POD_UID": "metadata.uid"}


def _cluster_settings(task: dsl.PipelineTask, cfg: RunConfig, step: str = "driver") -> dsl.PipelineTask:
    """Image, CPU/memory, secrets as env, and for GPU steps GPUs, /dev/shm and scheduling, for the cluster
    (ignored by the local runner); `step` is a kind of STEPS (`_step_settings`). GPUs are requested only where
    the cluster has them (launch.resources.gpus_per_node > 0)."""
    from kfp import kubernetes

    from versavit.weights import pod_env

    image, res, count = _step_settings(cfg, step)
    task.set_container_image(image)
    task.set_cpu_request(res["cpu"])
    if res["cpu_limit"]:
        task.set_cpu_limit(res["cpu_limit"])
    task.set_memory_request(res["memory"]).set_memory_limit(res["memory"])  # a leak: an OOMKill with a reason
    for name, value in pod_env(cfg).items():  # e.g. the hub offline once weights are staged
        task.set_env_variable(name, value)
    by_secret: dict[str, dict[str, str]] = {}
    for env, ref in cfg.launch.secret_env.items():
        secret, key = ref.split("/", 1)
        by_secret.setdefault(secret, {})[key] = env
    for secret, mapping in by_secret.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=mapping)
    for env, field_path in POD_FIELD_ENV.items():  # the step's pod: where and by whom training jobs are owned
        kubernetes.use_field_path_as_env(task, env_name=env, field_path=field_path)
    if count and cfg.launch.resources.gpus_per_node:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cfg.launch.resources.shm_size)
        task.set_accelerator_type(cfg.launch.resources.gpu_resource_name)
        task.set_accelerator_limit(str(count))
        for key, value in cfg.launch.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in cfg.launch.tolerations:
            kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator", "Equal"),
                                      value=tol.get("value"), effect=tol.get("effect"))
    return task


def make_pipeline(cfg: RunConfig) -> Callable:
    """weights -> data (synthetic: render, check, label; shards: prepare, pseudo-label fan-out) -> warm-up ->
    multi-task -> evaluation, under one MLflow parent run."""
    import components as c

    default = config_json(cfg)

    @dsl.pipeline(name="versavit", description="VersaViT: multi-task post-training of an MLLM's vision encoder")
    def versavit(config_json: str = default):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with _tracked(c, cfg, config_json, run_id) as parent:
            upstream = _data_and_labels(c, cfg, config_json, parent, run_id, check=True)
            last = _train_chain(c, cfg, config_json, "", upstream, parent, run_id)
            _evaluation(c, cfg, config_json, parent, run_id, [last])

    return versavit


def _evaluation(c, cfg: RunConfig, config_json, parent, run_id, manifests: list):  # noqa: ANN001, ANN202
    """Evaluation fans out: one step per evaluator of `eval.evaluators` (each on the baseline and every trained
    stage; a training-type evaluator's step launches its own job, as a train step does), then one report step."""
    from versavit.config.schema import TRAINING_EVALUATORS

    named = {f"manifest_{i}": m for i, m in enumerate(manifests, 1)}
    steps = []
    for name in cfg.eval.evaluators:
        task = c.evaluator(config_json=config_json, name=name, parent_run_id=parent, kfp_run_id=run_id, **named)
        task.set_display_name(f"evaluate-{name}")
        steps.append(_cluster_settings(task, cfg, "train" if name in TRAINING_EVALUATORS else "eval"))
    report = c.evaluate(config_json=config_json, parent_run_id=parent, kfp_run_id=run_id, **named).after(*steps)
    return _cluster_settings(report.set_display_name("report"), cfg, "report")


def _weights_and_datasets(c, cfg: RunConfig, config_json, parent, run_id) -> list:  # noqa: ANN001
    """The steps before training on a shards run: stage the weights (`weights.url`), prepare every dataset with
    a raw input, then each pseudo-label kind in LABEL_KINDS order, each a ParallelFor over `labeling.workers`
    slices (worker i takes output shards i, i+n, ...). Returns the last tasks, which training waits on."""
    from versavit.config.schema import LABEL_KINDS

    last: list = []
    if cfg.weights.url:
        staged = c.weights(config_json=config_json, parent_run_id=parent, kfp_run_id=run_id).set_retry(RETRIES)
        if cfg.weights.hub_token_secret:  # gated models: the hub token reaches this step only, by secret name
            from kfp import kubernetes

            secret, key = cfg.weights.hub_token_secret.split("/", 1)
            kubernetes.use_secret_as_env(staged, secret_name=secret, secret_key_to_env={key: cfg.weights.hub_token_env})
        last = [_cluster_settings(staged, cfg)]
        staged.set_env_variable("HF_HUB_OFFLINE", "0")  # the one step that reads the hub
    workers = cfg.labeling.workers
    datasets = cfg.data.datasets.values()
    steps: list[tuple[str, Callable]] = []
    if any(d.input for d in datasets):
        steps.append(("prepare", lambda i: c.prepare(config_json=config_json, shard_index=i, num_shards=workers,
                                                     parent_run_id=parent, kfp_run_id=run_id)))
    for kind in LABEL_KINDS:
        if any(kind in d.labels for d in datasets):
            steps.append((f"label-{kind}", lambda i, k=kind: c.label_datasets(
                config_json=config_json, kind=k, shard_index=i, num_shards=workers, parent_run_id=parent,
                kfp_run_id=run_id)))
    for name, make in steps:
        with dsl.ParallelFor(items=list(range(workers)), parallelism=workers, name=name) as index:
            task = make(index).set_retry(RETRIES).after(*last)
            task.set_display_name(name)
            _cluster_settings(task, cfg, "label" if name.startswith("label") else "prepare")
        last = [task]
    return last


@contextlib.contextmanager
def _tracked(c, cfg: RunConfig, config_json, run_id):  # noqa: ANN001, ANN202
    """Open the MLflow parent run first and close it in an exit handler, whatever the stages do; yields
    the parent run id. The exit task may not depend on other tasks: it finds the run by the KFP run id."""
    closer = _cluster_settings(c.close_run(config_json=config_json, kfp_run_id=run_id), cfg)
    with dsl.ExitHandler(closer, name="track-run"):
        opened = c.open_run(config_json=config_json, kfp_run_id=run_id).set_caching_options(False)
        # the parent run's pipeline-kind tag (versavit.tracking.identity); not in the config, so its hash is the same
        opened.set_env_variable("VERSAVIT_PIPELINE", dsl.pipeline_context.Pipeline.get_default_pipeline().name)
        yield _cluster_settings(opened, cfg).output


def _data_and_labels(c, cfg: RunConfig, config_json, parent, run_id, check: bool = False):  # noqa: ANN001, ANN202
    """The synthetic world rendered (+ read back when `check`) and pseudo-labelled, or (data.source shards) the
    weights staged and data.datasets prepared and pseudo-labelled; returns what the training stages wait on: the
    labelled dataset URL, or the last tasks."""
    if cfg.data.source != "synthetic":
        return _weights_and_datasets(c, cfg, config_json, parent, run_id)
    data = _cluster_settings(c.data(config_json=config_json, parent_run_id=parent, kfp_run_id=run_id), cfg)
    if check:
        _cluster_settings(c.data_check(config_json=config_json, dataset_url=data.output, parent_run_id=parent,
                                       kfp_run_id=run_id), cfg)
    labelled = c.label(config_json=config_json, dataset_url=data.output, parent_run_id=parent,
                       kfp_run_id=run_id).set_retry(RETRIES)
    return _cluster_settings(labelled, cfg, "label").output


def _split_upstream(upstream) -> tuple:  # noqa: ANN001
    """What `_data_and_labels` returned -> (URL to pass as `upstream`, tasks to run after)."""
    return ("", upstream) if isinstance(upstream, list) else (upstream, [])


def _train_chain(c, cfg: RunConfig, config_json, variant: str, upstream, parent, run_id):  # noqa: ANN001, ANN202
    """One `train` task per stage of `cfg`'s recipe, each after the previous; returns the last stage.json URL."""
    upstream, after = _split_upstream(upstream)
    for stage in cfg.train.stages():
        t = c.train(config_json=config_json, stage=stage.name, variant=variant, upstream=upstream,
                    parent_run_id=parent, kfp_run_id=run_id).set_retry(RETRIES).after(*after)
        after = []
        t.set_display_name(f"{stage.name}-{variant}" if variant else stage.name)
        upstream = _cluster_settings(t, cfg, "train").output
    return upstream


def make_ablation_pipeline(cfg: RunConfig) -> Callable:
    """Table 4: caption-only vs. caption+depth vs. all three tasks, as parallel branches that share the
    labelled data and the warm-up checkpoint; one evaluation compares the three backbones."""
    import components as c

    if cfg.train.recipe is not None:
        raise ValueError("the ablation varies the tasks of VersaViT's multitask stage: it needs train.recipe: null")
    default = config_json(cfg)
    branches = {name: _with_overrides(default, [f"train.multitask.tasks=[{', '.join(tasks)}]"])
                for name, tasks in ABLATION.items()}

    @dsl.pipeline(name="versavit-ablation-tasks", description="VersaViT Table 4: task subsets of the multi-task stage")
    def ablation(config_json: str = default):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with _tracked(c, cfg, config_json, run_id) as parent:
            upstream, after = _split_upstream(_data_and_labels(c, cfg, config_json, parent, run_id))
            warm = _cluster_settings(c.train(config_json=config_json, stage="warmup", variant="", upstream=upstream,
                                             parent_run_id=parent, kfp_run_id=run_id).set_retry(RETRIES).after(*after),
                                     cfg, "train")
            outs = []
            for name, branch_yaml in branches.items():
                t = c.train(config_json=branch_yaml, stage="multitask", variant=name, upstream=warm.output,
                            parent_run_id=parent, kfp_run_id=run_id).set_retry(RETRIES)
                t.set_display_name(f"multitask-{name}")
                outs.append(_cluster_settings(t, cfg, "train").output)
            _evaluation(c, cfg, config_json, parent, run_id, outs)

    return ablation


def recipe_branches(cfg: RunConfig) -> dict[str, RunConfig]:
    """variant -> branch config of the recipe comparison: VersaViT's two stages, the same with the synergy
    regulariser, and the SAILViT-style recipe (`cfg.train.recipe` if set, else configs/recipes/sailvit.yaml's).
    Everything but the recipe (data, model, evaluation) is `cfg`'s, so the branches differ only in training."""
    base = config_to_dict(cfg)
    sailvit = base["train"]["recipe"] or config_to_dict(load_config(SAILVIT_RECIPE))["train"]["recipe"]

    def branch(recipe: list | None, synergy: bool) -> RunConfig:
        train = {**base["train"], "recipe": recipe,
                 "multitask": {**base["train"]["multitask"],
                               "synergy": {**base["train"]["multitask"]["synergy"], "enabled": synergy}}}
        return RunConfig.model_validate({**base, "train": train})

    return {"versavit": branch(None, False), "versavit-synergy": branch(None, True), "sailvit": branch(sailvit, False)}


def make_recipes_pipeline(cfg: RunConfig) -> Callable:
    """VersaViT vs. VersaViT + synergy vs. the SAILViT-style recipe: three branches sharing data and labels,
    each running its recipe's stages in order under its own variant; one evaluation compares the three
    final backbones with the same probes, under one MLflow parent run."""
    import components as c

    default = config_json(cfg)
    branches = {variant: (branch, config_json(branch)) for variant, branch in recipe_branches(cfg).items()}

    @dsl.pipeline(name="versavit-recipes", description="Training recipes compared: VersaViT, VersaViT + "
                  "cross-task synergy (VITRON), SAILViT-style gradual feature refinement")
    def recipes(config_json: str = default):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with _tracked(c, cfg, config_json, run_id) as parent:
            upstream = _data_and_labels(c, cfg, config_json, parent, run_id)
            last = [_train_chain(c, branch, branch_json, variant, upstream, parent, run_id)
                    for variant, (branch, branch_json) in branches.items()]
            _evaluation(c, cfg, config_json, parent, run_id, last)

    return recipes


PIPELINES = {"versavit": make_pipeline, "ablation": make_ablation_pipeline, "recipes": make_recipes_pipeline}
