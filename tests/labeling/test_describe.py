"""Region describers: the Qwen-VL box conventions, a tiny Qwen2-VL in both modes, and DAM's opt-in and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from versavit.labeling import describe, tiny
from versavit.labeling.describe import (
    DEFAULT_PROMPT,
    DamDescriber,
    Describer,
    ImageTextDescriber,
    Region,
    box_text,
    first_sentence,
    is_dam,
    load_describer,
    qwen_input_hw,
    region_mask,
    resolve_mode,
)

# one worker runs the module (make test: xdist), so its module fixtures are built once
pytestmark = pytest.mark.xdist_group("describe")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread costs more than it gives (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny.save_tiny_qwen2_vl_describer(tmp_path_factory.mktemp("qwen2-vl") / "describer")


def regions() -> list[Region]:
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return [Region(img, (2, 2, 30, 30), None, "cube"), Region(img, (5, 5, 40, 40), np.ones((48, 64), bool), "ball"),
            Region(img, (0, 0, 64, 48), None, "cylinder")]


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------
# box conventions


def test_box_text_qwen_conventions() -> None:
    box, hw = (64, 48, 320, 240), (480, 640)
    # Qwen2-VL: (x, y) pairs normalised to [0, 1000): 64/640, 48/480 -> 100; 320/640, 240/480 -> 500
    assert box_text("qwen2-vl", box, hw) == "<|box_start|>(100,100),(500,500)<|box_end|>"
    assert box_text("qwen2-vl", (0, 0, 640, 480), hw) == "<|box_start|>(0,0),(999,999)<|box_end|>"
    # Qwen3-VL: the same relative scale, as grounding JSON
    assert json.loads(box_text("qwen3-vl", box, hw)) == {"bbox_2d": [100, 100, 500, 500]}
    # Qwen2.5-VL: absolute pixels of the resized input. 480x640 -> smart_resize (factor 28) -> 476x644:
    # x * 644/640, y * 476/480, rounded: 64.4 -> 64, 47.6 -> 48, 322, 238
    assert json.loads(box_text("qwen2.5-vl", box, hw, (476, 644))) == {"bbox_2d": [64, 48, 322, 238]}
    with pytest.raises(ValueError, match="no box convention"):
        box_text("llava", box, hw)


def test_qwen_input_size_and_large_image_coordinates() -> None:
    proc = SimpleNamespace(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}, patch_size=14,
                           merge_size=2)
    assert qwen_input_hw(480, 640, proc) == (476, 644)  # multiples of 28, under the default ~1 MP budget
    # 2000x3000 exceeds the budget (1280 * 28 * 28 px): scale sqrt(6e6 / 1003520) = 2.445, floor to 28s
    hw = qwen_input_hw(2000, 3000, proc)
    assert hw == (812, 1204) and hw[0] * hw[1] <= 1280 * 28 * 28
    # the box in the resized frame: 1500 * 1204/3000 = 602, 1000 * 812/2000 = 406, right/bottom clipped to size - 1
    assert json.loads(box_text("qwen2.5-vl", (1500, 1000, 3000, 2000), (2000, 3000), hw)) == \
        {"bbox_2d": [602, 406, 1203, 811]}
    assert qwen_input_hw(2000, 3000, proc, max_pixels=200 * 28 * 28)[0] < 812  # a smaller budget shrinks it
    capped = SimpleNamespace(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2)
    assert qwen_input_hw(480, 640, capped) == (84, 112)  # the checkpoint's max_pixels caps the budget


def test_mode_resolution() -> None:
    assert resolve_mode("auto", "qwen2-vl", "m") == "box-prompt"
    assert resolve_mode("auto", None, "m") == "focus-crop"
    assert resolve_mode("focus-crop", "qwen2.5-vl", "m") == "focus-crop"
    with pytest.raises(ValueError, match="box-prompt mode needs a model with a known box convention"):
        resolve_mode("box-prompt", None, "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match="unknown describer mode"):
        resolve_mode("crop", "qwen2-vl", "m")


# --------------------------------------------------------------------------------------------
# a tiny Qwen2-VL


def test_tiny_qwen2_vl_box_prompt(qwen2_vl: str) -> None:
    describer = load_describer(qwen2_vl, device="cpu", batch_size=2)
    assert isinstance(describer, ImageTextDescriber) and isinstance(describer, Describer)
    assert (describer.family, describer.mode) == ("qwen2-vl", "box-prompt")
    rs = regions()
    # (2, 2, 30, 30) on 64 x 48: 2/64 -> 31, 2/48 -> 42, 30/64 -> 469, 30/48 -> 625 (per mille)
    assert "<|box_start|>(31,42),(469,625)<|box_end|>" in describer.prompt_text(rs[0])
    assert "(0,0),(999,999)" in describer.prompt_text(rs[2])

    inputs = describer.inputs.build(rs[:2])
    tok = describer.inputs.tokenizer
    # the whole image (48 x 64 -> 56 x 56: 4 x 4 patches, 2 x 2 merged) per region, and the box as special tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ((inputs["input_ids"] == image_id).sum(1) == 4).all()
    assert (inputs["mm_token_type_ids"] == (inputs["input_ids"] == image_id)).all()
    assert ((inputs["input_ids"] == tok.convert_tokens_to_ids("<|box_start|>")).sum(1) == 1).all()

    texts = describer.describe(rs)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert describer.describe(rs) == texts  # greedy decoding: reproducible


@pytest.mark.parametrize(("model_type", "family", "box", "grid"), [
    # Qwen2.5-VL: pixels of the resized input, 48 x 64 -> 56 x 56 (factor 28): 2*56/64 -> 2, 2*56/48 -> 2,
    # 30*56/64 = 26.25 -> 26, 30*56/48 = 35
    ("qwen2_5_vl", "qwen2.5-vl", '{"bbox_2d": [2, 2, 26, 35]}', [1, 4, 4]),
    # Qwen3-VL: per mille again (patch 16: 48 x 64 -> 64 x 64)
    ("qwen3_vl", "qwen3-vl", '{"bbox_2d": [31, 42, 469, 625]}', [1, 4, 4]),
])
def test_tiny_qwen_vl_families_box_prompt(tmp_path: Path, model_type: str, family: str, box: str,
                                          grid: list[int]) -> None:
    path = tiny.save_tiny_qwen2_vl_describer(tmp_path / model_type, model_type=model_type, max_pixels=128 * 128)
    describer = load_describer(path, device="cpu")
    assert (describer.family, describer.mode) == (family, "box-prompt")
    rs = regions()[:2]
    assert box in describer.prompt_text(rs[0])
    assert describer.inputs.build(rs)["image_grid_thw"].tolist() == [grid, grid]
    assert all(describer.describe(rs))


def test_tiny_qwen2_vl_focus_crop_and_chat_fallback(qwen2_vl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    describer = ImageTextDescriber(qwen2_vl, device="cpu", mode="focus-crop")
    rs = regions()
    assert describer.mode == "focus-crop" and describer.prompt_text(rs[0]) == DEFAULT_PROMPT
    texts = describer.describe(rs)
    assert len(texts) == 3 and all(texts)
    # without a chat template in the tokenizer, the prompt is Qwen's ChatML: what the template renders
    templated = describer.inputs.chat("hi")
    monkeypatch.setattr(describer.inputs.tokenizer, "chat_template", None)
    assert describer.inputs.chat("hi") == templated
    assert templated.count("<|image_pad|>") == 1 and templated.endswith("<|im_start|>assistant\n")


def test_box_prompt_needs_box_placeholder(qwen2_vl: str) -> None:
    with pytest.raises(ValueError, match="needs a prompt with"):
        ImageTextDescriber(qwen2_vl, device="cpu", prompt="Describe it.")


# --------------------------------------------------------------------------------------------
# DAM


def test_dam_is_selected_by_name_or_config(tmp_path: Path) -> None:
    for ref in ("nvidia/DAM-3B", "nvidia/DAM-3B-Self-Contained", "/models/dam_3b_v1_self_contained",
                "nvidia/DAM-3B-Video/"):
        assert is_dam(ref), ref
    for ref in ("Qwen/Qwen2-VL-7B-Instruct", "/data/adam-vlm", "/home/dam/models/qwen2-vl", "madam"):
        assert not is_dam(ref), ref
    by_config = tmp_path / "region-captioner"
    by_config.mkdir()
    (by_config / "config.json").write_text(json.dumps({"architectures": ["DescribeAnythingModel"]}))
    assert is_dam(str(by_config))
    qwen_named_dam = tmp_path / "dam-finetuned-qwen"  # a transformers model that happens to be called dam
    qwen_named_dam.mkdir()
    (qwen_named_dam / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert not is_dam(str(qwen_named_dam))


def test_dam_needs_cuda_one_line() -> None:
    with pytest.raises(RuntimeError) as exc:
        load_describer("nvidia/DAM-3B", device="cpu")
    msg = one_line_error(exc)
    assert "'nvidia/DAM-3B'" in msg and "CUDA" in msg and "describe-anything" in msg and "Qwen2-VL" in msg


def test_dam_that_cannot_load_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pretend a GPU: loading fails before anything is moved to it (hub offline, no describe-anything package)
    monkeypatch.setattr(describe, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(RuntimeError) as exc:
        load_describer("nvidia/DAM-3B")
    msg = one_line_error(exc)
    assert msg.startswith("could not load the describer teacher 'nvidia/DAM-3B' (Describe Anything)")
    assert "remote code did not load" in msg and "describe-anything package is not installed" in msg
    assert "pip install git+https://github.com/NVlabs/describe-anything" in msg and "null for class labels" in msg

    no_remote_code = tmp_path / "DAM-3B"  # nvidia/DAM-3B's layout: a VILA config, no auto_map
    no_remote_code.mkdir()
    (no_remote_code / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaModel"],
                                                            "model_type": "llava_llama"}))
    with pytest.raises(RuntimeError) as exc:
        DamDescriber(str(no_remote_code))
    msg = one_line_error(exc)
    assert "describe-anything package is not installed" in msg and "remote code" not in msg.split(". ")[0]

    remote_code = tmp_path / "DAM-3B-Self-Contained"  # auto_map names a module the folder lacks
    remote_code.mkdir()
    (remote_code / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                         "auto_map": {"AutoModel": "modeling_dam.DamModel"}}))
    with pytest.raises(RuntimeError) as exc:
        DamDescriber(str(remote_code))
    assert "remote code did not load" in one_line_error(exc)


def test_dam_describes_masks_with_a_fake_dam(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAM call as its README shows it: (image, mask) PIL images and the query; first sentence kept."""
    calls = []

    class FakeDam:
        def get_description(self, image, mask, query, **kwargs):
            calls.append((image.size, np.asarray(mask), query, kwargs))
            return "A small red cube with sharp edges. It sits on the floor."

    monkeypatch.setattr(describe, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(describe, "load_dam", lambda model_id, device: FakeDam())
    describer = load_describer("nvidia/DAM-3B")
    assert isinstance(describer, DamDescriber)
    rs = regions()
    assert describer.describe(rs[:2]) == ["A small red cube with sharp edges"] * 2
    (size, mask, query, kwargs), _ = calls
    assert size == (64, 48) and query == describe.DAM_QUERY and kwargs["temperature"] == 0.0
    assert mask.dtype == np.uint8 and mask[2:30, 2:30].min() == 255 and mask.sum() == 28 * 28 * 255  # the box
    assert (np.asarray(calls[1][1]) == 255).all()  # a given mask is used as is
    assert first_sentence("One. Two.") == "One." and region_mask(Region(rs[0].image, (0, 0, 0, 0))).all()
