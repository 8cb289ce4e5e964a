"""The capacity planner (`versavit plan`, versavit.train.plan; issue 14 item 2).

Its activation estimates come from shape-level traces on the meta device of a reduced-depth analogue, scaled to
the configured depth and batch: here they are checked against the bytes a real CPU run of the whole model keeps
for backward (saved_tensors_hooks), at small widths. Then the arithmetic (ZeRO partitions, buckets, the verdict
and the largest batch), the stage lengths from the paper's dataset sizes, the paper config's verdict (acceptance:
every micro-step fits a 96 GB GPU), the CLI and the MLflow record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_model import TINY_MODEL

from versavit.config import load_config
from versavit.models.multitask import VersaViT
from versavit.train import plan as P
from versavit.train.trace import run_traced

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["train.resolution={caption_max: 112, caption_min: 56, depth: 112, refseg: 112}"]
B = 2  # samples per measured micro-step: the plan traces one and scales


def _cfg(tmp_path: Path, *extra: str):
    return load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path}", *extra])


def _measure(cfg, stage: str, dtype: torch.dtype, checkpointing: bool, tasks: tuple[str, ...] | None = None
             ) -> dict[str, tuple[int, dict[str, int]]]:
    """Bytes a real CPU micro-step of each task keeps for backward (all, and by ViT block / LLM layer / rest)."""
    rs = cfg.train.stage(stage)
    torch.manual_seed(0)
    model = VersaViT.build(cfg.model, tasks=rs.tasks, loss=cfg.train.loss, dtype=dtype)
    model.set_trainable(list(rs.trainable))
    model.backbone.set_gradient_checkpointing(checkpointing)
    head = model.heads["caption"] if "caption" in model.heads else None  # noqa: SIM401 - ModuleDict
    if head is not None:
        head.set_gradient_checkpointing(checkpointing)
    model.train()
    scoped = {f"vit{a}": [b] for a, b in enumerate(model.backbone.tower.blocks)}
    if head is not None:
        scoped.update({f"llm{a}": [layer] for a, layer in enumerate(head.llm.model.layers)})
    vocab = head.llm.config.vocab_size if head is not None else None
    out = {}
    for task in tasks or rs.tasks:
        batch = P.sample_batch(cfg, task, head, B, "cpu")  # float32, as the loader gives: the model casts its inputs
        trace = run_traced(model, lambda task=task, batch=batch: model(task, batch)[0], scoped, vocab_size=vocab)
        out[task] = (sum(trace.saved.values()), trace.saved)
    return out


def test_activation_estimates_match_measured_saved_bytes(tmp_path: Path) -> None:
    """fp32, every task of the multi-task stage, checkpointing off: the planned bytes per sample x 2 against a real
    run at batch 2, within 15% (they agree to ~1%); per ViT block too; and with checkpointing on, the hooks see
    only what the plan keeps outside the checkpointed layers (rest + logits). The tiny config's own widths (64) are
    checked the same way by bench/gpu_memory.py --tiny (tests/bench)."""
    cfg = _cfg(tmp_path, *TINY_MODEL[:-1], *SMALL, "train.precision=fp32")
    profiles, _ = P.profile_stage(cfg, "multitask", torch.float32)
    measured = _measure(cfg, "multitask", torch.float32, checkpointing=False)
    for task, prof in profiles.items():
        kept, _ = prof.activation_bytes(False, False, 4)
        planned = B * (kept + prof.logits_bytes)
        total, parts = measured[task]
        assert planned == pytest.approx(total, rel=0.15), (task, planned, total)
        block = parts["vit0"] / B
        assert prof.vit_layers[0]["bytes"] == pytest.approx(block, rel=0.15), (task, prof.vit_layers, block)
    ckpt = _measure(cfg, "multitask", torch.float32, checkpointing=True, tasks=("caption", "depth"))
    for task in ("caption", "depth"):
        prof = profiles[task]
        assert B * (prof.rest_bytes + prof.logits_bytes) == pytest.approx(ckpt[task][0], rel=0.15), task


def test_bf16_estimates_match_on_the_caption_path(tmp_path: Path) -> None:
    """bf16 (the GPU dtype: fp32 upcasts in rotary embeddings, fp32 norms and log-probabilities are what differ
    from a plain halving): the warm-up's caption step (ViT frozen, LLM frozen on the gradient's path)."""
    cfg = _cfg(tmp_path, *TINY_MODEL, "train.precision=bf16")
    profiles, _ = P.profile_stage(cfg, "warmup", torch.bfloat16)
    prof = profiles["caption"]
    assert prof.vit_layers[0]["bytes"] == 0 and prof.llm_layers[0]["frozen"] and prof.llm_layers[0]["bytes"] > 0
    total, _ = _measure(cfg, "warmup", torch.bfloat16, checkpointing=False)["caption"]
    kept, _ = prof.activation_bytes(False, False, 2)
    assert B * (kept + prof.logits_bytes) == pytest.approx(total, rel=0.15)


def _profile(**kw) -> P.TaskProfile:
    base = dict(task="depth", inputs="x", vit_tokens=100, llm_tokens=0, answer_tokens=0, vit_width=8,
                vit_layers=[{"count": 10, "bytes": 1000, "flops": 5, "trainable": True, "frozen": False,
                             "gradient_in": True}], rest_bytes=500, flops=70)
    base.update(kw)
    return P.TaskProfile(**base)


def test_memory_arithmetic_zero_partitions_buckets_verdict(tmp_path: Path) -> None:
    """ZeRO 2 partitions gradients and optimiser states over nnodes x nproc_per_node; ZeRO 1 only the states;
    buckets are reduce_bucket_size x 2 bytes (x2 with overlap_comm) + the largest gradient; checkpointing keeps each
    layer's input and one layer recomputed; the largest batch is what fits beside the fixed part."""
    cfg = _cfg(tmp_path, "launch.nnodes=4", "launch.nproc_per_node=8", "launch.resources.gpu_memory_gib=10",
               "train.deepspeed.reduce_bucket_size=1000000", "model.backbone.gradient_checkpointing=true")
    counts = {"total": 3_000_000, "trainable": 3_200_000, "largest_trainable": 100_000}
    gpu = P.GpuSpec("H20", 148e12, 10.0)
    prof = _profile()
    m = P.micro_step(cfg, "multitask", prof, counts, batch=4, world=32, gpu=gpu, accum=3, dtype=torch.bfloat16)
    assert m.params == 6_000_000
    assert m.grads == 3_200_000 * 2 // 32 and m.optimizer == 3_200_000 * 12 // 32
    assert m.buckets == 2 * 1_000_000 * 2 + 100_000 * 2  # overlap_comm auto: on GPUs, two buffers
    kept = 500 + 10 * 100 * 8 * 2  # rest + each layer's input (tokens x width x 2 bytes)
    assert m.activations == 4 * kept and m.recompute == 4 * 1000 and m.activations_no_ckpt == 4 * (500 + 10_000)
    fixed = m.params + m.grads + m.optimizer + m.buckets + m.reserved
    assert m.total == fixed + 4 * (kept + 1000) and m.fits
    assert m.max_batch == (m.gpu_bytes - fixed) // (kept + 1000)
    z1 = P.micro_step(cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": 1})}), "multitask",
                      prof, counts, 4, 32, gpu, 3, torch.bfloat16)
    assert z1.grads == 3_200_000 * 2 and z1.optimizer == m.optimizer
    small = P.GpuSpec("H20", 148e12, 2.0)  # less than the reserve: does not fit, and says what would
    bad = P.micro_step(cfg, "multitask", prof, counts, 4, 32, small, 3, torch.bfloat16)
    assert not bad.fits and bad.headroom < 0 and bad.max_batch == 0 and bad.advice


def test_gpu_from_node_selector_and_memory_override(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "launch.node_selector={nvidia.com/gpu.product: NVIDIA-H20}")
    assert P.gpu_spec(cfg).name == "H20" and P.gpu_spec(cfg).peak_bf16_flops == 148e12
    assert P.gpu_spec(_cfg(tmp_path, "launch.node_selector={nvidia.com/gpu.product: NVIDIA-H200}")).name == "H200"
    assert P.gpu_spec(_cfg(tmp_path)).name == "H100"
    assert P.gpu_spec(_cfg(tmp_path, "launch.resources.gpu_memory_gib=90"), "a100").memory_gib == 90
    with pytest.raises(ValueError, match="unknown GPU"):
        P.gpu_spec(cfg, "V100")


def test_paper_stage_lengths_from_the_papers_dataset_sizes() -> None:
    """Without readable manifests: the paper's counts (RECIPE.md) by data.datasets name, the loop's rule (one epoch
    of the largest task at batch x 128 GPUs)."""
    cfg = load_config(ROOT / "configs/paper.yaml")
    steps, micro, data = P.stage_steps(cfg, "warmup", 128, use_manifests=False)
    assert micro == ["caption"] and data["caption"]["samples"] == 9_400_000
    assert steps == math.ceil(9_400_000 / 1024)
    steps, micro, data = P.stage_steps(cfg, "multitask", 128, use_manifests=False)
    assert data["depth"]["samples"] == 27_900_000 and data["refseg"]["samples"] == 16_100_000
    assert steps == math.ceil(14_000_000 / (8 * 128))  # VQA is the longest in steps


def test_paper_config_fits_a_96_gb_gpu() -> None:
    """Acceptance (issue 14): every micro-step of configs/paper.yaml fits an H20 with the configured gradient
    checkpointing; without checkpointing the multi-task micro-steps would not."""
    cfg = load_config(ROOT / "configs/paper.yaml")
    plan = P.plan_run(cfg, "configs/paper.yaml", use_manifests=False)
    assert plan.gpu == "H20" and plan.gpus == 128 and plan.gpu_memory_gib == 95.5
    assert [(m.stage, m.task) for m in plan.micro_steps] == [
        ("warmup", "caption"), ("multitask", "caption"), ("multitask", "depth"), ("multitask", "refseg")]
    assert plan.fits, P.markdown(plan)
    multitask = [m for m in plan.micro_steps if m.stage == "multitask"]
    assert all(m.activations_no_ckpt + m.params > m.gpu_bytes for m in multitask)
    assert all(m.max_batch >= m.batch for m in plan.micro_steps)
    # the model: ViT-H 675.8M, Qwen3-1.7B, the heads at the paper's sizes
    counts = next(s.params for s in plan.stages if s.stage == "multitask")
    assert counts["backbone"] == pytest.approx(675.8e6, rel=0.001)
    assert all(s.steps and s.gpu_hours for s in plan.stages)
    assert "| multitask | depth | 32 |" in P.markdown(plan)


def test_cli_plan_json_and_exit_status(tmp_path: Path, cli_main) -> None:
    code, out = cli_main("plan", "--config", str(ROOT / "configs/tiny.yaml"), "--stage", "warmup", "--json",
                         f"workdir={tmp_path}")
    assert code == 0, out
    data = json.loads(out[out.index("{"):])
    assert data["fits"] and data["micro_steps"][0]["task"] == "caption" and data["stages"][0]["steps"] == 20
    code, out = cli_main("plan", "--config", str(ROOT / "configs/tiny.yaml"), "--stage", "warmup",
                         f"workdir={tmp_path}", "launch.resources.gpu_memory_gib=1")
    assert code == 1 and "does not fit" in out and "| warmup | caption |" in out


def test_log_plan_records_the_stage_for_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stage_train's record: a `plan_<stage>` run with the settings as params and the figures as metrics (the tracker
    itself, MLflow, is tested in tests/tracking); a plan that cannot be made never stops the launch."""
    import contextlib

    import versavit.tracking as tracking

    logged: dict[str, dict] = {}

    class Tracker:
        def log_config(self, run, config):
            logged["params"] = config

        def log_metrics(self, run, metrics, step):
            logged["metrics"] = dict(metrics)

    @contextlib.contextmanager
    def stage_run(cfg, name, tags=None, rank=0):
        logged["name"] = name
        yield Tracker(), None

    monkeypatch.setattr(tracking, "stage_run", stage_run)
    cfg = _cfg(tmp_path, "launch.resources.gpus_per_node=8")
    assert P.should_plan(cfg) and not P.should_plan(_cfg(tmp_path))  # a CPU run: no GPU plan
    result = P.log_plan(cfg, "warmup")
    assert result is not None and result.fits and logged["name"] == "plan_warmup"
    assert logged["params"]["plan"]["gpu"] == "H100" and logged["params"]["plan"]["caption.checkpointing"]
    assert logged["metrics"]["plan/warmup/caption/fits"] == 1.0 and logged["metrics"]["plan/warmup/steps"] == 20
    monkeypatch.setattr(P, "plan_run", lambda *a, **k: 1 / 0)
    assert P.log_plan(cfg, "warmup") is None
