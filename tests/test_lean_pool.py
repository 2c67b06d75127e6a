"""Lean max pooling: same outputs and gradients as F.max_pool2d, one byte saved per output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convpeft.memory.lean import lean_activations, max_pool2d_lean, saved_bytes_by_layer
from convpeft.ops import pool

GEOMETRIES = [  # kernel, stride, padding, dilation, ceil_mode, input shape
    (3, 2, 1, 1, False, (3, 4, 17, 19)),  # ResNet's stem pool, odd sizes
    (2, 2, 0, 1, False, (2, 3, 8, 8)),
    (3, 2, 1, 2, True, (2, 3, 15, 16)),
    ((3, 2), (1, 2), (1, 0), 1, True, (2, 2, 9, 7)),
    (5, 1, 2, 1, False, (1, 2, 6, 6)),
    (16, 16, 0, 1, False, (1, 1, 32, 32)),  # 256 window positions: the largest that fits
    # a window wider than the input: displacements collide, offsets by division instead
    (3, 1, 1, 1, False, (2, 3, 5, 2)),
]


@pytest.mark.parametrize("k,s,p,d,ceil,shape", GEOMETRIES)
def test_same_output_and_gradient(k, s, p, d, ceil, shape) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[:, :, :3, :3] = 1.0  # ties: the kernel's choice (first max) is kept
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(a, k, s, p, d, ceil), max_pool2d_lean(b, k, s, p, d, ceil)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_offsets_by_table_unless_displacements_collide() -> None:
    assert pool._displacements((3, 3), (1, 1), 19) == [0, 1, 2, 19, 20, 21, 38, 39, 40]
    # width 2 under a 3-wide window: (0, 2) and (1, 0) are both 2 apart from the top-left,
    # so the forward decodes by division (the geometry above covers its exactness)
    assert pool._displacements((3, 3), (1, 1), 2) == [0, 1, 2, 2, 3, 4, 4, 5, 6]


def test_batch_chunks_and_meta(monkeypatch) -> None:
    monkeypatch.setattr(pool, "CHUNK", 3 * 2 * 8 * 8)  # 3 samples per chunk, a ragged last one
    x = torch.randn(7, 2, 16, 16)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.max_pool2d(a, 2).square().sum().backward()
    max_pool2d_lean(b, 2).square().sum().backward()
    assert torch.equal(a.grad, b.grad)
    m = torch.empty(2, 3, 9, 9, device="meta", requires_grad=True)
    max_pool2d_lean(m, 3, 2, 1).sum().backward()
    assert m.grad.shape == m.shape


def test_lean_activations_swaps_pools_and_saves_a_byte_per_output() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1),
                        nn.MaxPool2d(2, return_indices=False), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(2, 3, 16, 16)
    plain = saved_bytes_by_layer(net, x)
    report = lean_activations(net, example_input=x)
    rows = {r.name: r for r in report.rows}
    assert rows["1"].action == "pool" and rows["2"].action == "pool"
    # plain: fp32 input + int64 indices; lean: one uint8 per output
    assert plain["1"] == 2 * 4 * 16 * 16 * 4 + 2 * 4 * 8 * 8 * 8
    assert report.lean_bytes["1"] == 2 * 4 * 8 * 8
    assert lean_activations(net, pools=False).counts().get("pool", 0) == 0


def test_pools_that_stay_plain_say_why() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, return_indices=True))
    row = [r for r in lean_activations(net).rows if r.name == "1"][0]
    assert row.action == "plain" and "return_indices" in row.reason
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(17))
    row = [r for r in lean_activations(net).rows if r.name == "1"][0]
    assert row.action == "plain" and "256" in row.reason
    with pytest.raises(ValueError, match="256"):
        max_pool2d_lean(torch.randn(1, 1, 20, 20), 17)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        max_pool2d_lean(torch.randn(1, 20, 20), 2)
