"""The backbones of a comparison: where each comes from (URL, hub id, export, in-memory) and how it loads.

Which backbones `run_eval` compares:
- "trained": `<workdir>/stages/multitask/export` (or the `trained` argument / `--trained`).
- "baseline": `eval.baseline_backbone` if set; else the backbone the multi-task stage started from:
  `model.backbone.pretrained` if set (e.g. Qwen/Qwen2-VL-7B-Instruct: the paper's Qwen2-VL ViT row), else
  the export named by `train.multitask.init_from` when that is a URL, else a random-init tower built exactly
  as training builds it (`torch.manual_seed(train.seed)`, then the tower first, in train.precision) - the
  tiny configuration's case. The warm-up stage trains only the projector, so it never changes the baseline.

A backbone given by URL may be a versavit export (a folder with versavit.json: backbone/ plus heads, so the
zero-shot depth and referring-segmentation heads are evaluated too), a Hugging Face vision-tower folder, a
full Qwen2-VL checkpoint or hub id, or an s3:// URL of any of those (copied to the local cache first).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from versavit import storage, weights
from versavit.config import RunConfig
from versavit.layout import eval_cache_dir, weights_record_url
from versavit.models.backbone import VisionBackbone
from versavit.models.precision import precision_dtype, resolve_precision


@dataclass
class Candidate:
    """One backbone of a comparison: where it comes from and, for a versavit export, its local folder."""

    name: str
    source: str  # URL / path / hub id, or a description of an in-memory backbone
    backbone: VisionBackbone | None = None  # given in memory (the random-init baseline)
    export: Path | None = None  # local versavit export (backbone/ + heads)
    heads: tuple[str, ...] = ()
    _loaded: VisionBackbone | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def load_backbone(self) -> VisionBackbone:
        """The frozen backbone in fp32, eval mode; loaded once and kept until `release()` (every evaluator of one
        backbone reads the same copy). Evaluators that train it take a copy (`copy.deepcopy`)."""
        if self._loaded is None:
            if self.backbone is not None:
                self._loaded = self.backbone.float().eval()
            else:
                path = str(self.export / "backbone") if self.export else self.source
                self._loaded = VisionBackbone.from_pretrained(path, dtype=torch.float32).eval()
        return self._loaded

    @property
    def digest(self) -> str:
        """Content digest of the backbone's weights (the feature cache's key)."""
        if self._digest is None:
            from versavit.eval.features import backbone_digest

            self._digest = backbone_digest(self.load_backbone())
        return self._digest

    def release(self) -> None:
        """Drop the loaded copy (the next backbone of the comparison needs the memory)."""
        self._loaded = None


def _local_copy(url: str, cache: Path) -> Path:
    """A local folder for `url` (s3:// folders are copied once into the cache, safely across processes)."""
    if not storage.is_remote(url):
        return Path(url.removeprefix("file://"))
    return weights.cached_copy(url, cache / "exports" / hashlib.sha256(url.encode()).hexdigest()[:16])


def resolve_candidate(name: str, spec: str | VisionBackbone | Candidate, cache: Path) -> Candidate:
    """A URL / hub id / in-memory backbone -> Candidate (versavit exports keep their heads)."""
    if isinstance(spec, Candidate):
        return spec
    if isinstance(spec, VisionBackbone):
        return Candidate(name, "in-memory backbone", backbone=spec)
    if storage.is_remote(spec) and storage.exists(weights_record_url(spec)):
        return Candidate(name, spec)  # a staged checkpoint: from_pretrained copies it into the node's model cache
    local = _local_copy(spec, cache) if storage.is_remote(spec) else Path(spec)
    if (local / "versavit.json").is_file():
        heads = tuple(h for h in json.loads((local / "versavit.json").read_text())["heads"] if h != "caption")
        return Candidate(name, spec, export=local, heads=heads)
    if local.is_dir():
        return Candidate(name, str(local))
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:  # a path, not an owner/name hub id
        raise storage.StorageError(f"backbone {name!r}: {spec} does not exist (expected a versavit export, a "
                                   "vision-tower folder or a hub id)", kind="missing")
    return Candidate(name, spec)  # a hub id: loaded (and downloaded if allowed) by VisionBackbone


def baseline_candidate(cfg: RunConfig) -> Candidate:
    """The backbone the multi-task stage started from (see the module docstring for the rules)."""
    cfg = weights.resolve(cfg)  # staged checkpoints (weights.url) instead of hub ids
    cache = eval_cache_dir(cfg)
    if cfg.eval.baseline_backbone:
        return resolve_candidate("baseline", cfg.eval.baseline_backbone, cache)
    if cfg.model.backbone.pretrained:
        return resolve_candidate("baseline", cfg.model.backbone.pretrained, cache)
    init = cfg.train.multitask.init_from
    if init and init != "auto":
        return resolve_candidate("baseline", init, cache)
    dtype = precision_dtype(cfg.train.precision)  # as the multi-task stage built it on this machine
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # what run_stage does right before VersaViT.build (tower first)
        backbone = VisionBackbone.build(cfg.model.backbone, dtype=dtype)
    precision = resolve_precision(cfg.train.precision)
    return Candidate("baseline", f"random init (train.seed={cfg.train.seed}, {precision}): the multi-task "
                     "stage's starting backbone", backbone=backbone)


def trained_candidate(cfg: RunConfig, url: str | None = None) -> Candidate:
    url = url or storage.join(cfg.workdir, "stages", "multitask", "export")
    if not storage.exists(url):
        raise storage.StorageError(f"no trained backbone at {url}: run `versavit train multitask` first, or pass "
                                   "--trained URL", kind="missing")
    return resolve_candidate("trained", url, eval_cache_dir(cfg))


def load_multitask(cand: Candidate, cfg: RunConfig, heads: tuple[str, ...] | list[str]):  # -> VersaViT
    """The export's backbone with the named task heads, fp32, eval mode (cand must be a versavit export)."""
    from versavit.models.multitask import VersaViT

    if cand.export is None:
        raise ValueError(f"{cand.name} is not a versavit export: it has no task heads")
    return VersaViT.from_export(str(cand.export), cfg.model, heads=list(heads), dtype=torch.float32).eval()
