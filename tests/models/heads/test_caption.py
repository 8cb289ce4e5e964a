"""Caption/VQA head and the tiny tokenizer: prompt layout, answer-only CE, gradients, memorisation, save/load,
loading an LLM + tokenizer by path (the real-run code path), generation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoTokenizer, Qwen3ForCausalLM  # noqa: E402

from versavit.config.schema import CaptionHeadConfig  # noqa: E402
from versavit.models.heads.caption import (  # noqa: E402
    CAPTION_INSTRUCTION,
    IGNORE_INDEX,
    CaptionHead,
    tiny_llm_config,
)
from versavit.models.tokenizer import (  # noqa: E402
    IM_END,
    IM_START,
    IMAGE_PAD,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
    build_tiny_tokenizer,
)

VISION_DIM = 16  # the ViT's D; visual tokens are 4*D
TINY = CaptionHeadConfig(llm=None, projector_hidden=32, max_text_tokens=64, tiny_llm_hidden=32, tiny_llm_layers=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _head(cfg: CaptionHeadConfig = TINY, seed: int = 0) -> CaptionHead:
    torch.manual_seed(seed)
    return CaptionHead.build(cfg, vision_dim=VISION_DIM)


def _visual(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4 * VISION_DIM, generator=gen) for n in lengths]


# ------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_deterministic_roundtrip_and_saveable(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    assert tok.backend_tokenizer.to_str() == build_tiny_tokenizer().backend_tokenizer.to_str()
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == IM_END
    text = f"{IM_START}user\n{VISION_START}{IMAGE_PAD}{VISION_END}How many cubes are there? 12{IM_END}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for special in SPECIAL_TOKENS:  # each control token is a single id
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    # Synthetic-world words are single tokens; unseen words still encode exactly (byte-level, no <unk>).
    assert len(tok(" cylinders", add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("zebra Ω!", add_special_tokens=False)["input_ids"]) == "zebra Ω!"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.convert_tokens_to_ids(IMAGE_PAD) == tok.convert_tokens_to_ids(IMAGE_PAD)
    custom = build_tiny_tokenizer(["hello world", "hello there"])
    assert len(custom(" world", add_special_tokens=False)["input_ids"]) == 1


# ------------------------------------------------------------------------------------------- prompt + loss


def test_prompt_layout_and_labels() -> None:
    head = _head()
    tok = head.tokenizer
    batch = head.build_batch([3, 5], ["What color is the ball?", None], ["red", "A room with 2 objects."])
    ids, labels, attn, img = batch.input_ids, batch.labels, batch.attention_mask, batch.image_mask
    assert img.sum(1).tolist() == [3, 5]
    for row, (question, answer) in enumerate([("What color is the ball?", "red"),
                                              (CAPTION_INSTRUCTION, "A room with 2 objects.")]):
        n = int(attn[row].sum())
        assert attn[row, :n].all() and not attn[row, n:].any()  # right padding
        assert (ids[row, n:] == tok.pad_token_id).all()
        text = tok.decode(ids[row, :n])
        n_img = int(img[row].sum())
        assert text == (f"{IM_START}user\n{VISION_START}{IMAGE_PAD * n_img}{VISION_END}{question}{IM_END}\n"
                        f"{IM_START}assistant\n{answer}{IM_END}")
        supervised = labels[row][labels[row] != IGNORE_INDEX]
        assert tok.decode(supervised) == answer + IM_END  # only the answer and its closing <|im_end|>
        assert (labels[row, n:] == IGNORE_INDEX).all()


def test_truncation_to_max_text_tokens() -> None:
    head = _head(TINY.model_copy(update={"max_text_tokens": 24}))
    batch = head.build_batch([4], ["How many " * 30], ["ball " * 40])
    text_tokens = int(batch.attention_mask.sum() - batch.image_mask.sum())
    assert text_tokens <= 24
    assert (batch.labels != IGNORE_INDEX).sum() > 0 and batch.image_mask.sum() == 4


def test_loss_is_mean_ce_over_answer_tokens() -> None:
    head = _head()
    visual = _visual(4, 9)
    questions, answers = ["How many balls are there?", None], ["3", "A room with 2 objects: a red ball and a cube."]
    out = head(visual, questions, answers, return_logits=True)
    logits, labels = out.logits[:, :-1], out.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    manual = F.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(out.loss, manual)
    n_answer = [len(head.tokenizer(a or "", add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    assert out.num_answer_tokens == int(mask.sum()) == sum(n_answer)
    # Masking matters: supervising the prompt tokens too would give another number.
    ids = head.build_batch([4, 9], questions, answers).input_ids[:, 1:]
    everything = F.cross_entropy(logits[ids != head.pad_id], ids[ids != head.pad_id])
    assert not torch.isclose(everything, manual)


def test_batch_loss_is_token_weighted_mean_of_samples() -> None:
    """Padding, attention masks and variable visual lengths: batching changes nothing per sample."""
    head = _head().eval()
    visual = _visual(2, 11, 6)
    questions = ["What shape is the red object?", None, "Is the cube left of the ball?"]
    answers = ["cube", "A room with 3 objects: a small red cube, a ball and a cylinder.", "yes"]
    batched = head(visual, questions, answers)
    singles = [head([v], [q], [a]) for v, q, a in zip(visual, questions, answers, strict=True)]
    weighted = sum(s.loss * s.num_answer_tokens for s in singles) / sum(s.num_answer_tokens for s in singles)
    torch.testing.assert_close(batched.loss, weighted, rtol=1e-4, atol=1e-5)
    assert batched.num_answer_tokens == sum(s.num_answer_tokens for s in singles)


def test_question_and_image_condition_the_answer_loss() -> None:
    head = _head()
    base = head(_visual(4), ["What color is the ball?"], ["red"]).loss
    assert not torch.isclose(base, head(_visual(4, seed=1), ["What color is the ball?"], ["red"]).loss)
    assert not torch.isclose(base, head(_visual(4), ["What color is the cube?"], ["red"]).loss)


def test_gradient_reaches_projector_and_llm() -> None:
    head = _head()
    visual = [v.requires_grad_() for v in _visual(4, 7)]
    head(visual, [None, "How many cubes are there?"], ["A room.", "2"]).loss.backward()
    for name, params in (("projector", head.projector_parameters()), ("llm", head.llm_parameters())):
        assert params and all(p.grad is not None for p in params), name
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, name
    assert all(v.grad.abs().sum() > 0 for v in visual)
    ids = {id(p) for p in head.parameters()}
    assert ids == {id(p) for p in head.projector_parameters()} | {id(p) for p in head.llm_parameters()}


def test_gradient_checkpointing_gives_same_loss_and_grads() -> None:
    visual, questions, answers = _visual(4, 7), [None, "How many cubes are there?"], ["A room.", "2"]
    plain, ckpt = _head(), _head()
    ckpt.gradient_checkpointing_enable()
    ckpt.train()
    losses = []
    for head in (plain, ckpt):
        loss = head(visual, questions, answers).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(plain.projector.fc1.weight.grad, ckpt.projector.fc1.weight.grad)


def test_memorises_one_sample_and_generates_it() -> None:
    """40 steps on one fixed sample drive the loss to ~0 and greedy decoding reproduces the answer."""
    head = _head()
    visual, question, answer = _visual(6), ["What color is the small cube?"], ["purple"]
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(40):
        loss = head(visual, question, answer).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = head(visual, question, answer).loss.item()
    assert final < 0.1 and final < first / 50, (first, final)
    head.eval()
    assert head.generate(visual, question, max_new_tokens=8) == answer


def test_generate_returns_strings_batched_like_single() -> None:
    head = _head().eval()
    visual = _visual(3, 8)
    out = head.generate(visual, [None, "How many balls are there?"], max_new_tokens=5)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    # Left padding and attention masks: the batch answers as each sample alone would.
    assert out == [head.generate([v], [q], max_new_tokens=5)[0]
                   for v, q in zip(visual, [None, "How many balls are there?"], strict=True)]


# ------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path: Path) -> None:
    head = _head().eval()
    visual, questions, answers = _visual(4, 6), ["What color is the ball?", None], ["red", "A room."]
    head.save_pretrained(tmp_path / "caption")
    assert {p.name for p in (tmp_path / "caption").iterdir()} == {"projector", "llm", "tokenizer"}
    loaded = CaptionHead.from_pretrained(tmp_path / "caption").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(visual, questions, answers).loss, head(visual, questions, answers).loss)
    assert loaded.generate(visual, questions, 4) == head.generate(visual, questions, 4)
    assert loaded.max_text_tokens == head.max_text_tokens
    with pytest.raises(ValueError, match="not a saved caption head"):
        CaptionHead.from_pretrained(tmp_path / "nothing")


def test_build_loads_llm_and_tokenizer_by_path(tmp_path: Path) -> None:
    """What a real run does with cfg.llm = 'Qwen/Qwen3-1.7B', on a tiny Qwen3 saved to disk first."""
    tok = build_tiny_tokenizer()
    torch.manual_seed(3)
    llm = Qwen3ForCausalLM(tiny_llm_config(TINY, len(tok), tok.pad_token_id, tok.convert_tokens_to_ids(IM_END)))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")  # a hub repo holds both
    tok.save_pretrained(tmp_path / "tok")

    cfg = TINY.model_copy(update={"llm": str(tmp_path / "llm")})
    head = CaptionHead.build(cfg, vision_dim=VISION_DIM)
    assert isinstance(head.llm, Qwen3ForCausalLM)
    for (name, a), b in zip(llm.state_dict().items(), head.llm.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert head.projector.fc2.out_features == llm.config.hidden_size
    assert head.projector.fc1.in_features == 4 * VISION_DIM

    separate = CaptionHead.build(cfg.model_copy(update={"tokenizer": str(tmp_path / "tok")}), vision_dim=VISION_DIM,
                                 dtype=torch.bfloat16)
    assert separate.llm.dtype == torch.bfloat16 and separate.projector.fc1.weight.dtype == torch.bfloat16
    out = separate(_visual(4), ["What color is the ball?"], ["red"])  # fp32 features into a bf16 head
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("source", ["/nonexistent/versavit/llm", "versavit-test/no-such-model"])
def test_unloadable_llm_is_a_clear_error(source: str) -> None:
    with pytest.raises(ValueError, match="cannot load the caption head's LLM"):
        CaptionHead.build(TINY.model_copy(update={"llm": source}), vision_dim=VISION_DIM)
