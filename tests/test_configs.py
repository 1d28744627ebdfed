"""Every config file parses and builds; bad keys and types are named."""
from __future__ import annotations

import pytest
import torch

from mm.config import CONFIG_DIR, ModelConfig, from_dict, list_configs, load_model_config, read_yaml
from mm.errors import ConfigError
from mm.model import cross_attention_layers
from speech import ConformerEncoder, SpeechAdapter, SpeechConfig
from vision import ImageEncoder, VisionConfig


@pytest.mark.parametrize("name", list_configs("vision"))
def test_vision_configs_build(name):
    config = from_dict(VisionConfig, read_yaml(CONFIG_DIR / "vision" / f"{name}.yaml"), name)
    assert config.validate() == []
    with torch.device("meta"):
        encoder = ImageEncoder(config)
    assert sum(p.numel() for p in encoder.parameters()) > 0


@pytest.mark.parametrize("name", list_configs("speech"))
def test_speech_configs_build(name):
    config = from_dict(SpeechConfig, read_yaml(CONFIG_DIR / "speech" / f"{name}.yaml"), name)
    assert config.validate() == []
    with torch.device("meta"):
        encoder, adapter = ConformerEncoder(config), SpeechAdapter(config, d_model=4096)
    assert sum(p.numel() for p in encoder.parameters()) > 0 and sum(p.numel() for p in adapter.parameters()) > 0


def test_paper_speech_sizes():
    config = from_dict(SpeechConfig, read_yaml(CONFIG_DIR / "speech" / "conformer_1b.yaml"), "x")
    with torch.device("meta"):
        encoder, adapter = ConformerEncoder(config), SpeechAdapter(config, d_model=4096)
    assert 0.95e9 < sum(p.numel() for p in encoder.parameters()) < 1.05e9  # "1B"
    assert 0.08e9 < sum(p.numel() for p in adapter.parameters()) < 0.12e9  # "~100M"


def test_bad_speech_config_is_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("decoder: tiny\nspeech: {width: 30, heads: 4, attach: sideways}\n")
    with pytest.raises(ConfigError, match="speech: width 30 must split into 4 heads.*attach 'sideways'"):
        load_model_config(path)


@pytest.mark.parametrize("name", list_configs("models"))
def test_model_configs_parse(name):
    config = load_model_config(CONFIG_DIR / "models" / f"{name}.yaml")
    assert isinstance(config, ModelConfig)
    assert config.decoder


def test_vit_h14_560_matches_llama_3_2_vision_size():
    config = from_dict(VisionConfig, read_yaml(CONFIG_DIR / "vision" / "vit_h14_560.yaml"), "x")
    with torch.device("meta"):
        encoder = ImageEncoder(config)
    n = sum(p.numel() for p in encoder.parameters())
    assert config.output_dim == 7680
    assert 0.8e9 < n < 0.9e9  # Llama 3.2 Vision's vision model: ~0.84B with its tile embeddings


def test_cross_attention_placement():
    assert cross_attention_layers(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert cross_attention_layers(30, 4) == [3, 7, 11, 15, 19, 23, 27]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("decoder: tiny\nvision: vit_tiny\nimage_adaptor: {every: 2}\n")
    with pytest.raises(ConfigError, match=r"m.yaml: unknown key 'image_adaptor'"):
        load_model_config(path)


def test_nested_unknown_key_and_wrong_type(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("decoder: tiny\nvision: {image_size: 32, patch_sise: 8}\n")
    with pytest.raises(ConfigError, match="unknown key 'vision.patch_sise'"):
        load_model_config(path)
    path.write_text("decoder: tiny\nimage_adapter: {every: four}\n")
    with pytest.raises(ConfigError, match="'image_adapter.every' must be int"):
        load_model_config(path)


def test_invalid_values_and_missing_named_config(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("decoder: tiny\nvision: {image_size: 30, patch_size: 8}\n")
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        load_model_config(path)
    path.write_text("decoder: tiny\nvision: vit_nope\n")
    with pytest.raises(ConfigError, match="no vision config named 'vit_nope'"):
        load_model_config(path)


def test_overrides_reach_into_named_configs():
    config = load_model_config(CONFIG_DIR / "models" / "tiny.yaml", ["vision.layers=3", "image_adapter.every=1"])
    assert config.vision.layers == 3 and config.vision.width == 32 and config.image_adapter.every == 1


@pytest.mark.parametrize("name", list_configs("stages"))
def test_stage_configs_parse_and_build_on_meta(name):
    from mm.stages import load_stage_config

    config = load_stage_config(CONFIG_DIR / "stages" / f"{name}.yaml")
    with torch.device("meta"):
        encoder = ImageEncoder(config.model.vision)
    assert config.model.vision.output_dim > 0 and encoder is not None
    assert all(not p.startswith("decoder") for p in config.train)


@pytest.mark.parametrize("name", list_configs("eval"))
def test_eval_configs_parse(name):
    from mm.evaluate import load_eval_config

    assert load_eval_config(CONFIG_DIR / "eval" / f"{name}.yaml").model


def test_stage_overrides_reach_into_named_model_and_vision():
    from mm.stages import load_stage_config

    config = load_stage_config(CONFIG_DIR / "stages" / "digits_image_pretrain.yaml",
                               ["model.vision.image_size=32", "optim.steps=7"])
    assert config.model.vision.image_size == 32 and config.model.vision.width == 128
    assert config.model.decoder == "smollm2" and config.optim.steps == 7
