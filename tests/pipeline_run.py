"""The shrunk local pipeline run the end-to-end tests share (`local_pipeline` in conftest.py: once per session).

`versavit pipeline run --local --config configs/tiny.yaml` with the tiny config's structure and smaller numbers
(the suite must stay fast on 2 cores), in a subprocess as a user runs it, into its own workdir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHRINK = [  # the tiny config's structure, smaller numbers: the suite must stay fast on 2 cores
    "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.image_size=56",
    "data.synthetic.samples_per_shard=16", "data.num_workers=0",
    "model.backbone.embed_dim=32", "model.backbone.depth=3", "model.backbone.num_heads=2",
    "model.heads.caption.projector_hidden=32", "model.heads.caption.tiny_llm_hidden=32",
    "model.heads.caption.tiny_llm_layers=1", "model.heads.depth.features=16",
    "model.heads.refseg.decoder_dim=32", "model.heads.refseg.decoder_depth=1", "model.heads.refseg.decoder_heads=2",
    "train.resolution={caption_max: 56, caption_min: 28, depth: 56, refseg: 56}",
    "train.multitask.batch_size={caption: 2, depth: 4, refseg: 4}",
    "train.warmup.batch_size={caption: 2}", "train.warmup.global_batch=4", "train.warmup.max_steps=3",
    "train.multitask.max_steps=6", "train.multitask.checkpoint_interval=3",
    "eval.probe.seg_resolution=56", "eval.probe.depth_resolution=56", "eval.probe.epochs=2",
    "eval.evaluators=[linear-probe, da2k, refseg]",  # each evaluator a step: three show the fan-out (all: tests/eval)
]
RUN_NAME_PATTERN = r"tiny-[0-9a-f]{8}-\d{8}-\d{6}"


@dataclass
class PipelineRun:
    """A finished `versavit pipeline run --local`: its workdir, exit status, output and wall time."""

    workdir: Path
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workdir}/mlflow.db"


def run_shrunk_pipeline(workdir: Path, *extra: str) -> PipelineRun:
    """The versavit pipeline on the shrunk tiny config (a tiny random text embedder, like the model sizes above:
    loading the bundled MiniLM costs the label step seconds; the refseg head takes its 32-d vectors)."""
    from versavit.labeling import tiny

    workdir.mkdir(parents=True, exist_ok=True)
    embedder = tiny.save_tiny_embedder(workdir.parent / f"{workdir.name}-embedder")
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "versavit.cli", "pipeline", "run", "--local", "--config", "configs/tiny.yaml",
         f"workdir={workdir}", *SHRINK, f"labeling.teachers.embedder={embedder}", "model.heads.refseg.text_dim=32",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    return PipelineRun(workdir, res.returncode, res.stdout, res.stderr, time.monotonic() - started)
