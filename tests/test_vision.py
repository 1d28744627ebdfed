"""Tiling, preprocessing and the image encoder."""
from __future__ import annotations

import torch

from vision import ImageEncoder, ImageProcessor, VisionConfig
from vision.tiling import aspect_ratio_id, best_grid, fit_size, supported_grids
from tests.conftest import make_image

TINY = VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, taps=[1, 3],
                    global_layers=1, max_tiles=4)


def test_grids_are_the_llama_3_2_aspect_ratios():
    assert supported_grids(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert aspect_ratio_id((1, 1), 4) == 1 and aspect_ratio_id((4, 1), 4) == 8


def test_best_grid_follows_the_aspect_ratio():
    assert best_grid(100, 100, 224, 4) == (1, 1)  # small: upscale onto one tile
    assert best_grid(448, 448, 224, 4) == (2, 2)  # exactly four tiles
    assert best_grid(224, 900, 224, 4) == (4, 1)  # wide: cols x rows
    assert best_grid(700, 224, 224, 4) == (1, 4)  # tall: 4 rows hold it without shrinking
    assert best_grid(600, 224, 224, 4) == (1, 3)
    assert best_grid(4000, 4000, 224, 4) == (2, 2)  # huge: least downscaling
    assert best_grid(1000, 1000, 224, 1) == (1, 1)


def test_fit_size_keeps_aspect_within_canvas():
    h, w = fit_size(300, 600, (2, 1), 224)
    assert (h, w) == (224, 448)
    h, w = fit_size(300, 500, (2, 1), 224)
    assert w <= 448 and h == 224 and abs(w / h - 500 / 300) < 0.02


def test_processor_tiles_and_pads():
    proc = ImageProcessor(32, 4, TINY.mean, TINY.std)
    out = proc([make_image(64, 32), make_image(10, 10)])
    assert out.tiles.shape == (2, 4, 3, 32, 32)
    assert out.n_tiles.tolist() == [2, 1]
    assert out.aspect_ratio_ids.tolist() == [aspect_ratio_id((2, 1), 4), aspect_ratio_id((1, 1), 4)]
    assert out.tiles[0, 2:].abs().sum() == 0 and out.tiles[1, 1:].abs().sum() == 0
    assert out.tiles[0, 1].abs().sum() > 0


def test_processor_tile_order_is_row_major():
    proc = ImageProcessor(32, 4, [0, 0, 0], [1, 1, 1])
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, :32, 32:] = 255  # top-right quadrant white
    out = proc([img])
    means = out.tiles[0].mean(dim=(1, 2, 3))
    assert out.n_tiles.item() == 4 and means.argmax().item() == 1


def test_encoder_shapes_and_taps():
    enc = ImageEncoder(TINY)
    proc = ImageProcessor(32, 4, TINY.mean, TINY.std)
    batch = proc([make_image(64, 64), make_image(30, 60)])
    out = enc(batch.tiles, batch.aspect_ratio_ids, batch.n_tiles)
    assert out.shape == (2, 4 * TINY.tokens_per_tile, TINY.width * 3)
    assert torch.isfinite(out).all()


def test_unused_tiles_do_not_leak_into_used_ones():
    enc = ImageEncoder(TINY).eval()
    proc = ImageProcessor(32, 4, TINY.mean, TINY.std)
    batch = proc([make_image(32, 64)])  # two tiles used
    noisy = batch.tiles.clone()
    noisy[:, 2:] = torch.randn_like(noisy[:, 2:])
    used = enc.token_mask(batch.n_tiles, 4)[0]
    with torch.no_grad():
        a = enc(batch.tiles, batch.aspect_ratio_ids, batch.n_tiles)[0, used]
        b = enc(noisy, batch.aspect_ratio_ids, batch.n_tiles)[0, used]
    assert torch.allclose(a, b, atol=1e-6)


def test_tile_embedding_gates_start_closed_but_can_learn():
    enc = ImageEncoder(TINY)
    proc = ImageProcessor(32, 4, TINY.mean, TINY.std)
    batch = proc([make_image(64, 32)])
    enc(batch.tiles, batch.aspect_ratio_ids, batch.n_tiles).sum().backward()
    for gate in (enc.pre_tile_embedding.gate, enc.tile_positional_embedding.gate, enc.post_tile_embedding.gate):
        assert gate.item() == 0 and gate.grad is not None and gate.grad.abs().item() > 0
