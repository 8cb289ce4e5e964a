"""Typed run configuration: one `RunConfig` describes a whole pipeline run.

Every model forbids unknown keys, so a typo fails loudly before any work starts. Numbers default
to the paper's recipe (RECIPE.md); `configs/tiny.yaml` scales sizes down for a 2-core machine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from versavit.config.trainable import check_pattern

TASKS: tuple[str, ...] = ("caption", "depth", "refseg")
Task = Literal["caption", "depth", "refseg"]
PATCH_MULTIPLE = 28  # patch 14 x 2x2 spatial merge: every fixed resolution must be a multiple


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_multiple_of_28(value: int) -> int:
    if value % PATCH_MULTIPLE:
        lower = value // PATCH_MULTIPLE * PATCH_MULTIPLE
        raise ValueError(
            f"must be a multiple of {PATCH_MULTIPLE} (patch 14 x 2x2 merge); nearest: {lower} or "
            f"{lower + PATCH_MULTIPLE}"
        )
    return value


# --------------------------------------------------------------------------------------------
# storage, data


class StorageConfig(Strict):
    """Where URLs resolve. Credentials are never stored here: only the names of env variables."""

    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint such as MinIO (http://minio:9000); env AWS_ENDPOINT_URL_S3 or "
        "AWS_ENDPOINT_URL when unset"
    )
    s3_region: str = "us-east-1"
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    create_buckets: bool = True


class SyntheticConfig(Strict):
    """The built-in synthetic world (versavit.data.synthetic)."""

    num_train: int = Field(512, ge=1)
    num_val: int = Field(64, ge=1)
    image_size: int = Field(224, ge=32)
    min_objects: int = Field(3, ge=1)
    max_objects: int = Field(6, ge=1)
    seed: int = 0
    samples_per_shard: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _objects_range(self) -> SyntheticConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        return self


class DataSource(Strict):
    """Shards of one task: a dataset URL (folder with manifest.json) or explicit shard URLs."""

    urls: list[str] = Field(default_factory=list, description="dataset folders or .tar shard URLs")
    val_urls: list[str] = Field(default_factory=list)
    weight: float = Field(1.0, ge=0)


class DataConfig(Strict):
    source: Literal["synthetic", "shards"] = "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig()
    tasks: dict[Task, DataSource] = Field(
        default_factory=dict,
        description="per-task shards; with source=synthetic every task reads the synthetic world",
    )
    shuffle_buffer: int = Field(256, ge=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes per task stream and for data jobs; auto: none for training "
        "on CPU (the step already uses every core, workers only contend: bench/train_step.py), 2 per task on "
        "GPUs, every core for data jobs",
    )
    max_corrupt_fraction: float = Field(
        0.05, ge=0, le=1, description="stop the run once more than this fraction of samples is corrupt"
    )
    min_samples_before_corrupt_check: int = Field(50, ge=1)


# --------------------------------------------------------------------------------------------
# model


class BackboneConfig(Strict):
    kind: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl"
    pretrained: str | None = Field(None, description="path or hub id; None builds from the sizes below")
    embed_dim: int = Field(1280, ge=8)
    depth: int = Field(32, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: Literal[14] = 14
    spatial_merge_size: Literal[2] = 2
    gradient_checkpointing: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> BackboneConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        return self


class CaptionHeadConfig(Strict):
    llm: str | None = Field("Qwen/Qwen3-1.7B", description="path or hub id of the causal LM; None = tiny")
    tokenizer: str | None = None
    projector_hidden: int = Field(4096, ge=1)
    max_text_tokens: int = Field(512, ge=8)
    tiny_llm_hidden: int = Field(64, ge=8, description="sizes used when llm is None")
    tiny_llm_layers: int = Field(2, ge=1)


class DepthHeadConfig(Strict):
    layers: list[int] | None = Field(None, description="backbone layers; None = three uniformly spaced")
    features: int = Field(256, ge=8)
    target: Literal["depth", "disparity"] = "disparity"


class RefSegHeadConfig(Strict):
    text_dim: int = Field(4096, ge=8, description="dimension of the offline text embeddings")
    decoder_dim: int = Field(256, ge=8)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(8, ge=1)


class HeadsConfig(Strict):
    caption: CaptionHeadConfig = CaptionHeadConfig()
    depth: DepthHeadConfig = DepthHeadConfig()
    refseg: RefSegHeadConfig = RefSegHeadConfig()


class ModelConfig(Strict):
    backbone: BackboneConfig = BackboneConfig()
    heads: HeadsConfig = HeadsConfig()


# --------------------------------------------------------------------------------------------
# training stages


class ResolutionConfig(Strict):
    caption_max: int = Field(896, ge=28, description="VQA/caption: dynamic resolution up to this side")
    caption_min: int = Field(56, ge=28)
    depth: int = Field(532, ge=28)
    refseg: int = Field(560, ge=28)

    _mult = field_validator("caption_max", "caption_min", "depth", "refseg")(_check_multiple_of_28)


class LossWeights(Strict):
    caption: float = Field(1 / 3, ge=0)
    depth: float = Field(1 / 3, ge=0)
    refseg: float = Field(1 / 3, ge=0)
    depth_ssi: float = Field(1.0, ge=0)
    depth_gm: float = Field(0.5, ge=0)
    gm_scales: int = Field(4, ge=1)
    seg_bce: float = Field(2.0, ge=0)
    seg_dice: float = Field(0.5, ge=0)


class OptimConfig(Strict):
    lr_backbone: float = Field(1e-5, gt=0, description="ViT, projector and LLM")
    lr_heads: float = Field(1e-4, gt=0, description="depth and segmentation heads")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, gt=0)


class StageLength(Strict):
    max_steps: int | None = Field(None, ge=1, description="optimiser steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    checkpoint_interval: int = Field(1000, ge=1)


class WarmupStageConfig(StageLength):
    enabled: bool = True
    lr: float = Field(1e-3, gt=0)
    global_batch: int = Field(1024, ge=1)
    micro_batch: int = Field(8, ge=1)


class SynergyConfig(Strict):
    """VITRON-style cross-task synergy regulariser (versavit.models.synergy), off by default.

    Pooled backbone features -> a task-invariant and a task-specific projection; a discriminator tries to
    tell the task from the invariant part through a gradient-reversal layer (so the backbone learns to hide
    it), a classifier reads it from the specific part, and an orthogonality term keeps the two apart.
    """

    enabled: bool = False
    weight: float = Field(0.1, ge=0, description="added to every micro-step's task loss (so it is also scaled by "
                          "that task's loss weight)")
    dim: int = Field(64, ge=2, description="size of the task-invariant and task-specific projections")
    grl_scale: float = Field(1.0, ge=0, description="gradient reversal factor: -scale x the discriminator's "
                             "gradient reaches the invariant projection and the backbone")
    specific_weight: float = Field(1.0, ge=0, description="task classifier on the task-specific part")
    orthogonal_weight: float = Field(0.1, ge=0, description="soft orthogonality of the two parts (DSN)")


def _check_tasks(v: list[str]) -> list[str]:
    if not v:
        raise ValueError(f"needs at least one task of {list(TASKS)}")
    if len(set(v)) != len(v):
        raise ValueError("lists a task twice")
    return v


def _check_batches(v: dict[str, int]) -> dict[str, int]:
    for task, size in v.items():
        if size < 1:
            raise ValueError(f"batch size of task {task!r} must be >= 1, got {size}")
    return v


class MultitaskStageConfig(StageLength):
    tasks: list[Task] = Field(default_factory=lambda: list(TASKS))
    init_from: str | None = Field(
        "auto", description="weights trained by an earlier stage: 'auto' = this run's warm-up (the previous "
        "recipe stage) if it exists, a URL of a stage export, or null")
    loss_weights: LossWeights = LossWeights()
    optim: OptimConfig = OptimConfig()
    batch_size: dict[Task, int] = Field(default_factory=lambda: {"caption": 8, "depth": 32, "refseg": 32})
    resolution: ResolutionConfig = Field(ResolutionConfig(), description="input sizes of every stage")
    synergy: SynergyConfig = SynergyConfig()

    _tasks = field_validator("tasks")(_check_tasks)
    _batches = field_validator("batch_size")(_check_batches)

    @model_validator(mode="after")
    def _batch_for_every_task(self) -> MultitaskStageConfig:
        missing = [t for t in self.tasks if t not in self.batch_size]
        if missing:
            raise ValueError(f"batch_size has no entry for active task(s) {missing}")
        return self


TextSource = Literal["caption", "dense", "vqa", "mixed"]


class RecipeStage(StageLength):
    """One stage of a training recipe: what trains, on which tasks and text, how fast and how long.

    Outputs go to `<workdir>/stages/<name>[-<variant>]`. Settings not named here are shared by every stage:
    `train.multitask.optim` (betas, schedule, warm-up ratio, clipping, default weight decay),
    `train.multitask.resolution` and the sub-loss weights of `train.multitask.loss_weights`.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$", max_length=24,
                      description="stage folder and job name: lowercase letters, digits, '-'")
    tasks: list[Task]
    trainable: list[str] = Field(
        min_length=1, description="parameter-name patterns (versavit.config.trainable): globs such as "
        "'heads.depth.*', 'backbone.blocks[-4:]' for the top 4 ViT blocks, shortcuts 'projector', 'llm', 'vit', "
        "'*' for everything; '!pattern' excludes. The backbone's unused merger never trains")
    lr_backbone: float = Field(1e-5, gt=0, description="ViT, projector and LLM parameters")
    lr_heads: float = Field(1e-4, gt=0, description="depth / segmentation heads and the synergy module")
    weight_decay: float | None = Field(None, ge=0, description="None = train.multitask.optim.weight_decay")
    batch_size: dict[Task, int] = Field(description="per-rank micro-batch of each task")
    global_batch: int | None = Field(
        None, ge=1, description="single-task stages: accumulate micro-batches up to this many samples per "
        "optimiser step over all ranks; None = one micro-batch per task per step")
    caption_source: TextSource = Field(
        "mixed", description="text of the caption task: caption (scene captions), dense (region text built from "
        "the objects' referring expressions), vqa (question/answer pairs), mixed (captions and QA, VersaViT)")
    loss_weights: dict[Task, float] | None = Field(None, description="lambda per task; None = "
                                                   "train.multitask.loss_weights")
    init_from: str | None = Field(
        "auto", description="'auto' = the export of the previous stage of the recipe (same variant, else "
        "variant ''), a URL of a stage export, or null")
    synergy: SynergyConfig = SynergyConfig()

    _tasks = field_validator("tasks")(_check_tasks)
    _batches = field_validator("batch_size")(_check_batches)

    @model_validator(mode="after")
    def _consistent(self) -> RecipeStage:
        for pattern in self.trainable:
            check_pattern(pattern)
        missing = [t for t in self.tasks if t not in self.batch_size]
        if missing:
            raise ValueError(f"batch_size has no entry for active task(s) {missing}")
        if self.global_batch is not None and len(self.tasks) != 1:
            raise ValueError("global_batch (accumulation) is for single-task stages; multi-task stages take "
                             "one micro-batch per task per step")
        if self.loss_weights is not None:
            if missing := [t for t in self.tasks if t not in self.loss_weights]:
                raise ValueError(f"loss_weights has no entry for active task(s) {missing}")
            if any(w < 0 for w in self.loss_weights.values()):
                raise ValueError("loss_weights must be >= 0")
        if self.synergy.enabled and len(self.tasks) < 2:
            raise ValueError("synergy needs at least two tasks (its discriminator tells tasks apart)")
        return self


WARMUP_TRAINABLE = ["projector"]  # VersaViT's warm-up: the projector alone (ViT and LLM frozen)
MULTITASK_TRAINABLE = ["*"]  # VersaViT's multi-task stage: ViT, projector, LLM and heads


class TrainConfig(Strict):
    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2] = 2
    seed: int = 0
    dist_timeout_s: int = Field(1800, ge=10, description="a collective waiting longer than this fails the run")
    log_interval: int = Field(1, ge=1, description="optimiser steps between metric points")
    warmup: WarmupStageConfig = WarmupStageConfig()
    multitask: MultitaskStageConfig = MultitaskStageConfig()
    recipe: list[RecipeStage] | None = Field(
        None, description="the stages, in order; None = VersaViT's: `warmup` (if enabled) then `multitask`, "
        "derived from the two blocks above")

    @model_validator(mode="after")
    def _recipe_valid(self) -> TrainConfig:
        if self.recipe is not None:
            if not self.recipe:
                raise ValueError("recipe needs at least one stage (or null for VersaViT's two stages)")
            names = [s.name for s in self.recipe]
            if twice := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"recipe names stage(s) {twice} more than once")
        else:
            try:  # the derived stages must be valid too (e.g. synergy with a single task)
                self.stages()
            except ValidationError as exc:
                raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return self

    def stages(self) -> list[RecipeStage]:
        """The recipe: `recipe` as written, or VersaViT's two stages derived from `warmup` and `multitask`."""
        if self.recipe is not None:
            return list(self.recipe)
        out = []
        w, m = self.warmup, self.multitask
        length = ("max_steps", "epochs", "checkpoint_interval")
        if w.enabled:
            out.append(RecipeStage(
                name="warmup", tasks=["caption"], trainable=WARMUP_TRAINABLE, lr_backbone=w.lr, lr_heads=w.lr,
                weight_decay=0.0, batch_size={"caption": w.micro_batch}, global_batch=w.global_batch,
                loss_weights={"caption": 1.0}, init_from=None, **{k: getattr(w, k) for k in length}))
        out.append(RecipeStage(
            name="multitask", tasks=m.tasks, trainable=MULTITASK_TRAINABLE, lr_backbone=m.optim.lr_backbone,
            lr_heads=m.optim.lr_heads, batch_size={t: m.batch_size[t] for t in m.tasks},
            loss_weights={t: getattr(m.loss_weights, t) for t in m.tasks}, init_from=m.init_from,
            synergy=m.synergy, **{k: getattr(m, k) for k in length}))
        return out

    def stage(self, name: str) -> RecipeStage:
        """The recipe stage called `name`."""
        stages = self.stages()
        for s in stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage {name!r}; this config's recipe has {[s.name for s in stages]}")

    def stage_path(self, name: str) -> str:
        """Where a stage is configured, for messages: train.warmup, train.multitask or train.recipe[i]."""
        if self.recipe is None:
            return f"train.{name}"
        return f"train.recipe[{[s.name for s in self.recipe].index(name)}]"


# --------------------------------------------------------------------------------------------
# pseudo-labelling, evaluation, tracking, launch


class TeachersConfig(Strict):
    depth: str = "depth-anything/Depth-Anything-V2-Large-hf"
    depth_input_size: int = Field(518, ge=14)
    masks: str = "facebook/sam-vit-huge"
    describer: str | None = Field(None, description="image-text-to-text model; None = class label text")
    embedder: str = "Qwen/Qwen3-Embedding-8B"


class LabelingConfig(Strict):
    use_ground_truth: bool = Field(
        True, description="synthetic world: keep exact ground truth instead of teacher labels"
    )
    teachers: TeachersConfig = TeachersConfig()
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ProbeConfig(Strict):
    seg_resolution: int = Field(560, ge=28)
    depth_resolution: int = Field(448, ge=28)
    depth_head: Literal["linear", "binned"] = "linear"
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)

    _mult = field_validator("seg_resolution", "depth_resolution")(_check_multiple_of_28)


class EvalConfig(Strict):
    benchmarks: list[str] = Field(default_factory=lambda: ["synthetic"])
    baseline_backbone: str | None = Field(None, description="path/hub id of the baseline; None = the "
                                          "stage's starting backbone")
    probe: ProbeConfig = ProbeConfig()
    seed: int = 0


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; None = sqlite:///<workdir>/mlflow.db")
    experiment: str = "versavit"


class ResourcesConfig(Strict):
    gpus_per_node: int = Field(0, ge=0)
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = Field("16Gi", description="/dev/shm for DataLoader workers and NCCL")
    gpu_resource_name: str = "nvidia.com/gpu"


class LaunchConfig(Strict):
    backend: Literal["local", "pytorchjob", "trainjob"] = "local"
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    image: str = "ghcr.io/versavit/trainer:0.1.0"
    namespace: str = "versavit"
    service_account: str = "versavit-runner"
    resources: ResourcesConfig = ResourcesConfig()
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="env var -> 'secret-name/key'; values never in the config"
    )
    backoff_limit: int = Field(3, ge=0)


class RunConfig(Strict):
    name: str = "versavit"
    workdir: str = Field("runs/versavit", description="root URL of everything a run writes (path or s3://)")
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    labeling: LabelingConfig = LabelingConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()

    @field_validator("workdir")
    @classmethod
    def _no_credentials_in_url(cls, v: str) -> str:
        if "://" in v and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("must not carry credentials (user:secret@); set them as env variables")
        return v

    @model_validator(mode="after")
    def _data_sources(self) -> RunConfig:
        if self.data.source == "shards":
            tasks = dict.fromkeys(t for s in self.train.stages() for t in s.tasks)
            missing = [t for t in tasks if not self.data.tasks.get(t, DataSource()).urls]
            if missing:
                raise ValueError(f"data.source is 'shards' but data.tasks has no urls for {missing}")
        return self
