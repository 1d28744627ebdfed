"""Write the bundled example images: real handwritten digit scans from scikit-learn's digits
set (8x8, 16 grey levels), upscaled to 64x64 PNGs. They come from the held-out part of the
set (index >= 1500), which no training stage of this project uses."""
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "assets"


def digit_image(pixels: np.ndarray, size: int = 64) -> Image.Image:
    grey = (255 - pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)  # dark ink on white paper
    return Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def main() -> None:
    digits = load_digits()
    OUT.mkdir(exist_ok=True)
    wanted = {3, 7}
    for index in range(1500, len(digits.images)):
        label = int(digits.target[index])
        if label in wanted:
            digit_image(digits.data[index]).save(OUT / f"digit_{label}.png")
            wanted.discard(label)
        if not wanted:
            break


if __name__ == "__main__":
    main()
