"""Video files -> a fixed number of uniformly sampled RGB frames, with their timestamps.

    clip = load_video("clip.mp4", frames=16)     # clip.frames: uint8 [16, 3, H, W]

Decoding uses PyAV (FFmpeg), so every container and codec FFmpeg reads works: mp4, webm, avi,
mkv, mov, gif, ... Memory stays bounded for any length: a first pass counts the frames without
keeping any, a second pass keeps only the sampled ones.

Sampling: frame i of F is the source frame at the middle of the i-th of F equal segments.
A clip with fewer than F frames REPEATS frames (each source frame about F/n times, in order);
nothing is padded with blank frames, so the temporal aggregator always sees F real frames.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import av
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from mm.errors import InputError, existing_file
from mm.ffmpeg import ffmpeg_errors
from vision.transforms import MAX_PIXELS


VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv")
MAX_SOURCE_FRAMES = 1_000_000  # refuse streams that claim more (about 9 hours at 30 fps)


@dataclass
class VideoClip:
    frames: Tensor  # uint8 [F, 3, H, W]
    timestamps: Tensor  # float seconds [F] of each sampled frame
    source_frames: int  # decodable frames in the file (before sampling)
    repeated: bool  # True when the file had fewer frames than asked for


def sample_indices(n: int, frames: int) -> list[int]:
    """F indices into n source frames: the middle of F equal segments (repeats when n < F)."""
    return [min(n - 1, int((i + 0.5) * n / frames)) for i in range(frames)]


def load_video(source, frames: int) -> VideoClip:
    """A path, encoded bytes or a uint8 tensor [T, 3, H, W] -> VideoClip of `frames` frames.

    Raises InputError naming the source for a missing, empty, undecodable or frame-less file,
    an unknown codec, frames that are too large, or a tensor of the wrong dtype/shape.
    """
    if isinstance(source, Tensor):
        return _from_tensor(source, frames)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise InputError("video data", "empty video data")
        return _decode(lambda: io.BytesIO(source), "video data", frames)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(type(source).__name__, "not a video: expected a path, bytes or uint8 tensor")
    path = existing_file(source, "a video")
    return _decode(lambda: str(path), path, frames)


def probe_video(path) -> None:
    """Cheap check of a video file before a model is loaded: it exists, has a video stream of a
    sane size, and its first frame decodes. Raises InputError naming the file."""
    path = existing_file(path, "a video")
    with ffmpeg_errors(path, "video"), av.open(str(path), mode="r") as container:
        stream = _video_stream(container, path)
        if next(iter(container.decode(stream)), None) is None:
            raise InputError(path, "no decodable video frames")


def video_from_bytes(data: bytes, name: str, frames: int) -> VideoClip:
    """Encoded video bytes (e.g. from a shard) -> VideoClip, with the checks of load_video."""
    if not data:
        raise InputError(name, "empty video data")
    return _decode(lambda: io.BytesIO(data), name, frames)


def _decode(opener, name, frames: int) -> VideoClip:
    with ffmpeg_errors(name, "video"):
        n = _count_frames(opener, name)
        if n == 0:
            raise InputError(name, "no decodable video frames")
        wanted = sample_indices(n, frames)
        keep: dict[int, Tensor] = {}
        stamps: dict[int, float] = {}
        targets = set(wanted)
        with av.open(opener(), mode="r") as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i in targets:
                    keep[i] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    stamps[i] = float(frame.time) if frame.time is not None else float("nan")
                if i >= wanted[-1]:
                    break
    if len(keep) < len(targets):  # the second pass decoded fewer frames than the first counted
        raise InputError(name, f"video ended early: {len(keep)} of {len(targets)} sampled frames decoded")
    return VideoClip(torch.stack([keep[i] for i in wanted]), torch.tensor([stamps[i] for i in wanted]),
                     n, n < frames)


def _video_stream(container, name):
    """The first video stream, if FFmpeg can decode it and its frames are of a sane size."""
    if not container.streams.video:
        raise InputError(name, "no video stream in the file")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.name in (None, ""):
        raise InputError(name, "unsupported video codec (FFmpeg has no decoder for it)")
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_PIXELS:
        raise InputError(name, f"video frames too large: {w}x{h} pixels (limit {MAX_PIXELS})")
    return stream


def _count_frames(opener, name) -> int:
    """Decodable frames of the first video stream, checking the frame size on the way."""
    with av.open(opener(), mode="r") as container:
        stream = _video_stream(container, name)
        n = 0
        try:
            for _ in container.decode(stream):
                n += 1
                if n > MAX_SOURCE_FRAMES:
                    raise InputError(name, f"video too long: more than {MAX_SOURCE_FRAMES} frames")
        except av.error.EOFError:  # a stream cut short: its decodable frames are what we have
            pass
        return n


def _from_tensor(t: Tensor, frames: int) -> VideoClip:
    if t.dtype != torch.uint8:
        raise InputError("video tensor", f"dtype must be torch.uint8, got {t.dtype}")
    if t.dim() != 4 or t.shape[1] != 3:
        raise InputError("video tensor", f"shape must be [T, 3, H, W], got {list(t.shape)}")
    if t.shape[0] == 0 or t.shape[2] * t.shape[3] == 0:
        raise InputError("video tensor", "video has no frames")
    if t.shape[2] * t.shape[3] > MAX_PIXELS:
        raise InputError("video tensor", f"video frames too large: {t.shape[3]}x{t.shape[2]} pixels")
    n = t.shape[0]
    idx = sample_indices(n, frames)
    return VideoClip(t[idx].cpu(), torch.full((frames,), float("nan")), n, n < frames)


def write_video(path: str | Path, frames: Tensor, fps: int = 8, codec: str | None = None) -> Path:
    """uint8 frames [T, 3, H, W] -> a video file (codec from the extension unless given)."""
    path = Path(path)
    ext = path.suffix.lower()
    codec = codec or {".webm": "libvpx-vp9", ".gif": "gif", ".avi": "mpeg4", ".mkv": "libx264"}.get(ext, "libx264")
    t, _, h, w = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class FrameProcessor:
    """Videos -> normalised frames [n, F, 3, S, S] for the image encoder: each frame is one tile,
    resized to fit S x S with its aspect ratio kept and padded with zeros (like a 1x1 tile grid)."""

    def __init__(self, tile_size: int, frames: int, mean: tuple, std: tuple) -> None:
        self.tile_size, self.frames = tile_size, frames
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, videos: list) -> Tensor:
        s = self.tile_size
        if not videos:
            return torch.zeros(0, self.frames, 3, s, s)
        return torch.stack([self.tiles(load_video(v, self.frames).frames) for v in videos])

    def tiles(self, frames: Tensor) -> Tensor:
        """uint8 [T, 3, H, W] -> float [T, 3, S, S]."""
        s = self.tile_size
        _, _, h, w = frames.shape
        scale = s / max(h, w)
        size = (max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale))))
        x = TF.resize(frames, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = (x.float() / 255.0 - self.mean) / self.std
        out = torch.zeros(frames.shape[0], 3, s, s)
        out[:, :, : size[0], : size[1]] = x
        return out
