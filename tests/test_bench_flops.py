"""bench/flops.py's FLOP counts: what docs/benchmark.md's "Where the floor is" rests on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.flops import counted_flops


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_a_convolutions_backward_counts_twice_its_forward(groups):
    # torch 2.14's FlopCounterMode counts a grouped convolution's weight gradient `groups` times over
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
    images = torch.randn(2, 8, 5, 5, requires_grad=True)
    multiply_adds = 2 * 8 * 5 * 5 * (8 // groups) * 3 * 3

    assert counted_flops(lambda: conv(images)) == 2 * multiply_adds
    assert counted_flops(lambda: conv(images).sum().backward()) == 3 * 2 * multiply_adds


def test_no_input_gradient_is_counted_where_none_is_needed():
    conv = nn.Conv2d(8, 8, 1, bias=False)
    images = torch.randn(2, 8, 5, 5)  # the cached features: no gradient wanted
    assert counted_flops(lambda: conv(images).sum().backward()) == 2 * counted_flops(lambda: conv(images))
