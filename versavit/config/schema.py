"""Typed run configuration: one `RunConfig` describes a whole pipeline run.

Every model forbids unknown keys, so a typo fails loudly before any work starts. Numbers default
to the paper's recipe (RECIPE.md); `configs/tiny.yaml` scales sizes down for a 2-core machine.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from versavit.config.trainable import check_pattern

TASKS: tuple[str, ...] = ("caption", "depth", "refseg")
Task = Literal["caption", "depth", "refseg"]
PATCH_MULTIPLE = 28  # patch 14 x 2x2 spatial merge: every fixed resolution must be a multiple
BackboneKind = Literal["qwen2_vl", "qwen2_5_vl", "siglip2"]
# Each backbone kind's ViT patch side; images are resized to multiples of patch x 2x2 merge (28, or 32 for SigLIP2)
PATCH_SIZES: dict[str, int] = {"qwen2_vl": 14, "qwen2_5_vl": 14, "siglip2": 16}
RESIZE_FACTORS: tuple[int, ...] = tuple(sorted({2 * p for p in PATCH_SIZES.values()}))
# The evaluator's benchmarks (versavit.eval.datasets.BENCHMARKS, whose keys a test holds equal to this), named
# here so that `eval.benchmarks` is checked when the config loads, not at the end of a run.
BENCHMARK_NAMES: tuple[str, ...] = (
    "synthetic", "ade20k", "voc", "cityscapes", "nyu", "kitti", "refcoco", "refcoco+", "refcocog", "da2k", "navi",
    "spair", "coco-karpathy", "mmbench", "mmstar", "mmmu", "mathvista", "hallusionbench", "ai2d", "ocrbench",
    "mmvet")
# The sources `versavit data prepare` reads (versavit.data.prepare.SOURCES, whose keys a test holds equal to
# this): training sets, then benchmarks, each in the layout its authors publish.
TRAINING_SOURCES: tuple[str, ...] = (
    "objects365", "grit", "sa1b", "refcoco", "refcoco+", "refcocog", "pixmo-cap", "idl-wds", "finevision",
    "sa1b-internvl", "images", "coco-stuff")
BENCHMARK_SOURCES: tuple[str, ...] = ("ade20k", "voc2012", "cityscapes", "nyuv2", "kitti", "da2k", "navi", "spair71k",
                                      "coco-karpathy", "mmbench", "mmstar", "mmmu", "mathvista", "hallusionbench",
                                      "ai2d", "ocrbench", "mmvet")
# The evaluators (versavit.eval.evaluators.EVALUATORS, whose keys a test holds equal to this), in report order.
EVALUATOR_NAMES: tuple[str, ...] = (
    "linear-probe", "zero-shot-depth", "da2k", "refseg", "finetune-depth", "refseg-finetune", "correspondence",
    "vqa", "retrieval")
# Those that train (kind "training"): a job of their own through the launchers, not the evaluate step's pod.
TRAINING_EVALUATORS: tuple[str, ...] = ("finetune-depth", "refseg-finetune", "vqa", "retrieval")
SOURCE_NAMES: tuple[str, ...] = TRAINING_SOURCES + BENCHMARK_SOURCES
# Pseudo-label steps, in the order they run on a dataset (describe reads masks, embed reads the texts).
LABEL_KINDS: tuple[str, ...] = ("depth", "masks", "describe", "embed")
LabelKind = Literal["depth", "masks", "describe", "embed"]


def _check_url(value: str | None) -> str | None:
    """An `s3://` URL must name a bucket (`s3://bucket/prefix`): `s3://`, `s3:///x` and `s3:/x` fail here, not
    later inside the ranks."""
    if value is None or not value.lower().startswith("s3:"):
        return value
    rest = value[3:]
    if not rest.startswith("//"):
        raise ValueError("an s3 URL is s3://bucket/prefix (two slashes after 's3:')")
    if not rest[2:].split("/", 1)[0]:
        raise ValueError("an s3 URL needs a bucket: s3://bucket/prefix")
    return value


Url = Annotated[str, AfterValidator(_check_url)]
OptionalUrl = Annotated[str | None, AfterValidator(_check_url)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _nearest(value: int, unit: int) -> str:
    lower = value // unit * unit
    return f"{lower} or {lower + unit}"


def _check_patch_multiple(value: int) -> int:
    """A fixed resolution: a multiple of 28 (patch 14 x 2x2 merge), or of 32 (SigLIP2's patch 16 x 2x2). Which one
    the run's backbone needs is checked with the whole config (RunConfig: `model.backbone.resize_factor`)."""
    if all(value % unit for unit in RESIZE_FACTORS):
        raise ValueError(
            f"must be a multiple of {PATCH_MULTIPLE} (patch 14 x 2x2 merge; 32 with backbone kind siglip2, patch 16); "
            f"nearest: {_nearest(value, PATCH_MULTIPLE)}"
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
    seed: int = Field(0, description="seeds the synthetic world (every sample's scene)")
    samples_per_shard: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _objects_range(self) -> SyntheticConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        return self


class DataSource(Strict):
    """Shards of one task: a dataset URL (folder with manifest.json) or explicit shard URLs."""

    urls: list[Url] = Field(default_factory=list, description="dataset folders or .tar shard URLs")
    val_urls: list[Url] = Field(default_factory=list)


def _check_source(name: str) -> str:
    if name not in SOURCE_NAMES:
        close = difflib.get_close_matches(name, SOURCE_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown source {name!r}{hint}; valid names: {', '.join(SOURCE_NAMES)}")
    return name


class DatasetSpec(Strict):
    """One dataset of the run: converted from its published layout (`versavit data prepare`, when `input` is
    set) into versavit shards at `url`, then pseudo-labelled (`labels`, in LABEL_KINDS order) into `labelled`.
    Training stages read `labelled` when there are labels, else `url`; the pipeline runs both steps first."""

    source: Annotated[str, AfterValidator(_check_source)] = Field(
        description=f"a `data prepare` source: {', '.join(SOURCE_NAMES)}")
    input: OptionalUrl = Field(None, description="raw input in the source's published layout (folder or URL); "
                               "None = `url` already holds prepared shards")
    url: Url = Field(description="the prepared versavit shards (manifest.json there, or <url>/<split>/ per split)")
    splits: list[str] = Field(default_factory=list, description="splits to prepare, each into <url>/<split>; "
                              "empty = the source's default split, written at <url>")
    labels: list[LabelKind] = Field(default_factory=list, description="pseudo-label steps run on this dataset")
    labelled: OptionalUrl = Field(None, description="where the labelled shards go (required with labels)")

    @field_validator("labels")
    @classmethod
    def _label_order(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a kind twice")
        return sorted(v, key=LABEL_KINDS.index)  # the order they must run in

    @model_validator(mode="after")
    def _labels(self) -> DatasetSpec:
        if self.labels and not self.labelled:
            raise ValueError("labels are set but labelled (the output URL) is not")
        if self.labelled and not self.labels:
            raise ValueError("labelled is set but there are no labels to write there")
        if self.labels and self.splits:
            raise ValueError("labelled datasets have one split (splits is for benchmarks)")
        return self

    def training_url(self) -> str:
        """What training reads: the labelled shards when there are labels, else the prepared ones."""
        return self.labelled or self.url


class DataConfig(Strict):
    source: Literal["synthetic", "shards"] = "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig()
    tasks: dict[Task, DataSource] = Field(
        default_factory=dict,
        description="per-task shards of every stage that names none of its own (a stage's `data`); with "
        "source=synthetic every task reads the synthetic world",
    )
    datasets: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)], DatasetSpec] = Field(
        default_factory=dict, description="datasets the pipeline prepares and pseudo-labels before training "
        "(name -> spec); stages and benchmarks read them by URL")
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
    kind: BackboneKind = Field(
        "qwen2_vl", description="qwen2_vl / qwen2_5_vl: Qwen2-VL's / Qwen2.5-VL's ViT (patch 14); siglip2: SigLIP2 "
        "NaFlex's (patch 16; configs/siglip2.yaml, the paper's Table 6 comparison)")
    pretrained: OptionalUrl = Field(None, description="path or hub id; None builds from the sizes below")
    embed_dim: int = Field(1280, ge=8)
    depth: int = Field(32, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: Literal[14, 16] = Field(14, description="the kind's patch side (14 Qwen-VL, 16 SigLIP2): set from "
                                        "kind when not given")
    spatial_merge_size: Literal[2] = 2
    gradient_checkpointing: bool = Field(True, description="recompute each ViT block in backward (when training)")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="the tower's attention (transformers' attn_implementation): sdpa loops over the images "
        "of a packed batch; flash_attention_2 (needs the flash-attn package and a GPU) runs them in one varlen call "
        "over cu_seqlens, without padding; eager keeps the S x S attention matrix")
    export_mllm: bool = Field(False, description="a stage that trains the tower also writes export/mllm: "
                              "`pretrained` (a full Qwen2-VL / Qwen2.5-VL checkpoint) with the trained tower")

    @model_validator(mode="after")
    def _heads_divide(self) -> BackboneConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        return self

    @model_validator(mode="after")
    def _kind_settings(self) -> BackboneConfig:
        patch = PATCH_SIZES[self.kind]
        if "patch_size" not in self.model_fields_set:
            # the kind's own (also after `kind` is assigned); written past validate_assignment, which would recurse
            self.__dict__["patch_size"] = patch
        elif self.patch_size != patch:
            raise ValueError(f"backbone kind {self.kind} has patch size {patch}, not {self.patch_size} "
                             "(leave patch_size out: it follows kind)")
        if self.kind == "siglip2":
            if self.attn_implementation == "flash_attention_2":
                raise ValueError("backbone kind siglip2: transformers' SigLIP2 has no flash_attention_2; use sdpa")
            if self.export_mllm:
                raise ValueError("export_mllm puts the trained tower back into a full Qwen2-VL / Qwen2.5-VL "
                                 "checkpoint; backbone kind siglip2 has none (set export_mllm: false)")
        return self

    @property
    def resize_factor(self) -> int:
        """Image sides are multiples of this: patch x 2x2 merge (28 for Qwen-VL, 32 for SigLIP2)."""
        return self.patch_size * self.spatial_merge_size


class CaptionHeadConfig(Strict):
    llm: OptionalUrl = Field("Qwen/Qwen3-1.7B", description="path or hub id of the causal LM; None = tiny")
    tokenizer: OptionalUrl = None
    projector_hidden: int = Field(5120, ge=1, description="hidden width of the projector MLP (Qwen2-VL's "
                                  "merger: 4*D -> 4*D -> LLM hidden)")
    max_text_tokens: int = Field(512, ge=8)
    tiny_llm_hidden: int = Field(64, ge=8, description="sizes used when llm is None")
    tiny_llm_layers: int = Field(2, ge=1)
    gradient_checkpointing: bool = Field(True, description="recompute the LLM's layers in backward (when training)")


class DepthHeadConfig(Strict):
    layers: list[int] | None = Field(None, description="backbone layers; None = three uniformly spaced")
    features: int = Field(256, ge=8)
    out_channels: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="reassemble channels per layer (shallow to deep); None = [f, 2f, 4f, 4f][:layers]")
    target: Literal["depth", "disparity"] = "disparity"

    @model_validator(mode="after")
    def _one_width_per_layer(self) -> DepthHeadConfig:
        n = len(self.layers) if self.layers else 3
        if self.out_channels is not None and len(self.out_channels) != n:
            raise ValueError(f"out_channels has {len(self.out_channels)} entries, one per depth layer expected ({n})")
        return self


class RefSegHeadConfig(Strict):
    text_dim: int = Field(4096, ge=8, description="dimension of the offline text embeddings")
    decoder_dim: int = Field(256, ge=8)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(8, ge=1)
    prompt_hidden: int | None = Field(None, ge=1, description="hidden width of the text prompt encoder's MLP; "
                                      "None = decoder_dim")


class HeadsConfig(Strict):
    caption: CaptionHeadConfig = CaptionHeadConfig()
    depth: DepthHeadConfig = DepthHeadConfig()
    refseg: RefSegHeadConfig = RefSegHeadConfig()


class ModelConfig(Strict):
    backbone: BackboneConfig = BackboneConfig()
    heads: HeadsConfig = HeadsConfig()


# --------------------------------------------------------------------------------------------
# training: the settings every stage shares, then the stages


class OptimConfig(Strict):
    """AdamW and its schedule, shared by every stage (`train.optim`). The learning rates are each stage's
    (`lr_backbone`, `lr_heads`)."""

    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay of every stage whose own "
                                "weight_decay is null")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="linear LR warm-up over this fraction of a stage's "
                                "steps, then the schedule")
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")


class ResolutionConfig(Strict):
    """Input sizes of every stage (`train.resolution`); evaluation runs the trained heads at depth / refseg."""

    caption_max: int = Field(896, ge=28, description="VQA/caption: dynamic resolution up to this side")
    caption_min: int = Field(56, ge=28)
    depth: int = Field(532, ge=28)
    refseg: int = Field(560, ge=28)

    _mult = field_validator("caption_max", "caption_min", "depth", "refseg")(_check_patch_multiple)


class LossConfig(Strict):
    """The terms inside the depth and referring-segmentation losses, shared by every stage (`train.loss`).
    How much each task counts (lambda) is each stage's `loss_weights`."""

    depth_ssi: float = Field(1.0, ge=0, description="scale-and-shift-invariant depth term")
    depth_gm: float = Field(0.5, ge=0, description="multi-scale gradient-matching depth term")
    gm_scales: int = Field(4, ge=1, description="scales of the gradient-matching term")
    seg_bce: float = Field(2.0, ge=0, description="binary cross-entropy of the mask")
    seg_dice: float = Field(0.5, ge=0, description="Dice loss of the mask")


class StageLength(Strict):
    max_steps: int | None = Field(None, ge=1, description="optimiser steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    checkpoint_interval: int = Field(1000, ge=1)


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


TextSource = Literal["caption", "dense", "vqa", "mixed"]

# The types of the stage fields the presets give other defaults: constraints and descriptions live here once.
Trainable = Annotated[list[str], Field(
    min_length=1, description="parameter-name patterns (versavit.config.trainable): globs such as "
    "'heads.depth.*', 'backbone.blocks[-4:]' for the top 4 ViT blocks, shortcuts 'projector', 'llm', 'vit', "
    "'*' for everything; '!pattern' excludes. The backbone's unused merger never trains")]
LrBackbone = Annotated[float, Field(gt=0, description="ViT, projector and LLM parameters")]
LrHeads = Annotated[float, Field(gt=0, description="depth / segmentation heads and the synergy module")]
WeightDecay = Annotated[float | None, Field(ge=0, description="None = train.optim.weight_decay")]
BatchSizes = Annotated[dict[Task, int], Field(description="per-rank micro-batch of each task")]
GlobalBatch = Annotated[int | None, Field(
    ge=1, description="single-task stages: accumulate micro-batches up to this many samples per optimiser step "
    "over all ranks; None = one micro-batch per task per step")]
LossWeights = Annotated[dict[Task, Annotated[float, Field(ge=0)]], Field(
    description="lambda per task: how much each active task's loss counts (default: 1/3 each, VersaViT's)")]
InitFrom = Annotated[str | None, AfterValidator(_check_url), Field(
    description="'auto' = the export of the previous stage of the recipe (same variant, else variant ''), a URL "
    "of a stage export, or null")]

WARMUP_TRAINABLE = ["projector"]  # VersaViT's warm-up: the projector alone (ViT and LLM frozen)
MULTITASK_TRAINABLE = ["*"]  # VersaViT's multi-task stage: ViT, projector, LLM and heads


class RecipeStage(StageLength):
    """One stage of a training recipe: what trains, on which tasks and text, how fast and how long.

    The only stage type: `train.recipe` lists them, and VersaViT's two stages `train.warmup` and
    `train.multitask` are presets of it (same fields and checks, other defaults). Outputs go to
    `<workdir>/stages/<name>[-<variant>]`. Settings not named here are shared by every stage: `train.optim`
    (betas, schedule, warm-up ratio, clipping, default weight decay), `train.resolution` and `train.loss`.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$", max_length=24,
                      description="stage folder and job name: lowercase letters, digits, '-'")
    tasks: list[Task]
    trainable: Trainable
    lr_backbone: LrBackbone = 1e-5
    lr_heads: LrHeads = 1e-4
    weight_decay: WeightDecay = None
    batch_size: BatchSizes
    global_batch: GlobalBatch = None
    caption_source: TextSource = Field(
        "mixed", description="text of the caption task: caption (scene captions), dense (region text built from "
        "the objects' referring expressions), vqa (question/answer pairs), mixed (captions and QA, VersaViT)")
    loss_weights: LossWeights = Field(default_factory=lambda: dict.fromkeys(TASKS, 1 / 3))
    init_from: InitFrom = "auto"
    synergy: SynergyConfig = SynergyConfig()
    data: dict[Task, DataSource] = Field(default_factory=dict, description="this stage's shards per task; a task "
                                         "not named here reads data.tasks[task]")

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
        if missing := [t for t in self.tasks if t not in self.loss_weights]:
            raise ValueError(f"loss_weights has no entry for active task(s) {missing}")
        if self.synergy.enabled and len(self.tasks) < 2:
            raise ValueError("synergy needs at least two tasks (its discriminator tells tasks apart)")
        return self


class WarmupStage(RecipeStage):
    """VersaViT's warm-up (`train.warmup`): the projector alone learns to caption, ViT and LLM frozen, at a high
    rate with a large accumulated batch. A preset of `RecipeStage`: every field can be changed but the name."""

    name: Literal["warmup"] = Field("warmup", description="fixed: the preset's stage folder and job name")
    tasks: list[Task] = Field(default_factory=lambda: ["caption"])
    trainable: Trainable = Field(default_factory=lambda: list(WARMUP_TRAINABLE))
    lr_backbone: LrBackbone = 1e-3
    lr_heads: LrHeads = 1e-3
    weight_decay: WeightDecay = 0.0
    batch_size: BatchSizes = Field(default_factory=lambda: {"caption": 8})
    global_batch: GlobalBatch = 1024
    loss_weights: LossWeights = Field(default_factory=lambda: {"caption": 1.0})
    init_from: InitFrom = None
    enabled: bool = Field(True, description="false: the recipe starts with the multi-task stage")


class MultitaskStage(RecipeStage):
    """VersaViT's multi-task stage (`train.multitask`): everything trains on caption/VQA, depth and referring
    segmentation, one micro-batch per task per step. A preset of `RecipeStage`: every field can be changed
    but the name."""

    name: Literal["multitask"] = Field("multitask", description="fixed: the preset's stage folder and job name")
    tasks: list[Task] = Field(default_factory=lambda: list(TASKS))
    trainable: Trainable = Field(default_factory=lambda: list(MULTITASK_TRAINABLE))
    batch_size: BatchSizes = Field(default_factory=lambda: {"caption": 8, "depth": 32, "refseg": 32})


class DeepSpeedConfig(Strict):
    """DeepSpeed's ZeRO communication settings (`train.deepspeed`; versavit.train.engine.deepspeed_config)."""

    overlap_comm: bool | Literal["auto"] = Field(
        "auto", description="reduce gradient buckets while backward still runs (two bucket buffers); auto: on GPUs")
    reduce_bucket_size: int = Field(500_000_000, ge=1_000_000, description="elements per gradient reduction "
                                    "bucket (bf16: 2 bytes each; two buffers with overlap_comm)")
    allgather_bucket_size: int = Field(500_000_000, ge=1_000_000, description="elements per parameter all-gather "
                                       "after the step (a chunk limit; all_gather_into_tensor allocates nothing)")


class TrainConfig(Strict):
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "bf16", description="auto = bf16 on GPUs with bf16 support and on CPUs with native bf16 kernels "
        "(AVX-512), fp32 elsewhere (bf16 on an AVX2-only CPU is ~30x slower: versavit.models.precision)")
    zero_stage: Literal[0, 1, 2] = 2
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    seed: int = Field(0, description="seeds model initialisation and the data order and sampling of every stage "
                      "(eval.seed seeds the probes, data.synthetic.seed the synthetic world)")
    dist_timeout_s: int = Field(1800, ge=10, description="a collective waiting longer than this fails the run")
    restart: bool = Field(False, description="start the stage over from step 0, deleting its checkpoints first; "
                          "needed when a stage folder holds a checkpoint made under another config (a rerun "
                          "refuses to resume it). Every launch with it set starts over: unset it afterwards")
    log_interval: int = Field(1, ge=1, description="optimiser steps between metric points")
    optim: OptimConfig = OptimConfig()
    resolution: ResolutionConfig = Field(ResolutionConfig(), description="input sizes of every stage")
    loss: LossConfig = LossConfig()
    warmup: WarmupStage = WarmupStage()
    multitask: MultitaskStage = MultitaskStage()
    recipe: list[RecipeStage] | None = Field(
        None, description="the stages, in order; None = VersaViT's: `warmup` (if enabled) then `multitask`")

    @model_validator(mode="after")
    def _recipe_valid(self) -> TrainConfig:
        if self.recipe is not None:
            if not self.recipe:
                raise ValueError("recipe needs at least one stage (or null for VersaViT's two stages)")
            names = [s.name for s in self.recipe]
            if twice := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"recipe names stage(s) {twice} more than once")
        return self

    def stages(self) -> list[RecipeStage]:
        """The recipe: `recipe` as written, or VersaViT's two presets, `warmup` (if enabled) then `multitask`."""
        if self.recipe is not None:
            return list(self.recipe)
        return [self.warmup, self.multitask] if self.warmup.enabled else [self.multitask]

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
    depth: Url = "depth-anything/Depth-Anything-V2-Large-hf"
    depth_input_size: int = Field(518, ge=14)
    masks: Url = "facebook/sam-vit-huge"
    describer: OptionalUrl = Field(None, description="image-text-to-text model; None = class label text")
    embedder: Url = "Qwen/Qwen3-Embedding-8B"


class LabelingConfig(Strict):
    use_ground_truth: bool = Field(
        True, description="synthetic world: keep exact ground truth instead of teacher labels"
    )
    teachers: TeachersConfig = TeachersConfig()
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, description="parallel workers of each prepare and label step (KFP ParallelFor "
                         "over shard slices): worker i takes output shards i, i+n, ... of every dataset")
    gpus_per_worker: int = Field(1, ge=0, description="GPUs of each label worker on the cluster (the teachers run "
                                 "on one device each)")


class ProbeConfig(Strict):
    seg_resolution: int = Field(560, ge=28)
    depth_resolution: int = Field(448, ge=28)
    extra_seg_resolutions: list[int] = Field(default_factory=list, description="more segmentation probes, e.g. "
                                             "[448] for Table 14 beside Table 3's 560; metrics `seg_miou_<R>px`")
    depth_head: Literal["linear", "binned"] = "linear"
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_grid: list[float] = Field(default_factory=list, description="DINOv2-style: train one head per learning "
                                 "rate and report the best on the evaluation split; empty = `lr` only")
    batch_size: int = Field(16, ge=1)

    _mult = field_validator("seg_resolution", "depth_resolution")(_check_patch_multiple)

    @field_validator("extra_seg_resolutions")
    @classmethod
    def _extra_mult(cls, values: list[int]) -> list[int]:
        return [_check_patch_multiple(v) for v in values]


def _check_benchmark(spec: str) -> str:
    """An `eval.benchmarks` entry, `name` or `name=root` (versavit.eval.datasets.parse_benchmark): the name
    must be one the evaluator knows; the root is checked when the benchmark opens."""
    name = spec.partition("=")[0].strip().lower()
    if name not in BENCHMARK_NAMES:
        close = difflib.get_close_matches(name, BENCHMARK_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown benchmark {name!r}{hint}; valid names: {', '.join(BENCHMARK_NAMES)}, each "
                         "optionally as name=/path/to/root")
    _check_url(spec.partition("=")[2].strip() or None)
    return spec


class Da2kConfig(Strict):
    """DA-2K relative depth: the multi-task DPT head's depth at each annotated point pair; accuracy of the order."""

    resolution: int | None = Field(None, ge=28, description="input side; None = train.resolution.depth")
    pairs_per_image: int = Field(16, ge=1, description="point pairs drawn per image of a benchmark without DA-2K "
                                 "annotations (the synthetic world's depth, exact order)")

    @field_validator("resolution")
    @classmethod
    def _mult(cls, value: int | None) -> int | None:
        return value if value is None else _check_patch_multiple(value)


class FinetuneDepthConfig(Strict):
    """Fine-tuned depth (paper Table 9): backbone + DPT head trained on the benchmark's train split."""

    epochs: int = Field(5, ge=1)
    lr_backbone: float = Field(1e-5, gt=0)
    lr_head: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1, description="per GPU")
    resolution: int | None = Field(None, ge=28, description="input side; None = train.resolution.depth")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (toy configs); None = epochs")
    flip: bool = Field(True, description="random horizontal flip of training pairs (Depth-Anything-V2's metric "
                       "fine-tune)")
    shuffle_buffer: int = Field(2048, ge=1, description="training samples held to shuffle a streamed (sharded) "
                                "split, about 2.3 MB each at 532 px; a random-access split is permuted whole")
    log_every: int = Field(50, ge=1, description="a progress log line every this many optimiser steps")


class RefsegFinetuneConfig(Strict):
    """Referring-segmentation fine-tune (paper Table 10): backbone + refseg head + LoRA on the text encoder."""

    epochs: int = Field(50, ge=1)
    lr_backbone: float = Field(1e-5, gt=0)
    lr_rest: float = Field(1e-4, gt=0, description="refseg head and LoRA adapters")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1, description="per GPU")
    resolution: int | None = Field(None, ge=28, description="input side; None = train.resolution.refseg")
    text_encoder: str | None = Field(None, description="hub id / path of the text encoder; None = "
                                     "labeling.teachers.embedder")
    train: list[str] = Field(default_factory=list, description="extra training sets (prepared URLs), e.g. "
                             "COCO-Stuff; the benchmark's own train split is always used")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (toy configs); None = epochs")
    shuffle_buffer: int = Field(1024, ge=1, description="training queries held to shuffle the streamed training "
                                "sets, about 1.3 MB each at 560 px (image shared by its queries, mask)")
    log_every: int = Field(50, ge=1, description="a progress log line every this many optimiser steps")


class CorrespondenceConfig(Strict):
    """3D correspondence, Probe3D protocol (versavit.eval.evaluators.correspondence): final-layer features, cosine
    nearest neighbours, recall within thresholds. Keypoint benchmarks (spair, synthetic) transfer each source
    keypoint and count it within `thresholds` x the normaliser (SPair: the target box's longer side, Probe3D's
    recall@0.10; synthetic: the image side); NAVI matches object pixels densely (ratio test, the best
    `navi_num_corr`) and counts matches whose 3D points lie within `navi_thresholds_m` metres."""

    resolutions: dict[str, int] = Field(default_factory=lambda: {"navi": 448, "spair": 896, "synthetic": 224},
                                        description="benchmark -> input side (the paper: NAVI 448, SPair 896); "
                                        "rounded down to the backbone's resize factor (28, or 32 for SigLIP2)")
    default_resolution: int = Field(448, ge=28, description="for benchmarks not in `resolutions`")
    thresholds: list[float] = Field(default_factory=lambda: [0.05, 0.10, 0.15], min_length=1,
                                    description="keypoint recall thresholds, fractions of the normaliser (SPair: the "
                                    "target bounding box's longer side; synthetic: the image side)")
    headline_threshold: float = Field(0.10, gt=0, description="the keypoint threshold of the `recall` column "
                                      "(Probe3D's SPair recall@0.10)")
    navi_thresholds_m: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05], min_length=1,
                                           description="NAVI recall thresholds on the 3D distance, metres "
                                           "(Probe3D's 1, 2 and 5 cm)")
    navi_headline_m: float = Field(0.02, gt=0, description="the NAVI threshold of the `recall` column (Probe3D "
                                   "bins its 2 cm recall by viewpoint change)")
    navi_num_corr: int = Field(1000, ge=1, description="NAVI: matches kept per pair, the most distinctive by "
                               "Lowe's ratio test (Probe3D: 1000)")
    navi_grid_scale: float = Field(0.25, gt=0, le=1, description="NAVI: matching grid side as a fraction of the "
                                   "input side (Probe3D: 0.25, 512 px -> 128); features upsampled (bicubic) to it")
    keypoints_per_pair: int = Field(20, ge=1, description="synthetic: keypoints drawn on object pixels per pair")
    max_pairs: int | None = Field(None, ge=1, description="cap on the pairs scored per benchmark (the first in "
                                  "the reader's order); None = every pair")

    @model_validator(mode="after")
    def _headlines_listed(self) -> CorrespondenceConfig:
        if not any(abs(t - self.headline_threshold) < 1e-9 for t in self.thresholds):
            raise ValueError(f"headline_threshold {self.headline_threshold} must be one of thresholds "
                             f"{self.thresholds}")
        if not any(abs(t - self.navi_headline_m) < 1e-9 for t in self.navi_thresholds_m):
            raise ValueError(f"navi_headline_m {self.navi_headline_m} must be one of navi_thresholds_m "
                             f"{self.navi_thresholds_m}")
        return self


class VqaConfig(Strict):
    """VQA with the frozen trained ViT in an MLLM (paper Table 2): projector, then projector + LLM."""

    llm: str | None = Field(None, description="hub id / path of the LLM (paper: Qwen/Qwen3-8B); None = "
                            "model.heads.caption.llm (a tiny one in tiny configs)")
    stage1_lr: float = Field(5e-4, gt=0, description="stage 1: the projector on caption / OCR data")
    stage2_lr: float = Field(2e-5, gt=0, description="stage 2: projector + LLM on instruction data")
    stage1_data: list[str] = Field(default_factory=list, description="caption/OCR shard URLs; empty = the run's "
                                   "caption data")
    stage2_data: list[str] = Field(default_factory=list, description="VQA shard URLs; empty = the run's VQA data")
    batch_size: int = Field(16, ge=1)
    stage1_steps: int | None = Field(None, ge=1, description="cap (toy configs); None = one epoch")
    stage2_steps: int | None = Field(None, ge=1, description="cap (toy configs); None = one epoch")
    qa_kinds: list[str] = Field(default_factory=list, description="question kinds trained and scored in stage 2 "
                                "(the synthetic world's: count, color, shape, spatial); empty = all")
    max_questions: int | None = Field(None, ge=1, description="score only the evaluation split's first this many "
                                      "questions; None = all")
    max_new_tokens: int = Field(16, ge=1, description="greedy answer length cap")
    processes: int = Field(1, ge=1, le=64, description="processes of the vqa job, one per GPU on one node (eval.gpus "
                           "1; CPU processes with eval.gpus 0): with more than one, both stages train data-parallel "
                           "under DeepSpeed ZeRO-2 and each process answers a share of the questions "
                           "(versavit.eval.vqa.parallel); paper.yaml: 8, as Qwen3-8B's full fine-tune needs")
    lmms_tasks: list[str] = Field(default_factory=list, description="lmms-eval tasks the trained MLLM is also scored "
                                  "on, through lmms-eval itself (extra `lmms-eval`), their scores logged as metrics "
                                  "lmms_<task>_<metric>: task names of lmms-eval's registry (e.g. mmstar, ai2d; "
                                  "downloaded from the hub by lmms-eval) or `local`, the benchmark's own evaluation "
                                  "questions written as a local lmms-eval task (no download)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of both stages (LLaVA's recipe: 0)")
    log_every: int = Field(50, ge=1, description="a progress log line every this many optimiser steps")
    in_memory: int = Field(1024, ge=0, description="a training set of at most this many images is read once and "
                           "kept in memory, and the visual features of up to this many images are kept (the backbone "
                           "is frozen); 0 = stream every epoch, compute every feature")


class RetrievalConfig(Strict):
    """Image-text retrieval (paper Table 11): attention pooling on the ViT + a SigLIP2 text encoder + MLP."""

    text_encoder: str | None = Field(None, description="hub id / path of a SigLIP or SigLIP2 checkpoint (its text "
                                     "model is used, frozen; paper: google/siglip2-so400m-patch14-384); None = a "
                                     "tiny random SigLIP2 text model built in memory (toy runs only)")
    embed_dim: int = Field(1280, ge=1, description="the shared embedding width (paper: 1280)")
    variants: list[Literal["projection-only", "backbone-trained"]] = Field(
        default_factory=lambda: ["projection-only", "backbone-trained"])
    lr: float = Field(1e-4, gt=0, description="backbone-trained variant: pooling layer, text MLP, temperature "
                      "and bias (paper 1e-4)")
    lr_projection: float = Field(5e-4, gt=0, description="projection-only variant (ViT frozen): pooling layer, "
                                 "text MLP, temperature and bias (paper 5e-4)")
    lr_backbone: float = Field(1e-5, gt=0, description="backbone-trained variant: the ViT (paper 1e-5)")
    batch_size: int = Field(64, ge=1, description="per GPU (paper: 128 on each of 128 GPUs); also the scoring "
                            "batch")
    epochs: int = Field(10, ge=1, description="passes over the training pairs (paper: 10)")
    resolution: int | None = Field(None, ge=28, description="input side (square); None = "
                                   "eval.probe.depth_resolution")
    train: list[str] = Field(default_factory=list, description="image-caption shard URLs (paper: CC3M + CC12M "
                             "+ YFCC15M); empty = the synthetic benchmark's own train split for it, else the "
                             "run's caption data")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (toy configs); None = epochs")
    shuffle_buffer: int = Field(2048, ge=1, description="training pairs held to shuffle the streamed shards")
    log_every: int = Field(50, ge=1, description="a progress log line every this many optimiser steps")

    @field_validator("resolution")
    @classmethod
    def _mult(cls, value: int | None) -> int | None:
        return value if value is None else _check_patch_multiple(value)


class EvalConfig(Strict):
    evaluators: list[str] = Field(default_factory=lambda: ["linear-probe", "zero-shot-depth", "da2k", "refseg"],
                                  description=f"protocols to run, from: {', '.join(EVALUATOR_NAMES)}")
    benchmarks: list[Annotated[str, AfterValidator(_check_benchmark)]] = Field(
        default_factory=lambda: ["synthetic"], description=f"{', '.join(BENCHMARK_NAMES)}; each `name` or "
        "`name=root` (a local folder, or for synthetic a shard dataset URL prefix)")
    baseline_backbone: OptionalUrl = Field(None, description="path/hub id of the baseline; None = the "
                                          "stage's starting backbone")
    probe: ProbeConfig = ProbeConfig()
    seed: int = Field(0, description="seeds the linear probes (head initialisation, batch order)")
    da2k: Da2kConfig = Da2kConfig()
    finetune_depth: FinetuneDepthConfig = FinetuneDepthConfig()
    refseg_finetune: RefsegFinetuneConfig = RefsegFinetuneConfig()
    correspondence: CorrespondenceConfig = CorrespondenceConfig()
    vqa: VqaConfig = VqaConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    gpus: int = Field(1, ge=0, le=1, description="GPUs of the evaluate step on the cluster: 1, or 0 for a CPU "
                      "node (evaluation runs on one device, so a step never requests GPUs it would not use)")

    @field_validator("evaluators")
    @classmethod
    def _known_evaluators(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in EVALUATOR_NAMES:
                close = difflib.get_close_matches(name, EVALUATOR_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown evaluator {name!r}{hint}; valid: {', '.join(EVALUATOR_NAMES)} "
                                 "(`versavit eval --list`)")
        if len(set(names)) != len(names):
            raise ValueError(f"an evaluator is named twice in {names}")
        return names


class WeightsConfig(Strict):
    """Checkpoints staged once (`versavit weights stage`): every model the run loads (backbone, LLM, teachers,
    baseline) is copied from the hub or a local folder to `url`, and every pod loads it from there, hub offline."""

    url: OptionalUrl = Field(None, description="where staged checkpoints live (s3:// or a shared folder); None = "
                             "load each model from its hub id or path as configured")
    revisions: dict[str, str] = Field(default_factory=dict, description="hub id -> revision (tag, branch or "
                                      "commit) to stage; default: main")
    hub_token_env: str = Field("HF_TOKEN", description="env variable holding a hub token (gated models); on the "
                               "cluster it comes from `hub_token_secret`")
    hub_token_secret: str | None = Field(None, description="'secret-name/key' of a Kubernetes Secret holding the "
                                         "hub token, for the weights step only")


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
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory of one GPU in GiB, for `versavit plan`'s "
                                         "verdict; None = the planner's table for the GPU model node_selector names")


_CPU = r"^([0-9]*[.])?[0-9]+m?$"  # what KFP and Kubernetes take: "2", "0.5", "500m"
_MEMORY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"


class StepResources(Strict):
    """CPU and memory of one kind of pipeline step (the defaults: a driver step): memory limited at the request
    (a leak is an OOMKill with a reason), CPU limited only where `cpu_limit` is set."""

    cpu: str = Field("500m", pattern=_CPU)
    memory: str = Field("2Gi", pattern=_MEMORY)
    cpu_limit: str | None = Field("2", pattern=_CPU)

    @field_validator("cpu", "cpu_limit", mode="before")
    @classmethod
    def _number_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


class PrepareStepResources(StepResources):
    cpu: str = Field("4", pattern=_CPU)
    memory: str = Field("16Gi", pattern=_MEMORY)
    cpu_limit: str | None = Field(None, pattern=_CPU)


class GpuStepResources(StepResources):
    cpu: str = Field("8", pattern=_CPU)
    memory: str = Field("64Gi", pattern=_MEMORY)
    cpu_limit: str | None = Field(None, pattern=_CPU)


class StepResourcesConfig(Strict):
    driver: StepResources = Field(StepResources(), description="open/close run, weights, data, data check, and "
                                  "train when it only creates and watches a job")
    prepare: PrepareStepResources = Field(PrepareStepResources(), description="each prepare worker (decoding "
                                          "and re-encoding a slice of a dataset)")
    gpu: GpuStepResources = Field(GpuStepResources(), description="each GPU step that is not a training job: "
                                  "label workers, evaluation")


class NetworkConfig(Strict):
    """The fast network of multi-node training jobs (PyTorchJob and TrainJob pods). Off by default."""

    nccl_env: dict[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")], str] = Field(
        default_factory=dict, description="plain env of every training container, e.g. NCCL_IB_HCA, "
        "NCCL_SOCKET_IFNAME, NCCL_DEBUG (no credentials: those go through secret_env)")
    rdma_resources: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="extended resource -> count per node, requested and limited, e.g. "
        "rdma/rdma_shared_device_a: 1 or nvidia.com/hostdev: 8")
    ipc_lock: bool = Field(False, description="add the IPC_LOCK capability (pinning RDMA memory) to the "
                           "otherwise all-dropped capabilities")
    host_network: bool = Field(False, description="run training pods in the node's network namespace "
                               "(dnsPolicy ClusterFirstWithHostNet)")


class SchedulingConfig(Strict):
    """Gang scheduling of the training jobs: all replicas start together or none does (versavit.launch.scheduling
    maps it onto PyTorchJob / TrainJob fields)."""

    kind: Literal["none", "volcano", "kueue", "coscheduling"] = Field(
        "none", description="none: the default scheduler; volcano: a Volcano PodGroup (the training operator run "
        "with --gang-scheduler-name=volcano); kueue: admission by a Kueue LocalQueue; coscheduling: a "
        "scheduler-plugins PodGroup (PyTorchJob: operator flag; TrainJob: the runtime's podGroupPolicy)")
    queue: str | None = Field(None, description="volcano: the Queue (default 'default'); kueue: the LocalQueue "
                              "in the job's namespace (required)")
    priority_class: str | None = Field(None, description="volcano/coscheduling: a PriorityClass; kueue: a "
                                       "WorkloadPriorityClass")
    schedule_timeout_s: int | None = Field(None, ge=1, description="a job whose pods are not all running this "
                                           "long after it was created is deleted (a transient failure: KFP "
                                           "retries the step); also the PodGroup's timeout for coscheduling")
    scheduler_name: str = Field("scheduler-plugins-scheduler", description="coscheduling: the schedulerName of "
                                "the pods (the scheduler-plugins scheduler)")

    @model_validator(mode="after")
    def _kueue_queue(self) -> SchedulingConfig:
        if self.kind == "kueue" and not self.queue:
            raise ValueError("kind kueue needs queue: the LocalQueue of the job's namespace")
        if self.queue and self.kind not in ("volcano", "kueue"):
            raise ValueError(f"queue is for kind volcano or kueue, not {self.kind}")
        return self


class LaunchConfig(Strict):
    backend: Literal["local", "pytorchjob", "trainjob"] = "local"
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    image: str = "ghcr.io/versavit/trainer:0.1.0"
    labeler_image: str = Field("ghcr.io/versavit/labeler:0.1.0", description="image of the prepare and label "
                               "steps (teachers, no DeepSpeed)")
    namespace: str = "versavit"
    service_account: str = "versavit-runner"
    resources: ResourcesConfig = ResourcesConfig()
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="env var -> 'secret-name/key'; values never in the config"
    )
    backoff_limit: int = Field(3, ge=0, description="container restarts, summed over a PyTorchJob's pods, before "
                               "the operator fails the job")
    max_restarts: int = Field(3, ge=0, description="torchrun's restart budget per node: a failed or rejoining "
                              "peer restarts the worker group (c10d rendezvous), every rank resuming from the "
                              "latest checkpoint")
    namespace_from: Literal["pod", "config"] = Field(
        "pod", description="pod: the jobs go to the namespace of the pod that launches them (the KFP run's), "
        "owned by that pod; config: always to `namespace` (also where they go when not launched from a pod)")
    pipeline_service_account: str | None = Field(
        None, description="the KFP run's service account, passed by `pipeline submit` (null: KFP's default, "
        "default-editor in a profile namespace, pipeline-runner standalone); it needs the Role of "
        "manifests/components/profile-namespace")
    scheduling: SchedulingConfig = SchedulingConfig()
    driver_image: str = Field("ghcr.io/versavit/driver:0.1.0", description="image of the pipeline's CPU steps "
                              "(images/driver): open/close run, weights, data, prepare, and train on a cluster "
                              "backend (it only creates and watches the job)")
    step_resources: StepResourcesConfig = StepResourcesConfig()
    network: NetworkConfig = NetworkConfig()
    trainjob_runtime: str = Field("torch-distributed", description="the TrainJob's training runtime, e.g. "
                                  "versavit-torch (manifests/components/trainer-runtime)")
    trainjob_runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"


class RunConfig(Strict):
    name: str = "versavit"
    workdir: Url = Field("runs/versavit", description="root URL of everything a run writes (path or s3://)")
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    labeling: LabelingConfig = LabelingConfig()
    eval: EvalConfig = EvalConfig()
    weights: WeightsConfig = WeightsConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()

    @field_validator("workdir")
    @classmethod
    def _no_credentials_in_url(cls, v: str) -> str:
        if "://" in v and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("must not carry credentials (user:secret@); set them as env variables")
        return v

    def label_kinds(self) -> list[str]:
        """The pseudo-label steps this run runs, in LABEL_KINDS order: the synthetic world's (embeddings; depth
        and masks too when teacher labels replace its exact ground truth), or those `data.datasets` list."""
        if self.data.source == "synthetic":
            return ["embed"] if self.labeling.use_ground_truth else ["depth", "masks", "embed"]
        used = {k for d in self.data.datasets.values() for k in d.labels}
        return [k for k in LABEL_KINDS if k in used]

    def stage_source(self, stage: str, task: str) -> DataSource:
        """The shards stage `stage` reads for `task`: its own `data`, else `data.tasks`."""
        own = self.train.stage(stage).data.get(task)  # type: ignore[call-overload]
        return own if own is not None else self.data.tasks.get(task, DataSource())  # type: ignore[call-overload]

    @model_validator(mode="after")
    def _resolutions_fit_the_backbone(self) -> RunConfig:
        """Every fixed resolution a multiple of the backbone's patch x 2x2 merge (28, or 32 for siglip2)."""
        b = self.model.backbone
        unit = b.resize_factor
        r, p = self.train.resolution, self.eval.probe
        sizes = {"train.resolution.caption_max": r.caption_max, "train.resolution.caption_min": r.caption_min,
                 "train.resolution.depth": r.depth, "train.resolution.refseg": r.refseg,
                 "eval.probe.seg_resolution": p.seg_resolution, "eval.probe.depth_resolution": p.depth_resolution}
        bad = [f"{path} = {value} (nearest: {_nearest(value, unit)})" for path, value in sizes.items() if value % unit]
        if bad:
            raise ValueError(f"backbone kind {b.kind} (patch {b.patch_size} x 2x2 merge) needs resolutions that are "
                             f"multiples of {unit}: {'; '.join(bad)}")
        return self

    @model_validator(mode="after")
    def _data_sources(self) -> RunConfig:
        if self.data.source == "shards":
            missing = [f"{self.train.stage_path(s.name)} {t}" for s in self.train.stages() for t in s.tasks
                       if not self.stage_source(s.name, t).urls]
            if missing:
                raise ValueError(f"data.source is 'shards' but no urls are configured for {', '.join(missing)} "
                                 "(a stage's data.<task>.urls, or data.tasks.<task>.urls)")
        unlabelled = {d.url: name for name, d in self.data.datasets.items() if d.labels}
        reads = [*(u for src in self.data.tasks.values() for u in src.urls),
                 *(u for s in self.train.stages() for src in s.data.values() for u in src.urls)]
        for url in reads:
            if url in unlabelled:
                raise ValueError(f"{url} holds the unlabelled shards of data.datasets.{unlabelled[url]}; training "
                                 f"reads its labelled URL {self.data.datasets[unlabelled[url]].labelled}")
        return self
