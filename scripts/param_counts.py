"""Parameter counts of the paper-size model (Llama 3.1 8B decoder + the Llama 3.2 11B Vision
image path) against transformers' MllamaForConditionalGeneration with the Llama 3.2 11B Vision
config. Both are built on the meta device: nothing is allocated, nothing is downloaded.

    .venv/bin/python scripts/param_counts.py          # writes docs/params.md
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration

from mm.config import CONFIG_DIR, ImageAdapterConfig, ModelConfig, from_dict, read_yaml
from mm.decoders import tiny_tokenizer
from mm.model import MultimodalModel
from speech import SpeechConfig
from vision import VisionConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "params.md"
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_parameters=ROPE, tie_word_embeddings=False)
# Llama 3.2 11B Vision (meta-llama/Llama-3.2-11B-Vision config.json)
MLLAMA_11B_TEXT = {**LLAMA_31_8B, "num_hidden_layers": 40, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}
MLLAMA_11B_VISION = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                         intermediate_size=5120, vision_output_dim=7680, image_size=560, patch_size=14,
                         max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30])


def numel(module: torch.nn.Module | None, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def paper_model() -> MultimodalModel:
    """Llama 3.1 8B + configs/vision/vit_h14_560_mllama + a block before every 4th layer, and the
    paper's speech encoder and adapter (configs/speech/conformer_1b)."""
    vision = from_dict(VisionConfig, read_yaml(CONFIG_DIR / "vision" / "vit_h14_560_mllama.yaml"), "vision")
    speech = from_dict(SpeechConfig, read_yaml(CONFIG_DIR / "speech" / "conformer_1b.yaml"), "speech")
    config = ModelConfig(decoder="llama-3.1-8b", vision=vision, image_adapter=ImageAdapterConfig(every=4),
                         speech=speech)
    with torch.device("meta"):
        decoder = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))
        return MultimodalModel(config, decoder, tiny_tokenizer())


def mllama_11b() -> MllamaForConditionalGeneration:
    with torch.device("meta"):
        return MllamaForConditionalGeneration(MllamaConfig(text_config=MLLAMA_11B_TEXT, vision_config=MLLAMA_11B_VISION))


def counts() -> list[tuple[str, int, int, str]]:
    """(component, ours, Llama 3.2 11B Vision, why they differ) for the image path."""
    ours, ref = paper_model(), mllama_11b()
    lm = ref.model.language_model
    cross = set(lm.cross_attention_layers)
    ref_cross = sum(numel(layer) for i, layer in enumerate(lm.layers) if i in cross)
    ref_self = sum(numel(layer) for i, layer in enumerate(lm.layers) if i not in cross)
    hidden = ours.decoder.config.hidden_size
    return [
        ("vision encoder (ViT-H/14, 560 px, 8 global layers, tile embeddings)",
         numel(ours.encoders["image"]), numel(ref.model.vision_model), ""),
        ("projector 7680 -> 4096", numel(ours.projectors["image"]), numel(ref.model.multi_modal_projector), ""),
        ("8 gated cross-attention blocks", numel(ours.xattn["image"]), ref_cross, ""),
        ("32 self-attention layers + final norm", numel(ours.decoder.model.layers) + numel(ours.decoder.model.norm),
         ref_self + numel(lm.norm), ""),
        ("token embedding table", numel(ours.decoder.model.embed_tokens), numel(lm.embed_tokens),
         f"Mllama's table has 8 rows beyond the 128256 of the vocabulary (8 x {hidden}); "
         "only the <|image|> row is used"),
        ("media-token rows (<|image|>, <|video|>, <|audio|>)", numel(ours.media_embedding), 0,
         f"ours: 3 x {hidden} beside the frozen table; Mllama keeps <|image|> in its table"),
        ("LM head (untied)", numel(ours.decoder.lm_head), numel(ref.lm_head), ""),
    ]


def video_path() -> int:
    ours = paper_model()
    return numel(ours.aggregator) + numel(ours.projectors["video"]) + numel(ours.xattn["video"])


def speech_path() -> tuple[int, int]:
    """(Conformer encoder, speech adapter) of the paper-size speech config."""
    ours = paper_model()
    return numel(ours.encoders["audio"]), numel(ours.speech_adapter) + numel(ours.xattn["audio"])


def table() -> str:
    rows = counts()
    total_ours, total_ref = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines = ["# Parameter counts: Llama 3.1 8B + image path vs Llama 3.2 11B Vision", "",
             "Produced by `scripts/param_counts.py` (both models built on the meta device: "
             "`mm.MultimodalModel` with a Llama 3.1 8B `LlamaForCausalLM` and "
             "`configs/vision/vit_h14_560_mllama.yaml`, and transformers' `MllamaForConditionalGeneration` "
             "with the Llama 3.2 11B Vision config). Checked by `tests/test_interop.py`.", "",
             "| component | mm (8B + image path) | Llama 3.2 11B Vision | difference | why |",
             "|---|---:|---:|---:|---|"]
    for name, a, b, why in rows:
        lines.append(f"| {name} | {a:,} | {b:,} | {a - b:+,} | {why} |")
    lines.append(f"| **total** | **{total_ours:,}** | **{total_ref:,}** | **{total_ours - total_ref:+,}** | "
                 "the two embedding rows above, nothing else |")
    lines += ["", f"Not in Llama 3.2 Vision, so not counted above: the video path (temporal aggregator, video "
                  f"projector, 2 video cross-attention blocks) with the default video config, {video_path():,} "
                  "parameters; the speech path of `configs/speech/conformer_1b.yaml` (the paper's sizes), "
                  f"Conformer encoder {speech_path()[0]:,} and speech adapter {speech_path()[1]:,} parameters.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(table())
    print(OUT.read_text())
