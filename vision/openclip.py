"""open_clip ViT weights as the image encoder's trunk.

    encoder = ImageEncoder(vision_config_from_open_clip("ViT-B-16"))
    load_open_clip(encoder, "open_clip_model.safetensors")     # a local state dict (safetensors)
    load_open_clip(encoder, "ViT-B-16:laion2b_s34b_b88k")       # open_clip's registry (network)

The trunk uses open_clip's parameter names (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.*, ln_post), so loading is a matter of picking the image tower's
tensors. The pooled projection `proj` has no counterpart (the encoder returns every token); the
tile embeddings and global layers keep their initialisation (their gates start closed or at
pi/4, as in Llama 3.2). Pickle checkpoints (.pt, .bin) are refused.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mm.checkpoint import PICKLE_SUFFIXES, load_tensors
from mm.errors import CheckpointError, InputError
from vision.encoder import ImageEncoder, VisionConfig

IGNORED = {"proj"}  # open_clip image-tower tensors without a counterpart here


def vision_config_from_open_clip(name: str, **changes) -> VisionConfig:
    """The trunk sizes of an open_clip architecture (its bundled model config, no network);
    `changes` set the rest (taps, global_layers, max_tiles, ...)."""
    import open_clip

    config = open_clip.get_model_config(name)
    if config is None:
        raise InputError(name, f"unknown open_clip model (have e.g. {', '.join(open_clip.list_models()[:5])}, ...)")
    vc = config["vision_cfg"]
    if any(k in vc for k in ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre")) or \
            vc.get("pos_embed_type", "learnable") != "learnable":
        raise InputError(name, "not a plain open_clip ViT (timm trunk, layer scale, attentional pooling, no ln_pre "
                               "or fixed positions)")
    width = vc["width"]
    head_width = vc.get("head_width", 64)
    image_size = vc["image_size"] if isinstance(vc["image_size"], int) else vc["image_size"][0]
    sizes = dict(image_size=image_size, patch_size=vc["patch_size"], width=width, layers=vc["layers"],
                 heads=width // head_width, mlp_dim=int(width * vc.get("mlp_ratio", 4.0)),
                 act="quick_gelu" if config.get("quick_gelu") else "gelu")
    return VisionConfig(**{**sizes, **changes})


def open_clip_tensors(source: str | Path) -> dict[str, Tensor]:
    """The image tower of an open_clip checkpoint under the trunk's names: from a .safetensors
    file (a whole CLIP state dict, `visual.*`, or the image tower's own) or `NAME:TAG` of
    open_clip's pretrained registry (downloads: needs network and a safetensors release)."""
    path = Path(source)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(path, "pickle-based checkpoint refused (loading it could run code); "
                                    "convert it to .safetensors")
    if path.suffix == ".safetensors" or path.exists():
        tensors = load_tensors(path)
    elif ":" in str(source):
        tensors = load_tensors(_download(str(source)))
    else:
        raise InputError(source, "no such file, and not an open_clip pretrained NAME:TAG")
    if any(k.startswith("visual.") for k in tensors):
        tensors = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    return {k: v for k, v in tensors.items() if k not in IGNORED}


def _download(spec: str) -> Path:
    import open_clip

    name, tag = spec.split(":", 1)
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise InputError(spec, f"no open_clip pretrained weights '{tag}' for '{name}' "
                               f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as e:  # the hub client raises many kinds; the user needs the one line
        raise InputError(spec, f"download failed ({type(e).__name__}: {e})") from None


def load_open_clip(encoder: ImageEncoder, source: str | Path) -> None:
    """Load an open_clip image tower into the encoder's trunk. Every trunk tensor must be in the
    checkpoint with the encoder's shape (a positional embedding of another resolution is
    resampled); a tensor the trunk lacks (layer scale, attentional pooling, ...) is an error."""
    tensors = open_clip_tensors(source)
    own = encoder.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(source, f"open_clip tensor '{unknown[0]}' has no place in the encoder "
                                      f"({len(unknown)} in all)")
    trunk = [k for k in own if not k.startswith(("pre_tile_embedding.", "post_tile_embedding.",
                                                 "tile_positional_embedding.", "global_transformer."))]
    missing = [k for k in trunk if k not in tensors]
    if missing:
        raise CheckpointError(source, f"no tensor '{missing[0]}' for the encoder trunk ({len(missing)} missing: "
                                      "check layers and vision.attn_bias)")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            t = tensors[name] = encoder.resize_tensor(name, t)
        if t.shape != own[name].shape:
            raise CheckpointError(source, f"tensor '{name}' has shape {list(t.shape)}, "
                                          f"the encoder {list(own[name].shape)}")
    encoder.load_state_dict(tensors, strict=False)
