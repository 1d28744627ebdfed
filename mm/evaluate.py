"""Free-text answer accuracy of a model on image-QA or video-QA shards; word error rate.

    mm eval configs/eval/digits.yaml [key=value ...]

An answer counts as correct when the expected answer appears in the generated reply as a whole
word (case and punctuation ignored): "It is a 7." answers "7".
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mm
from mm.errors import InputError
from mm.config import apply_overrides, from_dict, read_yaml
from mm.data import decode_image, expand_shards, first_shard_samples, sample_json, video_bytes


@dataclass
class EvalConfig:
    model: str
    shards: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    batch_size: int = 16
    limit: int = 0  # 0 = every sample
    output: str | None = None  # write per-sample results here (jsonl)


def load_eval_config(path, overrides=()) -> EvalConfig:
    return from_dict(EvalConfig, apply_overrides(read_yaml(path), list(overrides), str(path)), str(path))


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(reply: str, expected: str) -> bool:
    return f" {normalise(expected)} " in f" {normalise(reply)} "


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after normalise(): the
    numerator and denominator of word error rate (Levenshtein distance over words)."""
    ref, hyp = normalise(reference).split(), normalise(hypothesis).split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(pairs: list[tuple[str, str]]) -> float:
    """Corpus WER of (reference, hypothesis) pairs: total errors / total reference words."""
    errors, words = map(sum, zip(*(word_errors(r, h) for r, h in pairs))) if pairs else (0, 0)
    return errors / max(1, words)


def is_video(sample: dict) -> bool:
    try:
        video_bytes(sample)
        return True
    except InputError:
        return False


def evaluate(cfg: EvalConfig, model=None) -> dict:
    model = model or mm.load(cfg.model)
    samples = list(first_shard_samples(expand_shards(cfg.shards)))
    if cfg.limit:
        samples = samples[: cfg.limit]
    results, start = [], time.time()
    for i in range(0, len(samples), cfg.batch_size):
        chunk = samples[i:i + cfg.batch_size]
        fields = [sample_json(s) for s in chunk]
        if is_video(chunk[0]):  # the model decodes and samples the frames itself
            media = {"video": [video_bytes(s)[1] for s in chunk]}
        else:
            media = {"images": [[decode_image(s)] for s in chunk]}
        replies = model.generate([f["question"] for f in fields], max_new_tokens=cfg.max_new_tokens, **media)
        for f, reply in zip(fields, replies):
            results.append({**f, "reply": reply, "correct": is_correct(reply, str(f["answer"]))})
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r) + "\n" for r in results))
    correct = sum(r["correct"] for r in results)
    return {"samples": len(results), "correct": correct, "accuracy": correct / max(1, len(results)),
            "seconds": time.time() - start}
