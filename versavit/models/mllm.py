"""The trained tower back in its MLLM: a full Qwen2-VL / Qwen2.5-VL checkpoint whose vision tower is a VersaViT
export's (`versavit export mllm`; a stage's export/mllm with `model.backbone.export_mllm`).

Everything but the tower is the base checkpoint's: its config, generation config, tokenizer, processor and
chat-template files are copied unchanged, its LLM tensors are copied under their own names. The visual tensors
keep the base's names (`visual.*`, as Qwen's releases and transformers >= 5 write them, or `model.visual.*` as
transformers 4.5x wrote them) and dtypes, and take the export's values. The base's vision config must describe
the export's tower (same sizes). Weights are written as safetensors shards with an index (one
`model.safetensors` when everything fits in one shard), the way transformers writes them, one shard in memory at
a time. transformers' `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (or
`AutoModelForImageTextToText`) load the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from versavit import storage
from versavit.models.backbone import _FULL_MODEL_TYPES, _KINDS, _VISUAL_PREFIXES, VisionBackbone
from versavit.weights import ALLOW_PATTERNS, local_model_path

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 4 * 10**9
RECORD = "versavit_export.json"  # what was put together: base, tower, counts
_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
_WEIGHT_INDEXES = (_INDEX, "pytorch_model.bin.index.json")
# vision-config entries that change what the tower computes without changing a weight's shape
_VISION_KEYS = ("depth", "embed_dim", "hidden_size", "num_heads", "mlp_ratio", "intermediate_size", "hidden_act",
                "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels", "window_size",
                "fullatt_block_indexes", "out_hidden_size")


def _base_dir(base: str) -> Path:
    """A local folder holding the base checkpoint: a folder as given, a staged s3:// copy, or a hub snapshot
    (from the local cache with HF_HUB_OFFLINE=1)."""
    local = local_model_path(os.fspath(base))
    if os.path.isdir(local):
        return Path(local)
    if os.path.exists(local) or local.startswith(("/", ".", "~")):
        raise ValueError(f"base {base!r} is not a folder; expected a full Qwen2-VL / Qwen2.5-VL checkpoint")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(local, allow_patterns=[p for p in ALLOW_PATTERNS if p != "*.bin"]))
    except Exception as exc:  # unknown repo, hub unreachable, not in the offline cache
        raise ValueError(f"cannot fetch the base checkpoint {base!r}: {exc}") from exc


def base_kind(base: str | Path) -> str:
    """qwen2_vl / qwen2_5_vl: the kind of the full checkpoint at `base` (a local folder); ValueError otherwise."""
    config_file = Path(base) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"base {str(base)!r} has no config.json; expected a full Qwen2-VL / Qwen2.5-VL checkpoint")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in _FULL_MODEL_TYPES:
        raise ValueError(f"base {str(base)!r} has model_type {model_type!r}; expected a full Qwen2-VL / Qwen2.5-VL "
                         f"checkpoint ({' / '.join(_FULL_MODEL_TYPES)}), not a vision tower alone")
    return _FULL_MODEL_TYPES[model_type]


def check_base(base: str) -> str:
    """Fail early (before training) when `base` cannot take a tower; returns its kind."""
    return base_kind(_base_dir(base))


def _weight_files(folder: Path) -> list[str]:
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return list(dict.fromkeys(weight_map.values()))  # in the order of the index
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(f"base {str(folder)!r} has no safetensors weights (model.safetensors or {_INDEX}); only "
                     "safetensors checkpoints are supported")


def _tower_folder(backbone: str | Path) -> str:
    """A stage's export folder (with backbone/) or the tower folder itself (or anything from_pretrained reads);
    an s3:// one is copied to this node first (its backbone/ only)."""
    ref = os.fspath(backbone)
    if storage.is_remote(ref):
        if not storage.exists(storage.join(ref, "config.json")) and \
                storage.exists(storage.join(ref, "backbone", "config.json")):
            ref = storage.join(ref, "backbone")
        return local_model_path(ref)
    if not os.path.isfile(os.path.join(ref, "config.json")) and os.path.isfile(os.path.join(ref, "backbone",
                                                                                             "config.json")):
        return os.path.join(ref, "backbone")
    return ref


def _check_vision_config(base: Path, kind: str, tower: VisionBackbone) -> None:
    full = _KINDS[kind][2].from_pretrained(str(base)).vision_config.to_dict()
    own = tower.tower.config.to_dict()
    diff = {k: (own[k], full[k]) for k in _VISION_KEYS if k in own and k in full and own[k] != full[k]}
    if diff:
        raise ValueError(f"the tower does not fit base {str(base)!r}: its vision config differs in "
                         + ", ".join(f"{k} (tower {a!r}, base {b!r})" for k, (a, b) in sorted(diff.items())))


def export_mllm(base: str, backbone: str | Path, out: str | Path,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write `out`: the full checkpoint `base` (folder, staged URL or hub id) with the vision tower of `backbone`
    (a stage's export folder, its backbone/ folder, or any checkpoint `VisionBackbone.from_pretrained` reads).

    `out` must not exist or be empty. Returns what was done (also written to `out`/versavit_export.json)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    base_path = _base_dir(base)
    kind = base_kind(base_path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty folder; choose a new one")
    if out.resolve() == base_path.resolve():
        raise ValueError("--out is the base checkpoint's own folder")
    tower_path = _tower_folder(backbone)
    tower = VisionBackbone.from_pretrained(tower_path, kind=kind)  # checks the kind; any dtype: cast below
    _check_vision_config(base_path, kind, tower)
    new = tower.tower.state_dict()
    files = _weight_files(base_path)

    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # tensor names per written shard, in order
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = total_params = 0
    used: set[str] = set()
    changed: list[str] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(out / f".shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    with torch.no_grad():
        for name in files:
            with safe_open(str(base_path / name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    tensor = f.get_tensor(key)
                    prefix = next((p for p in _VISUAL_PREFIXES if key.startswith(p)), None)
                    if prefix is not None:
                        own = key[len(prefix):]
                        if own not in new:
                            raise ValueError(f"base weight {key} has no counterpart in the tower of {tower_path}")
                        if new[own].shape != tensor.shape:
                            raise ValueError(f"{key}: the tower's tensor has shape {tuple(new[own].shape)}, the "
                                             f"base's {tuple(tensor.shape)}")
                        replacement = new[own].to(tensor.dtype).contiguous()
                        if not torch.equal(replacement, tensor):
                            changed.append(own)
                        tensor = replacement
                        used.add(own)
                    size = tensor.numel() * tensor.element_size()
                    if pending and pending_bytes + size > max_shard_bytes:
                        flush()
                    pending[key] = tensor
                    pending_bytes += size
                    total_bytes += size
                    total_params += tensor.numel()
        flush()
    missing = sorted(set(new) - used)
    if missing:
        raise ValueError(f"base {str(base_path)!r} has no visual weight for {len(missing)} tower tensor(s), e.g. "
                         f"{missing[:4]}")

    # final names, as transformers writes them
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        os.replace(out / f".shard-{i:05d}.safetensors", out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes, "total_parameters": total_params},
                 "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys}}
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    copied = []
    for path in sorted(base_path.rglob("*")):
        rel = path.relative_to(base_path)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or rel.name == RECORD:
            continue
        if rel.name.endswith(_WEIGHT_SUFFIXES) or rel.name in _WEIGHT_INDEXES:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)  # follows the hub cache's symlinks
        copied.append(str(rel))

    merger_kept = not any(k.startswith("merger.") for k in changed)
    if not merger_kept:
        log.warning("the tower's merger (Qwen-VL's projector, which VersaViT never trains) differs from the base's: "
                    "was the tower initialised from another checkpoint than %s?", base)
    record = {"base": str(base), "backbone": str(backbone), "kind": kind, "visual_tensors": len(used),
              "visual_tensors_changed": len(changed), "merger_from_base": merger_kept, "shards": names,
              "total_bytes": total_bytes, "files_copied": copied}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
