"""Interoperability: Llama 3.2 Vision (transformers Mllama) import / export, open_clip trunks,
and the parameter count of the paper-size model against Llama 3.2 11B Vision."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_mllama import convert_aspect_ratios_to_ids

import mm
from mm.cli import main
from mm.decoders import tiny_tokenizer
from mm.generation import Sampler
from mm.mllama import export_mllama, import_mllama
from mm.model import Batch
from vision import ImageEncoder, VisionConfig
from vision.openclip import load_open_clip, open_clip_tensors
from vision.tiling import aspect_ratio_id
from vision.transforms import TiledImages

TILE, MAX_TILES = 32, 4


def tiny_mllama_config(vocab: int) -> MllamaConfig:
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 4, 5],
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                max_position_embeddings=512, initializer_range=0.1, bos_token_id=256, eos_token_id=258,
                pad_token_id=257)
    vision = dict(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2, intermediate_size=64,
                  image_size=TILE, patch_size=8, max_num_tiles=MAX_TILES, intermediate_layers_indices=[2, 0],
                  vision_output_dim=96, initializer_range=0.1)
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=vocab)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama 3.2 Vision checkpoint with open (non-zero) gates and its tokenizer."""
    path = tmp_path_factory.mktemp("mllama")
    tokenizer = tiny_tokenizer()
    config = tiny_mllama_config(len(tokenizer))
    tokenizer.add_tokens(["<|image|>"], special_tokens=True)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # every gate open, each to its own value
                p.uniform_(0.3, 1.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "imported"
    import_mllama(hf_dir, out)
    return out


def image_inputs(grids: list[tuple[int, int]], seed: int = 1):
    """Tiles of images on (cols, rows) grids -> (project TiledImages, Mllama pixel_values,
    aspect_ratio_ids, aspect_ratio_mask): the same pixels and grids on both sides."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.zeros(len(grids), MAX_TILES, 3, TILE, TILE)
    for i, (cols, rows) in enumerate(grids):
        tiles[i, : cols * rows] = torch.randn(cols * rows, 3, TILE, TILE, generator=g)
    n_tiles = torch.tensor([c * r for c, r in grids])
    ours = TiledImages(tiles, torch.tensor([aspect_ratio_id(grid, MAX_TILES) for grid in grids]), n_tiles)
    # transformers names a grid (rows, cols)
    hf_ids = convert_aspect_ratios_to_ids([[(r, c) for c, r in grids]], MAX_TILES)
    hf_mask = (torch.arange(MAX_TILES) < n_tiles[:, None]).long()[None]
    return ours, tiles[None], hf_ids, hf_mask


def cross_attention_mask(ids: torch.Tensor, image_id: int, n_tiles: torch.Tensor) -> torch.Tensor:
    """[1, L, n_images, tiles]: image j visible to its used tiles from its own <|image|> token on."""
    starts = (ids[0] == image_id).nonzero()[:, 0]
    pos = torch.arange(ids.shape[1])
    visible = pos[:, None] >= starts[None]  # [L, n]
    used = torch.arange(MAX_TILES) < n_tiles[:, None]  # [n, tiles]
    return (visible[:, :, None] & used[None]).long()[None]


PROMPTS = {  # text before, between and after the images; (cols, rows) grids of different aspect ratios
    "one image": ([256, 72, 105, -1, 87, 104, 97, 116, 32, 105, 115], [(2, 1)]),
    "two images": ([256, 65, -1, 32, 111, 114, -1, 63, 32, 87, 104, 105, 99, 104], [(1, 3), (2, 2)]),
}


@pytest.mark.parametrize("case", PROMPTS)
def test_imported_mllama_gives_the_same_logits_and_greedy_tokens(hf_dir, imported, case):
    hf = MllamaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = mm.load(imported).eval()
    image_id = hf.config.image_token_index
    assert model.media_token_ids["image"] == image_id
    tokens, grids = PROMPTS[case]
    ids = torch.tensor([[image_id if t < 0 else t for t in tokens]])
    images, pixel_values, ar_ids, ar_mask = image_inputs(grids)
    xmask = cross_attention_mask(ids, image_id, images.n_tiles)
    hf_inputs = dict(pixel_values=pixel_values, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                     cross_attention_mask=xmask)
    rows = torch.zeros(len(grids), dtype=torch.long)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **hf_inputs).logits
        got = model(ids, torch.ones_like(ids), images, rows).logits
    diff = (got - expected).abs().max().item()
    print(f"{case}: max |logits - Mllama logits| = {diff:.2e}")
    assert diff <= 1e-4
    assert expected.abs().max() > 1  # the comparison is not between near-zero tensors

    hf_out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **hf_inputs, max_new_tokens=20,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    batch = Batch(ids, torch.ones_like(ids), images, rows)
    model.eos_token_ids = lambda: set()  # 20 steps on both sides, whatever the random model says
    ours = torch.cat(list(model.decode(batch, 20, Sampler())))
    assert len(hf_out) == 20 and ours.tolist() == hf_out.tolist()


def test_images_change_the_imported_model_output(hf_dir, imported):
    """The parity above is not vacuous: the images do reach the logits."""
    model = mm.load(imported).eval()
    tokens, grids = PROMPTS["two images"]
    image_id = model.media_token_ids["image"]
    ids = torch.tensor([[image_id if t < 0 else t for t in tokens]])
    a, *_ = image_inputs(grids, seed=1)
    b, *_ = image_inputs(grids, seed=2)
    rows = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        la = model(ids, torch.ones_like(ids), a, rows).logits
        lb = model(ids, torch.ones_like(ids), b, rows).logits
    assert (la - lb)[0, 2:].abs().max() > 1e-2


def test_import_maps_mllama_layout(hf_dir, imported):
    model = mm.load(imported)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["text_config"]["cross_attention_layers"] == [1, 4, 5]
    # cross-attention layers 1, 4, 5 of 7 precede self-attention layers 1, 3, 3 of the 4 left
    assert model.decoder.config.num_hidden_layers == 4 and model.image_layers == [1, 3, 3]
    assert model.config.vision.taps == [1, 3] and not model.config.vision.attn_bias
    assert type(model.decoder).__name__ == "LlamaForCausalLM"
    assert (imported / "decoder" / "config.json").is_file()


def tensors_of(ckpt) -> dict[str, torch.Tensor]:
    out = {f"adapters/{k}": v for k, v in load_file(ckpt / "adapters.safetensors").items()}
    for f in sorted((ckpt / "decoder").glob("*.safetensors")):
        out.update({f"decoder/{k}": v for k, v in load_file(f).items()})
    return out


def test_export_then_import_round_trips_exactly(hf_dir, imported, tmp_path):
    export_mllama(imported, tmp_path / "hf")
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()  # transformers loads it
    original = load_file(hf_dir / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(exported) == set(original)  # the hub layout (language_model.model.*, vision_model.*, ...)
    assert len(again.state_dict()) == len(original)
    table, projector = "language_model.model.embed_tokens.weight", "multi_modal_projector.weight"
    vocab = again.config.text_config.vocab_size
    for name, t in original.items():
        if name not in (table, projector):
            assert torch.equal(exported[name], t), name
    assert torch.equal(exported[table][: vocab + 1], original[table][: vocab + 1])  # vocabulary + <|image|>
    # the export lists the taps in layer order ([0, 2], the original [2, 0]): projector columns permuted
    assert again.config.vision_config.intermediate_layers_indices == [0, 2]
    hf = MllamaForConditionalGeneration.from_pretrained(hf_dir).eval()
    tokens, grids = PROMPTS["two images"]
    ids = torch.tensor([[vocab if t < 0 else t for t in tokens]])
    images, pixel_values, ar_ids, ar_mask = image_inputs(grids)
    inputs = dict(input_ids=ids, pixel_values=pixel_values, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                  cross_attention_mask=cross_attention_mask(ids, vocab, images.n_tiles))
    with torch.no_grad():
        assert (again(**inputs).logits - hf(**inputs).logits).abs().max() <= 1e-5

    import_mllama(tmp_path / "hf", tmp_path / "again")
    first, second = tensors_of(imported), tensors_of(tmp_path / "again")
    assert set(first) == set(second) and len(first) > 50
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_import_errors_name_the_input(tmp_path, capsys):
    assert main(["import-mllama", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import-mllama", str(llama), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.json: not an Mllama" in err and err.count("\n") == 1
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main(["import-mllama", str(pickled), str(tmp_path / "out")]) == 2
    assert "pytorch_model.bin: pickle-based weights refused" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_import_and_export(hf_dir, tmp_path, capsys):
    assert main(["import-mllama", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    assert main(["export-mllama", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "left out (no Mllama counterpart): aggregator, projectors.video" in out
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "preprocessor_config.json").is_file()
    assert main(["export-mllama", str(tmp_path / "missing"), str(tmp_path / "hf2")]) == 2


def test_export_refuses_a_model_mllama_cannot_represent(tmp_path, capsys):
    mm.load("tiny").save(tmp_path / "tiny")
    assert main(["export-mllama", str(tmp_path / "tiny"), str(tmp_path / "hf")]) == 2
    assert "attention biases" in capsys.readouterr().err


# ---- open_clip ----------------------------------------------------------------------------------
OPEN_CLIP_VISION = dict(layers=3, width=32, head_width=16, mlp_ratio=2.0, patch_size=8, image_size=32)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_trunk_gives_open_clips_features_at_the_taps(tmp_path, quick_gelu):
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=OPEN_CLIP_VISION, quick_gelu=quick_gelu,
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()
    with torch.no_grad():  # open_clip starts ln weights at 1 and biases at 0: make every tensor count
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    config = VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, taps=[1, 3],
                          global_layers=0, max_tiles=1, act="quick_gelu" if quick_gelu else "gelu")
    encoder = ImageEncoder(config).eval()
    load_open_clip(encoder, tmp_path / "clip.safetensors")

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder(images[:, None], torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
        theirs = clip.visual.forward_intermediates(images, indices=[0, 2], output_fmt="NLC", output_extra_tokens=True,
                                                   intermediates_only=True)
    # open_clip index i is the output of block i: our tap i + 1; class token first
    taps = [torch.cat([c, p], dim=1) for c, p in zip(theirs["image_intermediates_prefix"],
                                                       theirs["image_intermediates"])]
    final = clip.visual.ln_post(taps[1])  # the last layer's output through ln_post
    for i, expected in enumerate([final, *taps]):
        diff = (ours[..., 32 * i: 32 * (i + 1)] - expected).abs().max().item()
        assert diff < 1e-5, (i, diff)
    assert open_clip_tensors(tmp_path / "clip.safetensors").keys() == {
        k for k in encoder.state_dict() if not k.startswith(("pre_tile", "post_tile", "tile_pos", "global_"))}


def test_open_clip_refusals(tmp_path, capsys):
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg={**OPEN_CLIP_VISION, "ls_init_value": 0.1},
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "ls.safetensors"))
    encoder = ImageEncoder(VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64,
                                        global_layers=0, max_tiles=1))
    with pytest.raises(mm.CheckpointError, match="ls_1.gamma' has no place"):  # layer scale: not our trunk
        load_open_clip(encoder, tmp_path / "ls.safetensors")
    no_bias = ImageEncoder(VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64,
                                        global_layers=0, max_tiles=1, attn_bias=False))
    plain = open_clip.CLIP(embed_dim=16, vision_cfg=OPEN_CLIP_VISION,
                           text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    save_file({k: v.contiguous() for k, v in plain.visual.state_dict().items()}, str(tmp_path / "v.safetensors"))
    with pytest.raises(mm.CheckpointError, match="in_proj_bias' has no place"):
        load_open_clip(no_bias, tmp_path / "v.safetensors")
    (tmp_path / "clip.pt").write_bytes(b"\x80\x04")
    assert main(["import-open-clip", str(tmp_path / "clip.pt"), str(tmp_path / "out"), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "clip.pt: pickle-based checkpoint refused" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_import_open_clip_writes_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=16, mlp_ratio=2.0,
                                                        patch_size=8, image_size=32),
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    assert main(["import-open-clip", str(tmp_path / "clip.safetensors"), str(tmp_path / "ckpt"), "--model", "tiny"]) == 0
    encoder = mm.load(tmp_path / "ckpt").encoders["image"]
    assert torch.equal(encoder.transformer.resblocks[1].attn.in_proj_weight,
                       clip.visual.transformer.resblocks[1].attn.in_proj_weight)


def test_vision_config_from_open_clip_registry():
    from vision.openclip import vision_config_from_open_clip

    config = vision_config_from_open_clip("ViT-B-16", taps=[6], global_layers=2)
    assert (config.width, config.layers, config.heads, config.mlp_dim, config.patch_size, config.image_size) == (
        768, 12, 12, 3072, 16, 224)
    assert vision_config_from_open_clip("ViT-B-32-quickgelu").act == "quick_gelu"
    with pytest.raises(mm.InputError, match="unknown open_clip model"):
        vision_config_from_open_clip("ViT-nope")


# ---- parameter counts -----------------------------------------------------------------------------
def test_paper_size_parameter_counts_match_llama_3_2_11b_vision():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "param_counts.py"
    spec = importlib.util.spec_from_file_location("param_counts", path)
    counts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counts)

    rows = counts.counts()
    ours, ref = counts.paper_model(), counts.mllama_11b()
    assert sum(r[2] for r in rows) == counts.numel(ref) == 10_670_220_835  # every Mllama parameter is in a row
    assert sum(r[1] for r in rows) + counts.video_path() + sum(counts.speech_path()) == counts.numel(ours)  # and ours
    for name, a, b, why in rows:
        assert a == b or why, name  # equal, or the difference is explained
    hidden = 4096
    assert sum(r[1] for r in rows) - sum(r[2] for r in rows) == (3 - 8) * hidden
    assert all(p.is_meta for p in ours.parameters())
