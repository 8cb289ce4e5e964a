"""Backbone kind siglip2 (the paper's Table 6 comparison): SigLIP2 NaFlex's tower behind VisionBackbone's interface.

Tiny random Siglip2VisionModel / Siglip2Model checkpoints written to tmp_path; nothing is downloaded. The wrapper's
features are checked against transformers' own hidden states for the same pixels, and its patches against
transformers' Siglip2ImageProcessor, so it cannot be silently wrong.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from autograd_memory import saved_bytes  # noqa: E402
from tiny_model import TINY_MODEL  # noqa: E402
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel  # noqa: E402

from versavit.config import ConfigError, load_config  # noqa: E402
from versavit.config.schema import BackboneConfig  # noqa: E402
from versavit.models.backbone import Siglip2Backbone, VisionBackbone  # noqa: E402

# one worker runs the module (make test: xdist), so its module fixtures are built once
pytestmark = pytest.mark.xdist_group("siglip2")

ROOT = Path(__file__).resolve().parents[2]
D, DEPTH, HEADS = 32, 3, 2
SIGLIP2 = [*TINY_MODEL, "model.backbone.kind=siglip2",
           "train.resolution={caption_max: 64, caption_min: 32, depth: 64, refseg: 64}"]


def tiny_vision_config(**kw) -> Siglip2VisionConfig:
    # a 4 x 4 learned position grid: every test size below resizes it (as NaFlex does with so400m's 16 x 16)
    return Siglip2VisionConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                               intermediate_size=64, patch_size=16, num_patches=16, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Siglip2VisionModel folder (with its pooling head) and a full Siglip2Model folder."""
    root = tmp_path_factory.mktemp("siglip2")
    torch.manual_seed(0)
    Siglip2VisionModel(tiny_vision_config()).save_pretrained(str(root / "tower"))
    text = dict(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=HEADS,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = Siglip2Model(Siglip2Config(vision_config=tiny_vision_config().to_dict(), text_config=text))
    full.save_pretrained(str(root / "full"))
    return {"tower": root / "tower", "full": root / "full"}


def images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def tiny(checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> Siglip2Backbone:
    torch.manual_seed(0)
    cfg = BackboneConfig(kind="siglip2", embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
                         gradient_checkpointing=checkpointing)
    model = VisionBackbone.build(cfg, dtype=dtype)
    assert isinstance(model, Siglip2Backbone)
    return model


# ------------------------------------------------------------------------------------------------
# loading, saving


def test_loads_a_vision_tower_folder(checkpoints):
    model = VisionBackbone.from_pretrained(str(checkpoints["tower"]))
    hf = Siglip2VisionModel.from_pretrained(str(checkpoints["tower"]))
    assert isinstance(model, Siglip2Backbone) and isinstance(model, VisionBackbone)
    assert (model.kind, model.embed_dim, model.depth, model.num_heads) == ("siglip2", D, DEPTH, HEADS)
    assert (model.patch_size, model.merge_size) == (16, 2)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(model.tower.state_dict()[name], tensor, rtol=0, atol=0)
    assert VisionBackbone.from_pretrained(str(checkpoints["tower"]), kind="siglip2").kind == "siglip2"
    with pytest.raises(ValueError, match="holds a siglip2 vision tower, but kind 'qwen2_vl'"):
        VisionBackbone.from_pretrained(str(checkpoints["tower"]), kind="qwen2_vl")


def test_loads_the_vision_model_of_a_full_siglip2_checkpoint(checkpoints):
    model = VisionBackbone.from_pretrained(str(checkpoints["full"]), dtype=torch.bfloat16)
    full = Siglip2Model.from_pretrained(str(checkpoints["full"]))
    assert isinstance(model, Siglip2Backbone) and model.dtype == torch.bfloat16
    expected = full.vision_model.state_dict()
    assert set(model.tower.state_dict()) == set(expected)  # the pooling head too; no text weights
    for name, tensor in expected.items():
        torch.testing.assert_close(model.tower.state_dict()[name], tensor.to(torch.bfloat16), rtol=0, atol=0)


def test_build_from_a_pretrained_config_and_save_round_trip(checkpoints, tmp_path):
    cfg = BackboneConfig(kind="siglip2", pretrained=str(checkpoints["full"]), embed_dim=D, depth=DEPTH,
                         num_heads=HEADS, mlp_ratio=2.0)
    model = VisionBackbone.build(cfg).eval()
    assert model.gradient_checkpointing and isinstance(model, Siglip2Backbone)
    model.save_pretrained(str(tmp_path / "saved"))
    again = VisionBackbone.from_pretrained(str(tmp_path / "saved")).eval()
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(str(tmp_path / "saved"))) is Siglip2VisionModel
    batch = torch.stack(images((64, 96), (64, 96)))
    a, b = model(batch, layers=[1], merged=True), again(batch, layers=[1], merged=True)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)
    torch.testing.assert_close(a.layers[1], b.layers[1], rtol=0, atol=0)


def test_build_from_sizes():
    model = tiny(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.tower.training  # a built backbone trains
    config = model.tower.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.patch_size) == (D, DEPTH, HEADS, 64, 16)
    assert not hasattr(model.tower, "head")  # built from sizes: no pooling head (VersaViT reads the patches)
    assert model.uniform_layers(3) == [1, 2, 3]
    so400m = BackboneConfig(kind="siglip2", embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7361111111)
    from versavit.models.siglip2 import vision_config

    assert vision_config(so400m).intermediate_size == 4304
    assert VisionBackbone.build(so400m.model_copy(update={"depth": 1}), dtype=torch.bfloat16).num_heads == 16


# ------------------------------------------------------------------------------------------------
# features


def test_patches_equal_siglip2_image_processor():
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    rgb = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    ref = Siglip2ImageProcessorPil()(images=[rgb], do_resize=False, max_num_patches=4 * 6, return_tensors="pt")
    pixels, mask, shapes = tiny().patchify([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), rtol=0, atol=1e-6)
    assert torch.equal(mask, ref["pixel_attention_mask"].long()) and shapes.tolist() == [[4, 6]]


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32)])
def test_maps_and_layers_equal_the_hf_models_hidden_states(checkpoints, size):
    model = VisionBackbone.from_pretrained(str(checkpoints["tower"])).eval()
    hf = Siglip2VisionModel.from_pretrained(str(checkpoints["tower"])).eval()
    h, w = size[0] // 16, size[1] // 16
    batch = torch.stack(images(size, size, seed=1))
    out = model(batch, layers=[0, 1, 2, 3], merged=True)
    assert out.maps.shape == (2, D, h, w)
    assert sorted(out.layers) == [0, 1, 2, 3] and all(m.shape == (2, D, h, w) for m in out.layers.values())
    pixels, mask, shapes = model.patchify(batch)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)
    assert len(ref.hidden_states) == DEPTH + 1
    for i, states in enumerate(ref.hidden_states):  # [B, h*w, D] row-major
        expected = states.reshape(2, h, w, D).permute(0, 3, 1, 2)
        torch.testing.assert_close(out.layers[i], expected, rtol=1e-5, atol=1e-5)
    # the final map is the last layer's output (post_layernorm is the unused contrastive readout, like the merger)
    torch.testing.assert_close(out.maps, out.layers[DEPTH], rtol=0, atol=0)
    assert not torch.allclose(out.maps, ref.last_hidden_state.reshape(2, h, w, D).permute(0, 3, 1, 2))


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_merged_tokens_are_2x2_units_of_the_final_map(size):
    model = tiny().eval()
    out = model(images(size, size, seed=2), merged=True)
    h, w = size[0] // 16, size[1] // 16
    assert len(out.merged) == 2
    for b, units in enumerate(out.merged):
        assert units.shape == ((size[0] // 32) * (size[1] // 32), 4 * D)
        fmap = out.maps[b]
        for u in range(units.shape[0]):
            i, j = 2 * (u // (w // 2)), 2 * (u % (w // 2))
            expected = torch.cat([fmap[:, i, j], fmap[:, i, j + 1], fmap[:, i + 1, j], fmap[:, i + 1, j + 1]])
            torch.testing.assert_close(units[u], expected, rtol=0, atol=0)
    assert h * w == 4 * out.merged[0].shape[0]


def test_images_of_different_sizes_in_one_padded_pass_equal_single_images():
    model = tiny().eval()
    ims = images((64, 96), (32, 32), (96, 64), seed=3)
    together = model(ims, merged=True)
    assert together.maps is None and [m.shape[0] for m in together.merged] == [6, 1, 6]
    for image, units in zip(ims, together.merged, strict=True):
        alone = model([image], merged=True).merged[0]
        torch.testing.assert_close(units, alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="dense maps need equal sizes"):
        model(ims)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(images((48, 64)))


def test_gradient_checkpointing_cuts_saved_activations_and_keeps_gradients():
    batch = torch.stack(images((64, 96), (64, 96), seed=4))
    kept, grads = {}, {}
    for on in (False, True):
        model = tiny(checkpointing=on)
        assert model.gradient_checkpointing is on and model.training
        assert all(block.gradient_checkpointing is on for block in model.blocks)
        kept[on] = saved_bytes(model, lambda model=model: model(batch, layers=[1, 2]).maps.sum())
        out = model(batch, layers=[1, 2], merged=True)
        (out.maps.square().mean() + out.layers[1].mean() + sum(m.sum() for m in out.merged)).backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {"tower.post_layernorm.weight", "tower.post_layernorm.bias"}  # never run
        assert set(grads[on]) == {n for n, _ in model.named_parameters()} - frozen
    print(f"siglip2 ViT saved bytes: {kept[False]} -> {kept[True]}")
    assert kept[True] < 0.6 * kept[False]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6)
    model = tiny(checkpointing=True)
    model.set_gradient_checkpointing(False)
    assert not model.gradient_checkpointing


# ------------------------------------------------------------------------------------------------
# configuration, data, the multi-task model


def test_config_kind_sets_patch_and_resize_factor():
    cfg = BackboneConfig(kind="siglip2")
    assert (cfg.patch_size, cfg.resize_factor) == (16, 32)
    assert (BackboneConfig().patch_size, BackboneConfig().resize_factor) == (14, 28)
    cfg.kind = "qwen2_5_vl"  # follows an assigned kind too
    assert cfg.patch_size == 14
    with pytest.raises(ValueError, match="patch size 16, not 14"):
        BackboneConfig(kind="siglip2", patch_size=14)
    with pytest.raises(ValueError, match="no flash_attention_2"):
        BackboneConfig(kind="siglip2", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="backbone kind siglip2 has none"):
        BackboneConfig(kind="siglip2", export_mllm=True)


def test_resolutions_must_fit_the_kind():
    tiny_yaml = ROOT / "configs/tiny.yaml"
    with pytest.raises(ConfigError, match=r"of 32: train\.resolution\.caption_min = 56 \(nearest: 32 or 64\)"):
        load_config(tiny_yaml, ["model.backbone.kind=siglip2"])
    with pytest.raises(ConfigError, match=r"multiples of 28: train\.resolution\.depth = 256"):
        load_config(tiny_yaml, ["train.resolution.depth=256"])  # 8 x 32: a siglip2 size, not a Qwen-VL one
    cfg = load_config(tiny_yaml, ["model.backbone.kind=siglip2", "train.resolution.caption_min=64"])
    assert cfg.model.backbone.resize_factor == 32


def test_shipped_siglip2_config():
    cfg = load_config(ROOT / "configs/siglip2.yaml")
    b = cfg.model.backbone
    assert (b.kind, b.pretrained, b.patch_size, b.export_mllm) == (
        "siglip2", "google/siglip2-so400m-patch16-naflex", 16, False)
    assert (b.embed_dim, b.depth, b.num_heads) == (1152, 27, 16)
    paper = load_config(ROOT / "configs/paper.yaml")
    assert cfg.train.multitask == paper.train.multitask and cfg.train.warmup == paper.train.warmup
    assert cfg.data == paper.data and cfg.model.heads.depth == paper.model.heads.depth
    r = cfg.train.resolution
    assert all(v % 32 == 0 for v in (r.caption_max, r.caption_min, r.depth, r.refseg))


def test_caption_view_resizes_to_multiples_of_32():
    from versavit.data.tasks import task_view_fn

    cfg = load_config(ROOT / "configs/tiny.yaml", SIGLIP2)
    rgb = (np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)
    sample = {"__key__": "x", "jpg": rgb, "json": {"caption": "a scene"}}
    view = task_view_fn(cfg, "caption")(sample)
    h, w = view["image"].shape[-2:]
    assert h % 32 == 0 and w % 32 == 0 and 32 * 32 <= h * w <= 64 * 64, (h, w)
    qwen = task_view_fn(load_config(ROOT / "configs/tiny.yaml", TINY_MODEL), "caption")(sample)
    assert all(s % 28 == 0 for s in qwen["image"].shape[-2:])


def _batches(cfg) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    side = cfg.train.resolution.depth
    text_dim = cfg.model.heads.refseg.text_dim
    return {
        "caption": {"image": [torch.rand(3, 64, 32, generator=g), torch.rand(3, 32, 64, generator=g)],
                    "question": [None, "How many objects are there?"], "answer": ["a red ball", "three"]},
        "depth": {"image": torch.rand(2, 3, side, side, generator=g), "target": torch.rand(2, side, side, generator=g),
                  "valid": torch.ones(2, side, side, dtype=torch.bool)},
        "refseg": {"image": torch.rand(2, 3, side, side, generator=g),
                   "text_embedding": torch.randn(2, text_dim, generator=g),
                   "mask": (torch.rand(2, side, side, generator=g) > 0.5).float()},
    }


def test_multitask_model_trains_all_three_heads_on_a_siglip2_backbone(tmp_path):
    from versavit.models.multitask import VersaViT

    cfg = load_config(ROOT / "configs/tiny.yaml", [*SIGLIP2, "model.backbone.gradient_checkpointing=true"])
    torch.manual_seed(0)
    model = VersaViT.build(cfg.model).prepare_training(cfg.model)
    assert isinstance(model.backbone, Siglip2Backbone) and model.backbone.gradient_checkpointing
    assert model.depth_layers == [1, 2, 3]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.tower.post_layernorm.weight", "backbone.tower.post_layernorm.bias"}
    model.zero_grad()
    for task, batch in _batches(cfg).items():
        loss, parts = model(task, batch)
        assert torch.isfinite(loss), (task, parts)
        loss.backward()
        touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("backbone.tower.encoder.layers.") for n in touched), task
        assert any(n.startswith(f"heads.{task}.") for n in touched), task
    dead = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())}
    assert not dead, sorted(dead)[:10]
    # trainable patterns address SigLIP2's encoder layers as backbone.blocks[...]; its readout never trains
    groups = model.set_trainable(["projector", "backbone.blocks[-1:]", "backbone.tower.post_layernorm.*"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("heads.caption.projector.", "backbone.tower.encoder.layers.2."))
                         for n in names), sorted(names)
    assert sum(len(v) for v in groups.values()) == len(names)
    # a stage's export (what the next stage's init_from and the evaluator load) keeps the kind
    model.save_pretrained(str(tmp_path / "export"))
    loaded = VersaViT.from_export(str(tmp_path / "export"), cfg.model)
    assert isinstance(loaded.backbone, Siglip2Backbone) and set(loaded.heads) == {"caption", "depth", "refseg"}
    batch = _batches(cfg)["depth"]["image"]
    torch.testing.assert_close(loaded.backbone.eval()(batch).maps, model.backbone.eval()(batch).maps, rtol=0, atol=0)


def test_plan_builds_the_siglip2_stage_model():
    from versavit.models.multitask import VersaViT
    from versavit.train.plan import build_skeleton, profile_stage

    cfg = load_config(ROOT / "configs/tiny.yaml", [*SIGLIP2, "model.backbone.gradient_checkpointing=true"])
    skeleton = build_skeleton(cfg, ["caption", "depth", "refseg"], torch.float32)
    built = VersaViT.build(cfg.model)
    assert isinstance(skeleton.backbone, Siglip2Backbone)
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in built.named_parameters()}
    profiles, counts = profile_stage(cfg, "multitask", torch.float32)
    assert counts["backbone"] == sum(p.numel() for p in built.backbone.parameters())
    assert profiles["depth"].vit_tokens == (64 // 16) ** 2 and profiles["caption"].vit_tokens == (64 // 16) ** 2
    assert all(k["bytes"] > 0 for p in profiles.values() for k in p.vit_layers)
