"""7. The character search's language model: keys/values kept per word sequence against re-reading,
and recordings searched side by side against one at a time.

`speech.lm_beam.WordLM` scores a new word sequence by running only the tokens after its longest
scored prefix, from that prefix's cached keys and values. The reference, `Rereading`, is the same
scorer without the cache: every new sequence is read from its first token, in batches of the same
size. Both drive `prefix_search` (and `punctuate`) over the same character log-probabilities on the
bundled decoder and must choose the same transcripts. Side by side (`lockstep`), the searches of
several recordings send their requests together, so the decoder is called about as often as for one.

8. A training step of the proof's Conformer (configs/speech/conformer_small.yaml) with its
character CTC head, as speech_ctc runs it: speech.dropout's masks against nn.Dropout's (the
'before'), and the stage option `precision: bfloat16` against float32.
"""
from __future__ import annotations

import torch
from torch import nn

import mm
from bench.common import Setting, median, timed
from speech.conformer import CHARACTERS
from speech.lm_beam import Lexicon, WordLM, lockstep, prefix_search, search_steps
from speech.punctuation import punctuate, punctuation_steps, user_turn

SENTENCES = [
    "where can i sign up for the next class",
    "the moving cursor writes and having written blinks on",
    "statistics means never having to say you are certain",
    "an apple every eight hours will keep three doctors away",
    "nothing takes the taste out of peanut butter quite like unrequited love",
    "did you notice how your friend twitched violently and cried out in pain",
]


class Rereading(WordLM):
    """WordLM without its key/value cache: each new sequence (with every shorter one it starts
    with) is scored by one decoder pass over all its tokens."""

    @torch.no_grad()
    def add(self, sequences: list[tuple[str, ...]]) -> None:
        todo = [s for s in dict.fromkeys(sequences) if s not in self.totals]
        device = self.decoder.get_input_embeddings().weight.device
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            rows = [self.ids(s) for s in chunk]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.start[0], dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            logits = self.decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            picked = logits.log_softmax(-1)[:, :-1].gather(2, ids[:, 1:, None].to(device)).squeeze(2).cpu()
            for r, s in enumerate(chunk):
                running, at = 0.0, len(self.start)
                for n in range(1, len(s) + 1):
                    k = len(self.pieces(s[n - 1], n == 1))
                    running += picked[r, at - 1:at - 1 + k].sum().item()
                    at += k
                    self.totals.setdefault(s[:n], running)


def heard(text: str, seed: int) -> torch.Tensor:
    """Character log-probabilities [frames, 1 + 38] of a head that mostly reads `text`: two frames
    per character and a blank between, each frame's other readings given random weight."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for ch in text:
        for label in (CHARACTERS.index(ch) + 1, CHARACTERS.index(ch) + 1, 0):
            frames.append(torch.randn(len(CHARACTERS) + 1, generator=g) * 1.5 + 6.0 * torch.nn.functional.one_hot(
                torch.tensor(label), len(CHARACTERS) + 1))
    return torch.stack(frames).log_softmax(-1)


def search(setting: Setting) -> dict:
    """Seconds per sentence of the character search (beam 16, as transcribe runs it) and of the
    punctuation that follows: one recording at a time with the cache and re-reading, and all of
    them side by side (`lockstep`, as transcribe runs a list), alternating, medians of repeats."""
    model = mm.load("smollm2", device=setting.device).to(setting.dtype).eval()
    lexicon = Lexicon(model.tokenizer)
    sentences = SENTENCES[:2] if setting.quick else SENTENCES
    inputs = [heard(s, n).to(setting.device) for n, s in enumerate(sentences)]
    context, end = user_turn(model.tokenizer)

    def one_at_a_time(kind: type[WordLM]) -> list[str]:
        out = []
        for log_probs in inputs:
            found = prefix_search(log_probs, CHARACTERS, kind(model.decoder, model.tokenizer), 0.5, 2.0, 16,
                                  lexicon=lexicon, unknown=10.0)
            out.append(punctuate(next(iter(found)), kind(model.decoder, model.tokenizer, context=context, end=end)))
        return out

    def side_by_side() -> list[str]:
        lm = WordLM(model.decoder, model.tokenizer)
        found = lockstep([search_steps(x, CHARACTERS, lm, 0.5, 2.0, 16, lexicon=lexicon, unknown=10.0)
                          for x in inputs], lm)
        lm = WordLM(model.decoder, model.tokenizer, context=context, end=end)
        return lockstep([punctuation_steps(next(iter(f)), lm) for f in found], lm)

    runs = {"ours": lambda: one_at_a_time(WordLM), "reference": lambda: one_at_a_time(Rereading),
            "side_by_side": side_by_side}
    texts = {side: run() for side, run in runs.items()}  # (also a warm-up)
    times = {side: [] for side in runs}
    for _ in range(1 if setting.quick else setting.repeats):
        for side, run in runs.items():
            times[side].append(timed(run, setting.device) / len(inputs))
    result = {side: {"s_per_sentence": median(t)} for side, t in times.items()}
    result["speed_ratio"] = result["reference"]["s_per_sentence"] / result["ours"]["s_per_sentence"]
    result["side_by_side_ratio"] = result["ours"]["s_per_sentence"] / result["side_by_side"]["s_per_sentence"]
    result["same_transcripts"] = texts["ours"] == texts["reference"] == texts["side_by_side"]
    result["sentences"], result["transcripts"] = len(inputs), texts["ours"]
    result["repeats"] = 1 if setting.quick else setting.repeats
    return result


def conformer_training(setting: Setting) -> dict:
    """Seconds per speech_ctc step (forward, backward, AdamW) of the proof's Conformer on a batch
    of 32 (8 quick) log-mel inputs of 2-3 s (random values: the step's cost does not depend on them), in
    three variants run alternately: nn.Dropout float32 (the reference), speech.dropout float32
    (ours), speech.dropout under bfloat16 autocast (left out where the device has no bfloat16
    matrix hardware: mm.train.bfloat16_is_fast)."""
    from mm.config import from_dict, named_config_path, read_yaml
    from mm.stages import CTCObjective, OptimConfig
    from mm.train import bfloat16_is_fast, make_optimizer, train_step
    from speech import ConformerEncoder, SpeechConfig
    from speech.dropout import Dropout

    path = named_config_path("speech", "conformer_small")
    config = from_dict(SpeechConfig, read_yaml(path), str(path))
    g = torch.Generator().manual_seed(0)
    batch = 8 if setting.quick else 32
    lengths = torch.randint(200, 301, (batch,), generator=g)
    ctc_lengths = lengths // 8
    inputs = {"features": torch.randn(batch, 300, config.n_mels, generator=g), "lengths": lengths,
              "ctc_targets": torch.randint(1, 38, (batch, int(ctc_lengths.max())), generator=g),
              "ctc_lengths": ctc_lengths}
    inputs = {k: v.to(setting.device) for k, v in inputs.items()}
    optim = OptimConfig(lr=1e-4, warmup_steps=1, steps=1000)

    def variant(plain_dropout: bool, precision: str):
        torch.manual_seed(0)
        objective = CTCObjective(ConformerEncoder(config)).to(setting.device).train()
        if plain_dropout:
            for module in list(objective.modules()):
                for name, child in module.named_children():
                    if isinstance(child, Dropout):
                        setattr(module, name, nn.Dropout(child.p))
        params = {n: p for n, p in objective.named_parameters()}
        optimizer = make_optimizer(params, optim)
        state = {"step": 0}

        def step():
            train_step(objective, optimizer, params, inputs, state["step"], optim, precision)
            state["step"] += 1
        return step

    runs = {"reference": variant(True, "float32"), "ours": variant(False, "float32")}
    fast = bfloat16_is_fast(torch.device(setting.device))
    if fast:
        runs["bfloat16"] = variant(False, "bfloat16")
    for run in runs.values():  # warm-up
        run()
    times = {side: [] for side in runs}
    for _ in range(2 if setting.quick else 3 * setting.repeats):
        for side, run in runs.items():
            times[side].append(timed(run, setting.device))
    result = {side: {"s_per_step": median(t)} for side, t in times.items()}
    result["dropout_ratio"] = result["reference"]["s_per_step"] / result["ours"]["s_per_step"]
    if fast:
        result["bfloat16_ratio"] = result["ours"]["s_per_step"] / result["bfloat16"]["s_per_step"]
        result["total_ratio"] = result["reference"]["s_per_step"] / result["bfloat16"]["s_per_step"]
    else:
        result["bfloat16_skipped"] = f"no bfloat16 matrix hardware ({torch.backends.cpu.get_cpu_capability()})"
    result["batch"], result["steps_timed"] = batch, len(times["ours"])
    return result
