"""Training data: webdataset shards, written from folders/manifests and read back as batches.

A sample in a shard is `<key>.<image, video or audio ext>` (the original file's bytes, checked
when written) plus `<key>.json`: {"caption": ...} for media-text pairs (for audio: the
transcript), {"question": ..., "answer": ...} for media QA (for spoken dialogue: the typed text
of what is spoken, and the reply). A manifest row names its file under "image", "video" or
"audio"; a folder holds image, video and audio files with same-named .txt captions. Audio whose
extension is also a video container's (.webm, .mp4, ...) is stored as "audio.<ext>", so that
no reader takes it for a video.

Reading is one readable list of steps (webdataset stages):

    shard list (shuffled per epoch) -> tar to samples (OPEN_SHARDS interleaved) -> shuffle buffer -> global batches
    -> this process's slice of each batch -> decode + preprocess -> collate

The sample order depends only on (seed, epoch), never on the number of processes or data
workers: every process reads the same stream and keeps its own slice of each global batch,
and data workers take whole batches in turn. So a run on N processes sees exactly the batches
of a run on 1, and a resumed run skips the batches already trained on (reading but not
decoding them) and sees the rest in the same order. Corrupt samples and unreadable shard
members are skipped and counted; the counts travel with the batches to the training log.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm.errors import InputError
from speech.audio import AUDIO_EXTENSIONS, audio_from_bytes, load_audio
from video.frames import VIDEO_EXTENSIONS, VideoClip, load_video, video_from_bytes
from vision.transforms import image_from_bytes, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# .gif is read as an image in image shards' folders; as a video only when a manifest says "video"
FOLDER_VIDEO_EXTENSIONS = tuple(e for e in VIDEO_EXTENSIONS if e != ".gif")
# .webm in a folder is a video; as audio only when a manifest says "audio"
FOLDER_AUDIO_EXTENSIONS = tuple(e for e in AUDIO_EXTENSIONS if e not in VIDEO_EXTENSIONS)
MEDIA_KINDS = ("image", "video", "audio")


# ---- writing ---------------------------------------------------------------------------------
@dataclass
class WriteReport:
    written: int = 0
    skipped: int = 0
    shards: int = 0


def read_manifest(path: str | Path) -> Iterator[dict]:
    """Rows of a .jsonl or .csv manifest, or (for a folder) each image, video or audio file with its
    caption from the same-named .txt file. Media paths in manifests are relative to the manifest's folder."""
    path = Path(path)
    if path.is_dir():
        kinds = {**{e: "image" for e in IMAGE_EXTENSIONS}, **{e: "video" for e in FOLDER_VIDEO_EXTENSIONS},
                 **{e: "audio" for e in FOLDER_AUDIO_EXTENSIONS}}
        for media in sorted(p for p in path.rglob("*") if p.suffix.lower() in kinds):
            caption = media.with_suffix(".txt")
            kind = kinds[media.suffix.lower()]
            yield {kind: str(media), "caption": caption.read_text().strip() if caption.is_file() else None}
        return
    if not path.is_file():
        raise InputError(path, "no such manifest file or folder")
    if path.suffix == ".jsonl":
        rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    elif path.suffix == ".csv":
        rows = csv.DictReader(io.StringIO(path.read_text()))
    else:
        raise InputError(path, "unsupported manifest (expected a folder, .jsonl or .csv)")
    for row in rows:
        row = dict(row)
        for kind in MEDIA_KINDS:
            if row.get(kind) and not Path(row[kind]).is_absolute():
                row[kind] = str(path.parent / row[kind])
        yield row


def write_shards(rows: Iterable[dict], out_dir: str | Path, kind: str, prefix: str | None = None,
                 per_shard: int = 1000, log: Callable[[str], None] = print) -> WriteReport:
    """Check each row's media file and fields, and write the good ones into tar shards.

    kind: "captions" (needs caption) or "qa" (needs question, answer); each row names an "image",
    a "video" or an "audio" file (decoded once here, so a corrupt, frame-less, empty, silent or
    too long file is skipped now).
    """
    fields = {"captions": ("caption",), "qa": ("question", "answer")}[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix or kind}-%06d.tar")
    report = WriteReport()
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, row in enumerate(rows):
            media = next((m for m in ("video", "audio") if row.get(m)), "image")
            missing = [f for f in (media, *fields) if not row.get(f)]
            try:
                if missing:
                    raise InputError(row.get(media, f"row {i}"), f"missing {', '.join(missing)}")
                # refuse missing, corrupt, truncated, oversized or frame-less files now
                {"image": load_image, "video": lambda p: load_video(p, 1), "audio": load_audio}[media](row[media])
            except InputError as e:
                report.skipped += 1
                log(f"skipped: {e}")
                continue
            ext = _shard_extension(media, Path(row[media]).suffix.lower())
            sink.write({"__key__": f"{i:09d}", ext: Path(row[media]).read_bytes(),
                        "json": json.dumps({f: row[f] for f in fields}).encode()})
            report.written += 1
        report.shards = sink.shard
    return report


def _shard_extension(media: str, suffix: str) -> str:
    """The member name a media file gets in a shard (the bytes are probed when read; the name
    only has to say which kind of media they are)."""
    ext = suffix.lstrip(".")
    if media == "image":
        return ext or "png"
    if media == "video":
        if suffix not in VIDEO_EXTENSIONS:
            return "mp4"
        return "video.gif" if ext == "gif" else ext  # a gif as a video, not as an image
    if suffix in FOLDER_AUDIO_EXTENSIONS:
        return ext
    return f"audio.{ext}" if ext else "audio"  # .webm, .mp4, ... or no extension: never a video


def expand_shards(specs: Iterable[str]) -> list[str]:
    """Paths, globs-free brace patterns ("data/x-{000000..000009}.tar") or folders of .tar files."""
    urls = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            urls += sorted(str(x) for x in p.glob("*.tar"))
        else:
            urls += list(braceexpand(spec))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise InputError(missing[0], "no such shard file")
    if not urls:
        raise InputError(", ".join(specs) or "data.shards", "no shards found")
    return urls


# ---- reading ---------------------------------------------------------------------------------
class SkipCounter:
    """A webdataset error handler that counts what it skipped instead of raising."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        return True

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


OPEN_SHARDS = 4  # shards read at once, sample by sample in a seeded random interleaving


def interleaved_shards(order: list[str], rng: random.Random, skipped: SkipCounter) -> Iterator[dict]:
    """The samples of the shards in `order`, OPEN_SHARDS of them read at once and each next sample
    taken from one of the open shards at random. A small source that fills one shard (900 spoken
    questions beside 9 shards of transcripts) is then spread over the epoch rather than arriving
    as one block that a shuffle buffer only blurs at its edges."""
    pending = iter(order)
    open_ = []
    while True:
        while len(open_) < OPEN_SHARDS and (url := next(pending, None)) is not None:
            open_.append(iter(wds.tarfile_samples([{"url": url}], handler=skipped)))
        if not open_:
            return
        i = rng.randrange(len(open_))
        sample = next(open_[i], None)
        if sample is None:
            open_.pop(i)
        else:
            yield sample


def raw_samples(urls: list[str], seed: int, shuffle_buffer: int, skipped: SkipCounter) -> Iterator[dict]:
    """An endless stream of raw samples: epoch e reads the shards in an order, interleaved and
    through a shuffle buffer, all seeded by (seed, e)."""
    for epoch in itertools.count():
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(urls)
        rng.shuffle(order)
        stream = interleaved_shards(order, rng, skipped)
        if shuffle_buffer > 1:
            stream = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(stream)
        count = 0
        for sample in stream:
            count += 1
            yield sample
        if count == 0:  # another epoch would find nothing either: stop instead of spinning forever
            raise InputError(urls[0] if len(urls) == 1 else f"{len(urls)} shards",
                             f"no readable samples ({skipped.count} unreadable)")


def image_bytes(sample: dict) -> tuple[str, bytes]:
    for key, value in sample.items():
        if "." + key.lower() in IMAGE_EXTENSIONS:
            return key, value
    raise InputError(sample.get("__key__", "sample"), "no image in sample")


def decode_image(sample: dict) -> Image.Image:
    ext, data = image_bytes(sample)
    return image_from_bytes(data, f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}.{ext}")


def video_bytes(sample: dict) -> tuple[str, bytes]:
    for key, value in sample.items():
        if key == "video.gif" or ("." + key.lower() in VIDEO_EXTENSIONS and key != "gif"):
            return key, value
    raise InputError(sample.get("__key__", "sample"), "no video in sample")


def decode_video(sample: dict, frames: int) -> VideoClip:
    ext, data = video_bytes(sample)
    return video_from_bytes(data, f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}.{ext}", frames)


def audio_bytes(sample: dict) -> tuple[str, bytes]:
    for key, value in sample.items():
        k = key.lower()
        if k == "audio" or k.startswith("audio.") or "." + k in FOLDER_AUDIO_EXTENSIONS:
            return key, value
    raise InputError(sample.get("__key__", "sample"), "no audio in sample")


def decode_audio(sample: dict) -> torch.Tensor:
    """The sample's recording -> float32 [n] mono at 16 kHz (InputError naming shard:key.ext)."""
    ext, data = audio_bytes(sample)
    return audio_from_bytes(data, f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}.{ext}")


def sample_json(sample: dict) -> dict:
    try:
        return json.loads(sample["json"])
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise InputError(sample.get("__key__", "sample"), f"bad json field ({e})") from None


class ShardBatches(IterableDataset):
    """Batches of decoded examples for one process, in the global order; see the module docstring.

    decode(raw_sample) -> example (raises on a corrupt sample); collate(examples) -> batch dict.
    Each yielded batch also carries "skipped" (corrupt samples since the last batch) and
    "batch_index" (global).
    """

    def __init__(self, urls: list[str], *, batch_size: int, decode: Callable, collate: Callable,
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, group_by_size: int = 0) -> None:
        if batch_size % world_size:
            raise InputError("data.batch_size", f"{batch_size} is not divisible by {world_size} processes")
        self.urls, self.batch_size, self.decode, self.collate = urls, batch_size, decode, collate
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.group_by_size = group_by_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skipped = SkipCounter()
        stream = raw_samples(self.urls, self.seed, self.shuffle_buffer, skipped)
        per_rank = self.batch_size // self.world_size
        for index, raw in enumerate(self._raw_batches(stream)):
            unreadable = skipped.take()  # shard members that failed while reading this batch
            if index < self.start_batch or index % workers != worker:
                continue
            mine = raw[self.rank * per_rank:(self.rank + 1) * per_rank]
            examples, corrupt = [], unreadable if self.rank == 0 else 0
            for sample in mine:
                try:
                    examples.append(self.decode(sample))
                except (InputError, KeyError, TypeError, ValueError):
                    corrupt += 1
            batch = self.collate(examples) if examples else {"examples": 0}
            batch["skipped"] = corrupt
            batch["batch_index"] = index
            yield batch


    def _raw_batches(self, stream: Iterator[dict]) -> Iterator[list[dict]]:
        """Global batches of raw samples. With group_by_size = G, G batches' worth of samples are
        sorted by the size of their bytes (a recording's or clip's length, roughly) and cut into
        batches of similar sizes, which are then shuffled (seeded): padding, the cost of a batch
        of recordings, stays small. The order still depends only on the seed."""
        if not self.group_by_size:
            while True:
                yield list(itertools.islice(stream, self.batch_size))
        rng = random.Random(self.seed)
        while True:
            window = list(itertools.islice(stream, self.batch_size * self.group_by_size))
            window.sort(key=lambda sample: sum(len(v) for v in sample.values() if isinstance(v, bytes)))
            batches = [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            rng.shuffle(batches)
            yield from batches


def batch_loader(dataset: ShardBatches, workers: int) -> DataLoader:
    """Each worker yields whole batches in turn, so the order is the same for any worker count."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=2 if workers else None)


def first_shard_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples of the shards in order, no shuffling (for evaluation)."""
    yield from wds.tarfile_samples([{"url": u} for u in urls], handler=SkipCounter())


def to_tensor_dict(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
