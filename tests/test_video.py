"""The video path on the tiny model: decoding, sampling, the aggregator, video cross-attention,
the video stages, and bad video files."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mm
from conftest import make_image, open_gates
from mm.cli import main
from mm.data import ShardBatches, expand_shards, read_manifest, write_shards
from mm.errors import InputError
from mm.stages import load_stage_config
from mm.train import train
from video import TemporalAggregator, VideoConfig, load_video, write_video
from video.frames import sample_indices

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = [".mp4", ".webm", ".avi", ".mkv", ".gif"]


def ramp_clip(frames: int = 12, height: int = 24, width: int = 32) -> torch.Tensor:
    """Frame t is a flat grey of level 20 * t (easy to recognise after lossy coding)."""
    levels = torch.arange(frames) * 20
    return levels.view(-1, 1, 1, 1).expand(frames, 3, height, width).to(torch.uint8).contiguous()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {ext: write_video(root / f"ramp{ext}", ramp_clip()) for ext in CONTAINERS}


# ---- decoding and sampling ---------------------------------------------------------------------
@pytest.mark.parametrize("ext", CONTAINERS)
def test_every_container_decodes_to_the_sampled_frames_in_order(clip_files, ext):
    clip = load_video(clip_files[ext], 4)
    assert clip.frames.shape == (4, 3, 24, 32) and clip.frames.dtype == torch.uint8
    assert clip.source_frames == 12 and not clip.repeated
    wanted = torch.tensor(sample_indices(12, 4)) * 20.0  # source frames 1, 4, 7, 10
    levels = clip.frames.float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, wanted, atol=6), levels
    assert bool((clip.timestamps.diff() > 0).all())


def test_uniform_sampling_and_short_clips_repeat_frames(clip_files):
    assert sample_indices(64, 4) == [8, 24, 40, 56]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than asked: each repeated, in order
    clip = load_video(clip_files[".mp4"], 30)
    assert clip.repeated and clip.frames.shape[0] == 30
    levels = clip.frames.float().mean(dim=(1, 2, 3))
    assert bool((levels.diff() >= -3).all())  # still in time order


def test_a_long_clip_keeps_only_the_sampled_frames(tmp_path, monkeypatch):
    """Memory is bounded by F, not by the clip's length: only F decoded frames become arrays."""
    path = write_video(tmp_path / "long.mp4", ramp_clip(frames=600, height=16, width=16) // 3)
    converted = []
    original = av.VideoFrame.to_ndarray

    def counting(self, *args, **kwargs):
        converted.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    clip = load_video(path, 8)
    assert clip.source_frames == 600 and clip.frames.shape[0] == 8 and len(converted) == 8


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, clip_files):
    root = tmp_path_factory.mktemp("bad_videos")
    good = clip_files[".mp4"].read_bytes()
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / "codec.mp4").write_bytes(good.replace(b"avc1", b"zzzz"))  # a codec FFmpeg can't decode
    container = av.open(str(root / "noframes.mkv"), "w")  # a video stream that never gets a frame
    stream = container.add_stream("mpeg4", rate=8)
    stream.width = stream.height = 16
    container.start_encoding()
    container.close()
    with av.open(str(root / "audio.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return {
        "missing": (root / "missing.mp4", "no such file"),
        "directory": (root, "is a directory"),
        "zero bytes": (root / "empty.mp4", "empty file"),
        "not a video": (root / "text.mp4", "not a video or corrupt"),
        "truncated": (root / "truncated.mp4", "not a video or corrupt"),
        "unknown codec": (root / "codec.mp4", "unsupported video codec"),
        "no frames": (root / "noframes.mkv", "no decodable video frames"),
        "audio only": (root / "audio.mp4", "no video stream"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "zero bytes", "not a video", "truncated", "unknown codec",
                                  "no frames", "audio only"])
def test_bad_video_files_name_the_file_and_the_problem(tiny, bad_videos, case):
    path, problem = bad_videos[case]
    with pytest.raises(InputError) as err:
        tiny.generate("what happens?", video=path, max_new_tokens=2)
    assert str(path) in str(err.value) and problem in str(err.value)
    assert main(["ask", "--model", "tiny", "--video", str(path), "what happens?"]) == 2


def test_cli_bad_video_is_one_line_and_exit_code_2(bad_videos):
    path, problem = bad_videos["unknown codec"]
    proc = subprocess.run([sys.executable, "-m", "mm", "ask", "--model", "tiny", "--video", str(path), "q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0]


def test_bad_video_tensors(tiny):
    with pytest.raises(InputError, match="uint8"):
        tiny.generate("q", video=torch.zeros(4, 3, 8, 8), max_new_tokens=1)
    with pytest.raises(InputError, match=r"\[T, 3, H, W\]"):
        tiny.generate("q", video=torch.zeros(3, 8, 8, dtype=torch.uint8), max_new_tokens=1)
    with pytest.raises(InputError, match="no frames"):
        tiny.generate("q", video=torch.zeros(0, 3, 8, 8, dtype=torch.uint8), max_new_tokens=1)


# ---- the aggregator ----------------------------------------------------------------------------------
def test_aggregator_starts_as_the_mean_of_each_run_of_frames():
    torch.manual_seed(0)
    agg = TemporalAggregator(VideoConfig(frames=8, merge=4, width=0, heads=4, layers=2), in_dim=24,
                             tokens_per_frame=5)
    frames = torch.randn(2, 8, 5, 24)
    means = frames.view(2, 2, 4, 5, 24).mean(2).reshape(2, 10, 24)
    assert torch.allclose(agg(frames), means + agg.latents.repeat(2, 1), atol=1e-6)


def test_aggregator_merges_runs_of_frames_and_sees_their_order():
    torch.manual_seed(0)
    agg = TemporalAggregator(VideoConfig(frames=8, merge=4, width=32, heads=4, layers=2), in_dim=24,
                             tokens_per_frame=5)
    with torch.no_grad():  # as after training: the zero-initialised branches and embeddings open
        for p in agg.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    frames = torch.randn(2, 8, 5, 24)
    out = agg(frames)
    assert out.shape == (2, 2 * 5, 32)
    swapped = frames[:, [1, 0, 2, 3, 4, 5, 6, 7]]  # two frames of the first run change places
    assert not torch.allclose(agg(swapped)[:, :5], out[:, :5], atol=1e-4)
    assert torch.allclose(agg(swapped)[0, 5:], out[0, 5:], atol=1e-5)  # the other run is untouched
    assert agg(torch.randn(1, 16, 5, 24), merge=8).shape == (1, 2 * 5, 32)  # any merge length


def test_video_path_can_start_from_the_image_path(tmp_path):
    model = mm.load("tiny", overrides=["video.width=0"])
    open_gates(model, 0.4)
    with torch.no_grad():
        for block in model.xattn["video"]:
            block.attn_gate.scale.zero_()
            block.mlp_gate.scale.zero_()
    copied = model.init_video_from_image()
    assert "projectors.video.weight" in copied
    assert torch.equal(model.projectors["video"].weight, model.projectors["image"].weight)
    for layer, block in zip(model.video_layers, model.xattn["video"]):
        twin = model.xattn["image"][model.image_layers.index(layer)]
        assert torch.equal(block.cross_attn.q_proj.weight, twin.cross_attn.q_proj.weight)
        assert block.attn_gate.scale.item() == 0 and block.mlp_gate.scale.item() == 0


# ---- video cross-attention --------------------------------------------------------------------------
def test_zero_video_gates_change_nothing_and_open_ones_only_act_after_the_video_token(tiny):
    video = ramp_clip(frames=6, height=20, width=20)
    batch = tiny.prepare([tiny.user_messages("first <|video|> then <|image|> and text", [make_image(30, 20)],
                                             videos=[video])])
    assert batch.videos.shape[:2] == (1, tiny.config.video.frames)
    open_gates(tiny)
    with torch.no_grad():
        for block in tiny.xattn["video"]:
            block.attn_gate.scale.zero_()
            block.mlp_gate.scale.zero_()
        with_video = tiny(batch.ids, batch.attention_mask, batch.images, batch.image_rows,
                          videos=batch.videos, video_rows=batch.video_rows).logits
        without = tiny(batch.ids, batch.attention_mask, batch.images, batch.image_rows).logits
        assert torch.equal(with_video, without)
        open_gates(tiny)
        opened = tiny(batch.ids, batch.attention_mask, batch.images, batch.image_rows,
                      videos=batch.videos, video_rows=batch.video_rows).logits
    at = int((batch.ids[0] == tiny.media_token_ids["video"]).nonzero())
    assert torch.equal(opened[:, :at], without[:, :at])
    assert not torch.allclose(opened[:, at:], without[:, at:])


def test_video_blocks_run_before_the_image_blocks_of_their_layer(tiny):
    assert set(tiny.video_layers) <= set(tiny.image_layers)
    for layer in tiny.video_layers:
        assert [name for name, _ in tiny.fusion._at[layer]] == ["video", "image"]


def test_video_keys_values_once_per_generate_and_batches_mixing_media(tiny):
    open_gates(tiny)
    video = ramp_clip(frames=5, height=16, width=24)
    replies = tiny.generate(["<|video|> and <|image|>?", "just text", "a video"],
                            images=[[make_image(20, 20)], [], []], video=[video, None, video], max_new_tokens=6)
    assert len(replies) == 3
    contexts = tiny.last_contexts
    assert contexts["video"].kv_computations == len(tiny.xattn["video"])
    assert contexts["image"].kv_computations == len(tiny.xattn["image"])
    alone = tiny.generate("just text", max_new_tokens=6)
    assert replies[1] == alone  # a text row in a batch with media gets its own reply
    chat = tiny.chat([{"role": "user", "content": [{"type": "video", "video": video},
                                                   {"type": "text", "text": "a video"}]}], max_new_tokens=6)
    assert chat == replies[2]
    assert "".join(tiny.stream("a video", video=video, max_new_tokens=6)) == replies[2]


def test_cli_ask_with_a_video_file(tiny, clip_files, capsys):
    path = clip_files[".webm"]
    assert main(["ask", "--model", "tiny", "--video", str(path), "--max-new-tokens", "3", "What happens?"]) == 0
    assert capsys.readouterr().out == tiny.generate("What happens?", video=path, max_new_tokens=3) + "\n"


# ---- shards and stages ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Clips that get brighter or darker over time, captioned and asked about."""
    root = tmp_path_factory.mktemp("video_data")
    rows = []
    for i in range(24):
        way = "brighter" if i % 2 else "darker"
        clip = ramp_clip(frames=8, height=16, width=16) + 40
        if way == "darker":
            clip = clip.flip(0)
        path = write_video(root / f"{i:03d}{CONTAINERS[i % 4]}", clip)
        rows.append({"video": str(path), "caption": f"it gets {way}", "question": "Brighter or darker?",
                     "answer": way})
    (root / "bad.mp4").write_text("not a video")
    rows.append({"video": str(root / "bad.mp4"), "caption": "x", "question": "q", "answer": "a"})
    assert write_shards(rows, root / "captions", "captions", per_shard=12, log=lambda m: None).skipped == 1
    assert write_shards(rows, root / "qa", "qa", per_shard=12, log=lambda m: None).written == 24
    return root


def test_video_shards_decode_in_training_order(tiny, video_shards):
    from mm.stages import LMExamples, collate_lm

    decode = LMExamples(tiny, "qa", 64, media="video")
    data = ShardBatches(expand_shards([str(video_shards / "qa")]), batch_size=4, seed=0, shuffle_buffer=8,
                        decode=decode, collate=lambda e: collate_lm(e, 0))
    batch = next(iter(data))
    f, s = tiny.config.video.frames, tiny.config.vision.image_size
    assert batch["videos"].shape == (4, f, 3, s, s) and batch["skipped"] == 0
    assert (batch["ids"] == tiny.media_token_ids["video"]).sum() == 4


def test_folder_of_videos_becomes_caption_rows(tmp_path, clip_files):
    (tmp_path / "a.mp4").write_bytes(clip_files[".mp4"].read_bytes())
    (tmp_path / "a.txt").write_text("a ramp")
    (tmp_path / "b.png").write_bytes(b"")
    rows = list(read_manifest(tmp_path))
    assert {"video": str(tmp_path / "a.mp4"), "caption": "a ramp"} in rows
    assert any("image" in r for r in rows)


def video_stage(tmp_path, shards, stage="video_pretrain", **changes) -> Path:
    config = {
        "stage": stage, "model": "tiny", "loss": "lm", "train": ["aggregator", "projectors.video", "xattn.video"],
        "data": {"shards": [str(shards / ("captions" if stage == "video_pretrain" else "qa"))],
                 "kind": "captions" if stage == "video_pretrain" else "qa", "media": "video",
                 "batch_size": 4, "workers": 0, "shuffle_buffer": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "steps": 4, "gate_lr": 3e-2},
        "output": str(tmp_path / stage), "save_every": 4,
    }
    config.update(changes)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tensor_hashes(model, prefixes) -> dict[str, str]:
    return {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()
            if k.startswith(prefixes)}


def test_video_stages_train_only_the_aggregator_and_video_blocks(tmp_path, video_shards):
    image_model = tmp_path / "image_model"
    base = mm.load("tiny")
    open_gates(base, 0.3)  # stands in for a trained image path: it must come out unchanged
    base.save(image_model)
    frozen = ("decoder.", "encoders.", "projectors.image", "xattn.image", "media_embedding")
    before = tensor_hashes(mm.load(image_model), frozen)
    video_before = tensor_hashes(mm.load(image_model), ("aggregator", "projectors.video", "xattn.video"))
    first = train(load_stage_config(video_stage(tmp_path, video_shards, init=str(image_model))))
    second = train(load_stage_config(video_stage(
        tmp_path, video_shards, stage="video_sft", init=str(first),
        model={"base": "tiny", "video": {"frames": 8, "merge": 4}})))
    keys = load_file(str(second / "adapters.safetensors")).keys()
    assert keys and all(k.startswith(("aggregator.", "projectors.video.", "xattn.video.")) for k in keys)
    trained = mm.load(second)
    assert trained.config.video.frames == 8 and trained.config.video.merge == 4
    assert tensor_hashes(trained, frozen) == before
    after = tensor_hashes(trained, ("aggregator", "projectors.video", "xattn.video"))
    assert all(after[k] != video_before[k] for k in after if k.endswith("gate.scale"))
    assert trained.decoder_sha256() == mm.load("tiny").decoder_sha256()


def test_video_stage_config_checks(tmp_path, video_shards):
    with pytest.raises(mm.ConfigError, match="needs data.media: video"):
        load_stage_config(video_stage(tmp_path, video_shards, data={"shards": ["x"], "media": "image"}))
    with pytest.raises(mm.ConfigError, match="multiple of merge"):
        load_stage_config(video_stage(tmp_path, video_shards, model={"base": "tiny", "video": {"frames": 5}}))


def test_cli_data_from_a_video_manifest_and_eval_on_video_qa(tmp_path, clip_files, capsys):
    import json

    from mm.evaluate import EvalConfig, evaluate

    manifest = tmp_path / "clips.jsonl"
    rows = [{"video": str(clip_files[ext]), "question": "What happens?", "answer": "it brightens"} for ext in CONTAINERS]
    rows.append({"video": str(tmp_path / "gone.mp4"), "question": "q", "answer": "a"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "qa", str(manifest), str(tmp_path / "shards")]) == 0
    out = capsys.readouterr()
    assert "wrote 5 samples" in out.out and "skipped 1" in out.out and "gone.mp4: no such file" in out.err
    result = evaluate(EvalConfig(model="tiny", shards=[str(tmp_path / "shards")], max_new_tokens=2, batch_size=2))
    assert result["samples"] == 5 and 0 <= result["correct"] <= 5
