"""Bad images, prompts and model names: a clear error naming the input (exit code 2 on the CLI)."""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import pytest
import torch

import mm
from mm.cli import main
from mm.errors import InputError
from tests.conftest import make_image


def _huge_png(path, width=100_000, height=100_000):
    """A valid PNG header that claims a huge canvas: a decompression bomb in ~60 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def bad_images(tmp_path):
    good = tmp_path / "good.png"
    make_image(64, 48).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "missing.png", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "empty": (empty, "empty file"),
        "not an image": (text, "not an image"),
        "truncated": (truncated, "corrupt or truncated"),
        "huge": (_huge_png(tmp_path / "bomb.png"), "too large"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not an image", "truncated", "huge"])
def test_api_names_the_bad_image(tiny, bad_images, case):
    path, problem = bad_images[case]
    with pytest.raises(InputError) as err:
        tiny.generate("what?", images=[path], max_new_tokens=2)
    assert str(path) in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("case", ["missing", "not an image", "truncated", "huge"])
def test_cli_exit_code_2_and_one_line(bad_images, case, capsys):
    path, problem = bad_images[case]
    assert main(["ask", "--model", "tiny", "--image", str(path), "what?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and problem in err[0]


def test_cli_process_exit_code(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    proc = subprocess.run([sys.executable, "-m", "mm", "ask", "--model", "tiny", "--image", str(bad), "q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mm: error: {bad}: not an image (unrecognised format)"]


def test_bad_tensors(tiny):
    with pytest.raises(InputError, match="uint8"):
        tiny.generate("q", images=[torch.rand(3, 8, 8)], max_new_tokens=1)
    with pytest.raises(InputError, match=r"shape must be \[3, H, W\]"):
        tiny.generate("q", images=[torch.zeros(8, 8, dtype=torch.uint8)], max_new_tokens=1)


def test_unknown_model_and_placeholder_mismatch(tiny, tmp_path):
    with pytest.raises(InputError, match="unknown model"):
        mm.load("no-such-model")
    with pytest.raises(InputError, match="2 <\\|image\\|> placeholders for 1 images"):
        tiny.generate("<|image|> and <|image|>?", images=[make_image(8, 8)], max_new_tokens=1)


def test_prompt_over_the_context(tiny):
    with pytest.raises(InputError, match="exceed the context of 512"):
        tiny.generate("x" * 600, max_new_tokens=4)
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "4", "y" * 600]) == 2


def test_ask_set_reaches_the_config_and_a_bad_key_is_one_line(capsys):
    """mm ask --set KEY=VALUE: a bad value or key ends with one line naming it, exit 2."""
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "2", "--set", "video.frames=0", "hi"]) == 2
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "2", "--set", "video.no_such_key=1", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "frames" in err[0] and "no_such_key" in err[1], err
    assert main(["ask", "--model", "tiny", "--max-new-tokens", "2", "--set", "video.frames=4", "hi"]) == 0
