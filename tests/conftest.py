"""Shared fixtures: the tiny model, images made on the fly, gate control."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mm  # noqa: E402


@pytest.fixture
def tiny():
    return mm.load("tiny")


def open_gates(model, value: float = 0.7) -> None:
    """Give every cross-attention gate a non-zero value, so that media change the output."""
    with torch.no_grad():
        for blocks in model.xattn.values():
            for block in blocks:
                block.attn_gate.scale.fill_(value)
                block.mlp_gate.scale.fill_(value)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def image_files(tmp_path):
    """Two real PNG files of different aspect ratios."""
    paths = []
    for i, (w, h) in enumerate([(40, 30), (20, 70)]):
        p = tmp_path / f"img{i}.png"
        make_image(w, h, seed=i).save(p)
        paths.append(p)
    return paths
