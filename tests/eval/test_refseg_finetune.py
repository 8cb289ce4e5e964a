"""The `refseg-finetune` evaluator (paper Table 10): its cIoU scoring, a tiny fine-tune on the synthetic world (the
loss falls, cIoU beats the untrained model's, only backbone + head + LoRA (+ projection) train, the adapter reloads
with peft), the evaluator on COCO-Stuff prepared as referring segmentation, and that source's queries."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import eval_config
from torch import nn

from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.data.convert import cocostuff
from versavit.data.prepare.runner import prepare_dataset
from versavit.eval.candidates import baseline_candidate, trained_candidate
from versavit.eval.datasets import Benchmark, PreparedRefSeg, open_benchmark
from versavit.eval.evaluators import EvalContext, Skipped, get
from versavit.eval.finetune import refseg as rf
from versavit.models.multitask import VersaViT

# one worker runs the module (make test: xdist), so its trained models (module fixtures) are built once
pytestmark = pytest.mark.xdist_group("refseg_finetune")

STEPS = 60  # enough for a tiny random model to find one object per image (cIoU ~4% -> ~20%)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT sentence-transformer (the tests' head expects 16: a projection is added)."""
    from versavit.labeling.tiny import save_tiny_embedder

    return save_tiny_embedder(tmp_path_factory.mktemp("text-encoder"), seed=0, dim=32)


@pytest.fixture(scope="module")
def one_object_world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The synthetic world with one object per 56 px image: learnable in tens of CPU steps (with 3-6 small objects
    per image a tiny random model needs far more steps to ground the words before it predicts any foreground)."""
    root = str(tmp_path_factory.mktemp("one-object-world"))
    build_synthetic(root, SyntheticConfig(num_train=16, num_val=8, image_size=56, min_objects=1, max_objects=1,
                                          samples_per_shard=8))
    return root


def _cfg(workdir: Path, text_encoder: str, *extra: str):  # noqa: ANN202 - RunConfig
    return eval_config(workdir, f"eval.refseg_finetune={{text_encoder: {text_encoder}, max_steps: {STEPS}, "
                       "batch_size: 8, lr_backbone: 1e-3, lr_rest: 5e-3, resolution: 56, log_every: 1000}", *extra)


@pytest.fixture(scope="module")
def finetuned(eval_run: Path, text_encoder: str, one_object_world: str, tmp_path_factory: pytest.TempPathFactory
              ) -> SimpleNamespace:
    """The trained export's backbone + its refseg head fine-tuned on the one-object world, with the model as it was
    built (same seed: the untrained state) for comparison."""
    cfg = _cfg(eval_run, text_encoder)
    bench = open_benchmark(f"synthetic={one_object_world}", cfg.workdir)
    cand = trained_candidate(cfg)
    untrained, origin = rf.build_refseg_model(cand, cfg)
    out = tmp_path_factory.mktemp("refseg-finetune-out")
    run = rf.train_refseg(cand, bench, cfg, out_dir=out)
    result = rf.score_finetuned(run, bench)
    before = rf.score_refseg_model(untrained, bench.eval, 56)["metrics"]
    return SimpleNamespace(cfg=cfg, bench=bench, run=run, result=result, untrained=untrained, origin=origin,
                           before=before, out=out)


# ------------------------------------------------------------------------------------------------ scoring


class _Maps(nn.Module):
    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(maps=torch.zeros(x.shape[0], 1, 1, 1))


class _OracleHead(nn.Module):
    """Returns, for text row (image i, query k), the logits of masks[i][k] or of another query's mask."""

    text_dim = 2

    def __init__(self, masks: list[list[np.ndarray]], swap: dict[tuple[int, int], tuple[int, int]] | None) -> None:
        super().__init__()
        self.masks, self.swap = masks, swap or {}

    def forward(self, fmap: torch.Tensor, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = []
        for i, k in text.long().tolist():
            i, k = self.swap.get((i, k), (i, k))
            m = torch.from_numpy(self.masks[i][k])
            assert tuple(m.shape) == tuple(size)
            out.append(torch.where(m, 10.0, -10.0))
        return torch.stack(out)


class _OracleText:
    """encode(sentences) is called once per image, in order: rows (image index, query index)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, sentences: list[str]) -> np.ndarray:
        rows = np.array([[self.calls, k] for k in range(len(sentences))], np.float32)
        self.calls += 1
        return rows


class _Oracle(nn.Module):
    """Stands in for RefsegFinetuneModel in `score_refseg_model`."""

    def __init__(self, masks: list[list[np.ndarray]], swap: dict | None = None) -> None:
        super().__init__()
        self.backbone, self.head, self.text = _Maps(), _OracleHead(masks, swap), _OracleText()

    def scoring_model(self) -> VersaViT:
        return VersaViT(self.backbone, {"refseg": self.head}, depth_layers=[])


def test_ciou_of_perfect_and_shuffled_masks(eval_run: Path) -> None:
    """Perfect masks score 100%; each query answered with another query's mask scores exactly the cumulative
    intersection / union of those pairs, far lower. The val split carries emb.npy (16-dim): scoring must ignore it
    and embed with the model's encoder (else the 2-dim oracle head would be skipped as another embedder's)."""
    bench = open_benchmark("synthetic", str(eval_run))
    samples = list(bench.eval)
    assert all("embeddings" in t for _, t in samples)
    masks = [[np.asarray(m, bool) for m in t["masks"]] for _, t in samples]
    perfect = rf.score_refseg_model(_Oracle(masks), bench.eval, 56, device="cpu")["metrics"]
    assert perfect["ciou"] == 1.0 and perfect["miou"] == 1.0
    assert perfect["objects"] == sum(len(m) for m in masks) > 8

    queries = [(i, k) for i, ms in enumerate(masks) for k in range(len(ms))]
    swap = {q: queries[(j + 1) % len(queries)] for j, q in enumerate(queries)}  # every query gets the next one's
    shuffled = rf.score_refseg_model(_Oracle(masks, swap), bench.eval, 56, device="cpu")["metrics"]
    inter = sum(int((masks[i][k] & masks[j][n]).sum()) for (i, k), (j, n) in swap.items())
    union = sum(int((masks[i][k] | masks[j][n]).sum()) for (i, k), (j, n) in swap.items())
    assert shuffled["ciou"] == pytest.approx(inter / union) and shuffled["ciou"] < 0.3
    assert shuffled["miou"] < 0.3


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_finetune_learns(finetuned: SimpleNamespace) -> None:
    losses = finetuned.run.losses
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    result = finetuned.result
    assert finetuned.origin == "export" and result.artifacts["head"] == "export"
    ciou = result.value("ciou")
    assert ciou > finetuned.before["ciou"] + 0.08, (ciou, finetuned.before)
    assert 0 <= result.value("miou") <= 1 and result.curves["train_loss"] == losses
    ex = result.artifacts["examples"]
    assert len(ex["pred"]) == len(ex["gt"]) == 4
    assert all(p.shape == g.shape == (56, 56) for p, g in zip(ex["pred"], ex["gt"], strict=True))
    assert all(isinstance(s, str) and s for s in ex["sentence"])
    assert result.artifacts["train_sets"] == ["synthetic/train (16)"]


def test_only_backbone_head_and_lora_train(finetuned: SimpleNamespace) -> None:
    model, untrained = finetuned.run.model, finetuned.untrained
    text = model.text
    assert text.projection is not None and (text.encoder_dim, text.out_dim) == (32, 16)
    assert set(text.targets) == {"query", "key", "value", "attention.output.dense"}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    expected = lora | {n for n, _ in model.named_parameters() if n.startswith(("backbone.", "head.",
                                                                                "text.projection."))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # the last step's gradients are still there: on every LoRA, head and projection tensor, on no frozen one
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert lora | {n for n in expected if n.startswith(("head.", "text.projection."))} <= grads <= expected
    before = dict(untrained.named_parameters())

    def moved(name: str) -> bool:
        return not torch.equal(dict(model.named_parameters())[name].detach().cpu(), before[name].detach().cpu())

    assert all(moved(n) for n in lora) and all(moved(n) for n in grads if n.startswith("head."))
    base = text.base_parameters()
    assert len(base) > 20 and not any(p.requires_grad for p in base.values())
    assert not any(moved(f"text.model.{n}") for n in base)  # the encoder's own weights are unchanged
    assert finetuned.run.backbone_update > 1e-3


def test_lora_adapter_reloads_with_peft(finetuned: SimpleNamespace, text_encoder: str) -> None:
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    path = Path(finetuned.run.adapter)
    assert path.parent == finetuned.out and (path / "adapter_config.json").is_file()
    st = SentenceTransformer(text_encoder, device="cpu").eval()
    sentences = ["the red cube", "the small blue ball left of the green cylinder"]
    features = (getattr(st, "preprocess", None) or st.tokenize)(sentences)
    plain = st(dict(features))["sentence_embedding"].detach()
    PeftModel.from_pretrained(st[0].auto_model, str(path))  # injects the saved adapters into the encoder
    reloaded = st(dict(features))["sentence_embedding"].detach()
    trained = finetuned.run.model.text.eval()
    tuned = trained.model(dict(features))["sentence_embedding"].detach()
    assert torch.allclose(reloaded, tuned, atol=1e-5) and not torch.allclose(plain, tuned, atol=1e-3)
    projection = torch.load(path / rf.ADAPTER_PROJECTION, weights_only=True)
    assert torch.equal(projection["weight"], trained.projection.weight.detach())


def test_finetune_refseg_writes_its_result(eval_run: Path, text_encoder: str, one_object_world: str,
                                          tmp_path: Path) -> None:
    cfg = _cfg(eval_run, text_encoder, "eval.refseg_finetune.max_steps=2")
    bench = open_benchmark(f"synthetic={one_object_world}", cfg.workdir)
    result = rf.finetune_refseg(baseline_candidate(cfg), bench, cfg, out_dir=tmp_path)
    assert result.artifacts["head"] == "fresh" and len(result.curves["train_loss"]) == 2
    loaded = rf.load_result(tmp_path / "refseg-finetune-synthetic-baseline.json")
    assert loaded.as_dict() == result.as_dict() and loaded.curves == result.curves
    ex, back = result.artifacts["examples"], loaded.artifacts["examples"]
    assert back["sentence"] == ex["sentence"] and len(back["pred"]) == len(ex["pred"]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(back["pred"], ex["pred"], strict=True))
    assert (Path(result.artifacts["adapter"]) / "adapter_config.json").is_file()
    no_train = Benchmark("refcoco", "-", bench.eval, None, ("refseg",))
    with pytest.raises(ValueError, match="nothing to train on"):
        rf.finetune_refseg(baseline_candidate(cfg), no_train, cfg)


# ------------------------------------------------------------------------------------------------ COCO-Stuff


@pytest.fixture(scope="module")
def coco_stuff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The COCO-Stuff fixture (published layout) prepared: <root>/train, <root>/val."""
    root = tmp_path_factory.mktemp("coco-stuff")
    cocostuff.write_coco_stuff_fixture(root / "raw", 0)
    for split in ("train", "val"):
        prepare_dataset("coco-stuff", str(root / "raw"), str(root / "prepared" / split), split=split)
    return root


def test_coco_stuff_queries_are_the_classes_present(coco_stuff: Path) -> None:
    """Read as referring segmentation: one query per class present (above the minimum area), named as the class,
    its mask exactly the class's pixels; unlabelled pixels (255) are in no mask."""
    reader = PreparedRefSeg(str(coco_stuff / "prepared" / "val"), "coco-stuff", "val")
    samples = list(reader)
    assert len(samples) == 2
    for i, (image, target) in zip(cocostuff.FIXTURE_SPLITS["val"], samples, strict=True):
        labels = cocostuff.fixture_labels(0, i)
        present = [v for v in np.unique(labels).tolist() if v != 255]
        names = [cocostuff.stuff_expression(cocostuff.COCO_STUFF_CLASSES[v]) for v in present]
        assert target["sentences"] == names and {"floor", "wall"} <= set(names)
        for v, mask in zip(present, target["masks"], strict=True):
            assert np.array_equal(mask, labels == v)
        assert not np.logical_or.reduce(target["masks"])[labels == 255].any() and (labels == 255).sum() == 3 * 96
        queries = rf.sample_queries(image, target, 48)
        assert [q.sentence for q in queries] == names and queries[0].mask.shape == (48, 48)


def test_evaluator_trains_on_the_configured_sets(eval_run: Path, text_encoder: str, coco_stuff: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark without a train split (as RefCOCO's val/testA/testB) trains on eval.refseg_finetune.train (here
    COCO-Stuff prepared); a second evaluation split reuses the fine-tune; the in-memory baseline is not modified."""
    from versavit.eval.evaluators import refseg_finetune as module

    cfg = _cfg(eval_run, text_encoder, "eval.refseg_finetune.max_steps=3",
               f"eval.refseg_finetune.train=[{coco_stuff / 'prepared'}]")
    evaluator = get("refseg-finetune")(EvalContext(cfg, tmp_path / "cache", tmp_path / "report", "cpu"))
    assert evaluator.kind == "training" and "LoRA r=8, alpha=8" in evaluator.protocol_note()
    val = PreparedRefSeg(str(coco_stuff / "prepared" / "val"), "coco-stuff", "val")
    splits = [Benchmark(name, "-", val, None, ("refseg",)) for name in ("stuff-a", "stuff-b")]
    assert evaluator.applies_to(splits[0]) and not evaluator.applies_to(Benchmark("nyu", "-", val, None, ("depth",)))
    cand = baseline_candidate(cfg)
    weights = {n: p.detach().clone() for n, p in cand.backbone.state_dict().items()}
    calls = []
    monkeypatch.setattr(module, "train_refseg", lambda *a, **k: calls.append(1) or rf.train_refseg(*a, **k))
    results = [evaluator.run(cand, b) for b in splits]
    assert len(calls) == 1 and results[0].curves == results[1].curves
    assert results[0].artifacts["train_sets"] == ["coco-stuff/train (6)"]
    assert results[0].as_dict() == results[1].as_dict() and set(results[0].as_dict()) == {"ciou", "miou"}
    assert all(torch.equal(weights[n], p) for n, p in cand.backbone.state_dict().items())
    files = evaluator.figures(results, tmp_path)
    assert [f.name for f in files] == ["refseg-finetune_stuff-a.png", "refseg-finetune_loss_stuff-a.png"]
    assert (tmp_path / "report" / "finetune" / "refseg-finetune-stuff-b-baseline.json").is_file()
    empty = get("refseg-finetune")(EvalContext(_cfg(eval_run, text_encoder), tmp_path, tmp_path, "cpu"))
    with pytest.raises(Skipped, match="nothing to train on"):
        empty.run(cand, splits[0])
