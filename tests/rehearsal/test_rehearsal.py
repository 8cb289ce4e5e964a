"""The paper chain rehearsed on this machine (configs/rehearsal.yaml): every source in its published layout,
every label step, both training stages and every benchmark, through the same stage functions the KFP steps
call. The full local pipeline (`versavit pipeline run --local --config configs/rehearsal.yaml`) runs the same
steps under KFP's local runner: README gives its measured time; here a shortened variant keeps CI fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from versavit import storage
from versavit.config import load_config
from versavit.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[2]
SHORTER = ["train.warmup.max_steps=2", "train.multitask.max_steps=2", "launch.nproc_per_node=1",
           "eval.probe.epochs=1", "data.num_workers=0", "eval.finetune_depth.max_steps=2",
           "eval.refseg_finetune.max_steps=2", "eval.correspondence.navi_num_corr=100",
           # the probes, zero-shot depth and referring segmentation on the dense and RefCOCO benchmarks; DA-2K,
           # correspondence and the training protocols have tests of their own on stand-ins of the same formats
           # (tests/eval: prepared, read back, evaluated), and all run in the measured rehearsal (README)
           "eval.evaluators=[linear-probe, zero-shot-depth, refseg]"]


@pytest.mark.slow
def test_the_paper_chain_runs_on_its_stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.cli import app  # noqa: F401  (the CLI's module imports, as a user's run has them)
    from versavit.data.prepare import SOURCES
    from versavit.labeling.tiny import save_tiny_teachers
    from versavit.stages import (
        dataset_label_chains,
        stage_eval_manifests,
        stage_label_datasets,
        stage_prepare,
        stage_train,
        stage_weights,
    )

    monkeypatch.chdir(tmp_path)  # the config's relative paths (runs/fixtures, runs/rehearsal) land here
    monkeypatch.setenv("VERSAVIT_MODEL_CACHE", str(tmp_path / "model-cache"))
    cfg = load_config(ROOT / "configs/rehearsal.yaml", SHORTER)
    storage.configure(cfg.storage)
    used = {d.source for d in cfg.data.datasets.values()}
    paper = load_config(ROOT / "configs/paper.yaml")
    assert cfg.data.datasets.keys() == paper.data.datasets.keys()  # every dataset of the paper run takes part
    assert used == {d.source for d in paper.data.datasets.values()} and len(used) == 29
    for name in used:
        (tmp_path / "runs/fixtures" / name).mkdir(parents=True)
        SOURCES[name].write_fixture(tmp_path / "runs/fixtures" / name, 0)
    save_tiny_teachers(tmp_path / "runs/fixtures/weights")

    assert stage_weights(cfg) == "runs/rehearsal/store/weights"
    summaries = json.loads(stage_prepare(cfg))
    prepared = {k for k, v in summaries.items() if v["manifest"]}
    assert prepared == set(summaries)
    for name, spec in cfg.data.datasets.items():
        for split in spec.splits or [None]:
            manifest = read_manifest(storage.join(spec.url, split) if split else spec.url)
            assert manifest.num_samples > 0, (name, split)
    again = json.loads(stage_prepare(cfg))  # a rerun redoes nothing
    assert all(v["shards_processed"] in (0, []) for v in again.values()), again

    chains = dataset_label_chains(cfg)
    assert list(chains) == ["depth", "masks", "describe", "embed"]
    for kind in chains:
        stage_label_datasets(cfg, kind)
    for name, spec in cfg.data.datasets.items():
        if spec.labels:
            labelled = read_manifest(spec.labelled)
            assert labelled.num_samples == read_manifest(spec.url).num_samples, name

    warm = stage_train(cfg, "warmup")
    multi = stage_train(cfg, "multitask")
    assert json.loads(storage.read_text(warm))["steps"] == 2
    # every evaluator of the paper run, in one process here (the pipeline's fan-out into one step per evaluator,
    # and the fine-tunes as launched jobs, are tested in tests/test_pipeline_full.py and tests/eval/test_evaluators.py)
    assert set(cfg.eval.evaluators) < set(paper.eval.evaluators) and len(paper.eval.evaluators) == 9
    report = stage_eval_manifests(cfg, [multi])
    md = (Path(report) / "comparison.md").read_text()
    sections = md.split("\n## ")
    for title, labels in (("Linear probes", ("ADE20k mIoU", "ADE20k mIoU@56", "Cityscapes mIoU", "VOC mIoU",
                                             "NYUv2 RMSE", "KITTI RMSE")),
                          ("Zero-shot relative depth", ("NYUv2 AbsRel", "KITTI δ1")),
                          ("Referring segmentation, multi-task head", ("RefCOCO val cIoU", "RefCOCO testA cIoU",
                                                                        "RefCOCO testB cIoU"))):
        section = next((s for s in sections if s.startswith(title)), None)
        assert section is not None, (title, md)
        for label in labels:
            assert label in section, (title, label)
    assert "| *VersaViT (paper)* |" in md and "| *Qwen2-VL ViT (paper)* |" in md
