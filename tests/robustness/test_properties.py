"""Property tests: random bytes into every preprocessor and into the shard reader give a clear
InputError or a valid tensor (finite, of the documented shape), never another exception."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm.data import ShardBatches
from mm.errors import InputError
from speech.audio import audio_from_bytes
from video.frames import video_from_bytes
from vision.transforms import ImageProcessor, image_from_bytes

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# headers that get the decoders past their first checks, followed by anything
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"fLaC",
         b"OggS", b"ID3", b"\x1a\x45\xdf\xa3", b"\x00\x00\x00\x18ftypmp42"]
blobs = st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=2048))


@settings(**SETTINGS)
@given(blobs)
def test_image_bytes(data):
    try:
        image = image_from_bytes(data, "random.img")
    except InputError as e:
        assert str(e).startswith("random.img: ")
        return
    tiles, grid = ImageProcessor(32, 4).tile(image)
    assert torch.isfinite(tiles).all() and tiles.shape[1:] == (3, 32, 32)


@settings(**SETTINGS)
@given(blobs)
def test_video_bytes(data):
    try:
        clip = video_from_bytes(data, "random.vid", 4)
    except InputError as e:
        assert str(e).startswith("random.vid: ")
        return
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape[:2] == (4, 3)


@settings(**SETTINGS)
@given(blobs)
def test_audio_bytes(data):
    try:
        wave = audio_from_bytes(data, "random.snd")
    except InputError as e:
        assert str(e).startswith("random.snd: ")
        return
    assert wave.dim() == 1 and wave.numel() > 0 and torch.isfinite(wave).all()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


members = st.lists(st.tuples(st.sampled_from(["0001.png", "0001.json", "0002.flac", "0002.json", "x", "0003.mp4"]),
                             st.binary(max_size=256)), max_size=6)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")


@settings(**SETTINGS)
@given(st.one_of(st.binary(max_size=4096), members.map(_tar), members.map(_tar).map(lambda b: b[: len(b) // 2])))
def test_shard_reader(shard_dir, data):
    """A shard of random bytes, a tar of random members, or a cut tar: the reader yields batches
    whose bad samples are counted as skipped, or says there is nothing readable; never a hang."""
    path = shard_dir / "random.tar"
    path.write_bytes(data)

    def decode(sample):
        if "json" not in sample:
            raise InputError(sample.get("__key__", "sample"), "no json")
        return {"key": sample["__key__"]}

    batches = ShardBatches([str(path)], batch_size=2, decode=decode, collate=lambda e: {"n": len(e)},
                           shuffle_buffer=1)
    try:
        for _, batch in zip(range(3), iter(batches)):
            assert batch["skipped"] >= 0 and (batch.get("n", 0) > 0 or batch["examples"] == 0)
    except InputError as e:  # nothing readable at all: said at once, never an endless wait
        assert "no readable samples" in str(e)
