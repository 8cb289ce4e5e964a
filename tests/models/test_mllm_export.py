"""The trained ViT back in its MLLM (issue 14, item 5): `versavit export mllm` writes a full Qwen2-VL / Qwen2.5-VL
checkpoint with a trained tower, which transformers loads and generates with; a tower export alone loads with
AutoModel; a stage with model.backbone.export_mllm writes export/mllm."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_model import TINY_MODEL  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from versavit.cli import app  # noqa: E402
from versavit.config import load_config  # noqa: E402
from versavit.config.schema import BackboneConfig  # noqa: E402
from versavit.labeling.tiny import save_tiny_qwen2_vl_describer  # noqa: E402
from versavit.models.backbone import VisionBackbone  # noqa: E402
from versavit.models.mllm import RECORD, export_mllm  # noqa: E402

# one worker runs the module (make test: xdist), so its module fixtures are built once
pytestmark = pytest.mark.xdist_group("mllm_export")

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("qwen2_vl", "qwen2_5_vl")


def _model_cls(kind: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny full checkpoints laid out like the hub's: weights, config, tokenizer, image processor, chat template."""
    root = tmp_path_factory.mktemp("bases")
    return {kind: save_tiny_qwen2_vl_describer(root / kind, model_type=kind) for kind in KINDS}


def _trained_export(base: str, folder: Path, dtype: torch.dtype = torch.float32) -> VisionBackbone:
    """A stage export (folder/backbone) whose tower differs from the base's (the merger, never trained, does not)."""
    backbone = VisionBackbone.from_pretrained(base, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.tower.named_parameters():
            if not name.startswith("merger."):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    backbone.save_pretrained(str(folder / "backbone"))
    return backbone


def _inputs(path: str, model) -> dict[str, torch.Tensor]:
    """A prompt with one 56x84 image, built from the image processor and tokenizer (as Qwen2VLProcessor does;
    AutoProcessor needs torchvision for the video processor)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor, tok = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    vision = image_processor(images=[image], do_resize=False, return_tensors="pt")
    n = int(vision["image_grid_thw"].prod()) // 4
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n
            + "<|vision_end|>describe the image<|im_end|>\n<|im_start|>assistant\n")
    ids = tok([text], return_tensors="pt")
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
              "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    if "mm_token_type_ids" in __import__("inspect").signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (ids["input_ids"] == model.config.image_token_id).long()
    return inputs


@pytest.mark.parametrize("kind", KINDS)
def test_export_mllm_loads_in_transformers_and_generates(bases, tmp_path, kind):
    base = bases[kind]
    trained = _trained_export(base, tmp_path / "export")
    record = export_mllm(base, tmp_path / "export", tmp_path / "mllm", max_shard_bytes=60_000)
    out = tmp_path / "mllm"
    assert record["kind"] == kind and record["merger_from_base"]
    trained_keys = [k for k in trained.tower.state_dict() if not k.startswith("merger.")]
    assert record["visual_tensors_changed"] == len(trained_keys)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(record["shards"]) > 1 and set(index["weight_map"].values()) == set(record["shards"])
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.json", RECORD):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((Path(base) / "config.json").read_text())

    cls = _model_cls(kind)
    model, reference = cls.from_pretrained(str(out)).eval(), cls.from_pretrained(base).eval()
    got, want = model.model.visual.state_dict(), trained.tower.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lm, ref_lm = model.model.language_model.state_dict(), reference.model.language_model.state_dict()
    assert all(torch.equal(lm[k], ref_lm[k]) for k in ref_lm)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)

    inputs = _inputs(str(out), model)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits, ref_logits = model(**inputs).logits, reference(**inputs).logits
    assert ids.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(__import__("transformers").AutoTokenizer.from_pretrained(str(out)).decode(ids[0]), str)
    assert not torch.allclose(logits, ref_logits)  # the new tower is the one that sees the image
    # and the tower comes back out of the full checkpoint unchanged
    again = VisionBackbone.from_pretrained(str(out))
    assert all(torch.equal(again.tower.state_dict()[k], v) for k, v in want.items())


def test_cli_export_mllm_and_its_refusals(bases, tmp_path):
    """A bf16 tower into an fp32 base with transformers 4.5x's key names (model.visual.*): the base's names and
    dtypes are kept; then what the command refuses."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(bases["qwen2_vl"], base)
    state = load_file(str(base / "model.safetensors"))
    save_file({("model." + k if k.startswith("visual.") else k): v for k, v in state.items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    trained = _trained_export(str(base), tmp_path / "export", dtype=torch.bfloat16)
    runner = CliRunner()
    args = ["export", "mllm", "--base", str(base), "--backbone", str(tmp_path / "export")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "mllm")])
    assert result.exit_code == 0, result.output
    assert "visual tensors changed" in result.output
    written = load_file(str(tmp_path / "mllm" / "model.safetensors"))
    assert written.keys() == state.keys() - {k for k in state if k.startswith("visual.")} | {
        "model." + k for k in state if k.startswith("visual.")}
    assert all(written[k].dtype == torch.float32 for k in written)
    want = trained.tower.state_dict()
    assert all(torch.equal(written["model.visual." + k], v.float()) for k, v in want.items())
    # a non-empty --out, a tower as the base, a tower of the other kind
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "mllm")])
    assert result.exit_code == 1 and "not an empty folder" in result.output
    result = runner.invoke(app, ["export", "mllm", "--base", str(tmp_path / "export" / "backbone"), "--backbone",
                                 str(tmp_path / "export"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "not a vision tower alone" in result.output.replace("\n", " ")
    result = runner.invoke(app, ["export", "mllm", "--base", bases["qwen2_5_vl"], "--backbone",
                                 str(tmp_path / "export"), "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "kind" in result.output


def test_tower_export_loads_with_automodel(tmp_path):
    from transformers import AutoModel

    for kind in KINDS:
        torch.manual_seed(0)
        backbone = VisionBackbone.build(BackboneConfig(kind=kind, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                                       gradient_checkpointing=False))
        backbone.save_pretrained(str(tmp_path / kind))
        want = backbone.tower.state_dict()
        options = [{}, {"trust_remote_code": True}] if kind == "qwen2_vl" else [{}]
        for extra in options:  # trust_remote_code: the two-line module next to the weights, plain transformers
            tower = AutoModel.from_pretrained(str(tmp_path / kind), **extra)
            assert type(tower).__name__ == type(backbone.tower).__name__
            assert all(torch.equal(tower.state_dict()[k], v) for k, v in want.items())
    # loading remote code marks the class it loads for re-export: transformers' own class stays unmarked, so
    # towers save as before in this process, and the remote-loaded one saves too
    backbone.save_pretrained(str(tmp_path / "again"))
    tower.save_pretrained(str(tmp_path / "remote"))
    assert AutoModel.from_pretrained(str(tmp_path / "again")).config.depth == 2
    # an export written before the auto_map (config without it, no module file) still loads
    config = json.loads((tmp_path / "qwen2_vl" / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "qwen2_vl" / "config.json").write_text(json.dumps(config))
    (tmp_path / "qwen2_vl" / "modeling_qwen2_vl_vision.py").unlink()
    assert VisionBackbone.from_pretrained(str(tmp_path / "qwen2_vl")).kind == "qwen2_vl"


def test_stage_export_writes_the_mllm(bases, tmp_path):
    """model.backbone.export_mllm: a stage that trains the tower writes export/mllm next to the tower (the
    stage's _finish with the model it built); a base that is no full checkpoint fails before training."""
    from versavit.train import loop

    base = bases["qwen2_vl"]
    overrides = [*TINY_MODEL, f"workdir={tmp_path / 'run'}", f"model.backbone.pretrained={base}",
                 "model.backbone.export_mllm=true", "model.heads.depth.layers=[1, 1, 1]", "tracking.enabled=false"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    plan = loop.plan_stage(cfg, "multitask")
    model, _, _ = loop.build_stage_model(cfg, plan, torch.float32)
    with torch.no_grad():
        model.backbone.tower.blocks[0].mlp.fc1.weight.add_(1.0)

    class Tracker:  # tracking off: every call a no-op
        enabled = False

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    engine = type("Engine", (), {"module": model})()
    result = loop._finish(cfg, plan, engine, 0, Tracker(), None, None)
    out = Path(result["export_url"]) / loop.MLLM_DIR
    from transformers import Qwen2VLForConditionalGeneration

    mllm = Qwen2VLForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(mllm.model.visual.blocks[0].mlp.fc1.weight, model.backbone.tower.blocks[0].mlp.fc1.weight)
    # the warm-up trains no tower: nothing to write; a tower-only base is refused at build time
    warm = loop.build_stage_model(cfg, loop.plan_stage(cfg, "warmup"), torch.float32)[0]
    assert not loop._exports_mllm(cfg, warm)
    tower_only = tmp_path / "tower"
    model.backbone.save_pretrained(str(tower_only))
    bad = load_config(ROOT / "configs/tiny.yaml", [*overrides, f"model.backbone.pretrained={tower_only}"])
    with pytest.raises(ValueError, match="not a vision tower alone"):
        loop.build_stage_model(bad, loop.plan_stage(bad, "multitask"), torch.float32)
