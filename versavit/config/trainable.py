"""Trainable parameter sets as data: name patterns -> the exact set of parameter names that learn.

A recipe stage lists patterns; a parameter trains iff some pattern selects it and no `!pattern` does:

    *                          every parameter
    heads.depth.*              an fnmatch glob over full parameter names (`*` also crosses dots)
    backbone.blocks[-4:]       the top 4 ViT blocks (a Python slice over the blocks, bottom = 0);
    backbone.blocks[0].attn.*  an index, optionally followed by a glob inside the block
    projector | llm | vit      shortcuts: the caption head's projector (the connector), its LLM, the ViT
    !llm                       exclusion, with the same syntax

The ViT's own `merger` (Qwen-VL's projector into its original LLM; with backbone kind siglip2, SigLIP2's
`post_layernorm` and pooling `head`) is never on VersaViT's path, so it never trains, whatever the patterns
say. A pattern that selects nothing is an error: in a recipe file a typo would otherwise silently freeze what
it meant to train. `backbone.blocks[...]` means Qwen-VL's `tower.blocks` or SigLIP2's `tower.encoder.layers`.

No torch import here: the config schema checks the syntax when a config loads.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

# where the ViT blocks' parameters live: Qwen2(.5)-VL's tower, SigLIP2's (backbone kind siglip2)
BLOCKS_PREFIXES = ("backbone.tower.blocks.", "backbone.tower.encoder.layers.")
ALWAYS_FROZEN = ("backbone.tower.merger.*", "backbone.tower.post_layernorm.*", "backbone.tower.head.*")
SHORTCUTS: dict[str, str] = {
    "projector": "heads.caption.projector.*",
    "llm": "heads.caption.llm.*",
    "vit": "backbone.*",
}
_BLOCKS = re.compile(r"^backbone\.blocks\[([^\]]*)\](.*)$")
_INT = r"\s*-?\d+\s*"
_SLICE = re.compile(rf"^(?:{_INT})?:(?:{_INT})?(?::(?:{_INT})?)?$|^{_INT}$")


def check_pattern(pattern: str) -> None:
    """Raise ValueError if `pattern` is not valid syntax (what it selects is checked against a model)."""
    body = pattern.removeprefix("!").strip()
    if not body:
        raise ValueError(f"trainable pattern {pattern!r} is empty")
    m = _BLOCKS.match(body)
    if m and not _SLICE.match(m.group(1)):
        raise ValueError(f"trainable pattern {pattern!r}: backbone.blocks[...] takes an index or a slice "
                         "such as [-4:] (the top 4 blocks)")
    if m and m.group(2) and not m.group(2).startswith("."):
        raise ValueError(f"trainable pattern {pattern!r}: after backbone.blocks[...] comes '.<glob>'")


def _block_indices(spec: str, depth: int) -> list[int]:
    if ":" not in spec:
        i = int(spec)
        if not -depth <= i < depth:
            raise ValueError(f"backbone.blocks[{spec}]: the ViT has {depth} blocks")
        return [i % depth]
    parts = [int(p) if p.strip() else None for p in spec.split(":")]
    return list(range(depth))[slice(*parts)]


def expand(pattern: str, depth: int) -> list[str]:
    """One pattern (without '!') -> the fnmatch globs it stands for."""
    body = pattern.strip()
    if body in SHORTCUTS:
        return [SHORTCUTS[body]]
    m = _BLOCKS.match(body)
    if m:
        rest = m.group(2) or ".*"
        return [f"{prefix}{i}{rest}" for prefix in BLOCKS_PREFIXES for i in _block_indices(m.group(1), depth)]
    return [body]


def select(patterns: Iterable[str], names: Iterable[str], depth: int) -> set[str]:
    """The parameter names `patterns` make trainable (ViT with `depth` blocks).

    Raises ValueError for a pattern that matches no name, or a slice that selects no block.
    """
    names = list(names)
    included: set[str] = set()
    excluded: set[str] = set()
    for pattern in patterns:
        check_pattern(pattern)
        negate = pattern.startswith("!")
        globs = expand(pattern.removeprefix("!"), depth)
        hits = {n for n in names for g in globs if fnmatch.fnmatchcase(n, g)}
        if not hits:
            example = ", ".join(sorted({n.rsplit(".", 2)[0] for n in names})[:6])
            raise ValueError(f"trainable pattern {pattern!r} selects no parameter of this stage's model "
                             f"(globs {globs}; names look like {example}, ...)")
        (excluded if negate else included).update(hits)
    frozen = {n for n in names for g in ALWAYS_FROZEN if fnmatch.fnmatchcase(n, g)}
    return included - excluded - frozen
