"""Shape-level tracing of one training micro-step: the bytes autograd keeps for backward and the FLOPs of
forward + backward, at full size without the compute (the capacity planner's measuring instrument).

The model's parameters live on PyTorch's meta device (shapes and dtypes, no storage), and so does every
floating-point tensor computed from them. Integer and boolean tensors (patch grids, sequence lengths, token ids,
masks) stay real on the CPU, so the code paths that read their values (`.tolist()`, boolean indexing, `if n > 0`)
run as in training; `_Shadow` moves a CPU operand to meta only where it meets a meta one, and turns boolean
indexing of a meta tensor into index tensors computed on the CPU. A Python float of a meta value (a logged
loss) reads as 0.

Attention: `torch.nn.functional.scaled_dot_product_attention` is routed to a fused kernel (PyTorch's flash
attention op), which keeps q, k, v, the output and a logsumexp per head and row for backward, as CUDA's flash
and memory-efficient kernels and flash-attn's varlen kernel do. Without the routing, SDPA on the meta device
would take the math path and keep the full attention matrix, which no GPU kernel does. `eager` attention
(transformers' own matmul + softmax) is traced as it is, attention matrix included.

`saved_bytes`: distinct storages packed by `torch.autograd.graph.saved_tensors_hooks` (parameters excluded),
each counted once at its full size, attributed to the scope that first saved it (`Scopes`). The same function
measures a real CPU run (tests compare the two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}


# PyTorch's flash-attention op (the one the fused routing calls) has no formula in torch's FLOP counter: the
# same as its CUDA twin's (2 matmuls forward, 4 backward; causal masks not discounted)
def _flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _flash_flop,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward_flop}


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _to_meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type != "meta" else t


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensor arguments of an aten call (they sit at the top level or in one list)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, list | tuple):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _args_to_meta(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def conv(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return _to_meta(a)
        if isinstance(a, list | tuple) and any(isinstance(t, torch.Tensor) for t in a):
            return type(a)(_to_meta(t) for t in a)
        return a

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


class _Shadow(TorchDispatchMode):
    """Floats on meta, integer/bool tensors real on the CPU (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _is_meta(args[0]):
            return False if args[0].dtype == torch.bool else 0
        device = kwargs.get("device")
        to_meta = device is not None and torch.device(device).type == "meta"
        if to_meta and func is aten._to_copy.default and not args[0].is_floating_point():
            return func(args[0], **{k: v for k, v in kwargs.items() if k != "device"})  # ids, masks: stay real
        if to_meta and func in _ARANGE and not (kwargs.get("dtype") or torch.int64).is_floating_point:
            return func(*args, **{**kwargs, "device": "cpu"})  # position indices: real
        tensors = list(_tensors(args, kwargs))
        if any(t.device.type == "meta" for t in tensors) and any(t.device.type != "meta" for t in tensors):
            if func is aten.index.Tensor:  # boolean masks -> the index tensors they select (computed on the CPU)
                indices = []
                for i in args[1]:
                    if i is not None and i.dtype == torch.bool and not _is_meta(i):
                        indices.extend(i.nonzero().unbind(1))
                    else:
                        indices.append(i)
                args = (args[0], indices)
            args, kwargs = _args_to_meta(args, kwargs)
        return func(*args, **kwargs)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through a fused kernel's autograd node (flash attention: O(S) kept for backward, not O(S^2))."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                            attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route torch's SDPA to the fused kernel while tracing (transformers calls it by attribute)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def shadow() -> Iterator[None]:
    """Run on meta parameters: see the module docstring."""
    with _Shadow(), fused_attention():
        yield


class Scopes:
    """Names the module a saved tensor was packed in: forward hooks on the `scoped` modules (e.g. each ViT block)
    set the current scope; anything else is `rest`. Tensors passed into a scoped module other than its first
    argument (position embeddings, masks, sequence lengths: shared by every block) stay with the scope that made
    them."""

    def __init__(self, scoped: dict[str, list[nn.Module]]):
        self.current = "rest"
        self.shared: set[int] = set()
        # the shared tensors themselves, held until the trace ends: a storage freed meanwhile could hand its address
        # (the key) to a new one saved inside a layer, which would then be misread as shared
        self._held: list[torch.Tensor] = []
        self._handles = []
        for name, modules in scoped.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            flat, _ = tree_flatten((args[1:], kwargs))
            tensors = [t for t in flat if isinstance(t, torch.Tensor)]
            self._held.extend(tensors)
            self.shared.update(_storage_key(t) for t in tensors)
            self.current = name
        return hook

    def _leave(self, module, args, output) -> None:
        self.current = "rest"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._held.clear()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class Trace:
    """What one traced micro-step kept for backward (bytes by scope) and computed (FLOPs by module)."""

    saved: dict[str, int] = field(default_factory=dict)  # scope -> bytes
    saved_by_kind: dict[str, int] = field(default_factory=dict)  # "logits" (last dim == vocab) / "other"
    flops: dict[str, int] = field(default_factory=dict)  # module path -> FLOPs (forward + backward); "Global"
    scope_calls: dict[str, int] = field(default_factory=dict)  # scope -> times entered


def run_traced(model: nn.Module, fn: Callable[[], torch.Tensor], scoped: dict[str, list[nn.Module]] | None = None,
               vocab_size: int | None = None, backward: bool = True) -> Trace:
    """Run `fn()` (returns the loss) and its backward, recording saved bytes (parameters excluded) by scope and
    FLOPs by module. Works on real tensors and inside `shadow()`."""
    params = {_storage_key(p) for p in model.parameters()}
    scopes = Scopes(scoped or {})
    kept: dict[int, tuple[str, int, bool]] = {}
    calls: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in kept:
            scope = "rest" if key in scopes.shared else scopes.current
            logits = vocab_size is not None and t.dim() >= 1 and t.shape[-1] == vocab_size
            kept[key] = (scope, t.untyped_storage().nbytes(), logits)
        return t

    def count(module, args, kwargs):
        calls[scopes.current] = calls.get(scopes.current, 0) + 1

    handles = [m.register_forward_pre_hook(count, with_kwargs=True) for ms in (scoped or {}).values() for m in ms]
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    try:
        with counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = fn()
            if backward and loss.requires_grad:
                loss.backward()
    finally:
        scopes.remove()
        for h in handles:
            h.remove()
    trace = Trace(scope_calls=calls)
    for scope, nbytes, logits in kept.values():
        trace.saved[scope] = trace.saved.get(scope, 0) + nbytes
        kind = "logits" if logits else "other"
        trace.saved_by_kind[kind] = trace.saved_by_kind.get(kind, 0) + nbytes
    trace.flops = {str(k): int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    return trace
