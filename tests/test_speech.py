"""The speech path: Conformer, BEST-RQ, speech adapter, audio in the decoder input (or through
cross-attention), the speech stages, transcribe / generate(audio=...) / `mm talk`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile
import torch

import mm
from mm.cli import main
from mm.data import read_manifest, write_shards
from mm.stages import load_stage_config
from mm.train import train
from speech import AudioFeatures, BestRQ, BestRQConfig, ConformerEncoder, SpeechAdapter, SpeechConfig
from speech.bestrq import span_mask

TINY = SpeechConfig(width=32, layers=2, heads=2, ffn_dim=64, dropout=0.0)


def tone(seconds: float, freq: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = mm.load("tiny").eval()
    with torch.no_grad():  # a random adapter, so that the speech visibly reaches the logits
        for p in model.speech_adapter.parameters():
            p.normal_(0, 0.5)
    return model


# ---- encoder and adapter ---------------------------------------------------------------------------
def test_conformer_frames_and_padding_do_not_leak():
    torch.manual_seed(0)
    encoder = ConformerEncoder(TINY).eval()
    short, long = torch.randn(37, 80), torch.randn(90, 80)
    batch = AudioFeatures.pad([short, long])
    with torch.no_grad():
        states, mask = encoder(batch.features, batch.lengths)
        alone, _ = encoder(short[None], torch.tensor([37]))
    assert states.shape == (2, 23, 32) and mask.sum(1).tolist() == [10, 23]  # ceil(T / 4): 40 ms frames
    assert torch.allclose(states[0, :10], alone[0], atol=1e-5)  # the longer row's padding changes nothing
    assert states[0, 10:].abs().max() == 0


def test_character_head_reads_several_labels_per_frame():
    """speech.ctc_upsample k: each 40 ms frame gives k character labels; a head trained with
    fewer labels per frame, each repeated (resize_tensor), reads what it read before."""
    from dataclasses import replace

    from speech.adapter import best_path

    torch.manual_seed(0)
    one = ConformerEncoder(TINY).eval()
    one.ctc_head.reset_parameters()
    two = ConformerEncoder(replace(TINY, ctc_upsample=2)).eval()
    two.load_state_dict({k: two.resize_tensor(k, v) for k, v in one.state_dict().items()})
    batch = AudioFeatures.pad([torch.randn(37, 80), torch.randn(90, 80)])
    with torch.no_grad():
        states, mask = one(batch.features, batch.lengths)
        logits, frames = one.characters(states, mask)
        doubled, doubled_frames = two.characters(*two(batch.features, batch.lengths))
    assert logits.shape == (2, 23, 39) and doubled.shape == (2, 46, 39)
    assert doubled_frames.sum(1).tolist() == [20, 46] and torch.equal(doubled_frames[:, ::2], mask)
    assert torch.equal(doubled[:, ::2], logits) and torch.equal(doubled[:, 1::2], logits)
    assert best_path(doubled, doubled_frames) == best_path(logits, frames)
    assert two.resize_tensor("ctc_head.weight", torch.zeros(3 * 39, 32)).shape == (3 * 39, 32)  # not a multiple: kept
    assert SpeechConfig(ctc_upsample=0).validate()


def test_adapter_halves_the_frame_rate_to_the_decoder_width():
    adapter = SpeechAdapter(TINY, d_model=48).eval()
    states, mask = torch.randn(2, 23, 32), torch.arange(23)[None] < torch.tensor([[10], [23]])
    out, out_mask = adapter(states, mask)
    assert out.shape == (2, 12, 48) and out_mask.sum(1).tolist() == [5, 12]  # 80 ms
    assert TINY.adapter_frames(37) == 5 and TINY.adapter_frames(90) == 12


def test_rotary_attention_sees_order():
    """Self-attention alone is a set operation; the rotary embedding makes it see positions."""
    torch.manual_seed(0)
    encoder = ConformerEncoder(SpeechConfig(width=32, layers=1, heads=2, ffn_dim=64, dropout=0.0, conv_kernel=1)).eval()
    x = torch.randn(1, 40, 80)
    reversed_frames = x.view(1, 10, 4, 80).flip(1).reshape(1, 40, 80)  # the same 40 ms frames, reversed
    with torch.no_grad():
        a, _ = encoder(x, torch.tensor([40]))
        b, _ = encoder(reversed_frames, torch.tensor([40]))
    assert (a - b.flip(1)).abs().max() > 1e-3


# ---- BEST-RQ --------------------------------------------------------------------------------------
def test_bestrq_targets_are_frozen_and_the_loss_is_on_masked_frames_only():
    torch.manual_seed(0)
    cfg = BestRQConfig(vocab=64, codebooks=4, mask_prob=0.05, span=8)
    objective = BestRQ(ConformerEncoder(TINY), cfg)
    again = BestRQ(ConformerEncoder(TINY), cfg)
    assert not any("quantizer" in n for n, _ in objective.named_parameters())  # frozen: buffers, not trained
    assert "quantizer.projection" not in objective.state_dict()  # nor saved: rebuilt from the seed
    x = torch.randn(3, 120, 80)
    stacked, _ = objective.encoder.stack(x, torch.tensor([120, 120, 120]))
    assert torch.equal(objective.quantizer(stacked), again.quantizer(stacked))  # same targets everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):  # precision: bfloat16 does not move the targets
        assert torch.equal(objective.quantizer(stacked), again.quantizer(stacked))
    assert objective.quantizer(stacked).shape == (3, 30, 4)

    lengths = torch.tensor([400, 200, 37])
    mask = span_mask(lengths, 400, 0.05, 2, torch.Generator().manual_seed(0))
    assert not mask[1, 200:].any() and not mask[2, 37:].any() and mask.any(1).all()
    # spans: a masked frame's run is at least the span long, unless cut by the row's end
    runs = torch.diff(torch.cat([torch.zeros(3, 1, dtype=torch.long), mask.long(), torch.zeros(3, 1, dtype=torch.long)], 1))
    starts, ends = (runs == 1).nonzero()[:, 1], (runs == -1).nonzero()[:, 1]
    assert ((ends - starts >= 2) | (ends == lengths[(runs == -1).nonzero()[:, 0]])).all()

    # the loss ignores unmasked frames: changing the input there (without changing the masked
    # frames' context much) leaves the heads' targets at masked frames the only ones that count
    features = torch.randn(2, 160, 80)
    loss, logged = objective(features, torch.tensor([160, 100]))
    assert torch.isfinite(loss) and abs(float(logged) - np.log(64)) < 1.5  # near chance at init
    loss.backward()
    assert objective.heads.weight.grad.abs().sum() > 0 and objective.encoder.input_proj.weight.grad.abs().sum() > 0


def test_dropout_mask_rate_scaling_gradient_and_seed():
    from speech.dropout import Dropout, drop_mask

    for p in (0.1, 0.5):
        mask = drop_mask(torch.Size([4, 250_001]), p, torch.device("cpu"))
        assert mask.dtype == torch.bool and mask.shape == (4, 250_001)
        lanes = mask.flatten()[:1_000_000].view(-1, 4).float().mean(0)  # each 16-bit lane of a word
        assert torch.allclose(lanes, torch.full((4,), p), atol=0.005), lanes
    layer = Dropout(0.25)
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)  # the global generator decides the mask
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.75)  # the gradient flows through kept elements only
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0)(x) is x


# ---- the composite model -------------------------------------------------------------------------------
def test_speech_is_spliced_between_the_audio_tokens(tiny):
    wave = torch.from_numpy(tone(1.0, 440))
    batch = tiny.prepare([tiny.user_messages("what was said?", [], audios=[(wave, 16000)]),
                          tiny.user_messages("no audio here", [])])
    audio_id = tiny.media_token_ids["audio"]
    frames = tiny.config.speech.adapter_frames(batch.audio.lengths[0])
    assert int((batch.ids[0] == audio_id).sum()) == frames == 13  # 1 s: 101 mel frames -> 26 -> 13
    assert int((batch.ids[1] == audio_id).sum()) == 0
    with torch.no_grad():
        out = tiny(batch.ids, batch.attention_mask, **batch.media()).logits
        other = tiny.prepare([tiny.user_messages("what was said?", [], audios=[(torch.from_numpy(tone(1.0, 880)), 16000)]),
                              tiny.user_messages("no audio here", [])])
        out2 = tiny(other.ids, other.attention_mask, **other.media()).logits
        bare = tiny.decoder(input_ids=batch.ids.clamp(max=tiny.decoder.config.vocab_size - 1),
                            attention_mask=batch.attention_mask,
                            position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    first = int((batch.ids[0] == audio_id).nonzero()[0])
    real = batch.attention_mask[0].bool()
    assert torch.allclose(out[0, :first][real[:first]], bare[0, :first][real[:first]], atol=1e-5)  # before: untouched
    assert (out[0, first:] - out2[0, first:]).abs().max() > 1e-3  # the recording reaches every later row
    assert torch.allclose(out[1][batch.attention_mask[1].bool()], bare[1][batch.attention_mask[1].bool()], atol=1e-5)


def test_audio_token_count_must_match_the_recordings(tiny):
    wave = (torch.from_numpy(tone(1.0, 440)), 16000)
    batch = tiny.prepare([tiny.user_messages("x", [], audios=[wave])])
    first = int((batch.ids[0] == tiny.media_token_ids["audio"]).nonzero()[0])
    cut = torch.cat([batch.ids[:, :first], batch.ids[:, first + 1:]], 1)  # one audio position short
    with pytest.raises(mm.InputError, match="positions for recordings of"):
        tiny(cut, torch.ones_like(cut), **batch.media())


def test_token_runs_merge_repeats_and_drop_blanks():
    from speech.adapter import token_runs

    table = torch.randn(4, 3)
    best = torch.tensor([[0, 2, 2, 0, 2, 3, 1], [4, 4, 0, 1, 0, 0, 0]])  # class c > 0 is token c - 1
    mask = torch.tensor([[True] * 6 + [False], [True] * 4 + [False] * 3])  # row 0's last output is padding
    logits = torch.nn.functional.one_hot(best, 5).float().mul(50).requires_grad_()
    runs, counts = token_runs(logits, mask, table)
    assert counts.tolist() == [3, 2]  # (1) (1) (2) | (3) (0): a blank splits a run, padding is not read
    assert torch.allclose(runs, table[[1, 1, 2, 3, 0]], atol=1e-5)  # a sure run is its token's embedding
    unsure = logits.detach().clone()
    unsure[0, 5, 4] = 50  # output 5 torn between tokens 2 and 3: its run is their blend
    runs, _ = token_runs(unsure, mask, table)
    assert torch.allclose(runs[2], table[[2, 3]].mean(0), atol=1e-5)
    token_runs(logits, mask, table)[0].sum().backward()
    assert logits.grad.abs().sum() > 0  # the embeddings the decoder reads train the head


def test_expand_positions_keeps_each_rows_padding_side():
    from mm.model import expand_positions

    ids = torch.tensor([[0, 5, 9, 6], [7, 9, 9, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left-padded
    at = ids == 9
    new, new_mask, _ = expand_positions(ids, mask, None, at, torch.tensor([3, 0, 2]), pad_id=0)
    assert new.tolist() == [[5, 9, 9, 9, 6], [0, 7, 9, 9, 8]]  # padding re-made: as wide as the longest row
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    labels = torch.tensor([[-100, -100, 4, 0], [-100, -100, 3, 3]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids[0] = torch.tensor([5, 9, 6, 0])
    new, new_mask, new_labels = expand_positions(ids, right, labels, ids == 9, torch.tensor([2, 2, 1]), pad_id=0)
    assert new.tolist() == [[5, 9, 9, 6, 0], [7, 9, 9, 9, 8]]  # right-padded rows stay right-padded
    assert new_labels.tolist() == [[-100, -100, -100, 4, -100], [-100, -100, -100, 3, 3]]


def test_token_adapter_gives_the_decoder_the_tokens_it_hears(monkeypatch):
    """adapter.tokens: the decoder reads one embedding per token run; when the head is sure,
    the logits are exactly those of the typed tokens in the recording's place."""
    torch.manual_seed(0)
    model = mm.load("tiny", overrides=["speech.adapter.tokens=true"]).eval()
    wave = (torch.from_numpy(tone(1.0, 440)), 16000)
    batch = model.prepare([model.user_messages("what was said?", [], audios=[wave])])
    audio_id = model.media_token_ids["audio"]
    assert int((batch.ids == audio_id).sum()) == 1  # the count is known once the recording is heard
    heard = [17, 17, 0, 42, 0, 99]  # blank-separated runs: tokens 16, 41, 98
    vocab = model.decoder.get_input_embeddings().weight.shape[0]

    def sure(h, mask, table):
        best = torch.tensor(heard + [0] * (h.shape[1] - len(heard)))
        return torch.nn.functional.one_hot(best, vocab + 1).float()[None].mul(100)

    monkeypatch.setattr(model.speech_adapter.tokens, "forward", sure)
    with torch.no_grad():
        out = model(batch.ids, batch.attention_mask, **batch.media()).logits
        at = int((batch.ids[0] == audio_id).nonzero()[0])
        typed = torch.cat([batch.ids[0, :at], torch.tensor([16, 41, 98]), batch.ids[0, at + 1:]])[None]
        bare = model.decoder(input_ids=typed).logits
    assert out.shape == bare.shape and torch.allclose(out, bare, atol=1e-4)
    first = model.generate("what was said?", audio=wave, max_new_tokens=1)  # the same through generation
    assert first == model.tokenizer.decode([int(bare[0, -1].argmax())], skip_special_tokens=True)


def test_speech_through_cross_attention_starts_as_the_bare_decoder_and_then_listens():
    torch.manual_seed(0)
    model = mm.load("tiny", overrides=["speech.attach=cross_attention"]).eval()
    assert len(model.xattn["audio"]) == len(model.image_layers)
    wave = (torch.from_numpy(tone(1.0, 440)), 16000)
    batch = model.prepare([model.user_messages("what was said?", [], audios=[wave])])
    assert int((batch.ids == model.media_token_ids["audio"]).sum()) == 1  # one token: the blocks read the rest
    with torch.no_grad():
        out = model(batch.ids, batch.attention_mask, **batch.media()).logits
        bare = model.decoder(inputs_embeds=model.embed(batch.ids)).logits
        assert torch.allclose(out, bare, atol=1e-6)  # gates closed
        for block in model.xattn["audio"]:
            block.attn_gate.scale.fill_(1.0)
            block.mlp_gate.scale.fill_(1.0)
        opened = model(batch.ids, batch.attention_mask, **batch.media()).logits
    assert (opened - bare).abs().max() > 1e-3
    assert model.generate("", audio=wave, max_new_tokens=3) is not None


def test_generate_transcribe_and_batches_of_audio(tiny, tmp_path):
    path = tmp_path / "a.flac"
    soundfile.write(path, tone(0.8, 300), 16000)
    one = tiny.generate("", audio=str(path), max_new_tokens=4)
    assert tiny.generate(["", "hello"], audio=[str(path), None], max_new_tokens=4)[0] == one  # batched = alone
    assert isinstance(tiny.transcribe(str(path), max_new_tokens=4), str)
    # by default a transcript stops at the budget of the recording's length (0.8 s: 8 + 5 tokens)
    from mm.model import ASR_PROMPT

    budget = tiny.transcript_budget(0.8)
    assert budget == 13
    said = tiny.generate(ASR_PROMPT.format(language="English"), audio=str(path), max_new_tokens=budget)
    assert tiny.transcribe(str(path)) == said
    assert tiny.transcribe([str(path), str(path)]) == [said, said]
    reply = tiny.chat([{"role": "user", "content": [{"type": "audio", "audio": str(path)}]}], max_new_tokens=4)
    assert reply == one
    assert "".join(tiny.stream("", audio=str(path), max_new_tokens=4)) == one
    with pytest.raises(mm.InputError, match="missing.wav"):
        tiny.generate("", audio=str(tmp_path / "missing.wav"))


# ---- stages ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_shards(tmp_path_factory):
    """ASR and dialogue shards of short tone 'utterances' (a pitch per word), one corrupt file."""
    root = tmp_path_factory.mktemp("speech")
    words = ["one", "two", "three", "four"]
    asr, dialogue = [], []
    for i in range(24):
        text = " ".join(words[(i + k) % 4] for k in range(1 + i % 3))
        wave = np.concatenate([tone(0.25, 200 + 150 * words.index(w), seed=i) for w in text.split()])
        soundfile.write(root / f"{i}.flac", wave, 16000)
        asr.append({"audio": f"{i}.flac", "caption": text})
        dialogue.append({"audio": f"{i}.flac", "question": text, "answer": f"you said {len(text.split())} words"})
    (root / "bad.flac").write_bytes(b"not audio at all")
    asr.append({"audio": "bad.flac", "caption": "broken"})
    for name, rows in (("asr", asr), ("dialogue", dialogue)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    asr_report = write_shards(read_manifest(root / "asr.jsonl"), root / "shards/asr", "captions", log=lambda _: None)
    write_shards(read_manifest(root / "dialogue.jsonl"), root / "shards/dialogue", "qa", log=lambda _: None)
    assert (asr_report.written, asr_report.skipped) == (24, 1)
    return root / "shards"


def stage_config(tmp_path, name, shards, extra=()):
    return load_stage_config(f"configs/stages/{name}.yaml", [
        "model=tiny", f"output={tmp_path / name}", f"data.shards={json.dumps([str(s) for s in shards])}",
        "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=10", "save_every=1000", *extra])


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_speech_ssl_then_sft_train_only_the_speech_path(speech_shards, tmp_path):
    before = mm.load("tiny")
    frozen = {k: v.clone() for k, v in before.state_dict().items() if not k.startswith(("encoders.audio", "speech_adapter"))}
    ssl = stage_config(tmp_path, "speech_ssl", [speech_shards / "asr"], [
        "optim.steps=40", "optim.warmup_steps=3", "optim.lr=3e-3", "bestrq={vocab: 32, codebooks: 2, span: 8, mask_prob: 0.05}"])
    final = train(ssl)
    losses = [m["loss"] for m in metrics(tmp_path / "speech_ssl")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses  # it learns the codewords
    from safetensors.torch import load_file

    saved = load_file(final / "adapters.safetensors")
    assert saved and all(k.startswith("encoders.audio.") for k in saved)  # the heads are not the model's

    sft = stage_config(tmp_path, "speech_sft", [speech_shards / "asr", speech_shards / "dialogue"], [
        f"init={final}", "optim.steps=40", "optim.warmup_steps=3", "optim.lr=3e-3", "ctc_weight=0.3"])
    final = train(sft)
    losses = [m["loss"] for m in metrics(tmp_path / "speech_sft")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert metrics(tmp_path / "speech_sft")[-1]["skipped"] == 0  # the corrupt file was refused when sharded
    saved = load_file(final / "adapters.safetensors")
    assert {k.split(".")[0] for k in saved} == {"encoders", "speech_adapter"}
    model = mm.load(final)
    assert model.decoder_sha256() == before.decoder_sha256()
    for name, value in model.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name  # decoder, image and video paths untouched
    assert isinstance(model.transcribe(str(speech_shards.parent / "0.flac"), max_new_tokens=4), str)


def test_speech_sft_with_the_token_adapter_learns_the_spoken_tokens(speech_shards, tmp_path):
    before = mm.load("tiny")
    sft = stage_config(tmp_path, "speech_sft", [speech_shards / "asr", speech_shards / "dialogue"], [
        "init=null", "model.speech.adapter.tokens=true", "token_ctc_weight=1.0", "optim.steps=40",
        "optim.warmup_steps=3", "optim.lr=3e-3"])
    final = train(sft)
    log = metrics(tmp_path / "speech_sft")
    token_ctc = [m["token_ctc"] for m in log]
    assert np.mean(token_ctc[-5:]) < np.mean(token_ctc[:5]) - 1.0, token_ctc  # it learns which tokens were said
    from safetensors.torch import load_file

    assert "speech_adapter.tokens.blank" in load_file(final / "adapters.safetensors")
    model = mm.load(final)
    assert not model.training  # inference without dropout: the same recording, the same transcript
    assert model.config.speech.adapter.tokens and model.decoder_sha256() == before.decoder_sha256()
    assert isinstance(model.transcribe(str(speech_shards.parent / "0.flac"), max_new_tokens=4), str)
    with pytest.raises(mm.ConfigError, match="token_ctc_weight"):
        stage_config(tmp_path, "speech_sft", [speech_shards / "asr"], ["token_ctc_weight=1.0"])


# ---- mm talk ---------------------------------------------------------------------------------------
def test_talk_prints_transcript_then_reply_and_speaks(tmp_path, capsys):
    path = tmp_path / "q.wav"
    soundfile.write(path, tone(0.6, 500), 16000)
    assert main(["talk", "--model", "tiny", "--max-new-tokens", "3", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("you said:") and out[1].startswith("reply:")
    if shutil.which("espeak-ng"):
        assert main(["talk", "--model", "tiny", "--max-new-tokens", "3", str(path), "--speak", str(tmp_path / "r.wav")]) == 0
        spoken, rate = soundfile.read(tmp_path / "r.wav")
        assert rate > 0 and len(spoken) > 0


def test_talk_set_changes_the_model_config_for_the_run(tmp_path, capsys, monkeypatch):
    """--set KEY=VALUE reaches the loaded model's config (how it transcribes, say); a bad key is a
    one-line error, exit 2."""
    import mm

    loaded = []
    real_load = mm.load
    monkeypatch.setattr(mm, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    path = tmp_path / "q.wav"
    soundfile.write(path, tone(0.6, 500), 16000)
    args = ["talk", "--model", "tiny", "--max-new-tokens", "3", str(path)]
    assert main([*args, "--set", "speech.transcriber.beam=3", "--set", "speech.transcriber.lm_weight=0.25"]) == 0
    transcriber = loaded[-1].config.speech.transcriber
    assert (transcriber.beam, transcriber.lm_weight) == (3, 0.25)
    assert capsys.readouterr().out.startswith("you said:")
    assert main([*args, "--set", "speech.transcriber.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and err.count("\n") == 1


def test_talk_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["talk", "--model", "tiny", str(tmp_path / "nope.wav")]) == 2
    err = capsys.readouterr().err
    assert "nope.wav" in err and err.count("\n") == 1
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    assert main(["talk", "--model", "tiny", str(silent)]) == 2
    assert "silent" in capsys.readouterr().err
    path = tmp_path / "q.wav"
    soundfile.write(path, tone(0.6, 500), 16000)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["talk", "--model", "tiny", str(path), "--speak", str(tmp_path / "r.wav")]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "r.wav").exists()


def test_bfloat16_training_follows_float32_and_keeps_float32_weights(speech_shards, tmp_path, monkeypatch):
    """precision: bfloat16 runs the forward under autocast: the same first loss to bfloat16's
    rounding, a falling curve, float32 weights saved, the decoder untouched."""
    import mm.train
    from safetensors.torch import load_file

    # the numbers, not the speed, are tested: allowed on a CPU without bfloat16 matrix hardware
    # too (the tiny model's products are small enough)
    monkeypatch.setattr(mm.train, "bfloat16_is_fast", lambda device: True)
    before = mm.load("tiny").decoder_sha256()
    runs = {}
    for precision in ("float32", "bfloat16"):
        cfg = stage_config(tmp_path / precision, "speech_sft", [speech_shards / "asr", speech_shards / "dialogue"], [
            "init=null", "optim.steps=30", "optim.warmup_steps=3", "optim.lr=3e-3", f"precision={precision}"])
        runs[precision] = (train(cfg), [m["loss"] for m in metrics(tmp_path / precision / "speech_sft")])
    (_, full), (final, half) = runs["float32"], runs["bfloat16"]
    assert abs(half[0] - full[0]) < 0.02 * full[0], (half[0], full[0])  # same model, same batch
    assert np.mean(half[-5:]) < np.mean(half[:5]) - 0.5, half
    assert {t.dtype for t in load_file(final / "adapters.safetensors").values()} == {torch.float32}
    assert mm.load(final).decoder_sha256() == before
    with pytest.raises(Exception, match="precision 'float16'"):
        stage_config(tmp_path, "speech_sft", [speech_shards / "asr"], ["precision=float16"])


def test_bfloat16_is_refused_where_it_would_be_slower(speech_shards, tmp_path, monkeypatch, capsys):
    """On a CPU without bfloat16 matrix hardware (AVX2 only) bfloat16 autocast is tens of times
    slower than float32: `mm train` says so in one line, exits 2 and writes no run."""
    import mm.train

    monkeypatch.setattr(mm.train, "bfloat16_is_fast", lambda device: False)
    out = tmp_path / "run"
    assert main(["train", "configs/stages/speech_sft.yaml", "model=tiny", f"output={out}", "precision=bfloat16",
                 f"data.shards={json.dumps([str(speech_shards / 'asr')])}", "data.workers=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision: bfloat16" in err and "precision=float32" in err, err
    assert not out.exists()
    mm.train.check_precision("float32", torch.device("cpu"))  # float32 is never refused


def test_speech_ctc_stage_and_size_grouped_batches(speech_shards, tmp_path):
    """speech_ctc trains the Conformer alone (no decoder in the loop); batches grouped by size
    hold the same samples as plain batches, in an order fixed by the seed, with little padding."""
    from mm.data import ShardBatches, SkipCounter, expand_shards, raw_samples
    from mm.stages import CTCObjective, SpeechExamples, collate_speech

    urls = expand_shards([str(speech_shards / "asr")])

    def batches(group):
        data = ShardBatches(urls, batch_size=4, decode=lambda s: (s["__key__"], len(s["flac"])),
                            collate=lambda items: {"items": items}, seed=0, shuffle_buffer=1, group_by_size=group)
        return [b["items"] for _, b in zip(range(6), iter(data))]

    plain, grouped = batches(0), batches(3)
    assert sorted(k for b in plain for k, _ in b) == sorted(k for b in grouped for k, _ in b)  # regrouped
    assert grouped == batches(3)  # deterministic

    def spread(bs):
        return np.mean([max(n for _, n in b) - min(n for _, n in b) for b in bs])
    assert spread(grouped) < spread(plain)

    cfg = stage_config(tmp_path, "speech_ctc", [speech_shards / "asr"], [
        "init=null", "optim.steps=30", "optim.warmup_steps=3", "optim.lr=3.0e-3", "data.group_by_size=2"])
    final = train(cfg)
    losses = [m["loss"] for m in metrics(tmp_path / "speech_ctc")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    from safetensors.torch import load_file

    assert all(k.startswith("encoders.audio.") for k in load_file(final / "adapters.safetensors"))
    objective = CTCObjective(mm.load(final).encoders["audio"])
    sample = next(iter(raw_samples(urls, 0, 1, SkipCounter())))
    batch = collate_speech([SpeechExamples(mm.load("tiny"), transcripts=True)(sample)])
    assert batch["ctc_lengths"][0] > 0 and isinstance(objective.greedy(batch["features"], batch["lengths"])[0], str)

    from mm.train import Task

    # data.spec_augment masks the training recordings' features (speech_ctc's and speech_sft's)
    masked = ["data.spec_augment.freq_masks=2", "data.spec_augment.time_masks=2"]
    for stage in ("speech_ctc", "speech_sft"):
        task = Task(stage_config(tmp_path, stage, [speech_shards / "asr"], ["init=null", *masked]))
        plain = Task(stage_config(tmp_path, stage, [speech_shards / "asr"], ["init=null"]))
        features = task.decode(sample)["audio"]
        assert torch.equal(plain.decode(sample)["audio"], plain.decode(sample)["audio"])
        assert features.shape == plain.decode(sample)["audio"].shape and (features == 0).all(0).any()
    with pytest.raises(mm.ConfigError, match="spec_augment applies to audio only"):
        load_stage_config("configs/stages/image_sft.yaml", ["model=tiny", *masked])
    # data.speed plays each training recording at a drawn speed (both stages): fewer frames at 1.25
    for stage in ("speech_ctc", "speech_sft"):
        fast = Task(stage_config(tmp_path, stage, [speech_shards / "asr"], ["init=null", "data.speed=[1.25]"]))
        plain = Task(stage_config(tmp_path, stage, [speech_shards / "asr"], ["init=null"]))
        n = len(plain.decode(sample)["audio"])
        assert abs(len(fast.decode(sample)["audio"]) - n / 1.25) <= 2
    with pytest.raises(mm.ConfigError, match="data.speed: factors must lie in"):
        stage_config(tmp_path, "speech_ctc", [speech_shards / "asr"], ["data.speed=[0]"])
    with pytest.raises(mm.ConfigError, match="data.speed applies to audio only"):
        load_stage_config("configs/stages/image_sft.yaml", ["model=tiny", "data.speed=[0.9,1.1]"])
    with pytest.raises(mm.ConfigError, match="time_ratio"):
        stage_config(tmp_path, "speech_ctc", [speech_shards / "asr"], ["data.spec_augment.time_ratio=0"])

    # the character head is the Conformer's own: speech_ctc saves it with the encoder, a later
    # stage with a CTC loss goes on from it, one without leaves it alone
    from mm.checkpoint import load_tensors

    trained = load_tensors(final / "adapters.safetensors")["encoders.audio.ctc_head.weight"]
    assert trained.any() and mm.load(final).encoders["audio"].has_ctc_head()
    assert not mm.load("tiny").encoders["audio"].has_ctc_head()
    sft = Task(stage_config(tmp_path, "speech_sft", [speech_shards / "asr"], [f"init={final}", "ctc_weight=0.3"]))
    assert torch.equal(sft.model.encoders["audio"].ctc_head.weight, trained)
    assert "encoders.audio.ctc_head.weight" in sft.trainable
    more = Task(stage_config(tmp_path, "speech_ctc", [speech_shards / "asr"], [f"init={final}", *masked]))
    assert torch.equal(more.model.encoders["audio"].ctc_head.weight, trained)
    plain = Task(stage_config(tmp_path, "speech_sft", [speech_shards / "asr"], [f"init={final}"]))
    assert not any(k.startswith("encoders.audio.ctc_head.") for k in plain.trainable)
    assert not plain.model.encoders["audio"].ctc_head.weight.requires_grad

    # loaded to read two labels per frame (speech.ctc_upsample), the head reads as it did and
    # its CTC loss trains the encoder; a head that is not a whole fraction of the new one is refused
    doubled = mm.load(final, overrides=["speech.ctc_upsample=2"])
    again = CTCObjective(doubled.encoders["audio"])
    assert again.greedy(batch["features"], batch["lengths"]) == objective.greedy(batch["features"], batch["lengths"])
    loss = again(**batch)[0]
    loss.backward()
    assert torch.isfinite(loss) and doubled.encoders["audio"].input_proj.weight.grad.abs().sum() > 0
    from mm.api import load_adapter_tensors

    tripled = mm.load(final, overrides=["speech.ctc_upsample=3"])
    two_per_frame = doubled.encoders["audio"].ctc_head.weight.detach()
    with pytest.raises(mm.CheckpointError, match="ctc_head.weight' has shape"):
        load_adapter_tensors(tripled, {"encoders.audio.ctc_head.weight": two_per_frame}, final)

    # a head trained from nothing starts at nn.Linear's initialisation: at the zeros that mark it
    # untrained the encoder would get no gradient at all
    fresh = Task(stage_config(tmp_path, "speech_ctc", [speech_shards / "asr"], ["init=null"]))
    encoder = fresh.model.encoders["audio"]
    assert encoder.has_ctc_head() and "encoders.audio.ctc_head.weight" in fresh.trainable
    for zeroed in (False, True):
        if zeroed:
            torch.nn.init.zeros_(encoder.ctc_head.weight)
        encoder.zero_grad()
        fresh.objective(**collate_speech([fresh.decode(sample)]))[0].backward()
        assert (encoder.input_proj.weight.grad.abs().sum() > 0) != zeroed

    # transcription reads a trained head with the decoder as language model ("auto"), or the
    # decoder when asked; "characters" is refused where no stage trained the head
    recording = str(speech_shards.parent / "0.flac")
    model = mm.load(final)
    assert model.transcription_method() == "characters" and isinstance(model.transcribe(recording), str)
    assert model.transcribe([recording, recording]) == [model.transcribe(recording)] * 2
    assert isinstance(model.transcribe(recording, method="decoder", max_new_tokens=4), str)
    with pytest.raises(mm.InputError, match="no stage of this model trained"):
        mm.load("tiny").transcribe(recording, method="characters")
    with pytest.raises(mm.ConfigError, match="transcriber.method"):
        mm.load("tiny", overrides=["speech.transcriber.method=words"])
    with pytest.raises(mm.ConfigError, match="question_weight must be at least 0"):
        mm.load("tiny", overrides=["speech.transcriber.question_weight=-1"])
    with pytest.raises(mm.ConfigError, match="recase at least 0"):
        mm.load("tiny", overrides=["speech.transcriber.recase=-1"])
    unheard = mm.load(final, overrides=["speech.transcriber.question_weight=0"])  # the pitch not heard
    assert isinstance(unheard.transcribe(recording), str)

    # spoken dialogue goes through the transcript where transcripts come from the character head
    # (speech.dialogue auto): the reply to the recording is the reply to its text, typed
    assert model.dialogue_method() == "transcript"
    assert mm.load("tiny").dialogue_method() == "embeddings"
    embedded = mm.load(final, overrides=["speech.dialogue=embeddings"])
    assert embedded.dialogue_method() == "embeddings"
    by_speech = embedded.generate("", audio=recording, max_new_tokens=4)
    said = {"text": "Where can I sign up?"}
    model.transcribe = lambda audio, *a, **k: [said["text"]] * len(audio) if isinstance(audio, list) else said["text"]
    assert model.generate("", audio=recording, max_new_tokens=4) == model.generate(said["text"], max_new_tokens=4)
    assert model.generate(["", "Say it."], audio=[recording, recording], max_new_tokens=4) == [
        model.generate(said["text"], max_new_tokens=4), embedded.generate("Say it.", audio=recording, max_new_tokens=4)]
    said["text"] = ""  # nothing made out: the reply is to the speech itself
    assert model.generate("", audio=recording, max_new_tokens=4) == by_speech

    # respond keeps what was heard beside the reply, each recording transcribed once
    calls = []
    model.transcribe = lambda audio, *a, **k: calls.append(audio) or (
        [said["text"]] * len(audio) if isinstance(audio, list) else said["text"])
    assert model.respond(recording, max_new_tokens=4) == ("", by_speech) and len(calls) == 1
    said["text"] = "Where can I sign up?"
    assert model.respond([recording, recording], max_new_tokens=4) == [
        (said["text"], model.generate(said["text"], max_new_tokens=4))] * 2 and len(calls) == 2
    assert embedded.respond(recording, max_new_tokens=4) == (embedded.transcribe(recording), by_speech)
    with pytest.raises(mm.ConfigError, match="dialogue 'typed'"):
        mm.load("tiny", overrides=["speech.dialogue=typed"])
