"""mm.load and checkpoint files of the composite model.

A checkpoint directory holds:
    config.yaml          the model config, the decoder's identity (source and sha256), the format
    adapters.safetensors every non-decoder tensor (the decoder is referenced, never copied)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from mm.checkpoint import load_tensors, write_dir_atomically
from mm.config import CONFIG_DIR, ModelConfig, apply_overrides, from_dict, list_configs, load_model_config, to_dict
from mm.decoders import load_decoder
from mm.errors import CheckpointError, ConfigError, InputError
from mm.model import MultimodalModel

FORMAT = "mm-checkpoint/1"
CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "adapters.safetensors"


def build(config: ModelConfig) -> MultimodalModel:
    decoder, tokenizer = load_decoder(config.decoder)
    return MultimodalModel(config, decoder, tokenizer)


def load(source: str | Path = "smollm2", *, overrides: list[str] = (), force: bool = False,
         device: str | torch.device | None = None) -> MultimodalModel:
    """A model by name (tiny, smollm2, ... from configs/models/), a checkpoint directory written by
    `save` or a training stage, a model config YAML, or a Llama checkpoint directory (which gets the
    default, untrained adapters). `force` loads a checkpoint onto a decoder whose weights differ
    from the one it was trained with. The model is in eval mode."""
    name = str(source)
    path = Path(name)
    if name in list_configs("models"):
        model = build(load_model_config(CONFIG_DIR / "models" / f"{name}.yaml", overrides))
    elif path.is_dir() and (path / CONFIG_FILE).is_file():
        model = load_checkpoint(path, force=force, overrides=overrides)
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        model = build(load_model_config(path, overrides))
    elif path.is_dir() and (path / "config.json").is_file():
        default = CONFIG_DIR / "models" / "smollm2.yaml"
        model = build(load_model_config(default, [f"decoder={path.resolve()}", *overrides]))
    elif path.exists():
        raise InputError(path, "not a model: expected a checkpoint directory (config.yaml), "
                               "a model config (.yaml) or a Llama checkpoint directory (config.json)")
    else:
        raise InputError(name, f"unknown model (not a file or directory; names: {', '.join(list_configs('models'))})")
    model.eval()  # for inference: no dropout (training stages call train() on what they train)
    return model.to(device) if device is not None else model


def save_checkpoint(model: MultimodalModel, path: str | Path) -> None:
    """Write every adapter tensor and the config, atomically: a self-contained checkpoint."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    meta = {
        "format": FORMAT,
        "model": to_dict(model.config),
        "decoder": {"source": model.config.decoder, "sha256": model.decoder_sha256()},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))

    write_dir_atomically(path, write)


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(path, "no such checkpoint (no config.yaml)" if not path.is_dir() or not any(path.iterdir())
                              else "not a checkpoint directory (no config.yaml)")
    try:
        meta = yaml.safe_load((path / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(path / CONFIG_FILE, f"unreadable checkpoint config ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(path / CONFIG_FILE, f"not an mm checkpoint (format should be {FORMAT})")
    return meta


def checkpoint_chain(path: Path) -> list[tuple[Path, dict]]:
    """The checkpoint and the ones it was initialised from (`init`, absolute or relative to the
    checkpoint's own directory), oldest first."""
    chain, seen = [], set()
    while path is not None:
        if path.resolve() in seen:
            raise CheckpointError(path, "checkpoints initialise each other in a loop")
        seen.add(path.resolve())
        meta = read_checkpoint_meta(path)
        chain.append((path, meta))
        path = init_of(path, meta)
    return chain[::-1]


def init_of(path: Path, meta: dict) -> Path | None:
    """The checkpoint `path` (its config `meta`) was initialised from: an absolute init as it is,
    a relative one taken from the checkpoint's own directory; None for a checkpoint built fresh."""
    return Path(os.path.normpath(Path(path) / meta["init"])) if meta.get("init") else None


def load_checkpoint(path: str | Path, *, force: bool = False, config: ModelConfig | None = None,
                    overrides: list[str] = ()) -> MultimodalModel:
    """Build the newest checkpoint's model and apply the tensors of every checkpoint of its
    chain, oldest first. `overrides` (key=value) change its recorded config, such as how it
    decodes (speech.transcriber.beam=8); one that changes a tensor's shape fails on loading. A
    training stage passes its own `config` instead: a higher resolution (positional embeddings
    are resampled) or another decoder of the same architecture (the base -> instruct hot-swap);
    `force` then allows the decoder to differ from the recorded one."""
    path = Path(path)
    chain = checkpoint_chain(path)
    newest = chain[-1][1]
    if config is None:
        source = str(path / CONFIG_FILE)
        config = from_dict(ModelConfig, apply_overrides(newest.get("model") or {}, list(overrides), source), source)
        config.validate(source)
    tensors = [(p, load_tensors(p / WEIGHTS_FILE)) for p, _ in chain]  # all read before building
    model = build(config)
    expected = (newest.get("decoder") or {}).get("sha256")
    if expected and expected != model.decoder_sha256() and not force:
        raise CheckpointError(path, f"trained on another decoder (sha256 {expected[:12]}..., "
                                    f"loaded {model.decoder_sha256()[:12]}...); pass force=True / --force "
                                    "(in a stage: decoder: PATH) to load anyway")
    for source, t in tensors:
        load_adapter_tensors(model, t, source)
    return model


def load_adapter_tensors(model: MultimodalModel, tensors: dict, source) -> None:
    """Load a subset of adapter tensors; names and shapes must match the model's."""
    own = model.adapter_state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(source, f"unexpected tensor '{unknown[0]}' ({len(unknown)} in all) for this model")
    tensors = dict(tensors)
    for name, t in tensors.items():
        if t.shape != own[name].shape and name.startswith("encoders.image."):
            # a stage at another resolution: resample positional embeddings to the new grid
            tensors[name] = t = model.encoders["image"].resize_tensor(name[len("encoders.image."):], t)
        if t.shape != own[name].shape and name.startswith("encoders.audio."):
            # a character head read at another number of labels per frame (speech.ctc_upsample)
            tensors[name] = t = model.encoders["audio"].resize_tensor(name[len("encoders.audio."):], t)
        if t.shape != own[name].shape:
            raise CheckpointError(source, f"tensor '{name}' has shape {list(t.shape)}, model has {list(own[name].shape)}")
    model.load_state_dict(tensors, strict=False)


__all__ = ["load", "build", "save_checkpoint", "load_checkpoint", "ConfigError"]
