"""Data parallelism of the VQA evaluator's job (`eval.vqa.processes` > 1: the stage `eval-vqa` launched with that
many processes, one per GPU; versavit.eval.jobs).

Every process holds the whole MLLM and trains it on its share of each stage's data (versavit.eval.vqa.data:
disjoint shards, or samples when there are fewer shards than processes) under DeepSpeed ZeRO-2: gradients are
averaged over the processes and the optimiser state (fp32 master weights, AdamW moments) and gradients are
partitioned among them, so an 8B LLM's full fine-tune fits 8 GPUs (weights 4 B/param on each, the rest
16 B/param over all: Qwen3-8B about 32 + 16 GB per GPU) where it does not fit one. The weights stay fp32 and the
model runs under bf16 autocast, as in one process (versavit.eval.vqa.model). The processes step together: a stage
ends when any process runs out of data, the logged loss is the mean over processes, the answer counts behind the
chance level are summed, and each process answers every world-th evaluation question (gathered back in order).

One process (no process group): every function here is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job: rank and number of processes."""

    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        """The process that writes (the model, the predictions, the result)."""
        return self.rank == 0


def current() -> Parallel:
    """The job's process group as initialised (versavit.eval.entry), else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Parallel(dist.get_rank(), dist.get_world_size())
    return Parallel()


def _device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_have(flag: bool, par: Parallel) -> bool:
    """Whether every process has `flag` (e.g. another batch): the same answer on all of them."""
    if par.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean(value: float, par: Parallel) -> float:
    """The mean of `value` over the processes."""
    if par.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / par.world


def gather(obj: Any, par: Parallel) -> list[Any]:
    """Every process's `obj`, by rank."""
    if par.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * par.world
    dist.all_gather_object(out, obj)
    return out


def zero2_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, grad_clip: float) -> Any:
    """A DeepSpeed ZeRO-2 engine around `model` and `optimizer` (its trainable parameters: the stage's); fp32
    weights (the model autocasts to bf16 itself), torch's AdamW. `engine.destroy()` when the stage ends removes its
    gradient hooks (the next stage builds its own)."""
    import deepspeed

    cuda = torch.cuda.is_available()
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": 2, "overlap_comm": cuda, "contiguous_gradients": cuda},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


__all__ = ["Parallel", "all_have", "current", "gather", "mean", "zero2_engine"]
