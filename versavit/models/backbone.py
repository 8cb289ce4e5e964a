"""The vision backbone: Qwen2-VL's (or Qwen2.5-VL's) ViT tower from transformers, as dense feature maps.

The tower works on a packed sequence of flattened 14x14 patches (all images of a batch in one
sequence, attention kept inside each image by `cu_seqlens`), with tokens in 2x2 *merge-unit* order:
for an image of h x w patches the sequence runs over merge units (h/2 x w/2, row-major) and, inside
each unit, over its 2x2 patches (row-major). Qwen2.5-VL additionally permutes the merge units into
attention windows. `VisionBackbone` hides all of that: it patchifies [0, 1] images exactly like
transformers' Qwen2VLImageProcessor, runs one tower pass, undoes the window permutation and returns
row-major [B, D, h, w] maps (final layer + any requested intermediate layers) and, for the caption
projector, the final layer's 2x2 merge units concatenated to [h*w/4, 4*D] per image.

The tower's own `merger` (Qwen-VL's projector into its LLM) stays in the module so that checkpoints
load and save unchanged, but it is frozen and bypassed: VersaViT trains its own projector.

Backbone kind siglip2 (`Siglip2Backbone`, mechanics in versavit.models.siglip2): SigLIP2 NaFlex's tower behind
the same interface (patch 16, so image sides are multiples of 32). `build` and `from_pretrained` pick the class
from the config's kind / the checkpoint's model_type.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.siglip2.configuration_siglip2 import Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel
from transformers.utils import cached_file
from transformers.vision_utils import get_vision_window_index

from versavit.config.schema import BackboneConfig
from versavit.models import siglip2
from versavit.models.checkpointing import set_hf_checkpointing
from versavit.weights import local_model_path

try:  # the pure-python copy: importing image_processing_qwen2_vl needs torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as _hf_smart_resize
except ImportError:  # pragma: no cover - older transformers
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as _hf_smart_resize
    except ImportError:
        _hf_smart_resize = None

try:
    from transformers.initialization import no_init_weights as _no_init_weights
except ImportError:  # pragma: no cover - older transformers
    try:
        from transformers.modeling_utils import no_init_weights as _no_init_weights
    except ImportError:
        _no_init_weights = None


log = logging.getLogger(__name__)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics, as Qwen2-VL's processor
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPORAL_PATCH_SIZE = 2  # Qwen2-VL's patch embedding is a 3D conv over 2 frames: images repeat the frame

# kind -> (tower class, vision config class, full-model config class)
_KINDS: dict[str, tuple[type, type, type]] = {
    "qwen2_vl": (Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig, Qwen2VLConfig),
    "qwen2_5_vl": (Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig, Qwen2_5_VLConfig),
}
_VISION_MODEL_TYPES = {"qwen2_vl_vision": "qwen2_vl", "qwen2_5_vl_vision": "qwen2_5_vl"}
_FULL_MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
# what else from_pretrained reads: SigLIP2, a tower alone or a full Siglip2Model (its vision_model.* weights)
_OTHER_VISION_MODEL_TYPES = {siglip2.VISION_MODEL_TYPE: siglip2.KIND}
_OTHER_FULL_MODEL_TYPES = {siglip2.FULL_MODEL_TYPE: siglip2.KIND}
_EXPECTED = ("a Qwen2-VL / Qwen2.5-VL / SigLIP2 vision tower (VisionBackbone.save_pretrained) or a full Qwen2-VL / "
             "Qwen2.5-VL / SigLIP2 checkpoint")
# where the vision tower's weights live inside a full checkpoint: original Qwen releases and
# transformers >= 5 write "visual.", transformers 4.5x wrote "model.visual."
_VISUAL_PREFIXES = ("visual.", "model.visual.")

# transformers registers the qwen2_vl_vision *config* but no AutoModel class for it (qwen2_5_vl_vision has
# one). A saved qwen2_vl tower therefore names a class in its config's auto_map, defined by a small module written
# next to it (AutoModel.from_pretrained(path, trust_remote_code=True) with plain transformers): transformers' own
# tower, subclassed, because loading remote code marks the loaded class for re-export (`register_for_auto_class`)
# and marking transformers' class itself would break every later save of a tower in that process. Importing this
# module registers transformers' class for AutoModel (AutoModel.from_pretrained(path), no remote code).
_TOWER_MODULE = "modeling_qwen2_vl_vision"
_TOWER_AUTO_MAP = {"AutoModel": f"{_TOWER_MODULE}.Qwen2VisionTransformerPretrainedModel"}
_TOWER_CODE = (
    '"""Qwen2-VL\'s vision tower as transformers defines it (a VersaViT export; its config\'s auto_map names it)."""'
    "\n\nfrom transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as _Tower"
    "\n\n\nclass Qwen2VisionTransformerPretrainedModel(_Tower):\n"
    '    """transformers\' class unchanged (a subclass, so that loading this module marks only this one)."""\n'
)


def _register_auto_model() -> None:
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if "qwen2_vl_vision" not in MODEL_MAPPING_NAMES:  # a later transformers may map it itself
        AutoModel.register(Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel, exist_ok=True)


_register_auto_model()


@dataclass
class BackboneOutput:
    """What one backbone pass returns. All maps are row-major over the patch grid (h = H/14, w = W/14).

    maps: [B, D, h, w] final-layer patch features; None only for images of different sizes (merged=True).
    layers: requested intermediate layers by 1-based block index (depth = final layer), each [B, D, h, w].
    merged: per image [h*w/4, 4*D], the final layer's 2x2 merge units concatenated (patch order inside a
        unit: top-left, top-right, bottom-left, bottom-right), units in raster order of the h/2 x w/2 grid;
        None unless requested.
    """

    maps: torch.Tensor | None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    merged: list[torch.Tensor] | None = None


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's dynamic-resolution rule: sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (transformers' implementation when importable)."""
    if _hf_smart_resize is not None:
        h, w = _hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return int(h), int(w)
    if max(height, width) / min(height, width) > 200:  # pragma: no cover - same rule as transformers
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:  # pragma: no cover
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:  # pragma: no cover
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _vision_config(cfg: BackboneConfig) -> Qwen2VLVisionConfig | Qwen2_5_VLVisionConfig | Siglip2VisionConfig:
    """The transformers vision config for a from-scratch tower of `cfg`'s sizes."""
    if cfg.kind == siglip2.KIND:
        return siglip2.vision_config(cfg)
    if cfg.kind == "qwen2_vl":
        if float(cfg.mlp_ratio) != int(cfg.mlp_ratio):
            # Qwen2VLVisionConfig types mlp_ratio as int (strict validation)
            raise ValueError(f"backbone kind qwen2_vl needs an integer mlp_ratio, got {cfg.mlp_ratio}")
        return Qwen2VLVisionConfig(
            depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=int(cfg.mlp_ratio),
            patch_size=cfg.patch_size, spatial_merge_size=cfg.spatial_merge_size,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            hidden_size=cfg.embed_dim,  # output size of the unused merger: keep it small
        )
    # Qwen2.5-VL-7B: full attention in every 8th block (7, 15, 23, 31), windows elsewhere; keep that
    # rhythm and always make the last block global
    full = sorted({i for i in range(cfg.depth) if (i + 1) % 8 == 0} | {cfg.depth - 1})
    return Qwen2_5_VLVisionConfig(
        depth=cfg.depth, hidden_size=cfg.embed_dim, num_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), patch_size=cfg.patch_size,
        spatial_merge_size=cfg.spatial_merge_size, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        window_size=112, fullatt_block_indexes=full,
        out_hidden_size=cfg.embed_dim,  # output size of the unused merger: keep it small
    )


def _read_json(path_or_id: str, filename: str, required: bool = True) -> dict | None:
    """A JSON file of a local folder or a hub repo (cached download); None when optional and absent."""
    problem = "not found"
    try:
        resolved = cached_file(path_or_id, filename, _raise_exceptions_for_missing_entries=required)
    except (OSError, ValueError) as exc:  # missing file, unknown/unreachable repo, invalid repo id
        resolved, problem = None, str(exc)
    if resolved is None:
        if not required:
            return None
        raise ValueError(f"cannot read {filename} of {path_or_id!r}: expected a folder or hub id holding {_EXPECTED} "
                         f"({problem})")
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def _visual_weight_files(path_or_id: str, prefixes: tuple[str, ...] = _VISUAL_PREFIXES) -> list[str]:
    """Local paths of the safetensors files holding the visual weights (names starting with `prefixes`) of a full
    checkpoint.

    With a sharded checkpoint only the shards that contain visual weights are fetched (the vision
    tower of Qwen2-VL-7B sits in 1-2 of its 5 shards)."""
    index = _read_json(path_or_id, "model.safetensors.index.json", required=False)
    if index is not None:
        shards = sorted({f for k, f in index["weight_map"].items() if k.startswith(prefixes)})
    else:
        shards = ["model.safetensors"]
    files = []
    for shard in shards:
        try:
            files.append(cached_file(path_or_id, shard))
        except OSError as exc:
            raise ValueError(
                f"{path_or_id!r} looks like a full checkpoint but its weights {shard} cannot be read "
                f"(only safetensors checkpoints are supported): {exc}"
            ) from exc
    return files


def _load_visual_weights(tower: nn.Module, files: list[str], source: str,
                         prefixes: tuple[str, ...] = _VISUAL_PREFIXES) -> None:
    """Copy the tensors of `files` under `prefixes` (visual.* / model.visual.*: Qwen-VL's) into `tower`, one tensor
    at a time (peak memory stays at the tower plus one tensor), checking that every tower weight is covered
    exactly once."""
    from safetensors import safe_open

    targets = tower.state_dict()  # shares storage with the parameters
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    prefix = next((p for p in prefixes if key.startswith(p)), None)
                    if prefix is None:
                        continue
                    name = key[len(prefix):]
                    if name not in targets:
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.shape != targets[name].shape:
                        raise ValueError(
                            f"{source}: weight {key} has shape {tuple(tensor.shape)}, the tower built from its "
                            f"vision_config expects {tuple(targets[name].shape)}"
                        )
                    targets[name].copy_(tensor)
                    seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise ValueError(
            f"{source}: visual weights do not match the vision tower: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


class VisionBackbone(nn.Module):
    """Qwen2-VL / Qwen2.5-VL vision tower returning dense, row-major feature maps (see module docstring).

    `build` / `from_pretrained` return a `Siglip2Backbone` (this interface, SigLIP2's tower) for kind siglip2."""

    patch_size = 14
    merge_size = 2
    blocks_path = "tower.blocks"  # the ViT blocks, relative to the backbone (plans and trainable patterns)

    def __init__(self, tower: Qwen2VisionTransformerPretrainedModel | Qwen2_5_VisionTransformerPretrainedModel,
                 kind: str) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown backbone kind {kind!r}; expected one of {sorted(_KINDS)}")
        config = tower.config
        if config.patch_size != self.patch_size or config.spatial_merge_size != self.merge_size:
            raise ValueError(
                f"VersaViT expects patch 14 and 2x2 merge, the tower has patch {config.patch_size}, "
                f"merge {config.spatial_merge_size}"
            )
        if config.temporal_patch_size != TEMPORAL_PATCH_SIZE:
            raise ValueError(f"expected temporal_patch_size {TEMPORAL_PATCH_SIZE}, got {config.temporal_patch_size}")
        self.tower = tower
        self.kind = kind
        self.embed_dim = int(config.embed_dim if kind == "qwen2_vl" else config.hidden_size)
        self.depth = int(config.depth)
        self.num_heads = int(config.num_heads)
        # The tower's merger is never run (see forward); frozen so optimisers and ZeRO see no
        # parameter that never receives a gradient.
        self.tower.merger.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    # construction, persistence

    @classmethod
    def build(cls, cfg: BackboneConfig, dtype: torch.dtype = torch.float32) -> VisionBackbone:
        """From `cfg`: random init of its sizes (`pretrained` None) or the checkpoint it names.

        Parameters are created directly in `dtype` (no fp32 copy first), so a bf16 paper-size tower
        costs about its bf16 bytes of memory to build."""
        if cfg.pretrained:
            model = VisionBackbone.from_pretrained(cfg.pretrained, kind=cfg.kind, dtype=dtype)
            got = (model.embed_dim, model.depth, model.num_heads)
            if got != (cfg.embed_dim, cfg.depth, cfg.num_heads):
                log.warning("backbone %s has (embed_dim, depth, num_heads) %s; the config's sizes %s are ignored",
                            cfg.pretrained, got, (cfg.embed_dim, cfg.depth, cfg.num_heads))
        else:
            # _from_config sets the default dtype while the modules are created: weights are born in `dtype`
            tower = tower_class(cfg.kind)._from_config(_vision_config(cfg), dtype=dtype)
            model = wrap_tower(tower, cfg.kind)
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        model.tower.set_attn_implementation(cfg.attn_implementation)  # flash_attention_2: varlen over cu_seqlens
        # transformers' from_pretrained returns eval mode, where blocks are never checkpointed: a built backbone
        # is in training mode whatever it was loaded from (callers that only infer call .eval())
        return model.train()

    @classmethod
    def from_pretrained(cls, path_or_id: str, kind: str | None = None,
                        dtype: torch.dtype = torch.float32) -> VisionBackbone:
        """Load a vision tower from a folder or hub id.

        Accepts a vision-tower-only checkpoint (what `save_pretrained` writes; model_type
        qwen2_vl_vision / qwen2_5_vl_vision / siglip2_vision_model) or a full Qwen2-VL / Qwen2.5-VL / SigLIP2
        checkpoint (model_type qwen2_vl / qwen2_5_vl / siglip2, e.g. Qwen/Qwen2-VL-7B-Instruct,
        google/siglip2-so400m-patch16-naflex), of which only `vision_config` and the visual weights are read.
        `kind` is inferred when None, and checked when given. A SigLIP2 tower comes back as a `Siglip2Backbone`."""
        path_or_id = local_model_path(os.fspath(path_or_id))  # a staged s3:// checkpoint: this node's copy
        if not os.path.isdir(path_or_id) and (os.path.exists(path_or_id) or path_or_id.startswith(("/", ".", "~"))):
            # clearly meant as a local path: say so rather than failing a hub lookup of it
            raise ValueError(f"{path_or_id!r} is not a folder; expected a folder or hub id holding {_EXPECTED}")
        config = _read_json(path_or_id, "config.json")
        model_type = config.get("model_type")
        towers = {**_VISION_MODEL_TYPES, **_OTHER_VISION_MODEL_TYPES}
        fulls = {**_FULL_MODEL_TYPES, **_OTHER_FULL_MODEL_TYPES}
        if model_type in towers:
            found = towers[model_type]
            full = False
        elif model_type in fulls:
            found = fulls[model_type]
            full = True
        else:
            raise ValueError(
                f"{path_or_id!r} has model_type {model_type!r}; expected a Qwen2-VL / Qwen2.5-VL / SigLIP2 vision "
                f"tower ({' / '.join(towers)}, as written by VisionBackbone.save_pretrained) or a full Qwen2-VL / "
                f"Qwen2.5-VL / SigLIP2 checkpoint ({' / '.join(fulls)})"
            )
        if kind is not None and kind != found:
            raise ValueError(f"{path_or_id!r} holds a {found} vision tower, but kind {kind!r} was requested")
        tower_cls = tower_class(found)
        if not full:
            tower = tower_cls.from_pretrained(path_or_id, dtype=dtype)
            return wrap_tower(tower, found)
        # Full checkpoint: build the tower from its vision_config (through the model's own config
        # class, which upgrades legacy config layouts) and copy in the visual weights only.
        if found == siglip2.KIND:
            full_config_cls, prefixes = siglip2.FULL_CONFIG_CLASS, siglip2.WEIGHT_PREFIXES
        else:
            full_config_cls, prefixes = _KINDS[found][2], _VISUAL_PREFIXES
        vision_config = full_config_cls.from_pretrained(path_or_id).vision_config
        files = _visual_weight_files(path_or_id, prefixes)
        init = _no_init_weights() if _no_init_weights is not None else _null_context()
        with init:  # every weight is overwritten below: skip the random init
            tower = tower_cls._from_config(vision_config, dtype=dtype)
        _load_visual_weights(tower, files, path_or_id, prefixes)
        tower.config.dtype = dtype
        return wrap_tower(tower, found)

    def save_pretrained(self, path: str) -> None:
        """Write the tower (merger included) in Hugging Face format: config.json + model.safetensors.

        Loadable by `from_pretrained` and by transformers' `AutoModel` (a qwen2_vl tower: after importing this
        module, or with plain transformers and `trust_remote_code=True`, see _TOWER_MODULE). A tower is not a
        Qwen2-VL model: `versavit export mllm` puts it back into one."""
        path = os.fspath(path)
        self.tower.save_pretrained(path)
        if self.kind == "qwen2_vl":
            config_file = os.path.join(path, "config.json")
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            config["auto_map"] = dict(_TOWER_AUTO_MAP)
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
            with open(os.path.join(path, f"{_TOWER_MODULE}.py"), "w", encoding="utf-8") as f:
                f.write(_TOWER_CODE)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward (training mode only) instead of keeping its activations."""
        set_hf_checkpointing(self.tower, enabled)

    @property
    def blocks(self) -> nn.ModuleList:
        """The ViT blocks, bottom first."""
        return self.tower.blocks

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether blocks are recomputed in backward (when training)."""
        return any(getattr(block, "gradient_checkpointing", False) for block in self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.patch_embed.proj.weight.dtype

    # ------------------------------------------------------------------------------------------
    # compute

    def uniform_layers(self, n: int = 3) -> list[int]:
        """`n` uniformly spaced 1-based block indices ending at the last block: ceil(depth * k / n), k = 1..n.

        depth 32: n=3 -> [11, 22, 32], n=4 -> [8, 16, 24, 32]; depth 24, n=4 -> [6, 12, 18, 24]."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n must be in [1, depth={self.depth}], got {n}")
        return [math.ceil(self.depth * k / n) for k in range(1, n + 1)]

    def patchify(self, images: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] images (each [3, H, W], H and W multiples of 28; or one [B, 3, H, W] tensor) -> normalised
        flattened patches [N, 3*2*14*14] in Qwen2VLImageProcessor's order, and grid_thw [n, 3] (t = 1)."""
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            self._check_size(images.shape, "images")
            return self._patchify_batch(images)
        if len(images) == 0:
            raise ValueError("patchify needs at least one image")
        pieces = []
        for i, image in enumerate(images):  # one vectorised call per image: sizes may differ
            if image.dim() != 3:
                raise ValueError(f"images[{i}] must be [3, H, W], got shape {tuple(image.shape)}")
            self._check_size(image.unsqueeze(0).shape, f"images[{i}]")
            pieces.append(self._patchify_batch(image.unsqueeze(0)))
        return torch.cat([p for p, _ in pieces]), torch.cat([g for _, g in pieces])

    def _check_size(self, shape: torch.Size, what: str) -> None:
        unit = self.patch_size * self.merge_size
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{what} must be [B, 3, H, W] or [3, H, W], got shape {tuple(shape)}")
        if shape[2] % unit or shape[3] % unit or shape[2] == 0 or shape[3] == 0:
            raise ValueError(
                f"{what}: height and width must be positive multiples of {unit}, got {shape[2]}x{shape[3]}"
            )

    def _patchify_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same-size images [B, 3, H, W] -> ([B*h*w, 1176], grid_thw [B, 3])."""
        b, c, height, width = images.shape
        p, m, t = self.patch_size, self.merge_size, TEMPORAL_PATCH_SIZE
        gh, gw = height // p, width // p
        if not images.is_floating_point():
            images = images.float()
        # statistics made per call (not buffers): a bf16 cast of the module must not round them
        mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        x = (images - mean) / std
        # [B, C, gh/m, m, p, gw/m, m, p] -> [B, gh/m, gw/m, m(row), m(col), C, p, p]: merge units row-major,
        # patches row-major inside a unit, then each patch flattened as (C, T, p, p) like the processor
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # repeat the frame over the 2 temporal slots
        patches = x.reshape(b * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long, device=images.device).expand(b, 3).contiguous()
        return patches, grid

    @contextmanager
    def _merger_bypassed(self) -> Iterator[None]:
        """Swap the tower's merger for an identity during a pass, so its projector never runs; the real
        module (and its weights) stays registered for checkpoints."""
        merger = self.tower._modules["merger"]
        self.tower._modules["merger"] = nn.Identity()
        try:
            yield
        finally:
            self.tower._modules["merger"] = merger

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], layers: Sequence[int] = (),
                merged: bool = False) -> BackboneOutput:
        """One packed tower pass over all images.

        images: [B, 3, H, W] in [0, 1], or a list of [3, H_i, W_i] (dynamic resolution). With different
        sizes only `merged` is defined: pass merged=True and no layers (maps is then None).
        layers: 1-based block indices to return besides the final map (0 = patch embeddings)."""
        images, sizes, layers, uniform = self._request(images, layers, merged)
        pixels, grid = self.patchify(images)
        extra = {}
        window_index = None
        if self.kind == "qwen2_5_vl":
            # the same window index the tower computes; passed in so both sides use one tensor
            window_index, cu_window_seqlens = self._window_index(grid)
            extra = {"window_index": window_index, "cu_window_seqlens": cu_window_seqlens}
        inner = [i for i in layers if i != self.depth]  # the final layer comes from last_hidden_state
        with self._merger_bypassed():
            out = self.tower(pixels, grid_thw=grid, output_hidden_states=inner if inner else False,
                             return_dict=True, **extra)

        def ordered(tokens: torch.Tensor) -> torch.Tensor:
            """Tower token order -> merge-unit order of the packed images (undo Qwen2.5-VL's windows)."""
            if window_index is None:
                return tokens
            unit = self.merge_size**2
            reverse = torch.argsort(window_index.to(tokens.device))
            return tokens.reshape(-1, unit, tokens.shape[-1])[reverse].reshape(tokens.shape)

        final = ordered(out.last_hidden_state)
        hidden = out.hidden_states if inner else ()
        maps = self._to_maps(final, sizes) if uniform else None
        layer_maps = {i: self._to_maps(ordered(hidden[i]), sizes) for i in inner}
        if self.depth in layers:
            layer_maps[self.depth] = maps
        merged_units = None
        if merged:
            counts = [(h // self.patch_size) * (w // self.patch_size) for h, w in sizes]
            unit = self.merge_size**2
            merged_units = [t.reshape(-1, unit * t.shape[-1]) for t in torch.split(final, counts)]
        return BackboneOutput(maps=maps, layers=layer_maps, merged=merged_units)

    def _request(self, images: torch.Tensor | Sequence[torch.Tensor], layers: Sequence[int], merged: bool
                 ) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int]], list[int], bool]:
        """forward's arguments checked: (images, their (H, W), sorted unique layers, whether all sizes are equal)."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images tensor must be [B, 3, H, W], got shape {tuple(images.shape)}")
            sizes = [tuple(images.shape[-2:])] * images.shape[0]
        else:
            images = list(images)
            sizes = [tuple(im.shape[-2:]) for im in images]
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i <= self.depth]
        if bad:
            raise ValueError(f"layers must be block indices in [0, {self.depth}], got {bad}")
        uniform = len(set(sizes)) == 1
        if not uniform and (layers or not merged):
            raise ValueError(
                f"images of different sizes {sorted(set(sizes))}: dense maps need equal sizes; for dynamic "
                "resolution call forward(images, merged=True) without layers"
            )
        return images, sizes, layers, uniform

    def _window_index(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.tower.config
        return get_vision_window_index(grid, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size,
                                       patch_size=cfg.patch_size)

    def _to_maps(self, tokens: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """Merge-unit-ordered tokens of same-size images [B*h*w, D] -> row-major maps [B, D, h, w]."""
        m = self.merge_size
        h, w = sizes[0][0] // self.patch_size, sizes[0][1] // self.patch_size
        x = tokens.reshape(len(sizes), h // m, w // m, m, m, tokens.shape[-1])
        # (B, unit row, unit col, row in unit, col in unit, D) -> (B, D, unit row, row in unit, unit col, col in unit)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(len(sizes), tokens.shape[-1], h, w)


class Siglip2Backbone(VisionBackbone):
    """SigLIP2 NaFlex's vision tower (transformers' Siglip2VisionModel) with VisionBackbone's interface: row-major
    [B, D, H/16, W/16] maps of the requested encoder layers (the final map: the last layer's output, before the
    unused post_layernorm), 2x2-merged tokens [h*w/4, 4*D] for the caption projector, images of any size whose
    sides are multiples of 32 in one padded pass (see versavit.models.siglip2)."""

    patch_size = siglip2.PATCH_SIZE
    merge_size = siglip2.MERGE_SIZE
    blocks_path = "tower.encoder.layers"

    def __init__(self, tower: Siglip2VisionModel, kind: str = siglip2.KIND) -> None:
        nn.Module.__init__(self)
        if kind != siglip2.KIND:
            raise ValueError(f"Siglip2Backbone is backbone kind {siglip2.KIND!r}, not {kind!r}")
        siglip2.check_tower(tower)
        self.tower = tower
        self.kind = kind
        config = tower.config
        self.embed_dim = int(config.hidden_size)
        self.depth = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        # post_layernorm and the pooling head are never run (see forward); frozen like Qwen-VL's merger
        for module in siglip2.unused_modules(tower):
            module.requires_grad_(False)

    def save_pretrained(self, path: str) -> None:
        """Write the tower (post_layernorm and head included) in Hugging Face format: config.json +
        model.safetensors, a Siglip2VisionModel that `from_pretrained` and transformers' AutoModel load."""
        self.tower.save_pretrained(os.fspath(path))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.embeddings.patch_embedding.weight.dtype

    def patchify(self, images: Sequence[torch.Tensor] | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[0, 1] images (each [3, H, W], H and W multiples of 32; or one [B, 3, H, W] tensor) -> the tower's
        (pixel_values [B, L, 768], pixel_attention_mask [B, L], spatial_shapes [B, 2]), as Siglip2ImageProcessor
        makes them (without its resizing)."""
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            self._check_size(images.shape, "images")
            images = list(images)
        else:
            images = list(images)
            if not images:
                raise ValueError("patchify needs at least one image")
            for i, image in enumerate(images):
                if image.dim() != 3:
                    raise ValueError(f"images[{i}] must be [3, H, W], got shape {tuple(image.shape)}")
                self._check_size(image.unsqueeze(0).shape, f"images[{i}]")
        return siglip2.patchify(images)

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], layers: Sequence[int] = (),
                merged: bool = False) -> BackboneOutput:
        """One tower pass over all images (padded to the largest); arguments and output as VisionBackbone's."""
        images, sizes, layers, uniform = self._request(images, layers, merged)
        pixels, mask, shapes = self.patchify(images)
        hidden = siglip2.encode(self.tower, pixels, mask, shapes, {*layers, self.depth})
        p = self.patch_size
        grids = [(h // p, w // p) for h, w in sizes]
        maps = siglip2.to_maps(hidden[self.depth], *grids[0]) if uniform else None
        layer_maps = {i: siglip2.to_maps(hidden[i], *grids[0]) for i in layers}
        merged_units = None
        if merged:
            final = hidden[self.depth]
            merged_units = [siglip2.merge_units(final[b, : h * w], h, w) for b, (h, w) in enumerate(grids)]
        return BackboneOutput(maps=maps, layers=layer_maps, merged=merged_units)


def tower_class(kind: str) -> type:
    """The transformers class of backbone kind `kind`'s tower."""
    if kind == siglip2.KIND:
        return siglip2.TOWER_CLASS
    if kind not in _KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; expected one of {sorted([*_KINDS, siglip2.KIND])}")
    return _KINDS[kind][0]


def wrap_tower(tower: nn.Module, kind: str) -> VisionBackbone:
    """A transformers tower of backbone kind `kind` as a backbone (VisionBackbone, or Siglip2Backbone)."""
    return Siglip2Backbone(tower) if kind == siglip2.KIND else VisionBackbone(tower, kind)


@contextmanager
def _null_context() -> Iterator[None]:
    yield
