"""train.precision auto: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from versavit.models import precision


def test_explicit_precisions_pass_through() -> None:
    assert precision.resolve_precision("bf16") == "bf16" and precision.resolve_precision("fp32") == "fp32"
    assert precision.precision_dtype("bf16") is torch.bfloat16
    assert precision.precision_dtype("fp32") is torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpus_bf16_support(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert precision.resolve_precision("auto") == ("bf16" if native else "fp32")
    assert precision.precision_dtype("auto") is (torch.bfloat16 if native else torch.float32)


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"
