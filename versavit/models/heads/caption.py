"""Caption / VQA head: MLP projector from 2x2-merged ViT tokens into a causal LM (Qwen3).

Prompt of one sample (Qwen chat template; the n_i placeholders are replaced by projected visual tokens):

    <|im_start|>user\\n<|vision_start|><|image_pad|> x n_i<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

Only the answer tokens and the closing <|im_end|> are supervised (L_cap, RECIPE.md "Losses").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from versavit.config.schema import CaptionHeadConfig
from versavit.models.checkpointing import set_hf_checkpointing
from versavit.models.tokenizer import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, build_tiny_tokenizer
from versavit.weights import local_model_path

IGNORE_INDEX = -100
CAPTION_INSTRUCTION = "Describe the image."
_PROJECTOR_DIR, _LLM_DIR, _TOKENIZER_DIR = "projector", "llm", "tokenizer"


@dataclass
class CaptionOutput:
    loss: Tensor  # mean cross-entropy over the batch's answer tokens (0-dim)
    num_answer_tokens: int
    logits: Tensor | None = None  # [B, L, vocab], only when asked for (it is large for a real vocabulary)
    labels: Tensor | None = None  # [B, L], IGNORE_INDEX outside answers; logits[:, t] predicts labels[:, t + 1]


@dataclass
class CaptionBatch:
    """Token-level inputs of one batch (right-padded)."""

    input_ids: Tensor  # [B, L] with IMAGE_PAD at the visual positions
    attention_mask: Tensor  # [B, L]
    labels: Tensor  # [B, L]
    image_mask: Tensor  # [B, L] bool, True where a visual token goes


class Projector(nn.Module):
    """LayerNorm(4D) -> Linear(4D, hidden) -> GELU -> Linear(hidden, llm_hidden), as Qwen2-VL's merger."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def tiny_llm_config(cfg: CaptionHeadConfig, vocab_size: int, pad_token_id: int, eos_token_id: int) -> Qwen3Config:
    """Qwen3 config of the tiny LM: 4 heads, 2 kv heads, intermediate 2x hidden, tied embeddings (as 1.7B)."""
    hidden = cfg.tiny_llm_hidden
    if hidden % 4:
        raise ValueError(f"tiny_llm_hidden ({hidden}) must be divisible by the 4 attention heads")
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=cfg.tiny_llm_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, bos_token_id=None,
    )


def _load_llm(source: str, dtype: torch.dtype, what: str) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(local_model_path(source), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:  # missing folder, unknown hub id offline, bad config
        raise ValueError(f"cannot load the caption head's {what} from {source!r} (a local folder or hub id; "
                         f"with HF_HUB_OFFLINE=1 hub ids must already be cached): {exc}") from exc


def _load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(local_model_path(source))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the caption head's tokenizer from {source!r}: {exc}") from exc


class CaptionHead(nn.Module):
    """Projector + causal LM + tokenizer; `forward` gives L_cap, `generate` gives greedy answers."""

    def __init__(self, projector: Projector, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_text_tokens: int = 512) -> None:
        super().__init__()
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        ids = tokenizer.convert_tokens_to_ids([IMAGE_PAD, IM_END])
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(f"tokenizer lacks the special tokens {IMAGE_PAD} / {IM_END} of the Qwen chat template")
        self.image_pad_id, self.im_end_id = ids
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.im_end_id
        # Fixed template pieces, tokenised once; special tokens split segments, so tokenising the
        # question and the answer alone gives the same ids as tokenising the whole prompt.
        self._prefix = self._ids(f"{IM_START}user\n{VISION_START}")
        self._vision_end = self._ids(VISION_END)
        self._suffix = self._ids(f"{IM_END}\n{IM_START}assistant\n")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, cfg: CaptionHeadConfig, vision_dim: int, dtype: torch.dtype = torch.float32,
              vocab_corpus: list[str] | None = None) -> CaptionHead:
        """The head of a run: a pretrained LM (path or hub id) or, with cfg.llm None, a tiny random Qwen3.

        `vision_dim` is the ViT's embed dim D; the projector takes the 2x2-merged 4*D tokens.
        """
        if cfg.llm is None:
            tokenizer = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tiny_tokenizer(vocab_corpus)
            llm_cfg = tiny_llm_config(cfg, len(tokenizer), tokenizer.pad_token_id,
                                      tokenizer.convert_tokens_to_ids(IM_END))
            llm = Qwen3ForCausalLM(llm_cfg).to(dtype)
        else:
            llm = _load_llm(cfg.llm, dtype, "LLM")
            tokenizer = _load_tokenizer(cfg.tokenizer or cfg.llm)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        projector = Projector(4 * vision_dim, cfg.projector_hidden, llm_hidden).to(dtype)
        head = cls(projector, llm, tokenizer, cfg.max_text_tokens)
        head.set_gradient_checkpointing(cfg.gradient_checkpointing)
        # from_pretrained returns the LLM in eval mode, where transformers never checkpoints: a head built for a
        # run is in training mode throughout, like one built from sizes
        return head.train()

    def save_pretrained(self, path: str | Path) -> None:
        """Write projector/ (config.json + model.safetensors), llm/ and tokenizer/ (HF format)."""
        from safetensors.torch import save_file

        root = Path(path)
        (root / _PROJECTOR_DIR).mkdir(parents=True, exist_ok=True)
        p = self.projector
        meta = {"in_dim": p.fc1.in_features, "hidden": p.fc1.out_features, "out_dim": p.fc2.out_features,
                "max_text_tokens": self.max_text_tokens}
        (root / _PROJECTOR_DIR / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in p.state_dict().items()}
        save_file(state, str(root / _PROJECTOR_DIR / "model.safetensors"))
        self.llm.save_pretrained(root / _LLM_DIR)
        self.tokenizer.save_pretrained(root / _TOKENIZER_DIR)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> CaptionHead:
        """Load a head written by `save_pretrained`."""
        from safetensors.torch import load_file

        root = Path(path)
        meta_file = root / _PROJECTOR_DIR / "config.json"
        if not meta_file.is_file():
            raise ValueError(f"{str(root)!r} is not a saved caption head (no {_PROJECTOR_DIR}/config.json)")
        meta = json.loads(meta_file.read_text())
        projector = Projector(meta["in_dim"], meta["hidden"], meta["out_dim"])
        projector.load_state_dict(load_file(str(root / _PROJECTOR_DIR / "model.safetensors")))
        llm = _load_llm(str(root / _LLM_DIR), dtype, "LLM")
        tokenizer = _load_tokenizer(str(root / _TOKENIZER_DIR))
        return cls(projector.to(dtype), llm, tokenizer, meta["max_text_tokens"])

    # ------------------------------------------------------------------ parameter groups
    def projector_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def llm_parameters(self) -> list[nn.Parameter]:
        return list(self.llm.parameters())

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the LLM's layer activations in backward (training mode only; non-reentrant, so it works with a
        frozen LLM whose input needs gradients, as in the warm-up). transformers >= 5 names, older as fallback."""
        set_hf_checkpointing(self.llm, enabled)

    def gradient_checkpointing_enable(self) -> None:
        self.set_gradient_checkpointing(True)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the LLM's layers are recomputed in backward (when training)."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.llm.modules())

    # ------------------------------------------------------------------ tokenisation
    def _ids(self, text: str, user_text: bool = False) -> list[int]:
        # User text never turns into control tokens: a literal "<|image_pad|>" in a caption is plain text.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=user_text)["input_ids"]

    def _text_ids(self, question: str, answer: str | None) -> tuple[list[int], list[int]]:
        """Question and answer ids (answer closed by <|im_end|>), truncated to max_text_tokens in all."""
        q = self._ids(question, user_text=True)
        a = [] if answer is None else [*self._ids(answer, user_text=True), self.im_end_id]
        template = len(self._prefix) + len(self._vision_end) + len(self._suffix)
        budget = max(self.max_text_tokens - template, 2)
        if len(q) + len(a) > budget:
            # Keep the question's start and the answer's start; the answer gets at least half when long.
            q = q[: max(budget - len(a), budget // 2)]
            a = a[: budget - len(q)]
        return q, a

    def _sequence(self, n_visual: int, question: str, answer: str | None) -> tuple[list[int], int]:
        """Token ids of one sample and the number of trailing answer ids."""
        q, a = self._text_ids(question, answer)
        ids = [*self._prefix, *([self.image_pad_id] * n_visual), *self._vision_end, *q, *self._suffix, *a]
        return ids, len(a)

    def build_batch(self, visual_lengths: list[int], questions: list[str | None],
                    answers: list[str]) -> CaptionBatch:
        """Right-padded ids, attention mask, labels (answer tokens only) and the visual-position mask."""
        if not len(visual_lengths) == len(questions) == len(answers):
            raise ValueError(f"batch sizes differ: {len(visual_lengths)} visual, {len(questions)} questions, "
                             f"{len(answers)} answers")
        seqs = [self._sequence(n, CAPTION_INSTRUCTION if q is None else q, a)
                for n, q, a in zip(visual_lengths, questions, answers, strict=True)]
        length = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        for row, (ids, n_answer) in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            if n_answer:
                labels[row, len(ids) - n_answer: len(ids)] = input_ids[row, len(ids) - n_answer: len(ids)]
        return CaptionBatch(input_ids, attention, labels, input_ids == self.image_pad_id)

    # ------------------------------------------------------------------ compute
    def _embed(self, input_ids: Tensor, image_mask: Tensor, visual: list[Tensor]) -> Tensor:
        """Token embeddings with the projected visual tokens scattered into the placeholder positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if not visual:
            return embeds
        weight = self.projector.fc1.weight
        tokens = self.projector(torch.cat(visual, dim=0).to(device=weight.device, dtype=weight.dtype))
        # masked_scatter fills positions row by row, which is the order of torch.cat over samples.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), tokens.to(embeds.dtype))

    def forward(self, visual: list[Tensor], questions: list[str | None], answers: list[str],
                return_logits: bool = False) -> CaptionOutput:
        """L_cap on a batch: visual[i] is [n_i, 4*D]; a None question means the caption instruction."""
        device = self.projector.fc1.weight.device
        batch = self.build_batch([int(v.shape[0]) for v in visual], questions, answers)
        input_ids, attention, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
        embeds = self._embed(input_ids, batch.image_mask.to(device), visual)
        # use_cache=False: training needs no KV cache (and gradient checkpointing refuses one).
        decoder = self.llm.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        lm_head = self.llm.get_output_embeddings()
        # Project only the supervised positions: full logits over a 152k vocabulary would dominate memory.
        answer_logits = lm_head(hidden[:, :-1][selected]).float()
        n = int(selected.sum())
        # With no answer token left (all truncated away) the loss is a zero that still connects to the graph.
        loss = F.cross_entropy(answer_logits, targets[selected]) if n else hidden.sum() * 0.0
        logits = lm_head(hidden).float() if return_logits else None
        return CaptionOutput(loss, n, logits, labels if return_logits else None)

    @torch.no_grad()
    def generate(self, visual: list[Tensor], questions: list[str | None], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers (special tokens stripped), one per sample."""
        if len(visual) != len(questions):
            raise ValueError(f"batch sizes differ: {len(visual)} visual, {len(questions)} questions")
        device = self.projector.fc1.weight.device
        seqs = [self._sequence(int(v.shape[0]), CAPTION_INSTRUCTION if q is None else q, None)[0]
                for v, q in zip(visual, questions, strict=True)]
        length = max(len(s) for s in seqs)
        # Left padding: every prompt then ends at the last position, where generation continues.
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(seqs):
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            attention[row, length - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        embeds = self._embed(input_ids, (input_ids == self.image_pad_id) & (attention == 1), visual)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.im_end_id,
                                  pad_token_id=self.pad_id)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention, generation_config=config)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
