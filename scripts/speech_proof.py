"""The speech proof: real synthesized speech (espeak-ng) through speech_ssl, then speech_ctc ->
speech_ctc_masked (the Conformer's character CTC, the second stage on SpecAugment-masked
recordings) -> speech_sft (the adapter, fitted once to the final Conformer), with the bundled
SmolLM2-135M-Instruct frozen, then word error rate and spoken-dialogue agreement.

    python scripts/speech_proof.py data    # the corpus (scripts/speech_corpus.py) -> data/speech/
    python scripts/speech_proof.py train   # the stages (configs/stages/espeak_speech_*.yaml)
    python scripts/speech_proof.py eval    # held-out figures -> docs/results/speech.json
    python scripts/speech_proof.py eval-conformer   # before speech_sft: the figures that only the
                                           # Conformer decides -> docs/results/speech_conformer.json
    python scripts/speech_proof.py eval-conformer --model M --results NAME   # another Conformer's
                                           # figures -> docs/results/NAME.json
    python scripts/speech_proof.py eval-dialogue   # only the dialogue figures again, in place
    python scripts/speech_proof.py eval speech.transcriber.word_bonus=1   # eval*: with changes to
                                           # the model's recorded config (how it decodes)
    python scripts/speech_proof.py dev [W ...]   # dev WER of the decoder transcription per CTC weight
    python scripts/speech_proof.py dev-lm [A,B ...]   # dev WER of the character search per LM weight, word bonus
    python scripts/speech_proof.py dev-lm "beam=32;unknown_word=15" ...   # or per any transcriber setting
    python scripts/speech_proof.py heads --model runs/speech/speech_ctc/final   # greedy character
                                           # head WER on 200 training sentences, dev, held-out, held-out voices
    python scripts/speech_proof.py fit-intonation   # the counts behind speech/intonation.py's RISE_LOG_ODDS
    python scripts/speech_proof.py fit-closing   # the weights of the closing "?": decoder, voice, prior
    python scripts/speech_proof.py punctuation-oracle   # dialogue with every word read right: what
                                           # casing and punctuation alone cost the agreement
    python scripts/speech_proof.py all

Held-out figures:
  wer                  sentences never in training, spoken by the training voices (model.transcribe
                       as configured: the character head searched with the decoder as language model)
  wer_heldout_voices   the same sentences, spoken by voices never used in training
  *_decoder            the same, transcribed by the decoder prompted to repeat, with the token head's
                       CTC (speech.adapter.ctc_weight)
  *_decoder_alone      the same, transcribed by the decoder alone (ctc_weight 0)
  *_ctc_head           the same, read by the Conformer's character CTC head alone (greedy, no
                       language model): what the encoder hears
  *_token_head         the same, read by the speech adapter's token head alone (greedy, no
                       decoder): the token runs the decoder is given, each as its likeliest token
  dialogue_agreement   held-out spoken questions whose reply (model.generate("", audio=...), as
                       speech.dialogue says: to the transcript, or to the speech's embeddings)
                       equals, token for token, the bare decoder's greedy reply to the typed
                       question (the training target of spoken dialogue is that reply)
  dialogue_transcripts_exact   questions whose transcript is the typed question, to the letter
                       (capitals and punctuation included)
  dialogue_agreement_embeddings   the agreement of replies to the speech's embeddings
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

DATA = ROOT / "data" / "speech"
RUN = ROOT / "runs" / "speech"
STAGES = ["speech_ssl", "speech_ctc", "speech_ctc_masked", "speech_sft"]
CONFORMER_STAGES = STAGES[:3]  # the transcripts (model.transcribe, the dialogue's) are theirs alone
FINAL = RUN / STAGES[-1] / "final"


def rows(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audio_path(row: dict) -> str:
    path = Path(row["audio"])
    return str(path if path.is_absolute() else DATA / path)


def transcripts(model, items: list[dict], batch_size: int = 16, ctc_weight: float | None = None,
                method: str | None = None) -> list[dict]:
    from mm.evaluate import word_errors

    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        said = model.transcribe([audio_path(r) for r in chunk], language="English", ctc_weight=ctc_weight,
                                method=method)
        for r, hyp in zip(chunk, said):
            errors, words = word_errors(r["caption"], hyp)
            out.append({"audio": r["audio"], "voice": r.get("voice"), "reference": r["caption"], "hypothesis": hyp,
                        "errors": errors, "words": words})
    return out


def replies(model, items: list[dict], max_new_tokens: int, batch_size: int = 16) -> list[dict]:
    """The reply to each spoken question, as model.generate("", audio=...) gives it, with what was
    heard (model.respond)."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        for r, (heard, reply) in zip(chunk, model.respond([audio_path(r) for r in chunk],
                                                          max_new_tokens=max_new_tokens)):
            out.append({"audio": r["audio"], "question": r["question"], "heard": heard, "expected": r["answer"],
                        "reply": reply, "same": reply.strip() == r["answer"].strip()})
    return out


def dialogue(model, max_new_tokens: int, model_dir: Path = FINAL, adapter: bool = True) -> dict:
    """Spoken-dialogue figures of held-out questions, as configured and (with `adapter`) by the
    speech's embeddings."""
    import mm

    results = replies(model, rows("dialogue_heldout"), max_new_tokens)
    (RUN / "dialogue_heldout_replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    figures = {"dialogue_method": model.dialogue_method(),
               "dialogue_agreement": round(sum(r["same"] for r in results) / max(1, len(results)), 4),
               "dialogue_questions": len(results)}
    if figures["dialogue_method"] == "transcript":
        figures["dialogue_transcripts_exact"] = round(
            sum(r["heard"] == r["question"] for r in results) / max(1, len(results)), 4)
    if figures["dialogue_method"] == "transcript" and adapter:
        embedded = mm.load(model_dir, overrides=["speech.dialogue=embeddings"])
        said = [reply for i in range(0, len(results), 16) for reply in embedded.generate(
            [""] * len(results[i:i + 16]), audio=[audio_path(r) for r in results[i:i + 16]], max_new_tokens=max_new_tokens)]
        figures["dialogue_agreement_embeddings"] = round(
            sum(reply.strip() == r["expected"].strip() for r, reply in zip(results, said)) / max(1, len(results)), 4)
    return figures


def ctc_transcripts(model, items: list[dict], batch_size: int = 16) -> list[dict] | None:
    """Best-path transcripts of the Conformer's character CTC head alone (no language model):
    what the encoder hears. None when no stage trained the head."""
    from mm.evaluate import word_errors
    from mm.stages import CTCObjective
    from speech import AudioFeatures

    if not model.encoders["audio"].has_ctc_head():
        return None
    objective = CTCObjective(model.encoders["audio"]).eval()
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = AudioFeatures.pad([model.audio_processor.features(audio_path(r)) for r in chunk])
        for r, hyp in zip(chunk, objective.greedy(batch.features, batch.lengths)):
            errors, words = word_errors(r["caption"], hyp)
            out.append({"reference": r["caption"], "hypothesis": hyp, "errors": errors, "words": words})
    return out


def token_transcripts(model, items: list[dict], batch_size: int = 16) -> list[dict] | None:
    """Best-path transcripts of the adapter's token head alone (the runs the decoder is given,
    each read as its likeliest token): what the adapter hears. None without a token head."""
    import torch

    from mm.evaluate import word_errors
    from speech import AudioFeatures
    from speech.adapter import best_path

    head = model.speech_adapter.tokens
    if head is None:
        return None
    table = model.decoder.get_input_embeddings().weight
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = AudioFeatures.pad([model.audio_processor.features(audio_path(r)) for r in chunk])
        with torch.no_grad():
            states, mask = model.encode_audio(batch)
            heard = best_path(head(states, mask, table), mask)
        for r, classes in zip(chunk, heard):
            hyp = model.tokenizer.decode([c - 1 for c in classes], skip_special_tokens=True)
            errors, words = word_errors(r["caption"], hyp)
            out.append({"reference": r["caption"], "hypothesis": hyp, "errors": errors, "words": words})
    return out


def wer(results: list[dict]) -> float:
    return round(sum(r["errors"] for r in results) / max(1, sum(r["words"] for r in results)), 4)


def evaluate(model_dir: Path, adapter: bool = True, overrides: list[str] = ()) -> dict:
    """The held-out figures of a model; without `adapter`, only those that its Conformer decides
    (the character search's transcripts, the character head, dialogue through transcripts).
    overrides: key=value changes to the model's recorded config (how it decodes)."""
    import mm

    corpus = json.loads((DATA / "corpus.json").read_text())
    model = mm.load(model_dir, overrides=overrides)
    t = model.config.speech.transcriber
    start = time.time()
    figures = {"method": model.transcription_method(), "ctc_weight": model.config.speech.adapter.ctc_weight,
               "lm_weight": t.lm_weight, "word_bonus": t.word_bonus, "beam": t.beam, "unknown_word": t.unknown_word,
               "unknown_char": t.unknown_char, "overrides": list(overrides)}
    for name, key in (("asr_heldout", "wer"), ("asr_heldout_voices", "wer_heldout_voices")):
        began = time.time()
        results = transcripts(model, rows(name))
        figures[f"{key}_seconds_per_utterance"] = round((time.time() - began) / max(1, len(results)), 2)
        (RUN / f"{name}_transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        figures[key] = wer(results)
        figures[f"{key}_utterances"] = len(results)
        if figures["method"] == "characters" and adapter:
            figures[f"{key}_decoder"] = wer(transcripts(model, rows(name), method="decoder"))
        if model.config.speech.adapter.tokens and adapter:
            figures[f"{key}_decoder_alone"] = wer(transcripts(model, rows(name), ctc_weight=0.0, method="decoder"))
        heard = ctc_transcripts(model, rows(name))
        if heard is not None:
            figures[f"{key}_ctc_head"] = wer(heard)
        heard = token_transcripts(model, rows(name)) if adapter else None
        if heard is not None:
            figures[f"{key}_token_head"] = wer(heard)
        for voice in sorted({r["voice"] for r in results if r["voice"]}):
            figures[f"{key}[{voice}]"] = wer([r for r in results if r["voice"] == voice])
    figures |= dialogue(model, corpus.get("max_new_tokens", 24), model_dir, adapter)
    figures["eval_seconds"] = round(time.time() - start, 1)
    return figures


def dev_sweep(model_dir: Path, weights: list[float]) -> dict:
    """WER on the dev sentences (neither trained on nor held out) per transcription CTC weight:
    where speech.adapter.ctc_weight is chosen, without looking at the held-out sentences."""
    import mm

    model = mm.load(model_dir)
    return {str(w): wer(transcripts(model, rows("asr_dev"), ctc_weight=w, method="decoder")) for w in weights}


def dev_lm_sweep(model_dir: Path, settings: list[str]) -> dict:
    """WER on the dev sentences of the character search per setting of speech.transcriber: each
    "A,B" (LM weight, word bonus) or "key=value;key=value" (lm_weight=0.5;beam=32): where its
    values are chosen, without looking at the held-out sentences. Transcripts are not
    punctuated here: WER ignores capitals and punctuation."""
    import mm

    out = {}
    for setting in settings:
        if "=" in setting:
            overrides = [f"speech.transcriber.{kv}" for kv in setting.split(";")]
        else:
            alpha, beta = setting.split(",")
            overrides = [f"speech.transcriber.lm_weight={alpha}", f"speech.transcriber.word_bonus={beta}"]
        model = mm.load(model_dir, overrides=[*overrides, "speech.transcriber.punctuate=false"])
        start = time.time()
        out[setting] = wer(transcripts(model, rows("asr_dev"), method="characters"))
        print(f"{setting}: dev WER {out[setting]} ({time.time() - start:.0f} s)", flush=True)
    return out


def head_sweep(model_dir: Path) -> dict:
    """Greedy WER of the Conformer's character head (no language model) on the first 200
    training sentences, the dev sentences and both held-out sets: how far a Conformer has come,
    in a minute, at any checkpoint."""
    import mm

    model = mm.load(model_dir)
    out = {}
    for name, items in (("train_200", rows("asr_train")[:200]), ("dev", rows("asr_dev")),
                        ("heldout", rows("asr_heldout")), ("heldout_voices", rows("asr_heldout_voices"))):
        heard = ctc_transcripts(model, items)
        if heard is None:
            raise SystemExit(f"error: {model_dir}: no stage of this model trained the character head")
        out[name] = wer(heard)
    return out


def fit_intonation(utterances: int = 4000) -> dict:
    """The counts behind speech/intonation.py's RISE_LOG_ODDS: per bin of final rise, the first
    `utterances` of asr_train that end in "?" and the others, and the log likelihood ratio."""
    import math

    from speech.audio import load_audio
    from speech.intonation import RISE_LOG_ODDS, final_rise

    counts = [[0, 0] for _ in RISE_LOG_ODDS]
    for row in rows("asr_train")[:utterances]:
        rise = final_rise(load_audio(audio_path(row)))
        if rise is not None:
            counts[next(i for i, (upper, _) in enumerate(RISE_LOG_ODDS) if rise < upper)][
                not row["caption"].endswith("?")] += 1
    asked, other = (sum(c[k] for c in counts) for k in (0, 1))
    return {f"below {upper}": {"questions": q, "others": o,
                               "log_odds": round(math.log((q + 0.5) / asked) - math.log((o + 0.5) / other), 2)}
            for (upper, _), (q, o) in zip(RISE_LOG_ODDS, counts)}


def fit_closing(utterances: int = 8000) -> dict:
    """The closing mark's weights (speech.transcriber question_weight and question_prior): of the
    first `utterances` of asr_train that end in ".", "?" or "!", every question and as many of
    the others (balanced: the text and its voice decide, not the corpus's share of questions),
    each with the decoder's log-odds of its own words closing on "?" rather than "." (as a
    user's turn, as write_out scores them) and its voice's (question_log_odds of its final
    rise); a logistic regression of "ends in ?" on the two. The decoder's weight is its
    coefficient (write_out takes it as it is), the voice's is question_weight, the intercept
    question_prior."""
    import mm
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from speech.audio import load_audio
    from speech.intonation import final_rise, question_log_odds
    from speech.lm_beam import WordLM
    from speech.punctuation import user_turn

    model = mm.load("smollm2")
    context, end = user_turn(model.tokenizer)
    items = [r for r in rows("asr_train")[:utterances] if r["caption"].strip()[-1:] in ".?!"]
    asked = [r for r in items if r["caption"].strip().endswith("?")]
    items = asked + [r for r in items if not r["caption"].strip().endswith("?")][:len(asked)]
    features, start = [], time.time()
    for i in range(0, len(items), 64):
        lm = WordLM(model.decoder, model.tokenizer, context=context, end=end)  # one chunk's cache at a time
        stems = [r["caption"].strip()[:-1].split() for r in items[i:i + 64]]
        closed = [[tuple(s[:-1] + [s[-1] + mark, WordLM.END]) for mark in "?."] for s in stems]
        lm.add([c for pair in closed for c in pair])
        features += [[lm.total(q) - lm.total(d), question_log_odds(final_rise(load_audio(audio_path(r))))]
                     for (q, d), r in zip(closed, items[i:i + 64])]
    x, y = np.array(features), np.array([r["caption"].strip().endswith("?") for r in items])
    fit = LogisticRegression().fit(x, y)
    rule = x[:, 0] + x[:, 1] > 0  # decoder and voice at weight 1, no prior
    return {"sentences": f"{len(asked)} questions, {len(items) - len(asked)} others",
            "decoder_weight": round(float(fit.coef_[0, 0]), 2), "question_weight": round(float(fit.coef_[0, 1]), 2),
            "question_prior": round(float(fit.intercept_[0]), 2),
            "fitted_right": {"questions": round(float((fit.predict(x) == y)[y].mean()), 4),
                             "others": round(float((fit.predict(x) == y)[~y].mean()), 4)},
            "unfitted_right": {"questions": round(float(rule[y].mean()), 4),
                               "others": round(float((~rule)[~y].mean()), 4)},
            "seconds": round(time.time() - start, 1)}


def read_as_spoken(text: str) -> list[str]:
    """The words of a typed text as the character search reads them: lower case, the character
    head's alphabet only (speech/conformer.py), a hyphen heard as the space it is spoken as."""
    from speech.conformer import CHARACTERS

    return "".join(c for c in text.lower().replace("-", " ") if c in CHARACTERS).split()


def punctuation_oracle(model_ref: str, overrides: list[str] = (), name: str = "dialogue_heldout", limit: int = 0,
                       reply: bool = True) -> dict:
    """Transcripts with every word read right: each sentence's own words (of the `name` rows, the
    first `limit`; a dialogue set's questions) as the character search reads them
    (`read_as_spoken`), written out as model.transcribe writes its transcripts (model.write_out:
    casing and punctuation by the decoder, the recording's final rise for a closing "?", and,
    when the model's character head is trained, the pauses it hears between the words for
    commas); for a dialogue set (with `reply`), replied to. What the writing-out alone costs the
    transcripts and the dialogue agreement; each sentence -> runs/speech/oracle_<name>.jsonl."""
    import mm

    model = mm.load(model_ref, overrides=overrides)
    items = rows(name)[:limit or None]
    max_new_tokens = json.loads((DATA / "corpus.json").read_text()).get("max_new_tokens", 24)
    reply = reply and all("answer" in r for r in items)
    trained = model.encoders["audio"].has_ctc_head()
    out, start = [], time.time()
    for i in range(0, len(items), 16):
        chunk = items[i:i + 16]
        texts = [r.get("question", r.get("caption")) for r in chunk]
        waves = [model.audio_processor.wave(audio_path(r)) for r in chunk]
        written = model.write_out([read_as_spoken(t) for t in texts], waves,
                                  model.hear_characters(waves) if trained else None)
        said = model.generate(written, max_new_tokens=max_new_tokens) if reply else [None] * len(chunk)
        for r, text, mine, answer in zip(chunk, texts, written, said):
            out.append({"text": text, "written": mine, "voice": r["voice"]}
                       | ({"reply": answer, "expected": r["answer"], "same": answer.strip() == r["answer"].strip()}
                          if reply else {}))
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / f"oracle_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    n, exact = max(1, len(out)), [r for r in out if r["written"] == r["text"]]
    figures = {"model": model_ref, "overrides": list(overrides), "sentences": f"{name}[:{len(out)}]",
               "pauses_heard": trained, "written_exact": round(len(exact) / n, 4),
               "closing_mark_right": round(sum(r["written"][-1:] == r["text"][-1:] for r in out) / n, 4),
               "capitals_right": round(sum([c.isupper() for c in r["written"]] == [c.isupper() for c in r["text"]]
                                           for r in out if len(r["written"]) == len(r["text"])) / n, 4)}
    if reply:
        figures |= {"agreement": round(sum(r["same"] for r in out) / n, 4),
                    "agreement_when_written_exact": round(sum(r["same"] for r in exact) / max(1, len(exact)), 4)}
    return figures | {"seconds": round(time.time() - start, 1)}


def report_dialogue(overrides: list[str] = ()) -> dict:
    """The dialogue figures again, in place in docs/results/speech.json (the rest kept)."""
    import mm
    from digits import write_results

    result = json.loads((ROOT / "docs" / "results" / "speech.json").read_text())
    start, max_new_tokens = time.time(), result["corpus"].get("max_new_tokens", 24)
    result["heldout"] |= dialogue(mm.load(FINAL, overrides=overrides), max_new_tokens)
    result["heldout"]["dialogue_eval_seconds"] = round(time.time() - start, 1)
    return write_results("speech", {k: v for k, v in result.items() if k != "machine"})


def report_conformer(model: Path | None = None, overrides: list[str] = (), name: str = "speech_conformer") -> dict:
    """Before speech_sft: the figures that a Conformer stage's model (default speech_ctc_masked's)
    decides -> docs/results/<name>.json."""
    from digits import write_results

    model = (model or RUN / CONFORMER_STAGES[-1] / "final").resolve()
    return write_results(name, {
        "model": str(model.relative_to(ROOT)), "heldout": evaluate(model, adapter=False, overrides=overrides),
        "training": conformer_training(model), "corpus": json.loads((DATA / "corpus.json").read_text())})


def conformer_training(model: Path) -> dict:
    """The training runs behind a model: the chain's Conformer stages up to the one it is the final
    of, or its own run."""
    from mm.train import run_summary

    run = model.parent
    if run.parent == RUN.resolve() and run.name in CONFORMER_STAGES:
        chain = CONFORMER_STAGES[:CONFORMER_STAGES.index(run.name) + 1]
        return {stage: run_summary(RUN / stage) for stage in chain if (RUN / stage / "metrics.jsonl").is_file()}
    return {run.name: run_summary(run)} if (run / "metrics.jsonl").is_file() else {}


def report(overrides: list[str] = ()) -> dict:
    from digits import write_results
    from mm.train import run_summary

    training = {stage: run_summary(RUN / stage) for stage in STAGES}  # a missing run fails before the eval
    return write_results("speech", {"heldout": evaluate(FINAL, overrides=overrides), "training": training,
                                    "corpus": json.loads((DATA / "corpus.json").read_text())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["data", "train", "eval", "eval-conformer", "eval-dialogue", "dev", "dev-lm",
                                         "heads", "fit-intonation", "fit-closing", "punctuation-oracle", "all"])
    parser.add_argument("--model", type=Path, help=f"the model of dev, dev-lm and heads (default "
                        f"{FINAL.relative_to(ROOT)}) and of eval-conformer (default {CONFORMER_STAGES[-1]}'s)")
    parser.add_argument("--results", default="speech_conformer", help="eval-conformer: the figures -> "
                        "docs/results/RESULTS.json (another model's figures beside the recorded chain's)")
    parser.add_argument("--rows", default="dialogue_heldout", help="punctuation-oracle: the sentences (a "
                        "data/speech/*.jsonl set: dialogue_heldout, dialogue_train, asr_dev, ...)")
    parser.add_argument("--limit", type=int, default=0, help="punctuation-oracle: only the first LIMIT sentences")
    parser.add_argument("--no-replies", action="store_true", help="punctuation-oracle: transcripts only")
    parser.add_argument("overrides", nargs="*", help="train: key=value for every stage; eval*: key=value changes "
                        "to the model's config (speech.transcriber.word_bonus=1); dev: CTC weights; dev-lm: A,B "
                        "pairs or key=value;... settings")
    args = parser.parse_intermixed_args()
    if args.step in ("data", "all"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "speech_corpus.py"), "--out", str(DATA),
                        "--train-sentences", "11200", "--train-readings", "2", "--dialogue-train", "900"], check=True)
    if args.step in ("train", "all"):
        from digits import train

        # speech_ctc starts from a fresh Conformer (its config says why), not from speech_ssl
        seconds = train(RUN, extra=args.overrides, stages=STAGES[:1], prefix="espeak")
        seconds |= train(RUN, extra=args.overrides, stages=STAGES[1:], prefix="espeak")
        print(json.dumps({"stage_seconds": seconds}))
    if args.step == "dev":
        weights = [float(w) for w in args.overrides] or [0.0, 0.3, 0.5, 0.7, 0.9]
        print(json.dumps({"dev_wer_by_ctc_weight": dev_sweep(args.model or FINAL, weights)}))
    if args.step == "dev-lm":
        print(json.dumps({"dev_wer_by_transcriber_setting": dev_lm_sweep(args.model or FINAL, args.overrides or ["0.5,2"])}))
    if args.step == "heads":
        print(json.dumps({"character_head_greedy_wer": head_sweep(args.model or FINAL)}))
    if args.step == "punctuation-oracle":
        model = str(args.model or (FINAL if FINAL.is_dir() else "smollm2"))
        print(json.dumps({"punctuation_oracle": punctuation_oracle(model, args.overrides, args.rows, args.limit,
                                                                   not args.no_replies)}, indent=1))
    if args.step == "fit-intonation":
        print(json.dumps({"rise_log_odds": fit_intonation()}, indent=1))
    if args.step == "fit-closing":
        print(json.dumps({"closing_mark": fit_closing()}, indent=1))
    if args.step in ("eval", "all"):
        print(json.dumps(report(args.overrides if args.step == "eval" else ()), indent=2))
    if args.step == "eval-conformer":
        print(json.dumps(report_conformer(args.model, args.overrides, args.results)["heldout"], indent=2))
    if args.step == "eval-dialogue":
        print(json.dumps(report_dialogue(args.overrides)["heldout"], indent=2))


if __name__ == "__main__":
    main()
