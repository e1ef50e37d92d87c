"""genloop's int8 and int4 linear layers: codes, kernels and fusing, against float math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genloop.errors import GenloopError
from genloop.models.quantized import Int4Linear, Int8Linear, quantize_int4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int4_codes_round_trip_within_half_a_step() -> None:
    w = torch.randn(16, 64)
    packed, sz = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32) and sz.shape == (2, 16, 2)
    linear = nn.Linear(64, 16, bias=False)
    linear.weight.data = w
    q = Int4Linear.from_linear(linear, 32)
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)  # (N, K)
    assert ((q.dequantized() - w).abs() <= scale / 2 + 1e-6).all()
    x = torch.randn(3, 64)
    # the packed CPU kernel computes what the stored codes say (bf16 activations) …
    assert q._kernel()[0] == "cpu"
    assert torch.allclose(q(x), x @ q.dequantized().t(), atol=0.1, rtol=0.02)
    # … and so does the fallback for widths the kernel does not tile (N = 8)
    small = Int4Linear.from_linear(nn.Linear(64, 8, bias=False), 32)
    assert small._kernel()[0] == "dequant"
    assert torch.allclose(small(x), x @ small.dequantized().t(), atol=1e-5)


def test_int8_modes_agree_with_the_dequantized_weight() -> None:
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    for mode in ("dynamic", "weight_only"):
        q = Int8Linear.from_linear(linear, mode)  # type: ignore[arg-type]
        expected = torch.nn.functional.linear(x, q.dequantized(), linear.bias.detach())
        assert q(x).shape == (2, 5, 48)
        assert _rel(q(x).detach(), expected) < 0.02, mode


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_fused_int8_layers_compute_the_same_and_share_memory(mode: str) -> None:
    """The serving engine fuses q/k/v (and gate/up) int8 layers: the fused layer's output
    is the layers' outputs side by side, and they keep working as views of it."""
    gen = torch.Generator().manual_seed(0)
    layers = [
        Int8Linear.from_linear(nn.Linear(32, n, bias=b), mode)  # type: ignore[arg-type]
        for n, b in ((16, True), (8, False), (24, True))
    ]
    x = torch.randn(5, 32, generator=gen)
    separate = torch.cat([m(x) for m in layers], dim=1)
    fused = Int8Linear.fused(layers)
    assert fused.out_features == 48
    assert torch.equal(fused(x), separate)
    assert torch.equal(torch.cat([m(x) for m in layers], dim=1), separate)
    assert layers[1].qweight.data_ptr() == fused.qweight[16:].data_ptr()
    with pytest.raises(GenloopError, match="same input"):
        Int8Linear.fused([layers[0], Int8Linear.from_linear(nn.Linear(16, 4), mode)])  # type: ignore[arg-type]
