"""The digits proof: real handwritten digit scans through every image stage, then held-out accuracy.

    python scripts/digits.py data      # PNGs, manifests and shards under data/digits/
    python scripts/digits.py train     # vision_clip -> image_pretrain -> image_sft (configs/stages/digits_*)
    python scripts/digits.py eval      # free-text answers on held-out scans -> docs/results/digits.json
    python scripts/digits.py all
    python scripts/digits.py demo      # the main job: a short schedule (< 10 min on 2 cores), then answers

Data: scikit-learn's bundled digits (1797 real 8x8 scans, 16 grey levels). Scans 0..1499 are
for training, 1500..1796 are held out and never seen by any stage. Questions and answers are
asked in varied words; some held-out questions use wordings that no training sample uses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_assets import digit_image  # noqa: E402

DATA = ROOT / "data" / "digits"
HELD_OUT_FROM = 1500
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CAPTIONS = [
    "A handwritten digit {w}.", "The number {d}, written by hand.", "A scan of a handwritten {d}.",
    "Handwritten {w} ({d}).", "A small grey scan showing the digit {d}.", "The digit {d}.",
]
QUESTIONS = [
    "What digit is this?", "Which number is written here?", "What number do you see?",
    "Can you read this digit?", "Which digit is shown in the image?", "What is the handwritten number?",
    "Tell me the digit in this picture.", "Read the number in the image.",
]
HELD_OUT_QUESTIONS = QUESTIONS + ["Identify the digit.", "What numeral is written in this scan?"]
ANSWERS = ["It is a {d}.", "{d}", "The digit is {d}.", "That is the number {d}.", "I see a {d}."]


def make_data() -> None:
    from sklearn.datasets import load_digits

    from mm.data import write_shards

    digits = load_digits()
    images = DATA / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    captions, qa, held_out = [], [], []
    for i, (pixels, label) in enumerate(zip(digits.data, digits.target)):
        path = images / f"{i:04d}.png"
        digit_image(pixels, size=16).save(path)
        d, w = int(label), WORDS[int(label)]
        if i < HELD_OUT_FROM:
            captions.append({"image": str(path), "caption": rng.choice(CAPTIONS).format(d=d, w=w)})
            for _ in range(2):
                qa.append({"image": str(path), "question": rng.choice(QUESTIONS),
                           "answer": rng.choice(ANSWERS).format(d=d)})
        else:
            held_out.append({"image": str(path), "question": rng.choice(HELD_OUT_QUESTIONS), "answer": str(d)})
    for name, rows in [("captions", captions), ("qa", qa), ("heldout_qa", held_out)]:
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        kind = "captions" if name == "captions" else "qa"
        report = write_shards(rows, DATA / name, kind, per_shard=500, log=print)
        print(f"{name}: {report.written} samples in {report.shards} shards, {report.skipped} skipped")


STAGES = ["vision_clip", "image_pretrain", "image_sft"]


def train(run: Path, steps: dict[str, int] | None = None, extra: list[str] = (), stages: list[str] = STAGES,
          init: Path | None = None, prefix: str = "digits") -> dict:
    """Run configs/stages/<prefix>_<stage>.yaml in order into run/<stage>, each initialised from
    the one before (the first from `init`, if given); returns each stage's wall seconds."""
    times, previous = {}, init
    for stage in stages:
        overrides = [f"output={run / stage}", *extra]
        if previous:
            overrides.append(f"init={previous}")
        if steps:
            overrides.append(f"optim.steps={steps[stage]}")
        start = time.time()
        cmd = [sys.executable, "-m", "mm", "train", str(ROOT / "configs/stages" / f"{prefix}_{stage}.yaml"), *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
        times[stage] = round(time.time() - start, 1)
        previous = run / stage / "final"
    return times


def evaluate(model: Path, limit: int = 0) -> dict:
    from mm.evaluate import evaluate as run_eval, load_eval_config

    cfg = load_eval_config(ROOT / "configs/eval/digits.yaml", [f"model={model}", f"limit={limit}",
                                                                f"output={model.parent.parent / 'heldout_answers.jsonl'}"])
    return run_eval(cfg)


def training_stats(run: Path) -> dict:
    """Per stage, from its metrics.jsonl: steps, wall time, median step time, peak memory, last loss."""
    from mm.train import run_summary

    return {stage: run_summary(run / stage) for stage in STAGES}


def report(run: Path) -> dict:
    """Held-out accuracy and training figures of a run, written to docs/results/digits.json."""
    return write_results("digits", {"heldout": evaluate(run / "image_sft" / "final"), "training": training_stats(run)})


def write_results(name: str, result: dict) -> dict:
    """A proof's figures, with the machine they were measured on, -> docs/results/<name>.json."""
    import torch

    result = {**result, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    out = ROOT / "docs" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def demo() -> None:
    """The main job: a short schedule of all three stages (progress shown), then questions about
    held-out scans."""
    start = time.time()
    if not (DATA / "heldout_qa").is_dir():
        make_data()
    run = ROOT / "runs" / "digits_demo"
    times = train(run, DEMO_STEPS)
    final = run / "image_sft" / "final"
    print(f"trained in {time.time() - start:.0f} s: {times}")
    for image in sorted((ROOT / "assets").glob("digit_*.png")):
        cmd = [sys.executable, "-m", "mm", "ask", "--model", str(final), "--image", str(image), "What digit is this?"]
        answer = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()
        print(f"{image.relative_to(ROOT)}: What digit is this? -> {answer}")
    result = evaluate(final, limit=100)
    print(f"held-out scans: {result['correct']}/{result['samples']} answered correctly "
          f"({100 * result['accuracy']:.1f}%); total {time.time() - start:.0f} s")


DEMO_STEPS = {"vision_clip": 400, "image_pretrain": 100, "image_sft": 120}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["data", "train", "eval", "all", "demo"])
    parser.add_argument("overrides", nargs="*", help="key=value for every stage")
    args = parser.parse_args()
    run = ROOT / "runs" / "digits"
    if args.step == "demo":
        return demo()
    if args.step in ("data", "all"):
        make_data()
    if args.step in ("train", "all"):
        print(json.dumps({"stage_seconds": train(run, extra=args.overrides)}))
    if args.step in ("eval", "all"):
        print(json.dumps(report(run), indent=2))


if __name__ == "__main__":
    main()
