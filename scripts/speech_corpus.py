"""The corpus of the speech proof: real English sentences spoken by espeak-ng in many voices.

    python scripts/speech_corpus.py                      # data/speech/ (a few minutes on 2 cores)
    python scripts/speech_corpus.py --train-sentences 50 --heldout-sentences 20 \\
        --dialogue-train 20 --dialogue-heldout 10 --out /tmp/speech   # a quick look

Text: the quotes, jokes and questions of the Debian package `fortunes` (scripts/setup.sh
installs it), split into sentences; kept are clean English sentences of 4 to 14 words (ASCII
letters, digits and basic punctuation; no all-caps words, speaker labels, attributions or URLs;
at most one word, names aside, outside the English word list of the Debian package wamerican,
which leaves out the Latin, French, Elvish and misspelling jokes), deduplicated without regard
to case. A seeded shuffle splits them: held-out sentences and
held-out dialogue questions never appear in any training manifest.

Speech: espeak-ng, several English accents and voice variants at 140-200 words per minute;
with --train-readings N each training sentence is spoken N times, each time by another voice
(further readings also by more variants of the training accents). Three held-out voices
(accents and variants used by no training utterance) speak the held-out sentences a second time. Each utterance is 16 kHz mono FLAC, named by a hash of (text, voice,
rate), so a rerun synthesizes only what is missing.

Manifests in OUT (paths relative to OUT):
    asr_train.jsonl             audio, caption (transcript), voice, rate
    asr_heldout.jsonl           held-out sentences, training voices
    asr_heldout_voices.jsonl    the same sentences, held-out voices
    asr_dev.jsonl               other unseen sentences, training voices: for choosing settings
                                (such as decoding weights) without looking at the held-out ones
    dialogue_train.jsonl        audio, question (what is spoken, typed), answer, voice, rate
    dialogue_heldout.jsonl      held-out questions
The answer is the bundled decoder's own greedy reply to the typed question (mm.load("smollm2"),
text only: exactly the frozen decoder's reply), so spoken dialogue is learned as "reply to what
was said as if it had been typed". Replies are cached in OUT/replies.json.
Shards (mm.data.write_shards): OUT/shards/asr (captions, from asr_train) and OUT/shards/dialogue
(qa, from dialogue_train). Figures: OUT/corpus.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORTUNES = Path("/usr/share/games/fortunes")
WORD_LIST = Path("/usr/share/dict/words")  # Debian wamerican: English words with their inflections
SKIP_FILES = {"ascii-art", "translate-me", "perl", "ethnic"}  # pictures, other languages, code, stereotypes
TRAIN_VOICES = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029",
                "en-us+f3", "en+m3", "en-us+f2", "en-gb-x-rp+f1", "en-029+m2"]
HELDOUT_VOICES = ["en-gb-x-gbcwmd", "en-gb-x-gbclan+f4", "en-us-nyc+m5"]  # accents and variants never trained on
# further readings of the training sentences (--train-readings) also draw from these: the training
# accents in other voice variants, none of them a held-out accent or variant
MORE_TRAIN_VOICES = ["en-us+m1", "en+f5", "en-gb-scotland+m4", "en-gb-x-rp+m6", "en-029+f1", "en-us+m7",
                     "en+f2", "en-gb-scotland+f3", "en-us+m8", "en-gb-x-rp+m2"]
RATES = list(range(140, 201, 10))  # words per minute
MIN_WORDS, MAX_WORDS = 4, 14
REPLY_BATCH = 16

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "lt", "jr", "sr", "vs", "etc", "prof", "gen", "col", "capt",
                  "sgt", "no", "mt", "ft", "co", "inc", "ltd"}
_SPEAKER = re.compile(r"^\s*[A-Z][\w .'-]{0,30}:\s")  # "Kirk: ...", "Pee Wee:\t..."
_ATTRIBUTION = re.compile(r"^\s*--")  # "\t\t-- Mark Twain"
_QA_LABEL = re.compile(r"^\s*[QA]:\s+")  # riddles: "Q:\tWhat ...?"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLEAN = re.compile(r"^[A-Z][A-Za-z0-9 ,'\-;]*[A-Za-z0-9'][.!?]$")


# ---- text ------------------------------------------------------------------------------------------
def fortune_entries(path: Path):
    """The entries of one fortune file (separated by lines holding only '%')."""
    text = path.read_bytes().decode("latin-1")
    text = re.sub(r".\x08", "", text)  # overstriking (bold/underline as char + backspace)
    yield from re.split(r"^%\s*$", text, flags=re.M)


def entry_sentences(entry: str):
    lines = [_QA_LABEL.sub("", line) for line in entry.splitlines()]
    lines = [line for line in lines if not _SPEAKER.match(line) and not _ATTRIBUTION.match(line)]
    text = " ".join(lines).replace('"', " ").replace("``", " ").replace("''", " ")
    pending = ""
    for piece in _SENTENCE_END.split(" ".join(text.split())):
        pending = f"{pending} {piece}".strip()
        if not _ends_in_abbreviation(pending):  # "Mr." or "A." does not end a sentence
            yield pending
            pending = ""
    if pending:
        yield pending


def _ends_in_abbreviation(text: str) -> bool:
    last = text.split()[-1] if text.split() else ""
    word = last[:-1].lower()
    return last.endswith(".") and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def is_clean(sentence: str, words: set[str]) -> bool:
    """4-14 words, ASCII letters/digits/basic punctuation, one sentence, no shouting, English."""
    if not _CLEAN.match(sentence) or "--" in sentence or "." in sentence[:-1]:
        return False
    if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
        return False
    # shouting and acronyms: espeak spells some and reads others, the text does not say which
    if any(len(w) >= 2 and w.isupper() for w in re.findall(r"[A-Za-z]+", sentence)):
        return False
    return unknown_words(sentence, words) <= 1


def unknown_words(sentence: str, words: set[str]) -> int:
    """Words outside the word list; capitalised words after the first are names and count as
    known; a chain of more than two hyphens counts as many."""
    unknown = 0
    for i, token in enumerate(re.findall(r"[A-Za-z][A-Za-z'-]*", sentence)):
        if token.count("-") > 2:
            return MAX_WORDS
        if i > 0 and token[0].isupper():
            continue
        for part in token.strip("'-").lower().split("-"):
            unknown += bool(part) and part not in words and part.removesuffix("'s") not in words
    return unknown


def english_words(path: Path = WORD_LIST) -> set[str]:
    return {w.strip().lower() for w in path.read_text(encoding="utf-8", errors="replace").splitlines()}


def corpus_sentences(folder: Path = FORTUNES, words: set[str] | None = None) -> list[str]:
    """Clean sentences of all fortune files, deduplicated case-insensitively, in a fixed order."""
    words = english_words() if words is None else words
    seen: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix or path.name in SKIP_FILES or not path.is_file():
            continue
        for entry in fortune_entries(path):
            for sentence in entry_sentences(entry):
                if is_clean(sentence, words):
                    seen.setdefault(sentence.lower(), sentence)
    return sorted(seen.values())


def split(sentences: list[str], args) -> dict[str, list[str]]:
    """Seeded split; held-out sentences and questions are disjoint from the training ones."""
    order = list(sentences)
    random.Random(args.seed).shuffle(order)
    questions = [s for s in order if s.endswith("?")]
    dialogue_heldout = questions[: args.dialogue_heldout]
    taken = set(dialogue_heldout)
    rest = [s for s in order if s not in taken]
    heldout, pool = rest[: args.heldout_sentences], rest[args.heldout_sentences:]
    parts = {"asr_train": pool[: args.train_sentences], "asr_heldout": heldout,
             "dialogue_train": [s for s in pool if s.endswith("?")][: args.dialogue_train],
             "dialogue_heldout": dialogue_heldout}
    spoken = set(parts["dialogue_train"])  # dev: from the end of the pool, away from any training text
    parts["asr_dev"] = [s for s in reversed(pool[args.train_sentences:]) if s not in spoken][: args.dev_sentences]
    wanted = {"asr_train": args.train_sentences, "asr_heldout": args.heldout_sentences,
              "dialogue_train": args.dialogue_train, "dialogue_heldout": args.dialogue_heldout,
              "asr_dev": args.dev_sentences}
    for name, n in wanted.items():
        if len(parts[name]) < n:
            sys.exit(f"speech_corpus: error: only {len(parts[name])} sentences for {name} (asked for {n}; "
                     f"the corpus has {len(sentences)} sentences, {len(questions)} questions)")
    trained = set(parts["asr_train"]) | set(parts["dialogue_train"])
    assert not trained & (set(heldout) | set(dialogue_heldout) | set(parts["asr_dev"]))
    assert not set(parts["asr_dev"]) & (set(heldout) | set(dialogue_heldout))
    return parts


# ---- speech ----------------------------------------------------------------------------------------
def utterance_path(out: Path, text: str, voice: str, rate: int) -> Path:
    digest = hashlib.sha1(f"{voice}|{rate}|{text}".encode()).hexdigest()[:16]
    return out / "audio" / digest[:2] / f"{digest}.flac"


def assign_voices(texts: list[str], voices: list[str], seed: str) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [(t, rng.choice(voices), rng.choice(RATES)) for t in texts]


def further_readings(texts: list[str], first: list[tuple[str, str, int]], readings: int,
                     seed: str) -> list[tuple[str, str, int]]:
    """Readings 2..N of each text, each by a voice (training voices and MORE_TRAIN_VOICES) not yet
    reading that text, at a random rate."""
    rng = random.Random(seed)
    voices = TRAIN_VOICES + MORE_TRAIN_VOICES
    used = {t: {v} for t, v, _ in first}
    plan = []
    for _ in range(readings - 1):
        for t in texts:
            voice = rng.choice([v for v in voices if v not in used[t]])
            used[t].add(voice)
            plan.append((t, voice, rng.choice(RATES)))
    return plan


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def synthesize(job: tuple[str, str, int, str]) -> tuple[str, float, bool]:
    """espeak-ng -> 16 kHz mono FLAC (skipped when the file exists): (path, seconds, made now)."""
    import soundfile as sf

    from speech.audio import SAMPLE_RATE, load_audio

    text, voice, rate, path = job
    out = Path(path)
    if out.is_file():
        return path, sf.info(out).duration, False
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(wav), "--stdin"],
                              input=text, text=True, capture_output=True)
        if proc.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r}: {proc.stderr.strip()}")
        wave = load_audio(wav)
        partial = Path(tmp) / "speech.flac"
        sf.write(partial, wave.numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        shutil.move(partial, out)  # whole files only: an interrupted run leaves no partial FLAC
    return path, len(wave) / SAMPLE_RATE, True


def check_tools(voices: list[str]) -> None:
    if shutil.which("espeak-ng") is None or not FORTUNES.is_dir() or not WORD_LIST.is_file():
        sys.exit("speech_corpus: error: needs espeak-ng and the fortunes and wamerican packages (run "
                 "scripts/setup.sh, or apt-get install espeak-ng fortunes wamerican)")
    for voice in voices:
        proc = subprocess.run(["espeak-ng", "-v", voice, "-q", "test"], capture_output=True, text=True)
        if proc.returncode != 0 or proc.stderr.strip():
            sys.exit(f"speech_corpus: error: espeak-ng has no voice {voice!r} ({proc.stderr.strip()})")


# ---- replies ---------------------------------------------------------------------------------------
def decoder_replies(questions: list[str], max_new_tokens: int, cache_path: Path, load_model) -> tuple[dict, int]:
    """The bundled decoder's greedy reply to each typed question; cached per max_new_tokens."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    replies = cache.setdefault(str(max_new_tokens), {})
    todo = [q for q in dict.fromkeys(questions) if q not in replies]
    if todo:
        from tqdm import tqdm

        model = load_model()
        for i in tqdm(range(0, len(todo), REPLY_BATCH), desc="replies", unit="batch"):
            batch = todo[i:i + REPLY_BATCH]
            replies.update(zip(batch, model.generate(batch, max_new_tokens=max_new_tokens)))
            write_atomically(cache_path, json.dumps(cache, indent=1, ensure_ascii=False))
    return replies, len(todo)


# ---- output ----------------------------------------------------------------------------------------
def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(path: Path, rows: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_shards(manifest: Path, out_dir: Path, kind: str) -> dict:
    """mm.data.write_shards from a manifest; skipped when the shards were made from this manifest."""
    from mm.data import read_manifest, write_shards

    stamp = out_dir / ".manifest.sha256"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if stamp.is_file() and json.loads(stamp.read_text())["sha256"] == digest:
        return {**json.loads(stamp.read_text())["report"], "made_now": False}
    if out_dir.exists():
        shutil.rmtree(out_dir)  # no stale shards of a larger earlier run
    report = write_shards(read_manifest(manifest), out_dir, kind, log=lambda m: print(m, file=sys.stderr))
    figures = {"written": report.written, "skipped": report.skipped, "shards": report.shards}
    stamp.write_text(json.dumps({"sha256": digest, "report": figures}))
    return {**figures, "made_now": True}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "mean": round(statistics.fmean(values), 2),
            "max": round(max(values), 2), "min": round(min(values), 2)} if values else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "data" / "speech")
    p.add_argument("--train-sentences", type=int, default=3000)
    p.add_argument("--heldout-sentences", type=int, default=200)
    p.add_argument("--dev-sentences", type=int, default=100)
    p.add_argument("--train-readings", type=int, default=1,
                   help="times each training sentence is spoken, each time by another voice")
    p.add_argument("--dialogue-train", type=int, default=600)
    p.add_argument("--dialogue-heldout", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=24, help="length of the decoder's replies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="synthesis processes")
    args = p.parse_args(argv)
    start = time.time()
    out = args.out
    if not 1 <= args.train_readings <= len(TRAIN_VOICES + MORE_TRAIN_VOICES):
        sys.exit(f"speech_corpus: error: --train-readings {args.train_readings}: must be 1 to "
                 f"{len(TRAIN_VOICES + MORE_TRAIN_VOICES)} (the training voices)")
    check_tools(TRAIN_VOICES + MORE_TRAIN_VOICES + HELDOUT_VOICES)
    out.mkdir(parents=True, exist_ok=True)

    sentences = corpus_sentences()
    parts = split(sentences, args)
    plans = {
        "asr_train": assign_voices(parts["asr_train"], TRAIN_VOICES, f"{args.seed}/asr_train"),
        "asr_heldout": assign_voices(parts["asr_heldout"], TRAIN_VOICES, f"{args.seed}/asr_heldout"),
        "asr_heldout_voices": assign_voices(parts["asr_heldout"], HELDOUT_VOICES, f"{args.seed}/heldout_voices"),
        "dialogue_train": assign_voices(parts["dialogue_train"], TRAIN_VOICES, f"{args.seed}/dialogue_train"),
        "dialogue_heldout": assign_voices(parts["dialogue_heldout"], TRAIN_VOICES, f"{args.seed}/dialogue_heldout"),
        "asr_dev": assign_voices(parts["asr_dev"], TRAIN_VOICES, f"{args.seed}/asr_dev"),
    }
    plans["asr_train"] += further_readings(parts["asr_train"], plans["asr_train"], args.train_readings,
                                           f"{args.seed}/asr_train/readings")

    # speech
    t0 = time.time()
    jobs = {str(utterance_path(out, t, v, r)): (t, v, r, str(utterance_path(out, t, v, r)))
            for plan in plans.values() for t, v, r in plan}
    seconds, made = {}, 0
    from tqdm import tqdm

    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=_worker_init) as pool:
        for path, secs, new in tqdm(pool.imap_unordered(synthesize, jobs.values(), chunksize=8), total=len(jobs),
                                    desc="speech", unit="utt"):
            seconds[path] = secs
            made += new
    stale = [p for p in (out / "audio").rglob("*.flac") if str(p) not in jobs]
    for path in stale:  # OUT/audio holds what the manifests name, nothing of earlier runs
        path.unlink()
    synthesis_s = time.time() - t0

    # replies
    t0 = time.time()
    model = None

    def load_model():
        nonlocal model
        import mm

        model = model or mm.load("smollm2")
        return model

    questions = parts["dialogue_train"] + parts["dialogue_heldout"]
    replies, replied = decoder_replies(questions, args.max_new_tokens, out / "replies.json", load_model)
    reply_s = time.time() - t0

    # manifests and shards
    stats = {}
    for name, plan in plans.items():
        rows = []
        for text, voice, rate in plan:
            path = utterance_path(out, text, voice, rate)
            row = {"audio": str(path.relative_to(out))}
            dialogue = name.startswith("dialogue")
            row.update({"question": text, "answer": replies[text]} if dialogue else {"caption": text})
            rows.append({**row, "voice": voice, "rate": rate})
        write_manifest(out / f"{name}.jsonl", rows)
        durations = [seconds[str(utterance_path(out, t, v, r))] for t, v, r in plan]
        stats[name] = {"utterances": len(rows), "hours": round(sum(durations) / 3600, 3), "seconds": summary(durations)}
    t0 = time.time()
    shards = {"asr": build_shards(out / "asr_train.jsonl", out / "shards" / "asr", "captions"),
              "dialogue": build_shards(out / "dialogue_train.jsonl", out / "shards" / "dialogue", "qa")}
    shard_s = time.time() - t0

    # figures
    from transformers import AutoTokenizer

    from mm.decoders import bundled_decoder_dir

    tokenizer = model.tokenizer if model is not None else AutoTokenizer.from_pretrained(bundled_decoder_dir())
    tokens = lambda texts: [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]  # noqa: E731
    all_seconds = list(seconds.values())
    texts = [t for plan in plans.values() for t, _, _ in plan]
    figures = {
        "source": f"Debian fortunes ({FORTUNES}), {len(sentences)} clean sentences, "
                  f"{sum(s.endswith('?') for s in sentences)} of them questions",
        "seed": args.seed,
        "manifests": stats,
        "utterances": len(jobs),
        "audio_hours": round(sum(all_seconds) / 3600, 3),
        "utterance_seconds": summary(all_seconds),
        "transcript_words": summary([len(t.split()) for t in texts]),
        "transcript_tokens": summary(tokens(texts)),
        "reply_tokens": summary(tokens([replies[q] for q in questions])),
        "max_new_tokens": args.max_new_tokens,
        "voices": {"train": TRAIN_VOICES, "train_further_readings": MORE_TRAIN_VOICES,
                   "heldout": HELDOUT_VOICES}, "train_readings": args.train_readings, "rates_wpm": RATES,
        "shards": shards,
        "time_s": {"synthesis": round(synthesis_s, 1), "synthesized_now": made, "removed_stale": len(stale),
                   "replies": round(reply_s, 1), "replied_now": replied,
                   "shards": round(shard_s, 1), "total": round(time.time() - start, 1)},
        "workers": args.workers,
    }
    write_atomically(out / "corpus.json", json.dumps(figures, indent=1) + "\n")
    for name, s in stats.items():
        print(f"{name:20s} {s['utterances']:5d} utterances  {s['hours']:.3f} h  "
              f"median {s['seconds'].get('median')} s  max {s['seconds'].get('max')} s")
    print(f"total {len(jobs)} utterances, {figures['audio_hours']:.3f} h of audio; "
          f"transcripts {figures['transcript_tokens']} tokens")
    print(f"voices: train {', '.join(TRAIN_VOICES)}"
          + (f"; further readings also {', '.join(MORE_TRAIN_VOICES)}" if args.train_readings > 1 else "")
          + f"; held out {', '.join(HELDOUT_VOICES)}")
    print(f"shards: {shards}")
    print(f"time: synthesis {synthesis_s:.0f} s ({made} new), replies {reply_s:.0f} s ({replied} new), "
          f"shards {shard_s:.0f} s, total {time.time() - start:.0f} s -> {out / 'corpus.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
