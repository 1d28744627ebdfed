"""Audio input: decoding every container to 16 kHz mono, resampling, log-mel features, bad
recordings (files, bytes and tensors), and audio shards written by `mm data`."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import speech.audio as audio
from mm.cli import main
from mm.data import decode_audio, expand_shards, first_shard_samples, read_manifest, sample_json, video_bytes
from mm.errors import InputError
from speech.audio import SAMPLE_RATE, LogMel, audio_from_bytes, feature_frames, load_audio


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, rate: int = SAMPLE_RATE) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(len(wave)))
    return float(spectrum.abs().argmax()) * rate / len(wave)


def write_av(path: Path, samples: np.ndarray, rate: int, codec: str) -> Path:
    """Mono float samples -> a file written by FFmpeg (for the containers soundfile cannot write)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for i in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


SF_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
              ".mp3": ("MP3", "MPEG_LAYER_III"), ".opus": ("OGG", "OPUS")}
AV_FORMATS = {".m4a": "aac", ".webm": "libopus"}
LOSSLESS = (".wav", ".flac")


def write_audio(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    if path.suffix in AV_FORMATS:
        return write_av(path, samples, rate, AV_FORMATS[path.suffix])
    fmt, subtype = SF_FORMATS[path.suffix]
    sf.write(path, samples.T if samples.ndim == 2 else samples, rate, format=fmt, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    return {ext: write_audio(root / f"tone{ext}", tone(440, SAMPLE_RATE, 1.0)) for ext in [*SF_FORMATS, *AV_FORMATS]}


# ---- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [*SF_FORMATS, *AV_FORMATS])
def test_every_format_round_trips_to_16k_mono_float(files, ext):
    wave = load_audio(files[ext])
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(len(wave) - SAMPLE_RATE) <= 1100  # lossy codecs add up to one frame of priming/padding
    assert abs(peak_hz(wave) - 440) < 5
    if ext in LOSSLESS:
        assert torch.allclose(wave, torch.from_numpy(tone(440, SAMPLE_RATE, 1.0)), atol=1e-4)
    # the same bytes from memory (as read from a shard) decode to the same samples
    assert torch.equal(audio_from_bytes(files[ext].read_bytes(), "x"), wave)


@pytest.mark.parametrize("rate", [44100, 8000, 48000, 44101])
def test_resampling_to_16k_keeps_a_tones_frequency(tmp_path, rate):
    samples = tone(1000, rate, 0.5)
    for wave in (load_audio(torch.from_numpy(samples), rate),
                 load_audio(write_audio(tmp_path / f"r{rate}.wav", samples, rate))):
        assert abs(len(wave) - SAMPLE_RATE // 2) <= 2
        assert abs(peak_hz(wave) - 1000) < 4
        assert 0.25 < float(wave[1000:-1000].abs().max()) < 0.35  # amplitude kept


def test_stereo_is_averaged_to_mono(tmp_path):
    stereo = np.stack([tone(440, SAMPLE_RATE, 0.5), tone(660, SAMPLE_RATE, 0.5, amplitude=0.2)])
    expected = torch.from_numpy(stereo.mean(axis=0))
    assert torch.allclose(load_audio(torch.from_numpy(stereo), SAMPLE_RATE), expected, atol=1e-6)
    assert torch.allclose(load_audio(write_audio(tmp_path / "st.flac", stereo)), expected, atol=1e-4)
    assert torch.allclose(load_audio((stereo, SAMPLE_RATE)), expected, atol=1e-6)  # numpy, as a tuple


def test_int16_and_int32_samples_are_pcm_scaled():
    x = tone(440, SAMPLE_RATE, 0.25)
    assert torch.allclose(load_audio(torch.from_numpy((x * 32767).round().astype(np.int16)), SAMPLE_RATE),
                          torch.from_numpy(x), atol=1e-4)
    assert torch.allclose(load_audio((x * 2 ** 31).round().astype(np.int32), SAMPLE_RATE),
                          torch.from_numpy(x), atol=1e-6)


# ---- bad recordings ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("bad_audio")
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("this is not audio\n" * 20)
    (root / "image.wav").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(root / "picture.png")
    (root / "picture.wav").write_bytes((root / "picture.png").read_bytes())
    wav, flac = files[".wav"].read_bytes(), files[".flac"].read_bytes()
    (root / "cut.wav").write_bytes(wav[: len(wav) // 3])
    (root / "cut.flac").write_bytes(flac[: len(flac) // 3])
    sf.write(root / "nosamples.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    sf.write(root / "silent.flac", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    nan = tone(440, SAMPLE_RATE, 0.1)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    return {
        "missing": (root / "missing.wav", "no such file"),
        "directory": (root, "is a directory"),
        "zero bytes": (root / "empty.wav", "empty file"),
        "text": (root / "text.wav", "not audio or corrupt"),
        "png header": (root / "image.wav", "not audio"),
        "png image": (root / "picture.wav", "not audio: no audio stream"),
        "truncated wav": (root / "cut.wav", "truncated WAV file"),
        "truncated flac": (root / "cut.flac", "corrupt or truncated"),
        "no samples": (root / "nosamples.wav", "no audio samples (empty audio)"),
        "silent": (root / "silent.flac", "silent audio"),
        "nan": (root / "nan.wav", "NaN or infinite"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "zero bytes", "text", "png header", "png image",
                                  "truncated wav", "truncated flac", "no samples", "silent", "nan"])
def test_bad_audio_files_name_the_file_and_the_problem(bad_files, case):
    path, problem = bad_files[case]
    with pytest.raises(InputError) as err:
        load_audio(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)
    if case == "silent":
        assert "nothing to transcribe" in str(err.value)
    if path.is_file() and path.stat().st_size:  # bytes (from a shard) get the same verdict, under their name
        with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            audio_from_bytes(path.read_bytes(), "shard.tar:000000001.wav")


@pytest.mark.parametrize("source, rate, problem", [
    (torch.zeros(16000), 16000, "silent audio"),
    (torch.tensor([0.1, float("inf"), 0.2]), 16000, "NaN or infinite"),
    (torch.zeros(0), 16000, "no audio samples"),
    (torch.zeros(1, 0), 16000, "no audio samples"),
    (torch.randn(2, 3, 100), 16000, r"shape must be \[n\] or \[channels, n\]"),
    (torch.randn(16000, 2), 16000, r"looks like \[n, channels\]"),
    (torch.randn(16000), None, "sample_rate is required"),
    (torch.randn(16000), 0, "out of range"),
    (torch.randn(16000), 16000.5, "whole number"),
    (torch.randint(-100, 100, (16000,)), 16000, "int64"),
    (torch.randint(0, 255, (16000,), dtype=torch.uint8), 16000, "uint8"),
    (np.array(["a", "b"]), 16000, "dtype must be"),
    ((torch.randn(100), 16000, 3), None, r"expected \(samples, sample_rate\)"),
    ((torch.randn(100), 16000), 8000, "differs"),
    (b"", None, "empty audio data"),
    (12345, None, "not audio: expected a path"),
])
def test_bad_samples_are_refused(source, rate, problem):
    with pytest.raises(InputError, match=problem):
        load_audio(source, rate)


def test_a_long_file_is_refused_from_its_header_before_decoding(files, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a recording that the header shows is too long")

    monkeypatch.setattr(audio.sf, "read", no_decoding)  # soundfile formats
    monkeypatch.setattr(audio.av, "AudioResampler", no_decoding)  # PyAV formats: no frame is converted
    for ext in (".flac", ".mp3", ".m4a", ".webm"):
        with pytest.raises(InputError) as err:
            load_audio(files[ext], max_seconds=0.5)
        assert str(err.value).startswith(f"{files[ext]}: recording too long: 1.0 s, the limit is 0.5 s")
    with pytest.raises(InputError, match="too long: 2.0 s, the limit is 1 s"):
        load_audio(torch.randn(32000), SAMPLE_RATE, max_seconds=1)


def test_a_stream_without_a_length_stops_decoding_past_the_limit(tmp_path, monkeypatch):
    path = write_av(tmp_path / "long.webm", tone(440, 48000, 8.0), 48000, "libopus")
    monkeypatch.setattr(audio, "_av_duration", lambda container, stream: None)  # as a live recording's webm
    decoded = []
    original = av.AudioFrame.to_ndarray

    def counting(self, *args, **kwargs):
        decoded.append(self.samples)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(av.AudioFrame, "to_ndarray", counting)
    with pytest.raises(InputError, match="recording too long: 1.0 s, the limit is 1 s"):
        load_audio(path, max_seconds=1.0)
    assert 48000 < sum(decoded) < 48000 * 1.1  # stopped within a frame of the limit, not at 8 s
    decoded.clear()
    assert len(load_audio(path, max_seconds=None)) == pytest.approx(8 * SAMPLE_RATE, abs=400)


@pytest.fixture(scope="module")
def corpus_of_real_bytes(files):
    return [p.read_bytes() for p in files.values()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bytes_give_a_wave_or_an_input_error(corpus_of_real_bytes, data):
    """Random bytes, and real files with bytes flipped or cut: a finite 1-D wave or InputError."""
    how = data.draw(st.sampled_from(["random", "flipped", "cut"]))
    if how == "random":
        blob = data.draw(st.binary(max_size=4096))
    else:
        blob = bytearray(data.draw(st.sampled_from(corpus_of_real_bytes)))
        if how == "cut":
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        else:
            for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=20)):
                blob[pos] = data.draw(st.integers(0, 255))
    try:
        wave = audio_from_bytes(bytes(blob), "blob")
    except InputError as e:
        assert str(e).startswith("blob: ")
    else:
        assert wave.dtype == torch.float32 and wave.dim() == 1 and len(wave) > 0
        assert bool(torch.isfinite(wave).all())


# ---- features ---------------------------------------------------------------------------------------
def test_log_mel_frames_and_per_bin_normalisation():
    log_mel = LogMel()
    for n in (1, 159, 160, 399, 400, 16000, 16123):
        feats = log_mel(torch.randn(n) * 0.1)
        assert feats.shape == (feature_frames(n), 80) == (1 + n // 160, 80) and feats.dtype == torch.float32
    noise = 0.01 * torch.randn(32000, generator=torch.Generator().manual_seed(0))
    wave = torch.from_numpy(tone(300, SAMPLE_RATE, 2.0)) + noise
    feats = log_mel(wave)
    assert torch.allclose(feats.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(feats.std(0, unbiased=False), torch.ones(80), atol=1e-3)
    assert torch.allclose(log_mel(4 * wave), feats, atol=1e-3)  # the recording's level does not matter


def test_log_mel_hop_is_10_ms():
    """Silence for 1 s, then a tone: the energy jumps at feature frame 100."""
    wave = torch.cat([1e-3 * torch.randn(SAMPLE_RATE, generator=torch.Generator().manual_seed(0)),
                      torch.from_numpy(tone(1000, SAMPLE_RATE, 1.0))])
    energy = LogMel().mel(wave).sum(0).log()  # [T]
    jump = int((energy[1:] - energy[:-1]).argmax()) + 1
    assert jump in (99, 100, 101)
    log_mel = LogMel()
    fb = log_mel.mel.mel_scale.fb  # [201 frequencies, 80 mels]; frequency i is i * 40 Hz
    loudest = int(log_mel.mel(torch.from_numpy(tone(1000, SAMPLE_RATE, 1.0))).mean(1).argmax())
    assert loudest == int(fb[1000 // 40].argmax())  # the mel bin of 1 kHz


def test_spec_augment_masks_bands_and_stretches_only():
    """Each mask sets whole mel bands or whole frames to the utterance mean (0); nothing else changes;
    no stretch is longer than time_ratio of the recording."""
    from speech.audio import SpecAugment

    torch.manual_seed(0)
    feats = torch.randn(300, 80) + 3.0  # no zeros to begin with
    for _ in range(20):
        out = SpecAugment(2, 27, 2, 40, 0.05)(feats)
        assert out.shape == feats.shape
        zero = out == 0
        bands, frames = zero.all(0), zero.all(1)
        assert torch.equal(zero, bands[None, :] | frames[:, None])  # masks are whole bands / frames
        assert torch.equal(out[~zero], feats[~zero])
        assert 0 < bands.sum() <= 2 * 27 and frames.sum() <= 2 * 15  # 15 = 5% of 300 frames
    assert SpecAugment(0, 27, 0, 40, 0.05)(feats).equal(feats)


def test_speed_perturbation_changes_tempo_and_pitch_together():
    """A factor f plays the recording f times as fast: 1/f of its length, its pitch f times as high;
    1.0 leaves it untouched; the factor is drawn from the list."""
    from speech.audio import SpeedPerturbation

    wave = torch.from_numpy(tone(400, SAMPLE_RATE, 1.0))
    for f in (0.9, 1.1):
        out = SpeedPerturbation([f])(wave)
        assert abs(len(out) - len(wave) / f) <= 2
        assert abs(peak_hz(out) - 400 * f) < 3
    assert SpeedPerturbation([1.0])(wave) is wave
    torch.manual_seed(0)
    lengths = {len(SpeedPerturbation([0.9, 1.0, 1.1])(wave)) for _ in range(30)}
    assert len(lengths) == 3


# ---- shards -----------------------------------------------------------------------------------------
def test_mm_data_writes_audio_shards_skipping_a_corrupt_file(tmp_path, capsys):
    paths = {"one": write_audio(tmp_path / "one.flac", tone(300, 22050, 0.6), 22050),
             "two": write_audio(tmp_path / "two.mp3", tone(500, SAMPLE_RATE, 0.8)),
             "three": write_av(tmp_path / "three.webm", tone(700, 48000, 0.5), 48000, "libopus")}
    (tmp_path / "broken.wav").write_bytes(paths["one"].read_bytes()[:300])  # header of a flac, cut short
    rows = [{"audio": "one.flac", "caption": "a low tone"}, {"audio": "broken.wav", "caption": "lost"},
            {"audio": "two.mp3", "caption": "a middle tone"}, {"audio": "three.webm", "caption": "a high tone"}]
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert main(["data", "captions", str(manifest), str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples" in captured.out and "skipped 1" in captured.out
    assert "broken.wav: corrupt or truncated" in captured.err
    samples = list(first_shard_samples(expand_shards([str(out)])))
    assert [sample_json(s)["caption"] for s in samples] == ["a low tone", "a middle tone", "a high tone"]
    assert [k for k in samples[2] if not k.startswith("__")] == ["audio.webm", "json"]  # never taken for a video
    with pytest.raises(InputError, match="no video"):
        video_bytes(samples[2])
    for sample, freq, seconds in zip(samples, (300, 500, 700), (0.6, 0.8, 0.5)):
        wave = decode_audio(sample)
        assert abs(peak_hz(wave) - freq) < 5 and abs(len(wave) / SAMPLE_RATE - seconds) < 0.07
    assert sample["audio.webm"] == paths["three"].read_bytes()  # the original bytes, as written
    damaged = dict(samples[0], flac=samples[0]["flac"][:200])
    with pytest.raises(InputError, match=r"shards/captions-000000\.tar:000000000\.flac: corrupt or truncated"):
        decode_audio(damaged)


def test_audio_folders_and_dialogue_qa_shards(tmp_path):
    write_audio(tmp_path / "hello.flac", tone(440, SAMPLE_RATE, 0.3))
    (tmp_path / "hello.txt").write_text("hello there\n")
    rows = list(read_manifest(tmp_path))
    assert rows == [{"audio": str(tmp_path / "hello.flac"), "caption": "hello there"}]
    manifest = tmp_path / "dialogue.csv"
    manifest.write_text("audio,question,answer\nhello.flac,Is it raining?,No it is not.\n")
    out = tmp_path / "qa"
    assert main(["data", "qa", str(manifest), str(out)]) == 0
    (sample,) = first_shard_samples(expand_shards([str(out)]))
    assert sample_json(sample) == {"question": "Is it raining?", "answer": "No it is not."}
    assert len(decode_audio(sample)) == int(0.3 * SAMPLE_RATE)


# ---- the speech corpus's text (scripts/speech_corpus.py) ------------------------------------------
def _corpus_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "speech_corpus.py"
    spec = importlib.util.spec_from_file_location("speech_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_sentences_are_clean_deduplicated_and_held_out(tmp_path):
    corpus = _corpus_module()
    (tmp_path / "sample").write_bytes(
        b"Are you sure the back door is locked?\n%\n"
        b"A tall, dark stranger will have more fun than you.  Drain the moat.\n%\n"
        b"After your lover has gone you will still have PEANUT BUTTER!\n%\n"
        b"Kirk:\tWe must find the ship before the sun goes down.\n%\n"
        b"A man lives life as it happens, or he\nturns his back on it.\n"
        b"\t\t-- Dr. Boyce, \"The Menagerie\", stardate unknown\n%\n"
        b"Q:\tWhat is the name of the world's oldest pilot?\n%\n"
        b"He said, \"Why do we always have to wait here?\"\n%\n"
        b"See http://www.example.com for the full list of rules.\n%\n"
        b"Ahead warp factor one, Mr. Sulu, and do not spare the engines.\n%\n"
        b"ARE YOU SURE the back door is locked?\n%\n"
        b"are you sure the back door is locked?\n%\n"
        b"Caf\xe9 au lait is served in the morning here.\n%\n"
        b"Azh nazg durbatuluk, azh nazg gimbatul, the ring said.\n%\n"
        b"It is hard to be an on-your-own-take-care-of-yourself grown-up.\n")
    (tmp_path / "sample.dat").write_bytes(b"\x00" * 24)  # index files are not text
    english = set("a man lives life as it happens or he turns his back on tall dark stranger will have more fun "
                  "than you are sure the door is locked said why do we always to wait here what name of world's "
                  "oldest pilot ring hard be an own take care yourself grown up azh".split())
    assert corpus.corpus_sentences(tmp_path, english) == [
        "A man lives life as it happens, or he turns his back on it.",
        "A tall, dark stranger will have more fun than you.",
        "Are you sure the back door is locked?",
        "He said, Why do we always have to wait here?",
        "What is the name of the world's oldest pilot?",
    ]  # speaker lines, shouting, URLs, abbreviations, non-ASCII, non-English, hyphen chains, short and
    # duplicate sentences are gone
    if not (corpus.FORTUNES.is_dir() and corpus.WORD_LIST.is_file()):
        return  # the packages of scripts/setup.sh
    sentences = corpus.corpus_sentences()
    assert len(sentences) > 5000 and sum(s.endswith("?") for s in sentences) > 700
    args = type("Args", (), dict(seed=3, train_sentences=2000, heldout_sentences=100, dialogue_train=300,
                                 dialogue_heldout=50, dev_sentences=80))
    parts = corpus.split(sentences, args)
    assert parts == corpus.split(sentences, args)  # seeded
    assert [len(parts[k]) for k in ("asr_train", "asr_heldout", "dialogue_train", "dialogue_heldout", "asr_dev")] == [
        2000, 100, 300, 50, 80]
    held_out = set(parts["asr_heldout"]) | set(parts["dialogue_heldout"])
    trained = set(parts["asr_train"]) | set(parts["dialogue_train"])
    assert not held_out & trained
    assert not set(parts["asr_dev"]) & (held_out | trained)
    assert all(q.endswith("?") for q in parts["dialogue_train"] + parts["dialogue_heldout"])


def test_further_readings_are_other_training_voices_never_held_out():
    corpus = _corpus_module()
    texts = [f"Sentence number {i} is here." for i in range(50)]
    first = corpus.assign_voices(texts, corpus.TRAIN_VOICES, "0/asr_train")
    more = corpus.further_readings(texts, first, 3, "0/asr_train/readings")
    assert more == corpus.further_readings(texts, first, 3, "0/asr_train/readings")  # seeded
    assert len(more) == 2 * len(texts) and [t for t, _, _ in more] == texts + texts
    for text in texts:
        voices = [v for t, v, _ in first + more if t == text]
        assert len(set(voices)) == 3  # each reading by another voice
    used = {v for _, v, _ in more}
    assert used <= set(corpus.TRAIN_VOICES + corpus.MORE_TRAIN_VOICES) and used & set(corpus.MORE_TRAIN_VOICES)
    held_out = set(corpus.HELDOUT_VOICES)
    variants = {v.partition("+")[2] for v in held_out} - {""}
    accents = {v.partition("+")[0] for v in held_out}
    assert all(v.partition("+")[0] not in accents and v.partition("+")[2] not in variants
               for v in corpus.TRAIN_VOICES + corpus.MORE_TRAIN_VOICES)
    assert corpus.further_readings(texts, first, 1, "seed") == []


def test_the_speech_proof_reads_a_typed_text_as_the_character_search_would():
    """scripts/speech_proof.py read_as_spoken: the words of a typed sentence, as the punctuation
    oracle hands them to model.write_out (lower case, the head's alphabet, hyphens as spaces)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "speech_proof.py"
    spec = importlib.util.spec_from_file_location("speech_proof", path)
    proof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proof)
    assert proof.read_as_spoken("What's a half-dozen Indians, Mr. O'Neil? 42!") == [
        "what's", "a", "half", "dozen", "indians", "mr", "o'neil", "42"]
    assert proof.read_as_spoken("?!") == []
