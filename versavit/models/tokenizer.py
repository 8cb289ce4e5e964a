"""A tiny Qwen-style tokenizer for the tiny configuration (no download needed).

It mirrors the real Qwen2/Qwen3 tokenizer's structure on a small scale: the same pre-tokenizer regex
(digits split one by one), byte-level BPE (so any text encodes and decodes exactly, no <unk>), and the
same chat/vision special tokens, so the caption head's prompt code is identical for tiny and real runs.
The BPE merges are learnt from the synthetic world's vocabulary, so its words are mostly single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)

# Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen2/Qwen3): words with an optional leading
# space/punctuation, single digits, punctuation runs, newlines, whitespace.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_VOCAB = 4096  # upper bound only: training stops early once every corpus word is one token

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
_SIZES = ("small", "large")
_SHAPES = ("ball", "cube", "cylinder")
_NUMBERS = ("no", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_WORDS = (
    "a", "an", "the", "room", "with", "object", "objects", "and", "is", "are", "there", "how", "many", "what",
    "color", "shape", "of", "in", "front", "behind", "left", "right", "closest", "farthest", "nearest",
    "describe", "image", "picture", "scene", "this", "briefly", "detail", "detailed", "yes", "no", "it", "its",
    "which", "user", "assistant", "answer", "question", "word", "single", "using", "caption",
)


def _default_corpus() -> list[str]:
    """Sentences covering the synthetic world's captions, questions and answers, plus the chat roles."""
    shapes = [*_SHAPES, *(s + "s" for s in _SHAPES)]
    words = sorted({*_COLORS, *_SIZES, *shapes, *_NUMBERS, *_WORDS})
    lines = [" ".join(words), " ".join(w.capitalize() for w in words), " ".join(str(d) for d in range(10))]
    for shape in _SHAPES:
        lines.append(f"How many {shape}s are there?")
        for color in _COLORS:
            for size in _SIZES:
                lines.append(f"A room with 3 objects: a {size} {color} {shape}, two {size} {color} {shape}s and "
                             f"a {color} {shape}. The {size} {shape} is the closest object.")
                lines.append(f"What color is the {size} {shape}? {color}")
                lines.append(f"What shape is the {size} {color} object? {shape}")
    for rel in ("left of", "right of", "in front of", "behind"):
        lines.append(f"Is the red ball {rel} the blue cube? yes")
        lines.append(f"The green cylinder is {rel} the small cube. no")
    lines += ["Describe the image.", "Describe the image briefly.", "Describe this image in detail.",
              "Answer the question using a single word or number.", "user\n", "assistant\n"]
    return lines


def build_tiny_tokenizer(corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer (deterministic for a given corpus) with Qwen's special tokens.

    `corpus` replaces the default synthetic-world corpus; words outside it still encode (as bytes).
    Save with `save_pretrained` and load back with `AutoTokenizer.from_pretrained`.
    """
    lines = list(corpus) if corpus is not None else _default_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END, padding_side="right",
        additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD], model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
