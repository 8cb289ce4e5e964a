"""VisionBackbone: patch order, token reordering, packing, checkpoints, gradient checkpointing, dtypes.

Everything runs on tiny random towers (embed 32, depth 4, 4 heads) that the tests build or save
themselves; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from versavit.config.schema import BackboneConfig
from versavit.models import BackboneOutput, VisionBackbone
from versavit.models.backbone import IMAGE_MEAN, IMAGE_STD, smart_resize

KINDS = ("qwen2_vl", "qwen2_5_vl")
D, DEPTH = 32, 4


def tiny(kind: str = "qwen2_vl", dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> VisionBackbone:
    torch.manual_seed(seed)
    cfg = BackboneConfig(kind=kind, embed_dim=D, depth=DEPTH, num_heads=4, gradient_checkpointing=False, **kw)
    return VisionBackbone.build(cfg, dtype=dtype).eval()


def images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def merge_unit_index(b: int, i: int, j: int, h: int, w: int) -> int:
    """Position of patch (i, j) of image b in the tower's packed 2x2 merge-unit order (same-size images)."""
    return b * h * w + ((i // 2) * (w // 2) + j // 2) * 4 + (i % 2) * 2 + (j % 2)


def to_raster_reference(tokens: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
    """Independent (loop) reorder of merge-unit-ordered tokens [B*h*w, D] into maps [B, D, h, w]."""
    out = torch.empty(batch, tokens.shape[-1], h, w, dtype=tokens.dtype)
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                out[b, :, i, j] = tokens[merge_unit_index(b, i, j, h, w)]
    return out


# ------------------------------------------------------------------------------------------------
# patchify


def _processor():
    try:  # the reference implementation (needs torchvision)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(do_resize=False)
    except ImportError:  # same patch layout, numpy backend (what transformers falls back to here)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(do_resize=False)


def test_patch_order_matches_qwen2vl_image_processor():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(56, 84), (112, 56)]]
    proc = _processor()
    assert tuple(proc.image_mean) == pytest.approx(IMAGE_MEAN) and tuple(proc.image_std) == pytest.approx(IMAGE_STD)
    ref = proc(images=arrays, return_tensors="pt")

    model = tiny()
    ours, grid = model.patchify([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in arrays])
    assert ours.shape == ref["pixel_values"].shape == (4 * 6 + 8 * 4, 3 * 2 * 14 * 14)
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]

    # a batched tensor gives the same patches as the list of its images
    batch = torch.stack(images((56, 84), (56, 84)))
    p_batch, g_batch = model.patchify(batch)
    p_list, g_list = model.patchify(list(batch))
    torch.testing.assert_close(p_batch, p_list)
    assert g_batch.tolist() == g_list.tolist() == [[1, 4, 6]] * 2


def test_patchify_rejects_sizes_not_multiple_of_28():
    with pytest.raises(ValueError, match="multiples of 28"):
        tiny().patchify([torch.rand(3, 56, 70)])


# ------------------------------------------------------------------------------------------------
# forward: shapes, ordering, packing


@pytest.mark.parametrize("kind", KINDS)
def test_shapes(kind: str):
    model = tiny(kind)
    with torch.no_grad():
        out = model(torch.stack(images((56, 84), (56, 84))), layers=[1, 2, DEPTH], merged=True)
    assert isinstance(out, BackboneOutput)
    assert out.maps.shape == (2, D, 4, 6)
    assert sorted(out.layers) == [1, 2, DEPTH]
    assert all(v.shape == (2, D, 4, 6) for v in out.layers.values())
    torch.testing.assert_close(out.layers[DEPTH], out.maps)
    assert [m.shape for m in out.merged] == [(6, 4 * D)] * 2

    # dynamic resolution: two different sizes in one pass
    with torch.no_grad():
        mixed = model(images((56, 84), (112, 56)), merged=True)
    assert mixed.maps is None and mixed.layers == {}
    assert [m.shape for m in mixed.merged] == [(4 * 6 // 4, 4 * D), (8 * 4 // 4, 4 * D)]
    with pytest.raises(ValueError, match="different sizes"):
        model(images((56, 84), (112, 56)))
    with pytest.raises(ValueError, match="layers must be"):
        model(torch.stack(images((56, 56))), layers=[DEPTH + 1])


@pytest.mark.parametrize("kind", KINDS)
def test_raster_order_with_identity_blocks(kind: str):
    """Blocks zeroed -> identity (residual + 0); patch embedding = mean of channel 0 over the patch. An image whose
    patch (i, j) is the constant v_ij must then give maps[b, 0, i, j] == normalised v_ij, for every layer."""
    model = tiny(kind)
    with torch.no_grad():
        for p in model.tower.blocks.parameters():
            p.zero_()
        weight = torch.zeros_like(model.tower.patch_embed.proj.weight)  # [D, 3, 2, 14, 14]
        weight[0, 0] = 1.0 / (2 * 14 * 14)
        model.tower.patch_embed.proj.weight.copy_(weight)
    b, h, w = 2, 8, 12
    values = torch.rand(b, h, w)
    pixels = values.repeat_interleave(14, 1).repeat_interleave(14, 2)  # [B, 112, 168], constant per patch
    batch = pixels[:, None].expand(b, 3, h * 14, w * 14).clone()
    with torch.no_grad():
        out = model(batch, layers=[0, 1, 2])  # 0 = patch embeddings
    expected = (values - IMAGE_MEAN[0]) / IMAGE_STD[0]
    for got in (out.maps, out.layers[0], out.layers[1], out.layers[2]):
        torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_maps_equal_tower_last_hidden_state_reordered():
    model = tiny("qwen2_vl")
    batch = torch.stack(images((84, 112), (84, 112)))
    with torch.no_grad():
        out = model(batch, layers=[2])
        pixels, grid = model.patchify(batch)
        tower = model.tower(pixels, grid_thw=grid, output_hidden_states=True)
    assert len(tower.hidden_states) == DEPTH + 1
    torch.testing.assert_close(out.maps, to_raster_reference(tower.last_hidden_state, 2, 6, 8))
    torch.testing.assert_close(out.layers[2], to_raster_reference(tower.hidden_states[2], 2, 6, 8))
    # merged units are the merge-unit-ordered tokens, four at a time
    with torch.no_grad():
        merged = model(batch, merged=True).merged
    torch.testing.assert_close(torch.cat(merged), tower.last_hidden_state.reshape(-1, 4 * D))


def test_qwen25_window_permutation_is_undone():
    model = tiny("qwen2_5_vl")
    assert model.tower.config.fullatt_block_indexes == [DEPTH - 1]  # windowed blocks before the last one
    batch = torch.stack(images((224, 168), (224, 168)))  # 8x6 merge units: several 4x4-unit windows
    h, w = 16, 12
    with torch.no_grad():
        out = model(batch, layers=[1], merged=True)
        pixels, grid = model.patchify(batch)
        tower = model.tower(pixels, grid_thw=grid, output_hidden_states=True)
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert not torch.equal(window_index, torch.arange(len(window_index)))

    def unpermute(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(-1, 4, D)[torch.argsort(window_index)].reshape(-1, D)

    torch.testing.assert_close(out.maps, to_raster_reference(unpermute(tower.last_hidden_state), 2, h, w))
    torch.testing.assert_close(out.layers[1], to_raster_reference(unpermute(tower.hidden_states[1]), 2, h, w))
    torch.testing.assert_close(torch.cat(out.merged), unpermute(tower.last_hidden_state).reshape(-1, 4 * D))
    # without un-permuting the order would be wrong: the check above can fail
    assert not torch.allclose(out.maps, to_raster_reference(tower.last_hidden_state, 2, h, w))


@pytest.mark.parametrize("kind", KINDS)
def test_batching_equals_single_images(kind: str):
    model = tiny(kind)
    a, b = images((224, 168), (224, 168), seed=1)
    with torch.no_grad():
        together = model(torch.stack([a, b]), layers=[2], merged=True)
        alone = [model(x[None], layers=[2], merged=True) for x in (a, b)]
    for k, single in enumerate(alone):
        torch.testing.assert_close(together.maps[k], single.maps[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.layers[2][k], single.layers[2][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.merged[k], single.merged[0], atol=1e-5, rtol=1e-5)
    # different sizes packed in one pass: same merged tokens as alone
    c = images((56, 112), seed=2)[0]
    with torch.no_grad():
        mixed = model([a, c], merged=True).merged
        alone_c = model([c], merged=True).merged[0]
    torch.testing.assert_close(mixed[0], alone[0].merged[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone_c, atol=1e-5, rtol=1e-5)


def test_merger_is_frozen_and_never_run():
    model = tiny()
    assert not any(p.requires_grad for p in model.tower.merger.parameters())

    def boom(*args, **kwargs):
        raise AssertionError("the tower's merger ran")

    model.tower.merger.forward = boom
    model(torch.stack(images((56, 56))), merged=True)
    assert any(k.startswith("tower.merger.") for k in model.state_dict())  # still saved with the tower


# ------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(kind: str, tmp_path):
    model = tiny(kind, seed=3)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "ckpt"))
    loaded = VisionBackbone.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.kind == kind and loaded.embed_dim == D and loaded.depth == DEPTH
    batch = torch.stack(images((56, 84)))
    with torch.no_grad():
        a, b = model(batch, layers=[1], merged=True), loaded(batch, layers=[1], merged=True)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.layers[1], b.layers[1])
    assert torch.equal(a.merged[0], b.merged[0])
    other = "qwen2_5_vl" if kind == "qwen2_vl" else "qwen2_vl"
    with pytest.raises(ValueError, match="kind"):
        VisionBackbone.from_pretrained(str(tmp_path / "ckpt"), kind=other)
    # build() with `pretrained` goes through the same loader
    cfg = BackboneConfig(kind=kind, pretrained=str(tmp_path / "ckpt"), embed_dim=D, depth=DEPTH, num_heads=4)
    built = VisionBackbone.build(cfg)
    assert built.gradient_checkpointing
    assert all(torch.equal(x, y) for x, y in zip(built.state_dict().values(), model.state_dict().values(), strict=True))


def _tiny_vlm(kind: str):
    """A tiny full Qwen2-VL / Qwen2.5-VL (LLM + vision tower)."""
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    torch.manual_seed(5)
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=DEPTH, embed_dim=D, hidden_size=32, num_heads=4, mlp_ratio=4)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=DEPTH, hidden_size=D, intermediate_size=64, out_hidden_size=32, num_heads=4,
                  fullatt_block_indexes=[DEPTH - 1])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def _visual_state(vlm) -> dict[str, torch.Tensor]:
    return vlm.model.visual.state_dict()  # transformers 5 layout: model.visual


@pytest.mark.parametrize("kind", KINDS)
def test_load_vision_tower_from_full_vlm_checkpoint(kind: str, tmp_path):
    vlm = _tiny_vlm(kind)
    vlm.save_pretrained(str(tmp_path / "vlm"))
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["model_type"] == kind
    model = VisionBackbone.from_pretrained(str(tmp_path / "vlm"))
    assert model.kind == kind and model.depth == DEPTH and model.embed_dim == D
    expected = _visual_state(vlm)
    got = model.tower.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    if kind == "qwen2_vl":  # and it computes what the VLM's own tower computes
        batch = torch.stack(images((56, 84)))
        with torch.no_grad():
            ref = vlm.model.visual(*model.patchify(batch)).last_hidden_state
            torch.testing.assert_close(model(batch).maps, to_raster_reference(ref, 1, 4, 6))


def test_full_checkpoint_with_model_visual_prefix_and_shards(tmp_path):
    """transformers 4.5x wrote `model.visual.*`; big checkpoints are sharded with an index."""
    vlm = _tiny_vlm("qwen2_vl")
    vlm.save_pretrained(str(tmp_path / "vlm"))
    state = load_file(str(tmp_path / "vlm" / "model.safetensors"))
    renamed = {("model." + k if k.startswith("visual.") else k): v.contiguous() for k, v in state.items()}
    visual_keys = [k for k in renamed if k.startswith("model.visual.")]
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in renamed.items() if k not in visual_keys},
              "model-00002-of-00002.safetensors": {k: renamed[k] for k in visual_keys}}
    os.remove(tmp_path / "vlm" / "model.safetensors")
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / "vlm" / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, t in shards.items() for k in t}}
    (tmp_path / "vlm" / "model.safetensors.index.json").write_text(json.dumps(index))
    model = VisionBackbone.from_pretrained(str(tmp_path / "vlm"), kind="qwen2_vl", dtype=torch.bfloat16)
    expected = _visual_state(vlm)
    assert all(torch.equal(model.tower.state_dict()[k], v.to(torch.bfloat16)) for k, v in expected.items())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_from_pretrained_rejects_other_paths(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        VisionBackbone.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        VisionBackbone.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected a Qwen2-VL"):
        VisionBackbone.from_pretrained(str(tmp_path / "bert"))


# ------------------------------------------------------------------------------------------------
# training details, dtypes, helpers


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_same_gradients(kind: str):
    batch = torch.stack(images((56, 84), (56, 84), seed=4))

    saved: dict[bool, int] = {}

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny(kind, seed=7).train()
        model.set_gradient_checkpointing(checkpointing)
        assert model.gradient_checkpointing is checkpointing
        saved[checkpointing] = 0

        def pack(t: torch.Tensor) -> torch.Tensor:  # activations kept for backward outside checkpoints
            saved[checkpointing] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch, layers=[2], merged=True)
        (out.maps.square().mean() + out.layers[2].mean() + out.merged[1].sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    off, on = grads(False), grads(True)
    assert saved[True] < saved[False] / 2  # checkpointing is really on: blocks' activations are not kept
    assert off.keys() == on.keys() and len(off) > 0
    for name in off:
        torch.testing.assert_close(on[name], off[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_build():
    model = tiny(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.stack(images((56, 56))), merged=True)
    assert out.maps.dtype == torch.bfloat16 and torch.isfinite(out.maps.float()).all()
    q25 = tiny("qwen2_5_vl", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in q25.parameters())


def test_uniform_layers_and_smart_resize():
    assert tiny().uniform_layers(3) == [2, 3, 4]
    deep = VisionBackbone.build(BackboneConfig(embed_dim=8, depth=32, num_heads=2))  # the paper's depth
    assert deep.uniform_layers(3) == [11, 22, 32]
    assert deep.uniform_layers(4) == [8, 16, 24, 32]
    with pytest.raises(ValueError):
        tiny().uniform_layers(DEPTH + 1)

    h, w = smart_resize(1080, 1920, min_pixels=56 * 56, max_pixels=896 * 896)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 896 * 896 and abs(w / h - 16 / 9) < 0.1
    assert smart_resize(100, 100, min_pixels=56 * 56, max_pixels=896 * 896) == (112, 112)
    assert smart_resize(20, 30, min_pixels=56 * 56, max_pixels=896 * 896) >= (56, 56)
