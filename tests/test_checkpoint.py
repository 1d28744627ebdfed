"""model.save / mm.load round trip; what a checkpoint holds; refusals."""
from __future__ import annotations

import errno

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mm
from mm.checkpoint import write_dir_atomically
from mm.errors import CheckpointError
from tests.conftest import make_image, open_gates


def test_round_trip_gives_the_same_answers(tiny, tmp_path):
    open_gates(tiny, 0.9)
    image = make_image(40, 30)
    before = tiny.generate("what is this?", images=[image], max_new_tokens=12)
    tiny.save(tmp_path / "ckpt")
    loaded = mm.load(tmp_path / "ckpt")
    assert loaded.generate("what is this?", images=[image], max_new_tokens=12) == before
    assert loaded.xattn["image"][0].attn_gate.scale.item() == pytest.approx(0.9)


def test_checkpoint_holds_adapters_and_decoder_identity_only(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "adapters.safetensors"))
    assert tensors and not any(k.startswith("decoder.") for k in tensors)
    meta = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert meta["decoder"] == {"source": "tiny", "sha256": tiny.decoder_sha256()}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapters.safetensors", "config.yaml"]


def test_other_decoder_is_refused_unless_forced(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "config.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta["decoder"]["sha256"] = "0" * 64
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match="trained on another decoder"):
        mm.load(tmp_path / "ckpt")
    assert mm.load(tmp_path / "ckpt", force=True) is not None


def test_pickle_and_corrupt_weights_are_refused(tiny, tmp_path):
    from mm.checkpoint import load_tensors

    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_tensors(tmp_path / "w.pt")
    tiny.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapters.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        mm.load(tmp_path / "ckpt")


def test_failed_write_leaves_the_previous_checkpoint(tiny, tmp_path):
    target = tmp_path / "ckpt"
    tiny.save(target)
    before = (target / "adapters.safetensors").read_bytes()

    def failing(tmp):
        (tmp / "adapters.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="ckpt: could not be written .No space left on device.; the previous"):
        write_dir_atomically(target, failing)
    assert (target / "adapters.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
