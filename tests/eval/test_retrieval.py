"""The `retrieval` evaluator (paper Table 11): recall@k both ways (perfect, random, several captions per image, ties),
SigLIP's sigmoid loss, the SigLIP2 text encoder from disk, training that learns a caption attribute visible in the
image (against the same training on shuffled captions), what each variant freezes, the evaluator end to end on the
synthetic world and COCO, and the COCO Karpathy reader and prepare source on their stand-in."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import eval_config
from safetensors.torch import load_file, save_file

from versavit.data import codecs
from versavit.data.prepare import SOURCES
from versavit.data.prepare.coco_karpathy import FIXTURE_IMAGES, SPLIT_FILE, fixture_truth
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.shards import ShardWriter
from versavit.data.synthetic import COLORS
from versavit.eval import retrieval as rt
from versavit.eval.candidates import baseline_candidate, trained_candidate
from versavit.eval.datasets import Benchmark, CocoKarpathy, PreparedCocoKarpathy, open_benchmark
from versavit.eval.evaluators import EvalContext, get

# one worker runs the module (make test: xdist), so its trained models (module fixtures) are built once
pytestmark = pytest.mark.xdist_group("retrieval")

SEED = 4
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ recall@k


def _itm_eval(sim: np.ndarray, txt2img: np.ndarray) -> dict[str, float]:
    """Reference: ALBEF / BLIP's itm_eval (argsort per row; an image's best-ranked caption counts)."""
    img2txt = [np.nonzero(txt2img == i)[0] for i in range(sim.shape[0])]
    i2t = np.array([min(int(np.nonzero(np.argsort(-row) == t)[0][0]) for t in img2txt[i])
                    for i, row in enumerate(sim)])
    t2i = np.array([int(np.nonzero(np.argsort(-col) == txt2img[t])[0][0]) for t, col in enumerate(sim.T)])
    return {f"{d}_r{k}": float(np.mean(r < k)) for d, r in (("t2i", t2i), ("i2t", i2t)) for k in rt.KS}


def test_recall_perfect_random_and_several_captions_per_image() -> None:
    n = 60
    assert rt.recall_at_k(np.eye(n) + 0.01 * np.random.default_rng(0).random((n, n)), np.arange(n)) == \
        {f"{d}_r{k}": 1.0 for d in ("t2i", "i2t") for k in rt.KS}
    # a random scorer: recall@k near k / N both ways (N = 100, 30 draws)
    draws = [rt.recall_at_k(np.random.default_rng(s).standard_normal((100, 100)), np.arange(100)) for s in range(30)]
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r5", "i2t_r10"):
        k = int(key.split("_r")[1])
        assert abs(np.mean([d[key] for d in draws]) - k / 100) < 0.35 * k / 100 + 0.004, key
    # 5 captions per image: equal to BLIP's itm_eval on tie-free scores, chunked or not
    txt2img = np.repeat(np.arange(40), 5)
    sim = np.random.default_rng(1).standard_normal((40, 200)) + 1.5 * (txt2img[None] == np.arange(40)[:, None])
    want = _itm_eval(sim, txt2img)
    assert rt.recall_at_k(sim, txt2img) == pytest.approx(want)
    assert 0.2 < want["t2i_r1"] < 0.9 and want["i2t_r1"] > want["t2i_r1"]  # any of 5 captions: easier
    t = torch.as_tensor(sim, dtype=torch.float32)
    chunked = rt.recalls(*rt.retrieval_ranks(lambda i, j: t[i, j], 40, torch.as_tensor(txt2img), chunk=7))
    assert chunked == pytest.approx(want)


def test_image_to_text_counts_any_caption_and_ties_count_against() -> None:
    txt2img = np.repeat(np.arange(4), 5)  # image i owns captions 5i..5i+4
    sim = (txt2img[None] == np.arange(4)[:, None]).astype(np.float64)
    sim[0, [5, 6]] = 2.0  # image 0: two negatives above all its captions -> rank 2
    sim[1, 5:10] = [3.0, 1.0, 1.0, 1.0, 1.0]
    sim[1, 0] = 2.5  # image 1: one caption above every negative -> found at 1
    sim[2] = np.where(txt2img == 2, 0.5, 1.0)  # image 2: 15 negatives above -> rank 15
    got = rt.recall_at_k(sim, txt2img)
    assert (got["i2t_r1"], got["i2t_r5"], got["i2t_r10"]) == (0.5, 0.75, 0.75)
    flat = rt.recall_at_k(np.ones((4, 20)), txt2img)  # a constant scorer finds nothing at 1
    assert flat["t2i_r1"] == 0.0 and flat["i2t_r1"] == 0.0
    with pytest.raises(ValueError, match="at least one caption"):
        rt.recall_at_k(np.ones((3, 2)), [0, 1])


# ------------------------------------------------------------------------------------------ loss and text encoder


def test_sigmoid_loss_is_siglips() -> None:
    logits = torch.randn(6, 6)
    want = -(sum(math.log(torch.sigmoid(logits[i, j] * (1 if i == j else -1)).item())
                 for i in range(6) for j in range(6))) / 6
    assert float(rt.sigmoid_loss(logits)) == pytest.approx(want, rel=1e-5)
    assert math.isclose(rt.LOGIT_SCALE_INIT, math.log(10)) and rt.LOGIT_BIAS_INIT == -10.0


def test_text_encoder_loads_from_a_text_model_folder_and_a_full_siglip2_checkpoint(tmp_path: Path) -> None:
    captions = ["A room with 3 objects: a small red ball.", "the blue cube is left of the ball", "x"]
    want = rt.tiny_text_tower(0)(captions)
    assert want.shape == (3, 32) and not torch.allclose(want[0], want[1])
    # the text model alone; a whole SigLIP2 (NaFlex releases); a whole SigLIP (the paper's fixed-resolution
    # siglip2-so400m-patch14-384 is one): the same text weights read back from each
    for layout, model_type, cls in (("text", "siglip2_text_model", "Siglip2TextModel"),
                                    ("siglip2", "siglip2", "Siglip2TextModel"),
                                    ("siglip", "siglip", "SiglipTextModel")):
        path = rt.save_tiny_text_encoder(tmp_path / layout, seed=0, layout=layout)
        assert json.loads((Path(path) / "config.json").read_text())["model_type"] == model_type
        tower = rt.load_text_tower(path)
        assert type(tower.model).__name__ == cls and tower.max_length == 64 and tower.dim == 32
        assert torch.allclose(tower(captions), want, atol=1e-5)
    # a checkpoint lacking text weights is an error, not a silently random text encoder
    weights = tmp_path / "text" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 2 weight"):
        rt.load_text_tower(str(tmp_path / "text"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="SigLIP or SigLIP2"):
        rt.load_text_tower(str(tmp_path / "bert"))
    with pytest.raises(rt.TextEncoderUnavailable):
        rt.load_text_tower(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------ training

# colour -> RGB of the square each image shows; its caption names the colour (the one thing both sides see)
_RGB = {"red": (204, 31, 26), "green": (31, 158, 51), "blue": (31, 71, 217), "yellow": (235, 209, 31),
        "purple": (133, 46, 179), "orange": (242, 122, 20), "cyan": (26, 199, 209)}
TRAIN, VAL = 56, 28  # 8 / 4 images per colour


def _write_split(url: str, n: int, seed: int, shuffle: bool = False) -> None:
    """n noise images, each with a 28 px square of COLORS[i % 7] somewhere, caption "a <colour> square"."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
        y, x = rng.integers(0, 28, 2)
        image[y:y + 28, x:x + 28] = _RGB[COLORS[i % len(COLORS)]]
        images.append(image)
        captions.append(f"a {COLORS[i % len(COLORS)]} square")
    if shuffle:  # the same images and captions, paired at random
        captions = [captions[j] for j in rng.permutation(n)]
    with ShardWriter(url, samples_per_shard=16) as writer:
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            writer.write({"__key__": f"{i:06d}", "rgb.png": codecs.encode_image(image, "png"),
                          "json": codecs.encode_json({"caption": caption})})


@pytest.fixture(scope="module")
def colour_worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two image-caption worlds with the same val split: captions true to the images, or shuffled in train."""
    out = {}
    for name, shuffle in (("true", False), ("shuffled", True)):
        root = tmp_path_factory.mktemp(f"colours-{name}")
        _write_split(f"{root}/train", TRAIN, 0, shuffle)
        _write_split(f"{root}/val", VAL, 1)
        out[name] = root
    return out


def _colour_cfg(workdir: Path, *extra: str):  # noqa: ANN202 - RunConfig
    return eval_config(workdir, "eval.retrieval={max_steps: 50, epochs: 1000, batch_size: 28, lr_projection: 1e-2, "
                       "lr: 1e-2, lr_backbone: 3e-3, embed_dim: 32, resolution: 28, log_every: 1000}", *extra)


def test_training_learns_a_visible_caption_attribute_and_shuffled_captions_do_not(colour_worlds: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    cfg = _colour_cfg(tmp_path, "eval.retrieval.variants=[projection-only]")
    cand = baseline_candidate(cfg)  # a random ViT: the pooling layer must find the colour in its features
    results = {name: rt.evaluate_retrieval(cand, open_benchmark(f"synthetic={root}", cfg.workdir), cfg, device="cpu")
               for name, root in colour_worlds.items()}
    learnt, shuffled = results["true"].as_dict(), results["shuffled"].as_dict()
    chance = 5 / VAL  # a caption's image among the top 5 of 28
    assert learnt["t2i_r5"] >= 0.6 and learnt["i2t_r5"] >= 0.5, learnt
    assert shuffled["t2i_r5"] <= chance + 0.15 and shuffled["i2t_r5"] <= chance + 0.15, shuffled
    assert learnt["t2i_r5"] - shuffled["t2i_r5"] >= 0.35
    # at 1, a caption's image ties with the 3 others of its colour: at best 1 / 4 (chance 1 / 28)
    assert learnt["t2i_r1"] >= 0.15 and learnt["t2i_r1"] >= shuffled["t2i_r1"] + 0.1
    # identical captions tie, and ties count against: no image finds its own caption first
    assert learnt["i2t_r1"] == 0.0
    loss = results["true"].curves["train_loss"]
    assert len(loss) == 50 and np.mean(loss[-10:]) < 0.8 * np.mean(loss[1:11])


def test_projection_only_freezes_the_vit_backbone_trained_moves_it_text_encoder_always_frozen(
        colour_worlds: dict[str, Path], tmp_path: Path) -> None:
    cfg = _colour_cfg(tmp_path, "eval.retrieval.max_steps=3")
    settings = rt.RetrievalSettings.from_config(cfg)
    cand = baseline_candidate(cfg)
    original = {k: v.clone() for k, v in cand.load_backbone().state_dict().items()}
    text = rt.tiny_text_tower(0)
    text_before = {k: v.clone() for k, v in text.model.state_dict().items()}
    pairs = rt.CaptionPairs([f"{colour_worlds['true']}/train"], settings.resolution, seed=0)
    assert pairs.num_samples() == TRAIN
    fresh = rt.build_model(cand, text, "projection-only", settings)
    assert math.isclose(fresh.logit_scale.item(), math.log(10), rel_tol=1e-6) and fresh.logit_bias.item() == -10.0
    trained = {v: rt.train_variant(cand, text, v, pairs, settings, CPU) for v in rt.VARIANTS}
    for variant, tv in trained.items():
        after = tv.model.backbone.state_dict()
        moved = any(not torch.equal(original[k], after[k]) for k in original)
        assert moved == (variant == "backbone-trained") and (tv.backbone_update > 0) == moved, variant
        assert len(tv.losses) == 3
        assert not torch.equal(fresh.pool.probe, tv.model.pool.probe)  # the pooling layer trained in both
        assert not torch.equal(fresh.text_proj[0].weight, tv.model.text_proj[0].weight)
    assert not any(p.requires_grad for p in trained["projection-only"].model.backbone.parameters())
    assert all(torch.equal(text_before[k], v) for k, v in text.model.state_dict().items())  # text encoder frozen
    assert not any(p.requires_grad for p in text.parameters())
    assert all(torch.equal(original[k], v) for k, v in cand.load_backbone().state_dict().items())  # never in place


# ------------------------------------------------------------------------------------------ COCO Karpathy


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco-raw")
    SOURCES["coco-karpathy"].write_fixture(root, SEED)
    return root


def _truths(label: str) -> list[dict]:
    return [fixture_truth(SEED, label, i) for i in range(FIXTURE_IMAGES[label])]


def _read(reader) -> list[tuple[str, list[str], int, tuple[int, ...]]]:  # noqa: ANN001
    return [(t["key"], t["captions"], t["cocoid"], image.shape) for image, t in reader]


def test_coco_karpathy_reader_and_prepared_shards_give_each_images_captions_exactly(coco_raw: Path,
                                                                                    tmp_path: Path) -> None:
    want = {split: [(t["key"], t["captions"], t["cocoid"], (48, 48, 3)) for label in labels for t in _truths(label)]
            for split, labels in (("test", ("test",)), ("val", ("val",)), ("train", ("train", "restval")))}
    assert [len(c) for _, c, _, _ in want["test"]] == [6, 5, 5, 5]  # image 0 has six captions, as a few do
    assert want["test"][1][1][-1] == fixture_truth(SEED, "test", 1)["raw"][-1].strip() != \
        fixture_truth(SEED, "test", 1)["raw"][-1]  # a raw caption ending in " \n" comes back stripped
    published = {split: CocoKarpathy(coco_raw, split) for split in want}
    assert all(r.root == coco_raw for r in published.values())
    # train = Karpathy's train + restval (its order: the file's, restval listed before train in the stand-in)
    assert sorted(_read(published["train"])) == sorted(want["train"]) and _read(published["test"]) == want["test"]
    assert _read(published["val"]) == want["val"]
    prepared = tmp_path / "prepared"
    for split in want:
        summary = prepare_dataset("coco-karpathy", str(coco_raw), str(prepared / split), split, units_per_shard=2)
        assert summary["counts"]["samples"] == len(want[split])
    bench = open_benchmark(f"coco-karpathy={prepared}", str(tmp_path))
    assert isinstance(bench.eval, PreparedCocoKarpathy) and bench.train is None and bench.tasks == ("retrieval",)
    assert _read(bench.eval) == want["test"] and len(bench.eval) == 4
    assert isinstance(open_benchmark(f"coco-karpathy={coco_raw}", str(tmp_path)).eval, CocoKarpathy)
    # the split file under karpathy/ (ViLT's layout): images still found beside it
    moved = tmp_path / "moved"
    shutil.copytree(coco_raw, moved)
    (moved / "karpathy").mkdir()
    (moved / SPLIT_FILE).rename(moved / "karpathy" / SPLIT_FILE)
    assert _read(CocoKarpathy(moved, "test")) == want["test"]


def test_coco_karpathy_bad_inputs(coco_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(coco_raw, raw)
    missing = fixture_truth(SEED, "test", 2)["key"]
    (raw / missing).unlink()
    with pytest.raises(ValueError, match="missing"):
        CocoKarpathy(raw, "test")
    data = json.loads((raw / SPLIT_FILE).read_text())
    data["images"][0]["sentences"] = []  # test image 0: no caption
    (raw / SPLIT_FILE).write_text(json.dumps(data))
    summary = prepare_dataset("coco-karpathy", str(raw), str(tmp_path / "out"), "test", units_per_shard=2)
    assert (summary["counts"]["samples"], summary["counts"]["missing_image"], summary["counts"]["bad_record"]) == \
        (2, 1, 1)
    (raw / SPLIT_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="images"):
        CocoKarpathy(raw, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        CocoKarpathy(coco_raw, "restval")


# ------------------------------------------------------------------------------------------ the evaluator


def test_evaluator_on_the_synthetic_world_and_coco_trains_once_per_backbone(eval_run: Path, coco_raw: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = eval_config(eval_run, "eval.retrieval={max_steps: 2, batch_size: 4, embed_dim: 16}")
    ctx = EvalContext(cfg, tmp_path / "cache", tmp_path / "out")
    ev = get("retrieval")(ctx)
    assert ev.kind == "training" and list(ev.metric_specs)[0] == "t2i_r1"
    assert list(ev.columns()) == ["t2i_r1", "i2t_r1", "t2i_r1_bb", "i2t_r1_bb"]
    calls: list[str] = []
    real = rt.train_variant

    def counted(candidate, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(candidate.name)
        return real(candidate, *args, **kwargs)

    monkeypatch.setattr(rt, "train_variant", counted)
    synthetic = open_benchmark("synthetic", cfg.workdir)
    coco = open_benchmark(f"coco-karpathy={coco_raw}", cfg.workdir)
    assert ev.applies_to(synthetic) and ev.applies_to(coco)
    assert not ev.applies_to(Benchmark("nyu", "", synthetic.eval, None, ("depth",)))
    trained = trained_candidate(cfg)
    results = [ev.run(trained, synthetic), ev.run(trained, coco)]
    assert calls == ["trained", "trained"]  # one per variant: COCO reuses the models trained for synthetic
    for r in results:
        assert list(r.as_dict()) == list(rt.METRIC_SPECS) and all(0 <= v <= 1 for v in r.as_dict().values())
        assert set(r.curves) == {"train_loss", "train_loss_bb"} and len(r.curves["train_loss"]) == 2
        assert r.artifacts["backbone_update"]["projection-only"] == 0 < r.artifacts["backbone_update"][
            "backbone-trained"]
    synth, coco_result = results
    assert synth.artifacts["images"] == synth.artifacts["captions"] == 8  # val: one scene caption per image
    assert (coco_result.artifacts["images"], coco_result.artifacts["captions"]) == (4, 21)
    assert coco_result.value("t2i_r5") == coco_result.value("t2i_r5_bb") == 1.0  # 4 images: always in the top 5
    assert (tmp_path / "out" / "retrieval" / "retrieval-coco-karpathy-trained.json").is_file()
    ev.run(baseline_candidate(cfg), synthetic)
    assert calls == ["trained", "trained", "baseline", "baseline"]  # a new backbone trains anew
    (tmp_path / "figures").mkdir()
    files = ev.figures([synth], tmp_path / "figures")
    assert [f.name for f in files] == ["retrieval_synthetic.png", "retrieval_loss_synthetic.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert "tiny random SigLIP2" in ev.protocol_note() and ev.settings()["embed_dim"] == 16
