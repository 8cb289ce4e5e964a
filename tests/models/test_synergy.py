"""The VITRON-style synergy module: gradient reversal, and what each of its parts learns."""

from __future__ import annotations

import pytest
import torch

from versavit.config.schema import SynergyConfig
from versavit.models.synergy import SynergyModule, grad_reverse

TASKS = ["caption", "depth", "refseg"]


def test_grad_reverse_is_identity_forward_and_negated_scaled_backward() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    assert torch.allclose(x.grad, -0.5 * 2 * x.detach())


def _pooled_grad(module: SynergyModule, pooled: torch.Tensor, task: str, reverse: bool) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    x = pooled.clone().requires_grad_(True)
    loss, _ = module(x, task, reverse=reverse)
    loss.backward()
    disc = {n: p.grad.clone() for n, p in module.named_parameters() if n.startswith("discriminator.")}
    return x.grad, disc


def test_gradient_reversal_flips_the_discriminator_gradient_reaching_the_backbone() -> None:
    torch.manual_seed(0)
    # the discriminator's term alone: no task classifier, no orthogonality term
    module = SynergyModule(16, TASKS, SynergyConfig(enabled=True, dim=8, specific_weight=0.0, orthogonal_weight=0.0))
    pooled = torch.randn(5, 16)
    with_grl, disc_with = _pooled_grad(module, pooled, "depth", reverse=True)
    without, disc_without = _pooled_grad(module, pooled, "depth", reverse=False)
    assert without.abs().sum() > 0
    torch.testing.assert_close(with_grl, -without)  # the backbone is pushed to fool the discriminator
    for name in disc_with:  # while the discriminator itself still learns to tell the tasks apart
        torch.testing.assert_close(disc_with[name], disc_without[name])


def test_grl_scale_scales_the_reversed_gradient() -> None:
    torch.manual_seed(0)
    cfg = SynergyConfig(enabled=True, dim=8, specific_weight=0.0, orthogonal_weight=0.0)
    module = SynergyModule(16, TASKS, cfg)
    pooled = torch.randn(3, 16)
    full, _ = _pooled_grad(module, pooled, "caption", reverse=True)
    module.grl_scale = 0.25
    quarter, _ = _pooled_grad(module, pooled, "caption", reverse=True)
    torch.testing.assert_close(quarter, 0.25 * full)


def test_the_specific_side_is_not_reversed() -> None:
    torch.manual_seed(0)
    module = SynergyModule(16, TASKS, SynergyConfig(enabled=True, dim=8, specific_weight=1.0, orthogonal_weight=0.0))
    pooled = torch.randn(4, 16)
    a, _ = _pooled_grad(module, pooled, "refseg", reverse=True)
    b, _ = _pooled_grad(module, pooled, "refseg", reverse=False)
    # only the discriminator's share flips: the classifier's gradient is the same in both
    module.specific_weight = 0.0
    da, _ = _pooled_grad(module, pooled, "refseg", reverse=True)
    torch.testing.assert_close(a - da, b - (-da))


def test_the_discriminator_learns_a_task_signal_when_there_is_one() -> None:
    """Features that carry the task (a per-task offset): the discriminator's accuracy rises well above chance."""
    torch.manual_seed(0)
    module = SynergyModule(16, TASKS, SynergyConfig(enabled=True, dim=8, specific_weight=0.0, orthogonal_weight=0.0))
    opt = torch.optim.Adam([p for n, p in module.named_parameters() if n.startswith("discriminator.")], lr=1e-2)
    offsets = torch.randn(3, 16) * 3
    acc = []
    for _ in range(60):
        opt.zero_grad()
        accs = []
        for i, task in enumerate(TASKS):
            loss, parts = module(torch.randn(8, 16) + offsets[i], task)
            loss.backward()
            accs.append(parts["synergy/disc_acc"])
        opt.step()
        acc.append(sum(accs) / 3)
    assert sum(acc[-10:]) / 10 > 0.9


def test_synergy_needs_two_tasks() -> None:
    with pytest.raises(ValueError, match="two tasks"):
        SynergyModule(16, ["caption"], SynergyConfig(enabled=True))
