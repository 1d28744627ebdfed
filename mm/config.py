"""Typed configs: YAML files in configs/ parsed into dataclasses, with key=value overrides.

Unknown keys and wrong types are errors that name the file and the key, before anything
is built. A dataclass-typed field may also be given as the name of a file in
configs/<registry>/ (e.g. `vision: vit_tiny` reads configs/vision/vit_tiny.yaml), or as
`{base: NAME, key: value, ...}`: that file with some keys changed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm.errors import ConfigError
from speech.conformer import SpeechConfig
from video.aggregator import VideoConfig
from vision.encoder import VisionConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# dataclass -> folder of configs/ that holds named files of it
REGISTRIES: dict[type, str] = {VisionConfig: "vision", SpeechConfig: "speech"}


@dataclass
class ImageAdapterConfig:
    every: int = 4  # a cross-attention block before every k-th decoder layer (k-1, 2k-1, ...)
    layers: list[int] | None = None  # explicit decoder layers preceded by a block (instead of
    # every); non-decreasing, a layer listed twice gets two blocks (imported Llama 3.2 Vision)
    attend_without_media: bool = False  # rows that see no media keep the attention branch
    # (transformers' Mllama does); by default they get no update at all


@dataclass
class ModelConfig:
    """A composite model: which decoder, which image encoder, how the adapters attach."""

    decoder: str = "smollm2"  # 'smollm2' (bundled), 'tiny', or a Llama checkpoint directory
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_adapter: ImageAdapterConfig = field(default_factory=ImageAdapterConfig)
    video: VideoConfig = field(default_factory=VideoConfig)  # frames, aggregator, video adapter placement
    speech: SpeechConfig = field(default_factory=SpeechConfig)  # Conformer, speech adapter, how it attaches
    seed: int = 0  # initialisation of the adapters

    def validate(self, source: str) -> None:
        problems = [f"vision: {p}" for p in self.vision.validate()]
        problems += [f"video: {p}" for p in self.video.validate()]
        problems += [f"speech: {p}" for p in self.speech.validate()]
        width = self.video.width or self.vision.output_dim
        if not problems and width % self.video.heads:
            problems.append(f"video: aggregator width {width} (0: the encoder's output width) is not divisible "
                            f"by heads {self.video.heads}")
        if self.image_adapter.every < 1:
            problems.append("image_adapter.every must be >= 1")
        layers = self.image_adapter.layers
        if layers is not None and (any(i < 0 for i in layers) or layers != sorted(layers)):
            problems.append("image_adapter.layers must be non-negative and non-decreasing")
        if problems:
            raise ConfigError(source, "; ".join(problems))


REGISTRIES[ModelConfig] = "models"


def named_config_path(registry: str, name: str) -> Path:
    return CONFIG_DIR / registry / f"{name}.yaml"


def list_configs(registry: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / registry).glob("*.yaml"))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "top level must be a mapping of keys to values")
    return data


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(source, f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            source, f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    values = {k: _coerce(hints[k], v, source, f"{prefix}{k}") for k, v in data.items()}
    return cls(**values)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e.problem)
        raise ConfigError(source, errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp in REGISTRIES:
            path = named_config_path(REGISTRIES[tp], value)
            if not path.is_file():
                names = ", ".join(list_configs(REGISTRIES[tp]))
                raise ConfigError(source, f"'{key}': no {REGISTRIES[tp]} config named '{value}' (have: {names})")
            return from_dict(tp, read_yaml(path), str(path))
        if isinstance(value, dict) and "base" in value and tp in REGISTRIES:
            # {base: NAME, key: value, ...}: the named config with some keys changed
            base = _coerce(str, value["base"], source, key + ".base")
            merged = _merge(_expand_named(REGISTRIES[tp], base, source),
                            {k: v for k, v in value.items() if k != "base"})
            return from_dict(tp, merged, source, key + ".")
        return from_dict(tp, value, source, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, f"'{key}' must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, f"'{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(source, f"'{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """key=value (dotted keys for nesting; values parsed as YAML) applied to a raw config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # a named sub-config: expand it so a key inside can change
                child = _expand_named(part, child, source)
            node[part] = dict(child or {})
            node = node[part]
        node[parts[-1]] = value
    return data


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), str):  # a named sub-config, partly changed
            out[k] = _merge(_expand_named(k, out[k], "config"), v)
        else:
            out[k] = v
    return out


def _expand_named(key: str, name: str, source: str) -> dict:
    for registry in REGISTRIES.values():
        path = named_config_path(registry, name)
        if key in (registry, registry.rstrip("s")) and path.is_file():
            return read_yaml(path)
    raise ConfigError(source, f"'{key}' names '{name}', which cannot be expanded for an override")


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    data = apply_overrides(read_yaml(path), list(overrides), str(path))
    config = from_dict(ModelConfig, data, str(path))
    config.validate(str(path))
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
