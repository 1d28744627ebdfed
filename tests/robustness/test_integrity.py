"""Integrity: after every kind of stage the decoder's weights hash the same; the checkpoint records
the hash of the decoder it was trained on, and loading it onto another decoder is refused unless
forced."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import mm
from mm.errors import CheckpointError
from mm.stages import load_stage_config
from mm.train import train
from tests.test_speech import speech_shards  # noqa: F401
from tests.test_training import shards  # noqa: F401
from tests.test_video import clip_files, video_shards  # noqa: F401

STAGES = {  # stage config -> (data fixture, shard folders, extra overrides)
    "image_pretrain": ("shards", ["captions"], ["init=null"]),
    "image_sft": ("shards", ["qa"], ["init=null", "data.kind=qa"]),
    "video_pretrain": ("video_shards", ["captions"], ["init=null", "init_video_from_image=false"]),
    "speech_ssl": ("speech_shards", ["asr"], ["init=null", "bestrq={vocab: 16, codebooks: 2, span: 8}"]),
    "speech_ctc": ("speech_shards", ["asr"], ["init=null"]),
    "speech_sft": ("speech_shards", ["asr", "dialogue"], ["init=null", "ctc_weight=0.2"]),
}


@pytest.mark.parametrize("stage", STAGES)
def test_the_decoder_is_untouched_by_every_stage(stage, tmp_path, request):
    fixture, folders, extra = STAGES[stage]
    root = request.getfixturevalue(fixture)
    bare = mm.load("tiny")
    before = bare.decoder_sha256()
    cfg = load_stage_config(f"configs/stages/{stage}.yaml", [
        "model=tiny", "decoder=null", f"output={tmp_path / stage}", "data.batch_size=4", "data.workers=0",
        "data.shuffle_buffer=4", "optim.steps=3", "optim.warmup_steps=1", "save_every=3",
        f"data.shards={json.dumps([str(root / f) for f in folders])}", *extra])
    final = train(cfg)
    meta = yaml.safe_load((final / "config.yaml").read_text())
    assert meta["decoder"]["sha256"] == before  # recorded
    model = mm.load(final)
    assert model.decoder_sha256() == before  # and unchanged by training
    assert all(not p.requires_grad for p in model.decoder.parameters())

    # the same checkpoint on another decoder (one weight changed): refused unless forced
    with torch.no_grad():
        other = bare.decoder.state_dict()
        other["lm_head.weight"][0, 0] += 1
    from mm.checkpoint import fingerprint

    meta["decoder"]["sha256"] = fingerprint(other)
    (final / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(CheckpointError, match="trained on another decoder"):
        mm.load(final)
    assert mm.load(final, force=True).decoder_sha256() == before
