"""Image loading (with the checks a user's file deserves) and tiling preprocessing."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from mm.errors import InputError, existing_file
from vision.tiling import aspect_ratio_id, best_grid, fit_size

# Refuse images whose header claims more pixels than this (decompression bombs); 8k x 8k.
MAX_PIXELS = 8192 * 8192



def load_image(source) -> Image.Image:
    """A path, a PIL image or a uint8 tensor [3, H, W] -> an RGB PIL image.

    Raises InputError naming the source for a missing, empty, unreadable, truncated or
    oversized image, or a tensor of the wrong dtype/shape.
    """
    if isinstance(source, Image.Image):
        return _checked(source, "image").convert("RGB")
    if isinstance(source, Tensor):
        return _from_tensor(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(type(source).__name__, "not an image: expected a path, PIL.Image or uint8 tensor")
    path = existing_file(source, "an image")
    return _open(path, path)


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes (e.g. from a shard) -> RGB PIL image, with the checks of load_image."""
    if not data:
        raise InputError(name, "empty image data")
    return _open(io.BytesIO(data), name)


def _open(file, name) -> Image.Image:
    try:
        with Image.open(file) as img:
            _checked(img, name)
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise InputError(name, f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(name, f"corrupt or truncated image ({e})") from None


def _checked(img: Image.Image, name) -> Image.Image:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise InputError(name, f"image too large: {w}x{h} pixels (limit {MAX_PIXELS})")
    if w == 0 or h == 0:
        raise InputError(name, "image has no pixels")
    return img


def _from_tensor(t: Tensor) -> Image.Image:
    if t.dtype != torch.uint8:
        raise InputError("image tensor", f"dtype must be torch.uint8, got {t.dtype}")
    if t.dim() != 3 or t.shape[0] != 3:
        raise InputError("image tensor", f"shape must be [3, H, W], got {list(t.shape)}")
    if t.shape[1] * t.shape[2] > MAX_PIXELS:
        raise InputError("image tensor", f"image too large: {t.shape[2]}x{t.shape[1]} pixels")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise InputError("image tensor", "image has no pixels")
    return TF.to_pil_image(t.cpu())


@dataclass
class TiledImages:
    """A batch of images, each resized onto its best grid and cut into tiles.

    tiles: [n, max_tiles, 3, S, S] normalised; unused tiles are zeros
    aspect_ratio_ids: [n]  grid id (1-based) of each image
    n_tiles: [n]  tiles in use per image
    """

    tiles: Tensor
    aspect_ratio_ids: Tensor
    n_tiles: Tensor

    def to(self, device, dtype=None) -> "TiledImages":
        return TiledImages(
            self.tiles.to(device, dtype), self.aspect_ratio_ids.to(device), self.n_tiles.to(device)
        )

    def __len__(self) -> int:
        return self.tiles.shape[0]


class ImageProcessor:
    """Images -> TiledImages for an encoder with tiles of `tile_size` pixels."""

    def __init__(self, tile_size: int, max_tiles: int, mean: tuple, std: tuple) -> None:
        self.tile_size, self.max_tiles = tile_size, max_tiles
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: list) -> TiledImages:
        tiles, ratio_ids, counts = [], [], []
        for image in images:
            t, grid = self.tile(load_image(image))
            tiles.append(t)
            ratio_ids.append(aspect_ratio_id(grid, self.max_tiles))
            counts.append(grid[0] * grid[1])
        s = self.tile_size
        if not tiles:
            return TiledImages(torch.zeros(0, self.max_tiles, 3, s, s), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long))
        return TiledImages(torch.stack(tiles), torch.tensor(ratio_ids), torch.tensor(counts))

    def tile(self, image: Image.Image) -> tuple[Tensor, tuple[int, int]]:
        """One RGB image -> tiles [max_tiles, 3, S, S] (row-major, padded) and its (cols, rows)."""
        s = self.tile_size
        grid = best_grid(image.height, image.width, s, self.max_tiles)
        h, w = fit_size(image.height, image.width, grid, s)
        x = TF.pil_to_tensor(image.resize((w, h), Image.Resampling.BICUBIC))
        x = TF.normalize(x.float() / 255.0, self.mean, self.std)
        cols, rows = grid
        canvas = torch.zeros(3, rows * s, cols * s)
        canvas[:, :h, :w] = x
        # [3, rows*S, cols*S] -> [rows*cols, 3, S, S], row-major
        grid_tiles = canvas.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        out = torch.zeros(self.max_tiles, 3, s, s)
        out[: rows * cols] = grid_tiles
        return out, grid
