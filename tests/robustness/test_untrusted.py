"""Checkpoints one did not make: weights only from safetensors, configs validated before anything
is built, pickle refused with the reason, no code from a checkpoint ever run."""
from __future__ import annotations

import pickle
import struct

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mm
import mm.api
from mm.checkpoint import load_tensors
from mm.cli import main
from mm.errors import CheckpointError, ConfigError


class Boom:
    """Unpickling this would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    mm.load("tiny").save(path)
    return path


def copy_of(saved, tmp_path):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(saved, out)
    return out


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(CheckpointError, match="pickle-based checkpoint refused .loading it could run code"):
        load_tensors(path)
    assert not marker.exists()


def test_pickle_behind_the_safetensors_name_is_refused(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    marker = tmp_path / "code_ran"
    (ckpt / "adapters.safetensors").write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        mm.load(ckpt)
    assert not marker.exists()


def test_config_is_validated_before_anything_is_built(saved, tmp_path, monkeypatch):
    ckpt = copy_of(saved, tmp_path)
    meta = yaml.safe_load((ckpt / "config.yaml").read_text())
    meta["model"]["vision"]["layrs"] = 3
    (ckpt / "config.yaml").write_text(yaml.safe_dump(meta))

    def no_build(*_):
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(mm.api, "build", no_build)
    with pytest.raises(ConfigError, match="unknown key 'vision.layrs'"):
        mm.load(ckpt)


def test_yaml_tags_that_would_run_code_are_refused(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    marker = tmp_path / "code_ran"
    (ckpt / "config.yaml").write_text(f"format: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(CheckpointError, match="unreadable checkpoint config"):
        mm.load(ckpt)
    assert not marker.exists()


def test_tensors_that_do_not_fit_are_refused(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    tensors = load_file(ckpt / "adapters.safetensors")
    name = next(iter(tensors))
    save_file({**tensors, "encoders.evil.weight": torch.zeros(2)}, str(ckpt / "adapters.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoders.evil.weight'"):
        mm.load(ckpt)
    save_file({**tensors, name: torch.zeros(7, 7)}, str(ckpt / "adapters.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        mm.load(ckpt)


def test_a_lying_safetensors_header_is_refused(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    # a header that claims 2**60 bytes of JSON, then garbage
    (ckpt / "adapters.safetensors").write_bytes(struct.pack("<Q", 2 ** 60) + b"{" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        mm.load(ckpt)


def test_other_decoder_refused_unless_forced(saved, tmp_path, capsys):
    ckpt = copy_of(saved, tmp_path)
    meta = yaml.safe_load((ckpt / "config.yaml").read_text())
    meta["decoder"]["sha256"] = "0" * 64
    (ckpt / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match="trained on another decoder"):
        mm.load(ckpt)
    assert mm.load(ckpt, force=True) is not None
    assert main(["ask", "--model", str(ckpt), "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on another decoder" in err[0] and "--force" in err[0]


def test_mllama_import_refuses_pickle(tmp_path, capsys):
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "mllama"}')
    marker = tmp_path / "code_ran"
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(marker)))
    assert main(["import-mllama", str(source), str(tmp_path / "out")]) == 2
    assert "pickle-based weights refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
