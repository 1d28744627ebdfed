"""Bad input, every modality, through the Python API and the command line.

Each bad input must end in one InputError naming the input and the problem (the CLI: one line on
stderr, exit code 2, no traceback) and never hang. The matrix below is the inventory of inputs
tried; `test_inventory` prints its size.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import soundfile
import torch

import mm
from mm.cli import main
from mm.errors import InputError
from tests.conftest import make_image
from video.frames import write_video

MODALITIES = ("image", "video", "audio")
CASES = ("missing", "directory", "zero bytes", "truncated", "corrupted", "wrong format", "huge")


def _png_bomb(path, side=100_000):
    """A valid PNG header claiming a side x side canvas: a decompression bomb in ~60 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return path


def _gif_bomb(path, side=65_000):
    """A GIF whose logical screen claims side x side pixels around a 1x1 image."""
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00"
    path.write_bytes(header + image + b"\x3b")
    return path


def _corrupt(data: bytes, seed: int = 0) -> bytes:
    """Keep the first 64 bytes (the header), scramble the rest."""
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, max(0, len(data) - 64), dtype=np.uint8).tobytes()
    return data[:64] + body


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """{(modality, case): (path, words the message must contain)}."""
    root = tmp_path_factory.mktemp("bad")
    good = {"image": root / "good.png", "video": root / "good.mp4", "audio": root / "good.flac"}
    make_image(64, 48).save(good["image"])
    write_video(good["video"], torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    t = np.arange(16000) / 16000
    soundfile.write(good["audio"], (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    files = {}
    for kind, path in good.items():
        ext, data = path.suffix, path.read_bytes()
        d = root / kind
        d.mkdir()
        (d / f"empty{ext}").write_bytes(b"")
        (d / f"truncated{ext}").write_bytes(data[: len(data) // 3])
        (d / f"corrupted{ext}").write_bytes(_corrupt(data))
        other = good["audio" if kind != "audio" else "image"].read_bytes()  # another format, this name
        (d / f"wrong{ext}").write_bytes(other)
        files[(kind, "missing")] = (d / f"missing{ext}", "no such file")
        files[(kind, "directory")] = (d, "directory")
        files[(kind, "zero bytes")] = (d / f"empty{ext}", "empty")
        files[(kind, "truncated")] = (d / f"truncated{ext}", "")
        files[(kind, "corrupted")] = (d / f"corrupted{ext}", "")
        files[(kind, "wrong format")] = (d / f"wrong{ext}", "")
    files[("image", "huge")] = (_png_bomb(root / "image" / "bomb.png"), "too large")
    files[("video", "huge")] = (_gif_bomb(root / "video" / "bomb.gif"), "")
    long = root / "audio" / "long.wav"  # 61 s of quiet noise at 8 kHz: over the 60 s limit
    soundfile.write(long, np.random.default_rng(0).normal(0, 0.05, 61 * 8000).astype(np.float32), 8000)
    files[("audio", "huge")] = (long, "too long")
    return files


def api_call(model, kind: str, path):
    if kind == "image":
        return model.generate("what is it?", images=[path], max_new_tokens=2)
    if kind == "video":
        return model.generate("what happens?", video=path, max_new_tokens=2)
    return model.generate("", audio=path, max_new_tokens=2)


def cli_args(kind: str, path) -> list[str]:
    if kind == "image":
        return ["ask", "--model", "tiny", "--max-new-tokens", "2", "--image", str(path), "what is it?"]
    if kind == "video":
        return ["ask", "--model", "tiny", "--max-new-tokens", "2", "--video", str(path), "what happens?"]
    return ["talk", "--model", "tiny", "--max-new-tokens", "2", str(path)]


@pytest.fixture(scope="module")
def model():
    return mm.load("tiny")


@pytest.mark.parametrize("kind", MODALITIES)
@pytest.mark.parametrize("case", CASES)
def test_api_refuses_naming_the_file(model, bad_files, kind, case):
    path, words = bad_files[(kind, case)]
    with pytest.raises(InputError) as err:
        api_call(model, kind, path)
    message = str(err.value)
    assert str(path) in message and words in message and "\n" not in message


@pytest.mark.parametrize("kind", MODALITIES)
@pytest.mark.parametrize("case", CASES)
def test_cli_one_line_exit_2(bad_files, kind, case, capsys):
    path, words = bad_files[(kind, case)]
    assert main(cli_args(kind, path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mm: error: ") and str(path) in lines[0] and words in lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("kind", MODALITIES)
def test_cli_process_exit_code_no_traceback_no_hang(bad_files, kind):
    path, _ = bad_files[(kind, "corrupted")]
    proc = subprocess.run([sys.executable, "-m", "mm", *cli_args(kind, path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr


# ---- tensors --------------------------------------------------------------------------------------
BAD_TENSORS = {
    "image float": ("image", torch.rand(3, 8, 8), "uint8"),
    "image 2-D": ("image", torch.zeros(8, 8, dtype=torch.uint8), "shape"),
    "image empty": ("image", torch.zeros(3, 0, 8, dtype=torch.uint8), ""),
    "video float": ("video", torch.rand(4, 3, 8, 8), "uint8"),
    "video 3-D": ("video", torch.zeros(4, 8, 8, dtype=torch.uint8), "shape"),
    "video no frames": ("video", torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "no frames"),
    "video huge frames": ("video", torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, 9000, 9000), "too large"),
    "audio NaN": ("audio", (torch.full((16000,), float("nan")), 16000), "NaN"),
    "audio inf": ("audio", (torch.full((16000,), float("inf")), 16000), ""),
    "audio empty": ("audio", (torch.zeros(0), 16000), ""),
    "audio silent": ("audio", (torch.zeros(16000), 16000), "silent"),
    "audio 3-D": ("audio", (torch.zeros(1, 2, 16000), 16000), ""),
    "audio no rate": ("audio", torch.rand(16000), "sample_rate"),
    "audio uint8": ("audio", (torch.zeros(16000, dtype=torch.uint8), 16000), ""),
    "audio bad rate": ("audio", (torch.rand(16000), 0), ""),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors(model, case):
    kind, value, words = BAD_TENSORS[case]
    with pytest.raises(InputError, match=words or None):
        api_call(model, kind, value)


# ---- prompts, configs, models ------------------------------------------------------------------------
def test_prompts(model, capsys):
    with pytest.raises(InputError, match="not valid UTF-8"):
        model.generate("caf\udce9", max_new_tokens=2)  # what Python makes of non-UTF-8 argv bytes
    with pytest.raises(InputError, match="must be text"):
        model.generate(b"bytes", max_new_tokens=2)
    with pytest.raises(InputError, match="exceed the context"):
        model.generate("word " * 600, max_new_tokens=2)
    assert main(["ask", "--model", "tiny", "caf\udce9"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert main(["ask", "--model", "tiny", "word " * 600]) == 2
    assert "exceed the context" in capsys.readouterr().err


def test_non_utf8_argv_in_a_process():
    proc = subprocess.run([sys.executable.encode(), b"-m", b"mm", b"ask", b"--model", b"tiny", b"caf\xe9?"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 2 and b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


CONFIGS = {
    "unknown key": ("decoder: tiny\nvison: vit_tiny\n", "unknown key 'vison'"),
    "nested unknown key": ("decoder: tiny\nspeech: {widht: 32}\n", "unknown key 'speech.widht'"),
    "wrong type": ("decoder: tiny\nimage_adapter: {every: two}\n", "'image_adapter.every' must be int"),
    "bad value": ("decoder: tiny\nspeech: {attach: sideways}\n", "attach 'sideways'"),
    "not a mapping": ("- just\n- a list\n", "must be a mapping"),
    "not YAML": ("decoder: [tiny\n", "not valid YAML"),
    "unknown named config": ("decoder: tiny\nvision: vit_nope\n", "no vision config named 'vit_nope'"),
    "python tag": ("decoder: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_model_configs(tmp_path, case, capsys):
    text, words = CONFIGS[case]
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=words):
        mm.load(path)
    assert main(["ask", "--model", str(path), "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


STAGE_CONFIGS = {
    "unknown key": ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    "wrong type": ("optim.steps=many", "'optim.steps' must be int"),
    "train the decoder": ("train=[decoder]", "the decoder is frozen"),
    "bad override": ("steps", "is not key=value"),
    "unknown stage": ("stage=dream", "stage 'dream' is not one of"),
    "wrong media": ("data.media=video", "needs data.media: audio"),
}


@pytest.mark.parametrize("case", STAGE_CONFIGS)
def test_stage_configs(case, capsys):
    override, words = STAGE_CONFIGS[case]
    assert main(["train", "configs/stages/speech_sft.yaml", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


@pytest.mark.parametrize("name", ["no-such-model", "smollm3", "../etc"])
def test_unknown_model_names(name, capsys):
    with pytest.raises(InputError, match="unknown model|not a model"):
        mm.load(name)
    assert main(["ask", "--model", name, "hi"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inventory(bad_files):
    """The count of bad inputs this file tries (reported in the project's notes)."""
    counts = {"files x (API, CLI)": len(bad_files) * 2, "files in a process": len(MODALITIES),
              "tensors": len(BAD_TENSORS), "prompts": 4 + 1, "model configs x (API, CLI)": len(CONFIGS) * 2,
              "stage configs": len(STAGE_CONFIGS), "model names x (API, CLI)": 3 * 2}
    print(counts, sum(counts.values()))
    assert len(bad_files) == len(MODALITIES) * len(CASES)
