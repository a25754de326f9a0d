"""Random small networks for the fuzz suite (tests/test_fuzz.py): sequence networks built from
linear, residual (with LayerNorm), concat and attention blocks (a Hugging Face style attention that
reads ``num_heads``/``head_dim`` in its forward, and ``nn.MultiheadAttention``), and conv networks
built from conv+BatchNorm, residual, concat and depthwise-separable blocks; some layers frozen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


class SelfAttention(nn.Module):
    """Hugging Face style multi-head self-attention: q/k/v/o projections, ``num_heads`` and ``head_dim``
    attributes that its forward reads (and that compaction must update)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))


class Block(nn.Module):
    """One block of a random sequence network; ``kind`` says which."""

    def __init__(self, kind: str, width: int, out: int, heads: int):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.fc = nn.Linear(width, out)
        elif kind == "residual":
            self.norm = nn.LayerNorm(width)
            self.up, self.down = nn.Linear(width, out), nn.Linear(out, width)
        elif kind == "concat":
            self.left, self.right = nn.Linear(width, out), nn.Linear(width, width)
        elif kind == "attention":
            self.attn = SelfAttention(width, heads)
        elif kind == "mha":
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.width = {"linear": out, "concat": out + width}.get(kind, width)

    def forward(self, x):
        if self.kind == "linear":
            return F.relu(self.fc(x))
        if self.kind == "residual":
            return x + self.down(F.gelu(self.up(self.norm(x))))
        if self.kind == "concat":
            return torch.cat([F.relu(self.left(x)), torch.tanh(self.right(x))], dim=-1)
        if self.kind == "attention":
            return x + self.attn(x)
        return x + self.attn(x, x, x, need_weights=False)[0]


class SequenceNet(nn.Module):
    def __init__(self, d_in: int, blocks: list[tuple[str, int, int]], classes: int):
        super().__init__()
        self.embed = nn.Linear(d_in, blocks[0][1] if blocks else d_in)
        width = blocks[0][1] if blocks else d_in
        layers = []
        for kind, out, heads in blocks:
            block = Block(kind, width, out, heads)
            layers.append(block)
            width = block.width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


class ConvBlock(nn.Module):
    def __init__(self, kind: str, channels: int, out: int):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.conv, self.bn = nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out)
        elif kind == "residual":
            self.conv1, self.bn1 = nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out)
            self.conv2, self.bn2 = nn.Conv2d(out, channels, 1), nn.BatchNorm2d(channels)
        elif kind == "concat":
            self.left, self.right = nn.Conv2d(channels, out, 1), nn.Conv2d(channels, channels, 3, padding=1)
        elif kind == "depthwise":
            self.dw, self.pw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.Conv2d(channels, out, 1)
        self.channels = {"conv": out, "concat": out + channels, "depthwise": out}.get(kind, channels)

    def forward(self, x):
        if self.kind == "conv":
            return F.relu(self.bn(self.conv(x)))
        if self.kind == "residual":
            return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        if self.kind == "concat":
            return torch.cat([self.left(x), F.relu(self.right(x))], dim=1)
        return F.relu(self.pw(F.relu(self.dw(x))))


class ConvNet(nn.Module):
    def __init__(self, c_in: int, blocks: list[tuple[str, int, int]], classes: int):
        super().__init__()
        width = blocks[0][1] if blocks else 4
        self.stem = nn.Conv2d(c_in, width, 3, padding=1)
        layers = []
        for kind, out, _ in blocks:
            block = ConvBlock(kind, width, out)
            layers.append(block)
            width = block.channels
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean(dim=(2, 3)))


WIDTHS = st.sampled_from([4, 8, 12, 16])


@st.composite
def networks(draw):
    """(model, example input, family): a random SequenceNet or ConvNet with its input."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        kinds = st.sampled_from(["linear", "residual", "concat", "attention", "mha"])
        blocks = draw(st.lists(st.tuples(kinds, WIDTHS, st.sampled_from([1, 2, 4])), min_size=1, max_size=3))
        d_in = draw(WIDTHS)
        model = SequenceNet(d_in, blocks, draw(st.integers(2, 5)))
        x = torch.randn(2, 3, d_in)
    else:
        kinds = st.sampled_from(["conv", "residual", "concat", "depthwise"])
        blocks = draw(st.lists(st.tuples(kinds, WIDTHS, st.just(1)), min_size=1, max_size=3))
        c_in = draw(st.sampled_from([3, 4]))
        model = ConvNet(c_in, blocks, draw(st.integers(2, 5)))
        x = torch.randn(2, c_in, 5, 5)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in draw(st.lists(st.sampled_from(layers), max_size=2, unique_by=id)):
        layer.requires_grad_(False)  # frozen layers are pruned like the others and stay frozen
    model.eval()
    return model, x
