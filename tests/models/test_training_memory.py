"""Memory correctness of a stage's model (issue 14, item 1): whatever loaded the ViT and the caption LLM (sizes,
a tower-only checkpoint, a full Qwen2-VL checkpoint, an LLM folder, a previous stage's export via init_from),
the model a stage trains is in training mode and recomputes activations when the config asks for gradient
checkpointing. Measured: the bytes autograd keeps for backward (saved_tensors_hooks, parameters excluded)
of a ViT forward and an LLM forward, with and without checkpointing."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from autograd_memory import saved_bytes  # noqa: E402
from tiny_model import TINY_MODEL  # noqa: E402

from versavit.config import load_config  # noqa: E402
from versavit.config.schema import BackboneConfig  # noqa: E402
from versavit.models.backbone import VisionBackbone  # noqa: E402
from versavit.models.heads.caption import tiny_llm_config  # noqa: E402
from versavit.models.tokenizer import IM_END, build_tiny_tokenizer  # noqa: E402
from versavit.train.loop import TRAINED_STATE, build_stage_model, plan_stage  # noqa: E402

# one worker runs the module (make test: xdist), so its module fixtures are built once
pytestmark = pytest.mark.xdist_group("training_memory")

ROOT = Path(__file__).resolve().parents[2]
D, DEPTH, HEADS = 32, 3, 2  # TINY_MODEL's backbone
CUT = 0.6  # checkpointing keeps less than this fraction of the bytes kept without it


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tower-only checkpoint, a full Qwen2-VL checkpoint and a Qwen3 LLM folder (with its tokenizer), on disk."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    cfg = BackboneConfig(embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0)
    VisionBackbone.build(cfg).save_pretrained(str(root / "tower"))
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=DEPTH, embed_dim=D, hidden_size=32, num_heads=HEADS, mlp_ratio=2)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)).save_pretrained(
        str(root / "full"))
    tok = build_tiny_tokenizer()
    caption = load_config(ROOT / "configs/tiny.yaml", TINY_MODEL).model.heads.caption
    llm_cfg = tiny_llm_config(caption.model_copy(update={"tiny_llm_layers": 2}), len(tok), tok.pad_token_id,
                              tok.convert_tokens_to_ids(IM_END))
    Qwen3ForCausalLM(llm_cfg).save_pretrained(str(root / "llm"))
    tok.save_pretrained(str(root / "llm"))
    return {"tower": str(root / "tower"), "full": str(root / "full"), "llm": str(root / "llm")}


def _config(workdir: Path, backbone: str | None, llm: str | None, checkpointing: bool, *extra: str):
    return load_config(ROOT / "configs/tiny.yaml", [
        *TINY_MODEL, f"workdir={workdir}", "model.heads.caption.tiny_llm_layers=2",
        f"model.backbone.pretrained={backbone or 'null'}", f"model.heads.caption.llm={llm or 'null'}",
        f"model.backbone.gradient_checkpointing={str(checkpointing).lower()}",
        f"model.heads.caption.gradient_checkpointing={str(checkpointing).lower()}", *extra])


def _vit_bytes(model) -> int:
    images = torch.rand(2, 3, 56, 84)
    return saved_bytes(model, lambda: model.backbone(images))


def _llm_bytes(model) -> int:
    head = model.heads["caption"]
    visual = [torch.randn(6, 4 * D, requires_grad=True), torch.randn(4, 4 * D, requires_grad=True)]
    answers = ["a small red ball and two large blue cubes", "three green cylinders"]
    return saved_bytes(model, lambda: head(visual, [None, "How many objects are there?"], answers))


def _build(cfg, stage: str, init_from: str | None = None):
    model, inherited, trainable = build_stage_model(cfg, plan_stage(cfg, stage), torch.float32, init_from)
    return model, inherited, trainable


def _check_modes(model) -> None:
    """Every module holding a trainable parameter trains, and so do the ViT tower and the LLM (a frozen LLM still
    passes gradients to the warm-up's projector: only a training-mode module is checkpointed)."""
    stale = [name or "<root>" for name, m in model.named_modules()
             if any(p.requires_grad for p in m.parameters(recurse=False)) and not m.training]
    assert not stale, f"trainable modules in eval mode: {stale[:5]}"
    assert model.backbone.tower.training
    assert model.heads["caption"].llm.training


# (backbone source, LLM source, stage): every loading path of the ViT and of the LLM
PATHS = [("sizes", "tiny", "multitask"), ("tower", "folder", "multitask"), ("full", "folder", "multitask"),
         ("full", "folder", "warmup")]


@pytest.mark.parametrize(("backbone", "llm", "stage"), PATHS)
def test_checkpointing_cuts_saved_activations_whatever_loaded_the_model(sources, tmp_path, backbone, llm, stage):
    measured = {}
    for checkpointing in (False, True):
        cfg = _config(tmp_path, sources.get(backbone), sources["llm"] if llm == "folder" else None, checkpointing)
        model, _, trainable = _build(cfg, stage)
        _check_modes(model)
        assert model.backbone.gradient_checkpointing is checkpointing
        assert model.heads["caption"].gradient_checkpointing is checkpointing
        vit_trains = any(p.requires_grad for p in model.backbone.parameters())
        assert vit_trains is (stage == "multitask")
        measured[checkpointing] = (_vit_bytes(model) if vit_trains else None, _llm_bytes(model))
    (vit_off, llm_off), (vit_on, llm_on) = measured[False], measured[True]
    print(f"{backbone}/{llm}/{stage}: ViT {vit_off} -> {vit_on} B, LLM {llm_off} -> {llm_on} B")
    if stage == "multitask":
        assert vit_on < CUT * vit_off, (vit_on, vit_off)
    # warm-up: the LLM is frozen but the projector's gradient runs through it, so it is checkpointed too
    assert llm_on < CUT * llm_off, (llm_on, llm_off)


def test_init_from_a_previous_stage_export_keeps_checkpointing(sources, tmp_path):
    """The multi-task stage starting from the warm-up's export (the tower loaded from a tower-only checkpoint)."""
    warm_cfg = _config(tmp_path, sources["tower"], sources["llm"], True)
    warm, _, _ = _build(warm_cfg, "warmup")
    export = tmp_path / "export"
    warm.save_pretrained(str(export))
    torch.save({k: v.detach() for k, v in warm.named_parameters() if v.requires_grad}, export / TRAINED_STATE)
    measured = {}
    for checkpointing in (False, True):
        cfg = _config(tmp_path, sources["tower"], sources["llm"], checkpointing)
        model, inherited, _ = _build(cfg, "multitask", init_from=str(export))
        assert inherited and all(k.startswith("heads.caption.projector.") for k in inherited)
        _check_modes(model)
        measured[checkpointing] = (_vit_bytes(model), _llm_bytes(model))
    (vit_off, llm_off), (vit_on, llm_on) = measured[False], measured[True]
    print(f"init_from: ViT {vit_off} -> {vit_on} B, LLM {llm_off} -> {llm_on} B")
    assert vit_on < CUT * vit_off and llm_on < CUT * llm_off


def test_eval_mode_would_silently_skip_checkpointing(sources, tmp_path):
    """What the stage guards against: the flag set, the module in eval mode (how from_pretrained returns it),
    and nothing is recomputed: as many bytes kept as without checkpointing."""
    cfg = _config(tmp_path, sources["tower"], sources["llm"], True)
    model, _, _ = _build(cfg, "multitask")
    trained = _vit_bytes(model), _llm_bytes(model)
    model.backbone.tower.eval()
    model.heads["caption"].llm.eval()
    stale = _vit_bytes(model), _llm_bytes(model)
    assert model.backbone.gradient_checkpointing and model.heads["caption"].gradient_checkpointing
    assert trained[0] < CUT * stale[0] and trained[1] < CUT * stale[1]
    off, _, _ = _build(_config(tmp_path, sources["tower"], sources["llm"], False), "multitask")
    assert stale == (_vit_bytes(off), _llm_bytes(off))  # exactly what no checkpointing keeps
