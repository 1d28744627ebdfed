"""The video proof: clips made of real handwritten digit scans, where the answer depends on the
order of the frames, trained through real video files.

    python scripts/video_digits.py data    # clips -> video files, manifests, shards (data/video_digits/)
    python scripts/video_digits.py train   # video_pretrain -> video_sft (configs/stages/digits_video_*)
    python scripts/video_digits.py eval    # held-out accuracy, in order and with frames shuffled
    python scripts/video_digits.py all

Needs the image model of the digits proof (`python scripts/digits.py all`): the video stages
start from runs/digits/image_sft/final and train only the temporal aggregator, the video
projector and the video cross-attention blocks.

Two kinds of 16-frame clips, 16 x 16 px:
  order   scan A for 8 frames, then scan B (another digit) for 8: "Which digit comes first?"
          / "... last?". Every frame set is the same whichever way round: only time tells.
  motion  one scan sliding 12 px to the left or to the right: "Which way does the digit move?"
          The set of positions is the same both ways: only time tells.
Clips of training scans (0..1499) are mp4; held-out clips (scans 1500..1796, never seen by any
stage) cycle through mp4, webm, avi, mkv and gif. With the frames of each held-out clip
shuffled, a model that uses time must fall to chance (50%).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_assets import digit_image  # noqa: E402

DATA = ROOT / "data" / "video_digits"
IMAGE_MODEL = ROOT / "runs" / "digits" / "image_sft" / "final"
RUN = ROOT / "runs" / "video_digits"
HELD_OUT_FROM = 1500
FRAMES, SIZE, TRAVEL = 16, 16, 12
STAGES = ["video_pretrain", "video_sft"]
HELD_OUT_CONTAINERS = [".mp4", ".webm", ".avi", ".mkv", ".gif"]

ORDER_CAPTIONS = ["The digit {a}, then the digit {b}.", "First a {a}, then a {b}.", "A handwritten {a} followed by a {b}."]
MOTION_CAPTIONS = ["A handwritten {d} moving to the {way}.", "The digit {d} slides to the {way}."]
FIRST_QUESTIONS = ["Which digit comes first?", "What digit is shown first?", "Which number appears first?"]
LAST_QUESTIONS = ["Which digit comes last?", "What digit is shown at the end?", "Which number appears last?"]
MOTION_QUESTIONS = ["Which way does the digit move?", "In which direction is the digit moving?",
                    "Does the digit move left or right?"]
DIGIT_ANSWERS = ["{d}", "It is a {d}.", "The digit {d}."]
MOTION_ANSWERS = ["{way}", "It moves to the {way}.", "To the {way}."]


def scan(pixels: np.ndarray) -> torch.Tensor:
    """An 8x8 scan -> uint8 [3, 16, 16], dark ink on white paper."""
    return torch.from_numpy(np.asarray(digit_image(pixels, size=SIZE))).permute(2, 0, 1).contiguous()


def order_clip(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    half = FRAMES // 2
    return torch.stack([a] * half + [b] * (FRAMES - half))


def motion_clip(digit: torch.Tensor, way: str) -> torch.Tensor:
    """The scan on a white canvas, shifted from -TRAVEL/2 to +TRAVEL/2 px (or back)."""
    shifts = np.linspace(-TRAVEL / 2, TRAVEL / 2, FRAMES).round().astype(int)
    if way == "left":
        shifts = shifts[::-1]
    frames = []
    for dx in shifts:
        canvas = torch.full_like(digit, 255)
        if dx >= 0:
            canvas[:, :, dx:] = digit[:, :, : SIZE - dx]
        else:
            canvas[:, :, :dx] = digit[:, :, -dx:]
        frames.append(canvas)
    return torch.stack(frames)


def make_clips(indices: list[int], images, labels, n: int, rng: random.Random, containers: list[str],
               folder: Path) -> list[dict]:
    """n clips (half order, half motion) of the given scans, written as video files; manifest rows."""
    from video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        ext = containers[k % len(containers)]
        path = folder / f"{k:05d}{ext}"
        if k % 2 == 0:
            i = rng.choice(indices)
            j = rng.choice([x for x in rng.sample(indices, 20) if labels[x] != labels[i]])
            a, b = int(labels[i]), int(labels[j])
            write_video(path, order_clip(scan(images[i]), scan(images[j])))
            first = rng.random() < 0.5
            rows.append({"video": str(path), "kind": "order", "caption": rng.choice(ORDER_CAPTIONS).format(a=a, b=b),
                         "question": rng.choice(FIRST_QUESTIONS if first else LAST_QUESTIONS),
                         "answer": str(a if first else b),
                         "answer_text": rng.choice(DIGIT_ANSWERS).format(d=a if first else b)})
        else:
            i, way = rng.choice(indices), rng.choice(["left", "right"])
            d = int(labels[i])
            write_video(path, motion_clip(scan(images[i]), way))
            rows.append({"video": str(path), "kind": "motion",
                         "caption": rng.choice(MOTION_CAPTIONS).format(d=d, way=way),
                         "question": rng.choice(MOTION_QUESTIONS), "answer": way,
                         "answer_text": rng.choice(MOTION_ANSWERS).format(way=way)})
    return rows


def make_data(n_train: int = 3000, n_held_out: int = 300) -> None:
    from sklearn.datasets import load_digits

    from mm.data import write_shards

    digits = load_digits()
    rng = random.Random(0)
    train_ix = list(range(HELD_OUT_FROM))
    held_ix = list(range(HELD_OUT_FROM, len(digits.data)))
    start = time.time()
    train = make_clips(train_ix, digits.data, digits.target, n_train, rng, [".mp4"], DATA / "train")
    held = make_clips(held_ix, digits.data, digits.target, n_held_out, rng, HELD_OUT_CONTAINERS, DATA / "heldout")
    print(f"{len(train) + len(held)} clips written in {time.time() - start:.0f} s")
    sft_rows = [{**r, "answer": r["answer_text"]} for r in train]
    for name, rows, kind in [("captions", train, "captions"), ("qa", sft_rows, "qa"), ("heldout_qa", held, "qa")]:
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = write_shards(rows, DATA / name, kind, per_shard=1000, log=print)
        print(f"{name}: {report.written} clips in {report.shards} shards, {report.skipped} skipped")


def train(extra: list[str] = ()) -> dict:
    from digits import train as train_stages

    if not (IMAGE_MODEL / "config.yaml").is_file():
        sys.exit(f"{IMAGE_MODEL}: no image model; run `python scripts/digits.py all` first")
    return train_stages(RUN, extra=extra, stages=STAGES, init=IMAGE_MODEL)


def held_out_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "heldout_qa.jsonl").read_text().splitlines()]


def evaluate(model_dir: Path, shuffle: bool, batch_size: int = 16) -> dict:
    """Held-out accuracy by clip kind; shuffle=True permutes each clip's frames (seeded)."""
    import mm
    from mm.evaluate import is_correct
    from video import load_video

    model = mm.load(model_dir)
    rows = held_out_rows()
    rng = torch.Generator().manual_seed(0)
    frames = model.config.video.frames
    results, start = [], time.time()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        videos = []
        for r in chunk:
            clip = load_video(r["video"], frames).frames
            videos.append(clip[torch.randperm(len(clip), generator=rng)] if shuffle else clip)
        replies = model.generate([r["question"] for r in chunk], video=videos, max_new_tokens=12)
        for r, reply in zip(chunk, replies):
            results.append({"kind": r["kind"], "container": Path(r["video"]).suffix, "question": r["question"],
                            "answer": r["answer"], "reply": reply, "correct": is_correct(reply, r["answer"])})
    out = {"samples": len(results), "accuracy": _acc(results), "seconds": round(time.time() - start, 1)}
    for key in ("kind", "container"):
        for value in sorted({r[key] for r in results}):
            out[f"{key}={value}"] = _acc([r for r in results if r[key] == value])
    name = "heldout_shuffled" if shuffle else "heldout"
    (RUN / f"{name}_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return out


def _acc(results: list[dict]) -> float:
    return round(sum(r["correct"] for r in results) / max(1, len(results)), 4)


def training_stats() -> dict:
    from mm.train import run_summary

    return {stage: run_summary(RUN / stage) for stage in STAGES}


def report() -> dict:
    final = RUN / "video_sft" / "final"
    from digits import write_results

    return write_results("video_digits", {"heldout": evaluate(final, shuffle=False),
                                          "heldout_frames_shuffled": evaluate(final, shuffle=True),
                                          "training": training_stats()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["data", "train", "eval", "all"])
    parser.add_argument("overrides", nargs="*", help="key=value for every stage")
    args = parser.parse_args()
    if args.step in ("data", "all"):
        make_data()
    if args.step in ("train", "all"):
        print(json.dumps({"stage_seconds": train(extra=args.overrides)}))
    if args.step in ("eval", "all"):
        print(json.dumps(report(), indent=2))


if __name__ == "__main__":
    main()
