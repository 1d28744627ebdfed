"""Llama 3.2 Vision checkpoints (transformers' MllamaForConditionalGeneration) <-> mm checkpoints.

    import_mllama("Llama-3.2-11B-Vision/", "ckpt/")   # then mm.load("ckpt/")
    export_mllama("ckpt/", "hf/")                     # MllamaForConditionalGeneration.from_pretrained("hf/")

An Mllama text model interleaves self-attention layers with gated cross-attention layers
(`cross_attention_layers`). Imported, the self-attention layers become a plain LlamaForCausalLM
(saved with its tokenizer in ckpt/decoder/), and each cross-attention layer becomes an image block
run before the next self-attention layer (`image_adapter.layers`). The vision model becomes the
image encoder (attention without biases, tokens padded to a multiple of 8, padding masked in
pairs, as Mllama computes), the projector the image projector, and the <|image|> row of Mllama's
embedding table the media-token embedding.

Conventions that differ, converted exactly (permutations only):
- aspect-ratio ids: Mllama numbers grids as (rows, cols) pairs, this project as (cols, rows); the
  rows of the three aspect-ratio embedding tables are permuted so that a grid keeps its vectors.
- taps: Mllama's intermediate layer i is the output of layer i, i.e. our tap i + 1; Mllama
  interleaves the tapped features (feature d of tap t at column d * n_taps + t), we concatenate
  them tap by tap: the projector's input columns are permuted.
- Mllama's embedding table has 8 rows beyond the vocabulary; the <|image|> row (and the rows of
  <|video|> / <|audio|> when the tokenizer puts them there) become media-token rows, the rest
  are unused and exported as zeros.
Video and speech parts have no Mllama counterpart: an import gives them their fresh
initialisation, an export leaves them out.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import Tensor

from mm.checkpoint import PICKLE_SUFFIXES, fingerprint, load_tensors, write_dir_atomically
from mm.config import ImageAdapterConfig, ModelConfig, to_dict
from mm.errors import CheckpointError, InputError
from vision.encoder import VisionConfig
from vision.tiling import supported_grids

DECODER_DIR = "decoder"
# transformers' hidden_act names <-> VisionConfig.act
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
# key prefixes on disk (hub checkpoints; transformers writes them still) -> in-memory module names
LEGACY_PREFIXES = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                   "vision_model.": "model.vision_model.", "multi_modal_projector.": "model.multi_modal_projector."}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
V, T, P = "model.vision_model.", "model.language_model.", "model.multi_modal_projector."
# our per-layer vision names <- Mllama's (q/k/v are fused into in_proj_weight separately)
VISION_LAYER = {"attn.out_proj.weight": "self_attn.o_proj.weight", "ln_1.weight": "input_layernorm.weight",
                "ln_1.bias": "input_layernorm.bias", "ln_2.weight": "post_attention_layernorm.weight",
                "ln_2.bias": "post_attention_layernorm.bias", "mlp.c_fc.weight": "mlp.fc1.weight",
                "mlp.c_fc.bias": "mlp.fc1.bias", "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
VISION_TOP = {"conv1.weight": "patch_embedding.weight", "class_embedding": "class_embedding",
              "positional_embedding": "gated_positional_embedding.embedding",
              "tile_positional_embedding.gate": "gated_positional_embedding.gate",
              "tile_positional_embedding.tile_embedding.weight": "gated_positional_embedding.tile_embedding.weight",
              "pre_tile_embedding.gate": "pre_tile_positional_embedding.gate",
              "pre_tile_embedding.embedding.weight": "pre_tile_positional_embedding.embedding.weight",
              "post_tile_embedding.gate": "post_tile_positional_embedding.gate",
              "post_tile_embedding.embedding.weight": "post_tile_positional_embedding.embedding.weight",
              "ln_pre.weight": "layernorm_pre.weight", "ln_pre.bias": "layernorm_pre.bias",
              "ln_post.weight": "layernorm_post.weight", "ln_post.bias": "layernorm_post.bias"}
RATIO_TABLES = ("tile_positional_embedding.tile_embedding.weight", "pre_tile_embedding.embedding.weight",
                "post_tile_embedding.embedding.weight")
BLOCK = {"input_layernorm.weight": "input_layernorm.weight", "attn_gate.scale": "cross_attn_attn_gate",
         "post_attention_layernorm.weight": "post_attention_layernorm.weight",
         "mlp_gate.scale": "cross_attn_mlp_gate", **{f"cross_attn.{n}": f"cross_attn.{n}" for n in (
             "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight")},
         **{f"mlp.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}}


# ---- conventions ----------------------------------------------------------------------------
def mllama_aspect_ratios(max_tiles: int) -> list[list[int]]:
    """Mllama's supported aspect ratios, (rows, cols) pairs in its order (the same enumeration as
    ours, read the other way round)."""
    return [[a, b] for a, b in supported_grids(max_tiles)]


def ratio_permutation(max_tiles: int) -> Tensor:
    """perm[our id] = Mllama's id of the same grid; 0 (padding) stays 0."""
    grids = supported_grids(max_tiles)
    return torch.tensor([0] + [grids.index((rows, cols)) + 1 for cols, rows in grids])


def tap_columns(width: int, hf_taps: list[int]) -> Tensor:
    """Column index into Mllama's projector input for each column of ours (final features, then
    taps in layer order, each `width` wide)."""
    n = len(hf_taps)
    order = sorted(range(n), key=lambda t: hf_taps[t])
    taps = [width + torch.arange(width) * n + t for t in order]
    return torch.cat([torch.arange(width), *taps])


def decoder_positions(cross_layers: list[int], total: int) -> list[int]:
    """Mllama layer indices of its cross-attention layers -> the self-attention layer (0-based,
    counting self-attention layers only) that each one precedes."""
    positions = [i - sum(c < i for c in cross_layers) for i in sorted(cross_layers)]
    return positions if all(p < total - len(cross_layers) for p in positions) else []


# ---- import ----------------------------------------------------------------------------------
def _read_mllama_dir(hf_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    if not hf_dir.exists():
        raise InputError(hf_dir, "no such directory")
    if not hf_dir.is_dir():
        raise InputError(hf_dir, "not a directory (expected a transformers Mllama checkpoint directory)")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise InputError(hf_dir, "no config.json: not a transformers checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(config_path, f"unreadable config ({e})") from None
    if config.get("model_type") != "mllama":
        raise CheckpointError(config_path, f"not an Mllama (Llama 3.2 Vision) checkpoint: "
                                           f"model_type={config.get('model_type')!r}")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(pickles[0], "pickle-based weights refused (loading them could run code); "
                                              "convert them to safetensors")
        raise CheckpointError(hf_dir, "no .safetensors weights")
    tensors = {}
    for f in files:
        tensors.update({_renamed(k, LEGACY_PREFIXES): v for k, v in load_tensors(f).items()})
    return config, tensors


def _renamed(key: str, prefixes: dict[str, str]) -> str:
    old = next((p for p in prefixes if key.startswith(p)), None)
    return prefixes[old] + key[len(old):] if old else key


def _tokenizer(hf_dir: Path, tokenizer_dir: Path | None):
    from transformers import AutoTokenizer

    source = tokenizer_dir or hf_dir
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(source, "no tokenizer files (tokenizer.json / tokenizer_config.json); "
                                 "give one with --tokenizer DIR")
    return AutoTokenizer.from_pretrained(source)


def _vision_config(vc: dict, hf_dir: Path) -> VisionConfig:
    source = hf_dir / "config.json"
    size, patch = vc.get("image_size", 448), vc.get("patch_size", 14)
    size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
    patch = patch if isinstance(patch, int) else (patch[0] if patch[0] == patch[1] else None)
    max_tiles = vc.get("max_num_tiles", 4)
    taps = vc.get("intermediate_layers_indices") or [3, 7, 15, 23, 30]
    ratios = vc.get("supported_aspect_ratios") or mllama_aspect_ratios(max_tiles)
    problems = []
    if size is None or patch is None:
        problems.append("non-square image_size / patch_size")
    if vc.get("num_channels", 3) != 3:
        problems.append("num_channels must be 3")
    if vc.get("hidden_act", "gelu") not in HF_ACTIVATIONS:
        problems.append(f"vision hidden_act {vc.get('hidden_act')!r} (supported: {', '.join(HF_ACTIVATIONS)})")
    if vc.get("norm_eps", 1e-5) != 1e-5:  # Mllama's layernorm_pre/post always use 1e-5, its layers norm_eps
        problems.append(f"vision norm_eps {vc.get('norm_eps')} (only 1e-5 is supported)")
    if sorted(map(list, ratios)) != sorted(mllama_aspect_ratios(max_tiles)):
        problems.append(f"supported_aspect_ratios {ratios} are not all grids of <= {max_tiles} tiles")
    if len(set(taps)) != len(taps):
        problems.append(f"intermediate_layers_indices {taps} repeat a layer")
    if problems:
        raise CheckpointError(source, "unsupported Mllama vision config: " + "; ".join(problems))
    mean, std = _processor_stats(hf_dir, size, max_tiles)
    config = VisionConfig(
        image_size=size, patch_size=patch, width=vc.get("hidden_size", 1280), layers=vc.get("num_hidden_layers", 32),
        heads=vc.get("attention_heads", 16), mlp_dim=vc.get("intermediate_size", 5120),
        taps=sorted(t + 1 for t in taps), global_layers=vc.get("num_global_layers", 8), max_tiles=max_tiles,
        mean=mean, std=std, act=HF_ACTIVATIONS[vc.get("hidden_act", "gelu")], attn_bias=False, pad_tokens_to=8,
        padding_mask="pairs")
    if vc.get("vision_output_dim", config.output_dim) != config.output_dim:
        raise CheckpointError(source, f"vision_output_dim {vc['vision_output_dim']} != hidden_size x (1 + taps) "
                                      f"= {config.output_dim}")
    return config


def _processor_stats(hf_dir: Path, size: int, max_tiles: int) -> tuple[list[float], list[float]]:
    """Normalisation of the checkpoint's image processor (transformers' defaults without one)."""
    from transformers import MllamaImageProcessor

    path = hf_dir / "preprocessor_config.json"
    pc = json.loads(path.read_text()) if path.is_file() else {}
    tile = (pc.get("size") or {}).get("height", size)
    if tile != size or pc.get("max_image_tiles", max_tiles) != max_tiles:
        raise CheckpointError(path, f"processor tiles ({tile} px, {pc.get('max_image_tiles')}) differ from the "
                                    f"vision model's ({size} px, {max_tiles})")
    mean = pc.get("image_mean", MllamaImageProcessor.image_mean)
    std = pc.get("image_std", MllamaImageProcessor.image_std)
    return [float(x) for x in mean], [float(x) for x in std]


def _decoder_config(tc: dict, n_self: int, source: Path):
    from transformers import LlamaConfig

    if tc.get("hidden_act", "silu") != "silu":
        raise CheckpointError(source, f"text hidden_act {tc['hidden_act']!r}: the cross-attention blocks use silu")
    hidden, heads = tc.get("hidden_size", 4096), tc.get("num_attention_heads", 32)
    return LlamaConfig(
        vocab_size=tc.get("vocab_size", 128256), hidden_size=hidden, intermediate_size=tc.get("intermediate_size", 14336),
        num_hidden_layers=n_self, num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads", 8),
        head_dim=hidden // heads, max_position_embeddings=tc.get("max_position_embeddings", 131072),
        rms_norm_eps=tc.get("rms_norm_eps", 1e-5), rope_parameters=tc.get("rope_parameters"),
        tie_word_embeddings=False, bos_token_id=tc.get("bos_token_id"), eos_token_id=tc.get("eos_token_id"),
        pad_token_id=tc.get("pad_token_id"), initializer_range=tc.get("initializer_range", 0.02))


class _Tensors:
    """Mllama tensors taken by name; what is never taken is an error (nothing is silently dropped)."""

    def __init__(self, tensors: dict[str, Tensor], source: Path) -> None:
        self.tensors, self.source, self.taken = tensors, source, set()

    def __call__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise CheckpointError(self.source, f"missing tensor '{name}'")
        self.taken.add(name)
        return self.tensors[name]

    def check_all_taken(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise CheckpointError(self.source, f"unexpected tensor '{left[0]}' ({len(left)} in all)")


def import_mllama(hf_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """Convert a transformers MllamaForConditionalGeneration directory into an mm checkpoint
    directory (config.yaml, adapters.safetensors, decoder/) that `mm.load(out_dir)` loads."""
    from transformers import LlamaForCausalLM

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config, raw = _read_mllama_dir(hf_dir)
    tc, vc = config.get("text_config") or {}, config.get("vision_config") or {}
    take = _Tensors(raw, hf_dir)
    total = tc.get("num_hidden_layers", 40)
    cross = sorted(tc.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38])
    positions = decoder_positions(cross, total)
    if not positions:
        raise CheckpointError(hf_dir / "config.json", "a cross-attention layer after the last self-attention "
                                                      "layer has no decoder layer to precede")
    vision = _vision_config(vc, hf_dir)
    decoder_config = _decoder_config(tc, total - len(cross), hf_dir / "config.json")
    tok = _tokenizer(hf_dir, Path(tokenizer) if tokenizer else None)
    image_id = config.get("image_token_index", 128256)
    if tok.convert_tokens_to_ids("<|image|>") != image_id:
        raise CheckpointError(hf_dir, f"the tokenizer's <|image|> id {tok.convert_tokens_to_ids('<|image|>')} "
                                      f"is not the config's image_token_index {image_id}")

    decoder_tensors = _decoder_tensors(take, tc, cross, total)
    adapters = {**_vision_tensors(take, vision, vc), **_block_tensors(take, cross)}
    w, b = take(P + "weight"), take(P + "bias")
    columns = tap_columns(vision.width, vc.get("intermediate_layers_indices") or [3, 7, 15, 23, 30])
    adapters["projectors.image.weight"], adapters["projectors.image.bias"] = w[:, columns].contiguous(), b
    table = take(T + "embed_tokens.weight")
    take.check_all_taken()

    with torch.device("meta"):
        decoder = LlamaForCausalLM(decoder_config)
    decoder.load_state_dict(decoder_tensors, assign=True, strict=True)
    # the model mm.load builds: the imported decoder's own tokenizer, media tokens added
    media_ids = _media_ids(tok)
    adapters["media_embedding.weight"] = _media_rows(table, media_ids, image_id, decoder_config.vocab_size)
    model_config = ModelConfig(decoder=str(out_dir.resolve() / DECODER_DIR), vision=vision,
                               image_adapter=ImageAdapterConfig(layers=positions, attend_without_media=True))
    model_config.validate(str(hf_dir))
    meta = {"format": "mm-checkpoint/1", "model": to_dict(model_config),
            "decoder": {"source": model_config.decoder,
                        "sha256": fingerprint({k: v.float() for k, v in decoder.state_dict().items()})},
            "imported_from": {"format": "mllama", "path": str(hf_dir.resolve())}}
    _write_checkpoint(out_dir, meta, adapters, lambda d: (decoder.save_pretrained(d), tok.save_pretrained(d)))
    return out_dir


def _media_ids(tokenizer) -> list[int]:
    from mm.model import MEDIA_TOKENS

    tokenizer.add_tokens(list(MEDIA_TOKENS.values()), special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS.values()]


def _media_rows(table: Tensor, media_ids: list[int], image_id: int, vocab: int) -> Tensor:
    """Media-token rows [3, d] (float32): <|image|>'s row of Mllama's table; <|video|> and
    <|audio|> take the table's row when their id falls in its extra rows (an exported
    checkpoint puts them there), else the initialisation mm gives new rows (the table's mean)."""
    mean = table[:vocab].float().mean(0)
    return torch.stack([table[i].float() if i == image_id or vocab <= i < table.shape[0] else mean
                        for i in media_ids])


def _decoder_tensors(take: _Tensors, tc: dict, cross: list[int], total: int) -> dict[str, Tensor]:
    vocab = tc.get("vocab_size", 128256)
    out = {"model.embed_tokens.weight": take(T + "embed_tokens.weight")[:vocab].contiguous(),
           "model.norm.weight": take(T + "norm.weight"), "lm_head.weight": take("lm_head.weight")}
    own = 0
    for i in range(total):
        if i in cross:
            continue
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"model.layers.{own}.{name}"] = take(f"{T}layers.{i}.{name}")
        own += 1
    return out


def _block_tensors(take: _Tensors, cross: list[int]) -> dict[str, Tensor]:
    return {f"xattn.image.{j}.{ours}": take(f"{T}layers.{i}.{theirs}")
            for j, i in enumerate(cross) for ours, theirs in BLOCK.items()}


def _vision_tensors(take: _Tensors, vision: VisionConfig, vc: dict) -> dict[str, Tensor]:
    perm = ratio_permutation(vision.max_tiles)
    out = {}
    for ours, theirs in VISION_TOP.items():
        t = take(V + theirs)
        out[f"encoders.image.{ours}"] = t[perm].contiguous() if ours in RATIO_TABLES else t
    for stack, hf_stack, n in (("transformer", "transformer", vision.layers),
                               ("global_transformer", "global_transformer", vision.global_layers)):
        for i in range(n):
            ours, theirs = f"encoders.image.{stack}.resblocks.{i}.", f"{V}{hf_stack}.layers.{i}."
            out[ours + "attn.in_proj_weight"] = torch.cat(
                [take(f"{theirs}self_attn.{x}_proj.weight") for x in "qkv"])
            out.update({ours + a: take(theirs + b) for a, b in VISION_LAYER.items()})
            if stack == "global_transformer":
                out[ours + "gate_attn"], out[ours + "gate_ffn"] = take(theirs + "gate_attn"), take(theirs + "gate_ffn")
    return out


def _write_checkpoint(out_dir: Path, meta: dict, adapters: dict, write_decoder: Callable[[Path], object]) -> None:
    """config.yaml + adapters.safetensors + the decoder directory, written atomically."""
    from safetensors.torch import save_file

    from mm.api import CONFIG_FILE, WEIGHTS_FILE

    tensors = {k: v.detach().contiguous().cpu() for k, v in adapters.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        write_decoder(tmp / DECODER_DIR)

    write_dir_atomically(out_dir, write)


# ---- export ----------------------------------------------------------------------------------
def exportable_problems(model) -> list[str]:
    """Why a model cannot be written as an Mllama checkpoint with the same outputs (empty: it can)."""
    v, dc = model.config.vision, model.decoder.config
    problems = []
    if v.attn_bias:
        problems.append("the image encoder has attention biases (vision.attn_bias), Mllama's has none")
    if v.pad_tokens_to != 8 or v.padding_mask != "pairs":
        problems.append("Mllama pads tile tokens to a multiple of 8 and masks padding in pairs "
                        "(vision.pad_tokens_to: 8, vision.padding_mask: pairs)")
    if v.act not in EXPORT_ACTIVATIONS or v.norm_eps != 1e-5:
        problems.append(f"vision act {v.act!r} / norm_eps {v.norm_eps} (Mllama: gelu variants, 1e-5)")
    if 0 in v.taps or not v.taps:
        problems.append("Mllama taps the output of a layer (taps >= 1) and needs at least one tap")
    if not model.config.image_adapter.attend_without_media:
        problems.append("Mllama keeps the attention branch of rows that see no image "
                        "(image_adapter.attend_without_media: true)")
    if getattr(dc, "attention_bias", False) or getattr(dc, "mlp_bias", False) or dc.hidden_act != "silu":
        problems.append("the decoder has biases or a non-silu MLP")
    if (getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads) * dc.num_attention_heads != dc.hidden_size:
        problems.append("the decoder's head_dim x heads differs from its width (Mllama derives head_dim)")
    if model.media_token_ids["image"] >= dc.vocab_size + 8:
        problems.append(f"<|image|> id {model.media_token_ids['image']} is beyond Mllama's table (vocab + 8 rows)")
    return problems


def export_mllama(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                  force: bool = False) -> list[str]:
    """Write the model of an mm checkpoint as a transformers MllamaForConditionalGeneration
    directory (config.json, model.safetensors, preprocessor_config.json, tokenizer). Returns the
    names of the parts that have no Mllama counterpart and were left out."""
    import mm

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise InputError(checkpoint, "no such checkpoint directory")
    model = mm.load(checkpoint, force=force)
    problems = exportable_problems(model)
    if problems:
        raise CheckpointError(checkpoint, "cannot be written as Mllama: " + "; ".join(problems))
    config, tensors = _mllama_state(model)
    on_disk = {new: old for old, new in LEGACY_PREFIXES.items()}
    tensors = {_renamed(k, on_disk): v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    left_out = sorted({p for k in model.adapter_state_dict()
                       for p in ("aggregator", "projectors.video", "xattn.video") if k.startswith(p + ".")})
    v = model.config.vision

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file
        from transformers import MllamaImageProcessor

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        MllamaImageProcessor(size={"height": v.image_size, "width": v.image_size}, max_image_tiles=v.max_tiles,
                             image_mean=v.mean, image_std=v.std).save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)

    write_dir_atomically(out_dir, write)
    return left_out


def _mllama_state(model):
    """-> (MllamaConfig, Mllama state dict) of a model that passes exportable_problems."""
    from transformers import MllamaConfig

    v, dc = model.config.vision, model.decoder.config
    n_self, layers = dc.num_hidden_layers, model.image_layers
    cross = [p + j for j, p in enumerate(layers)]  # block j runs before self layer p: Mllama index p + j
    ours = {**model.decoder.state_dict(), **model.adapter_state_dict()}
    out: dict[str, Tensor] = {"lm_head.weight": ours["lm_head.weight"], T + "norm.weight": ours["model.norm.weight"]}
    # self-attention layers at the Mllama indices not taken by cross-attention layers
    self_indices = [i for i in range(n_self + len(cross)) if i not in cross]
    for own, i in enumerate(self_indices):
        prefix = f"model.layers.{own}."
        out.update({f"{T}layers.{i}.{k[len(prefix):]}": t for k, t in ours.items() if k.startswith(prefix)})
    for j, i in enumerate(cross):
        out.update({f"{T}layers.{i}.{theirs}": ours[f"xattn.image.{j}.{mine}"] for mine, theirs in BLOCK.items()})
    out[T + "embed_tokens.weight"] = _mllama_table(model, ours["model.embed_tokens.weight"])
    out.update(_mllama_vision(ours, v))
    hf_taps = [t - 1 for t in v.taps]
    inverse = torch.argsort(tap_columns(v.width, hf_taps))
    out[P + "weight"] = ours["projectors.image.weight"][:, inverse].contiguous()
    out[P + "bias"] = ours["projectors.image.bias"]
    rope = getattr(dc, "rope_parameters", None)
    text = dict(vocab_size=dc.vocab_size, hidden_size=dc.hidden_size, hidden_act="silu",
                num_hidden_layers=n_self + len(cross), num_attention_heads=dc.num_attention_heads,
                num_key_value_heads=dc.num_key_value_heads, intermediate_size=dc.intermediate_size,
                rope_parameters=dict(rope) if rope else None, rms_norm_eps=dc.rms_norm_eps,
                max_position_embeddings=dc.max_position_embeddings, tie_word_embeddings=False,
                cross_attention_layers=cross, bos_token_id=dc.bos_token_id, eos_token_id=dc.eos_token_id,
                pad_token_id=dc.pad_token_id, initializer_range=dc.initializer_range)
    vision = dict(hidden_size=v.width, hidden_act=EXPORT_ACTIVATIONS[v.act], num_hidden_layers=v.layers,
                  num_global_layers=v.global_layers, attention_heads=v.heads, intermediate_size=v.mlp_dim,
                  vision_output_dim=v.output_dim, image_size=v.image_size, patch_size=v.patch_size,
                  norm_eps=v.norm_eps, max_num_tiles=v.max_tiles, intermediate_layers_indices=hf_taps,
                  supported_aspect_ratios=mllama_aspect_ratios(v.max_tiles))
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=model.media_token_ids["image"])
    return config, out


def _mllama_table(model, table: Tensor) -> Tensor:
    """Mllama's embedding table: the vocabulary, then 8 extra rows holding the media tokens whose
    ids fall there (the rest zeros)."""
    vocab = table.shape[0]
    extra = table.new_zeros(8, table.shape[1])
    full = torch.cat([table, extra])
    for i, row in zip(model.media_embedding.new_ids.tolist(), model.media_embedding.weight):
        if i < vocab + 8 and (i >= vocab or i == model.media_token_ids["image"]):
            full[i] = row
    return full


def _mllama_vision(ours: dict[str, Tensor], v: VisionConfig) -> dict[str, Tensor]:
    inverse = torch.argsort(ratio_permutation(v.max_tiles))
    out = {}
    for mine, theirs in VISION_TOP.items():
        t = ours[f"encoders.image.{mine}"]
        out[V + theirs] = t[inverse].contiguous() if mine in RATIO_TABLES else t
    for stack, n in (("transformer", v.layers), ("global_transformer", v.global_layers)):
        for i in range(n):
            mine, theirs = f"encoders.image.{stack}.resblocks.{i}.", f"{V}{stack}.layers.{i}."
            q, k, val = (c.clone() for c in ours[mine + "attn.in_proj_weight"].chunk(3))
            out.update({f"{theirs}self_attn.q_proj.weight": q, f"{theirs}self_attn.k_proj.weight": k,
                        f"{theirs}self_attn.v_proj.weight": val})
            out.update({theirs + b: ours[mine + a] for a, b in VISION_LAYER.items()})
            if stack == "global_transformer":
                out[theirs + "gate_attn"], out[theirs + "gate_ffn"] = ours[mine + "gate_attn"], ours[mine + "gate_ffn"]
    return out
