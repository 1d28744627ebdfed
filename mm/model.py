"""The composite model: encoders -> projectors -> gated cross-attention into a frozen Llama.

    model = MultimodalModel(config, decoder, tokenizer)
    model.generate("What is shown?", images=["a.jpg"])

Modules are kept in dicts keyed by modality (`encoders`, `projectors`, `xattn`) so that the
video and speech paths plug in beside the image path. The decoder is never trained: it is
frozen here, and `trainable_parameters` never returns one of its parameters.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from adapters import CrossAttentionBlock, CrossAttentionFusion, MediaContext, MediaTokenEmbedding
from mm.checkpoint import fingerprint
from mm.config import ImageAdapterConfig, ModelConfig
from mm.decoders import freeze
from mm.errors import ConfigError, InputError
from mm.generation import Sampler, incremental_text
from mm.llama_step import LlamaDecodeStep, supports
from speech import AudioFeatures, AudioProcessor, ConformerEncoder, SpeechAdapter
from speech.adapter import token_runs
from speech.ctc_prefix import JointSampler
from video import FrameProcessor, TemporalAggregator
from vision import ImageEncoder, ImageProcessor
from vision.tiling import aspect_ratio_id
from vision.transforms import TiledImages

MEDIA_TOKENS = {"image": "<|image|>", "video": "<|video|>", "audio": "<|audio|>"}
KINDS = tuple(MEDIA_TOKENS)
# the recording follows the instruction, as a user would say it
ASR_PROMPT = "Repeat after me in {language}: <|audio|>"
DECODE_MODES = ("lean", "compile", "plain")
FEATURE_SECONDS = 0.01  # one log-mel frame per 10 ms


def cross_attention_layers(n_layers: int, every: int) -> list[int]:
    """Decoder layers preceded by a cross-attention block: k-1, 2k-1, ... (3, 7, ..., 31 for 32 / 4)."""
    return [i for i in range(n_layers) if (i + 1) % every == 0]


def image_adapter_layers(adapter: ImageAdapterConfig, n_layers: int) -> list[int]:
    """The decoder layers preceded by an image block: the explicit list, else every k-th."""
    if adapter.layers is None:
        return cross_attention_layers(n_layers, adapter.every)
    outside = [i for i in adapter.layers if not 0 <= i < n_layers]
    if outside:
        raise ConfigError("image_adapter.layers", f"{outside} outside the decoder's layers 0..{n_layers - 1}")
    return list(adapter.layers)


@dataclass
class DecoderInputs:
    """What the decoder reads for a batch once its media are encoded: the ids (with speech
    spliced into the input, each audio token expanded to its recording's positions), their mask
    and labels (None when not training), the cross-attention contexts by kind, the speech
    embeddings [k, d] that replace the k audio-token positions in row-major order (or None), and
    with speech.adapter.tokens the token head's logits [n, m, 1 + vocab] of the n recordings and
    their valid outputs [n, m] (or None)."""

    ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    media: dict
    spliced: Tensor | None
    token_logits: tuple[Tensor, Tensor] | None = None


def expand_positions(ids: Tensor, attention_mask: Tensor, labels: Tensor | None, at: Tensor, counts: Tensor,
                     pad_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Repeat each position flagged in `at` [b, L] (row-major order) counts[k] times, 0 removing
    it; rows are re-padded on the side they were padded on (right when a row ends in padding,
    else left), labels with -100 (cross-entropy's ignore index)."""
    repeats = torch.ones_like(ids)
    repeats[at] = counts.to(ids)
    repeats = repeats * attention_mask.to(ids)
    left = not bool((attention_mask[:, -1] == 0).any())
    width = max(int(repeats.sum(1).max()), 1)
    new_ids = ids.new_full((ids.shape[0], width), pad_id)
    new_mask = attention_mask.new_zeros((ids.shape[0], width))
    new_labels = None if labels is None else labels.new_full((ids.shape[0], width), -100)
    for r in range(ids.shape[0]):
        row = ids[r].repeat_interleave(repeats[r])
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        new_ids[r, cols], new_mask[r, cols] = row, 1
        if labels is not None:
            new_labels[r, cols] = labels[r].repeat_interleave(repeats[r])
    return new_ids, new_mask, new_labels


@dataclass
class Batch:
    """Token ids, left-padded, and the images of all rows in row order.

    ids, attention_mask: [b, L];  images: TiledImages of n images;  image_rows: [n] row of each;
    videos: [n_v, F, 3, S, S] preprocessed frames;  video_rows: [n_v] row of each;
    audio: log-mel features of n_a recordings;  audio_rows: [n_a] row of each.
    """

    ids: Tensor
    attention_mask: Tensor
    images: TiledImages | None = None
    image_rows: Tensor | None = None
    videos: Tensor | None = None
    video_rows: Tensor | None = None
    audio: AudioFeatures | None = None
    audio_rows: Tensor | None = None

    def media(self) -> dict:
        return dict(images=self.images, image_rows=self.image_rows, videos=self.videos, video_rows=self.video_rows,
                    audio=self.audio, audio_rows=self.audio_rows)


class MultimodalModel(nn.Module):
    def __init__(self, config: ModelConfig, decoder: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.decoder = freeze(decoder)
        tokenizer.add_tokens(list(MEDIA_TOKENS.values()), special_tokens=True)
        self.tokenizer = tokenizer
        self.media_token_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in MEDIA_TOKENS.items()}
        dc = decoder.config
        table = decoder.get_input_embeddings().weight
        self.image_layers = image_adapter_layers(config.image_adapter, dc.num_hidden_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.media_embedding = MediaTokenEmbedding(list(self.media_token_ids.values()), table.mean(0))
            self.encoders = nn.ModuleDict({"image": ImageEncoder(config.vision)})
            self.projectors = nn.ModuleDict({"image": nn.Linear(config.vision.output_dim, dc.hidden_size)})
            attend = config.image_adapter.attend_without_media
            self.xattn = nn.ModuleDict({"image": nn.ModuleList(
                [self._block(dc, attend) for _ in self.image_layers])})
            # video: frames through the image encoder, merged in time, own blocks (zero gates)
            # before every k-th image block; built after the image path so its init is unchanged
            self.video_layers = self.image_layers[config.video.every - 1:: config.video.every]
            self.aggregator = TemporalAggregator(config.video, config.vision.output_dim, config.vision.tokens_per_tile)
            self.projectors["video"] = nn.Linear(self.aggregator.width, dc.hidden_size)
            self.xattn["video"] = nn.ModuleList([self._block(dc) for _ in self.video_layers])
            # speech: Conformer -> adapter; its outputs are decoder inputs, or (attach:
            # cross_attention) the states of audio blocks at the image blocks' layers
            self.encoders["audio"] = ConformerEncoder(config.speech)
            self.speech_adapter = SpeechAdapter(config.speech, dc.hidden_size)
            self.audio_layers = self.image_layers if config.speech.attach == "cross_attention" else []
            self.xattn["audio"] = nn.ModuleList([self._block(dc) for _ in self.audio_layers])
        self.to(table.device, table.dtype)
        self.fusion = CrossAttentionFusion(decoder.model.layers)
        self.fusion.add("video", self.xattn["video"], self.video_layers)  # added first: runs first
        self.fusion.add("image", self.xattn["image"], self.image_layers)
        self.fusion.add("audio", self.xattn["audio"], self.audio_layers)
        v = config.vision
        self.image_processor = ImageProcessor(v.image_size, v.max_tiles, v.mean, v.std)
        self.frame_processor = FrameProcessor(v.image_size, config.video.frames, v.mean, v.std)
        self.audio_processor = AudioProcessor(config.speech)
        self._decoder_sha256: str | None = None
        self._lexicon = None  # the character search's word list (speech/lm_beam.py), built on first use
        # how decode() runs generated tokens: "lean" through mm.llama_step (the decoder's modules,
        # pre-allocated cache, fewer steps per token), "compile" the same through torch.compile
        # (pays off over long or many replies), "plain" through the decoder's forward
        self.decode_mode = "lean"
        self._lean: LlamaDecodeStep | None = None

    @staticmethod
    def _block(dc, attend_without_media: bool = False) -> CrossAttentionBlock:
        return CrossAttentionBlock(
            dim=dc.hidden_size, n_heads=dc.num_attention_heads, n_kv_heads=dc.num_key_value_heads,
            head_dim=getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads,
            mlp_dim=dc.intermediate_size, norm_eps=dc.rms_norm_eps, attend_without_media=attend_without_media,
        )

    # ---- what trains, what is saved -------------------------------------------------------
    def train(self, mode: bool = True) -> "MultimodalModel":
        super().train(mode)
        self.decoder.eval()  # frozen: no dropout, whatever the mode of the rest
        return self

    @torch.no_grad()
    def init_video_from_image(self) -> list[str]:
        """Start the video path from the trained image path: each video block from the image
        block of its layer, the video projector from the image projector (when the aggregator
        works in the encoder's width). Gates stay closed, so the model's outputs are unchanged;
        with the aggregator starting as the mean of each run of frames, the video blocks can
        read a merged frame the way the image blocks read an image from the first step on.
        Returns the names of the tensors copied."""
        copied = []
        image_blocks = dict(zip(self.image_layers, self.xattn["image"]))
        for layer, block in zip(self.video_layers, self.xattn["video"]):
            source = image_blocks[layer].state_dict()
            block.load_state_dict({k: (v if not k.endswith("gate.scale") else torch.zeros_like(v))
                                   for k, v in source.items()})
            copied += [f"xattn.video.{self.video_layers.index(layer)}.{k}" for k in source]
        if self.projectors["video"].weight.shape == self.projectors["image"].weight.shape:
            self.projectors["video"].load_state_dict(self.projectors["image"].state_dict())
            copied += ["projectors.video.weight", "projectors.video.bias"]
        return copied

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything but the decoder (which a checkpoint identifies by hash instead)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("decoder.")}

    def decoder_sha256(self) -> str:
        if self._decoder_sha256 is None:
            self._decoder_sha256 = fingerprint(self.decoder.state_dict())
        return self._decoder_sha256

    @property
    def device(self) -> torch.device:
        return self.media_embedding.weight.device

    # ---- forward -------------------------------------------------------------------------
    def embed(self, ids: Tensor, spliced: Tensor | None = None) -> Tensor:
        """Token embeddings [b, L, d]; `spliced` [k, d] (speech adapter outputs) replace the k
        audio-token positions in row-major order."""
        embeds = self.media_embedding(ids, self.decoder.get_input_embeddings())
        if spliced is None:
            return embeds
        at = (ids == self.media_token_ids["audio"])[..., None]
        return embeds.masked_scatter(at, spliced.to(embeds.dtype))

    def image_context(self, ids: Tensor, images: TiledImages | None, image_rows: Tensor | None) -> MediaContext | None:
        """Encode the batch's images once; place them per row in the order of their <|image|> tokens."""
        if images is None or len(images) == 0:
            return None
        encoder = self.encoders["image"]
        dtype = self.media_embedding.weight.dtype
        states = self.projectors["image"](encoder(images.tiles.to(dtype), images.aspect_ratio_ids, images.n_tiles))
        valid = encoder.token_mask(images.n_tiles, images.tiles.shape[1])  # [n, M]
        return self._context("image", ids, states, valid, image_rows)

    def encode_video(self, frames: Tensor) -> Tensor:
        """Preprocessed frames [n, F, 3, S, S] -> video states [n, (F / M) * N, d_model].

        Each frame is one tile of the image encoder, run `video.chunk` frames at a time; the
        encoder keeps no activations for backward unless one of its parameters trains."""
        n, f = frames.shape[:2]
        encoder = self.encoders["image"]
        tokens = self.config.vision.tokens_per_tile
        flat = frames.flatten(0, 1)[:, None].to(self.media_embedding.weight.dtype)  # [n*F, 1, 3, S, S]
        grid = torch.full((flat.shape[0],), aspect_ratio_id((1, 1), self.config.vision.max_tiles), device=flat.device)
        one = torch.ones_like(grid)
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(trains):
            per_frame = [encoder(c, g, o)[:, :tokens] for c, g, o in zip(
                flat.split(self.config.video.chunk), grid.split(self.config.video.chunk), one.split(self.config.video.chunk))]
        states = torch.cat(per_frame).view(n, f, tokens, -1)
        return self.projectors["video"](self.aggregator(states))

    def video_context(self, ids: Tensor, videos: Tensor | None, video_rows: Tensor | None) -> MediaContext | None:
        """Encode the batch's videos once; place them per row in the order of their <|video|> tokens."""
        if videos is None or len(videos) == 0:
            return None
        states = self.encode_video(videos)
        valid = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return self._context("video", ids, states, valid, video_rows)

    def encode_audio(self, audio: AudioFeatures) -> tuple[Tensor, Tensor]:
        """Log-mel features of n recordings -> adapter outputs [n, m, d_model] (80 ms each) and
        their mask [n, m] (False past each recording's end)."""
        states, mask = self.encoders["audio"](audio.features.to(self.media_embedding.weight.dtype), audio.lengths)
        return self.speech_adapter(states, mask)

    def audio_inputs(self, ids: Tensor, attention_mask: Tensor, labels: Tensor | None, audio: AudioFeatures,
                     audio_rows: Tensor) -> tuple:
        """-> (MediaContext or None, spliced embeddings or None, ids, attention_mask, labels, the
        token head's logits and valid outputs or None): how the speech reaches the decoder, by
        speech.attach. Spliced: every recording fills the run of audio tokens that `prepare` put
        in its place, one token per adapter output; with adapter.tokens, `prepare` puts one audio
        token per recording, expanded here to as many as the recording has token runs
        (speech/adapter.py)."""
        states, valid = self.encode_audio(audio)
        if self.config.speech.attach == "cross_attention":
            return self._context("audio", ids, states, valid, audio_rows), None, ids, attention_mask, labels, None
        at = ids == self.media_token_ids["audio"]
        rows = at.nonzero(as_tuple=True)[0]
        head = self.speech_adapter.tokens
        per_recording = valid.sum(1) if head is None else torch.ones_like(audio_rows)
        expected = audio_rows.to(rows.device).repeat_interleave(per_recording.to(rows.device))
        if rows.numel() != expected.numel() or not torch.equal(rows, expected):
            raise InputError("prompt", f"{rows.numel()} {MEDIA_TOKENS['audio']} positions for recordings of "
                                       f"{per_recording.tolist()} positions")
        if head is None:
            return None, states[valid], ids, attention_mask, labels, None
        table = self.decoder.get_input_embeddings().weight
        logits = head(states, valid, table)
        runs, counts = token_runs(logits, valid, table)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, attention_mask, labels = expand_positions(ids, attention_mask, labels, at, counts, pad)
        return None, runs, ids, attention_mask, labels, (logits, valid)

    def _context(self, kind: str, ids: Tensor, states: Tensor, valid: Tensor, rows_of: Tensor) -> MediaContext:
        """Media states [n, m, d] -> a MediaContext packed per row, each visible from its token on."""
        rows, cols = (ids == self.media_token_ids[kind]).nonzero(as_tuple=True)
        if rows.numel() != len(states) or not torch.equal(rows, rows_of.to(rows.device)):
            raise InputError("prompt", f"{rows.numel()} {MEDIA_TOKENS[kind]} tokens for {len(states)} {kind}s")
        b, n, m = ids.shape[0], len(states), states.shape[1]
        first_of_row = torch.searchsorted(rows, rows, side="left")
        slot = torch.arange(n, device=rows.device) - first_of_row
        n_max = int(slot.max()) + 1
        packed = states.new_zeros(b, n_max, m, states.shape[-1])
        packed_valid = valid.new_zeros(b, n_max, m)
        start = torch.full((b, n_max), torch.iinfo(torch.long).max, device=ids.device)
        packed[rows, slot], packed_valid[rows, slot], start[rows, slot] = states, valid, cols
        return MediaContext(packed.flatten(1, 2), start, packed_valid.flatten(1, 2), m)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, images: TiledImages | None = None,
                image_rows: Tensor | None = None, labels: Tensor | None = None, videos: Tensor | None = None,
                video_rows: Tensor | None = None, audio: AudioFeatures | None = None,
                audio_rows: Tensor | None = None, **decoder_kwargs):
        """Teacher-forced pass. ids [b, L] -> CausalLMOutputWithPast (loss when labels are given)."""
        x = self.media_inputs(ids, attention_mask, images, image_rows, videos, video_rows, audio, audio_rows, labels)
        return self._run(self.decoder, x.ids, x.attention_mask, x.media, spliced=x.spliced, labels=x.labels,
                         **decoder_kwargs)

    def hidden_states(self, inputs: DecoderInputs, prefix: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """The decoder's final hidden states [b, L - P, d] (before the LM head; training takes the
        logits of the labelled positions only). `prefix`: per-layer keys/values [1, kv, P, hd]
        of the first P tokens, shared by every row (see `prefix_cache`); only the rest is run."""
        return self._run(self.decoder.model, inputs.ids, inputs.attention_mask, inputs.media, prefix,
                         inputs.spliced).last_hidden_state

    def media_inputs(self, ids, attention_mask=None, images=None, image_rows=None, videos=None, video_rows=None,
                     audio=None, audio_rows=None, labels=None) -> DecoderInputs:
        """Encode a batch's media -> what the decoder reads (DecoderInputs). Speech goes first:
        spliced into the input it may change the positions the other media's tokens sit at."""
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        audio_context, spliced, token_logits = None, None, None
        if audio is not None and len(audio):
            audio_context, spliced, ids, attention_mask, labels, token_logits = self.audio_inputs(
                ids, attention_mask, labels, audio, audio_rows)
        media = {"image": self.image_context(ids, images, image_rows),
                 "video": self.video_context(ids, videos, video_rows), "audio": audio_context}
        return DecoderInputs(ids, attention_mask, labels, media, spliced, token_logits)

    @torch.no_grad()
    def prefix_cache(self, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Keys/values of a text prefix [P] that precedes every media token. Rows before any media
        are exactly the frozen decoder's, so this is valid for the whole life of the model."""
        if bool(torch.isin(ids, self.media_embedding.new_ids).any()):
            raise ValueError("a cached prefix cannot contain media tokens")
        out = self.decoder.model(inputs_embeds=self.embed(ids[None]), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _run(self, module: nn.Module, ids, attention_mask, media: dict, prefix=None, spliced=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        start = prefix[0][0].shape[2] if prefix else 0
        if prefix:
            b = ids.shape[0]
            kwargs["past_key_values"] = DynamicCache(
                [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix], config=self.decoder.config)
        for context in media.values():
            if context is not None:
                context.set_queries(torch.arange(start, ids.shape[1], device=ids.device))
        with self.fusion.media(**media):
            return module(inputs_embeds=self.embed(ids, spliced)[:, start:], attention_mask=attention_mask,
                          position_ids=_positions(attention_mask)[:, start:], **kwargs)

    # ---- prompts -------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> tuple[str, dict[str, list]]:
        """Chat messages (content a string or a list of {"type": "image"|"video"|"audio"|"text", ...}
        parts) -> prompt text with one media token per item, and {"image": [...], "video": [...],
        "audio": [...]} in order."""
        flat, media = [], {k: [] for k in KINDS}
        for message in messages:
            content = message.get("content", "")
            if isinstance(content, str):
                flat.append({"role": message["role"], "content": _text(content)})
                continue
            text = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    text.append(_text(part.get("text", "")))
                elif kind in media:
                    media[kind].append(next(part[k] for k in (kind, "path", "url") if k in part))
                    text.append(MEDIA_TOKENS[kind])
                else:
                    raise InputError("message", f"unsupported content part type {kind!r}")
            flat.append({"role": message["role"], "content": "".join(text)})
        return self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False), media

    def user_messages(self, prompt: str, images: list, system: str | None = None, videos: list = (),
                      audios: list = ()) -> list[dict]:
        """A one-turn conversation. Media go first (images, videos, then audio) unless the prompt
        places its own <|image|> / <|video|> / <|audio|> tokens, one per item, in the order given."""
        given = {"image": list(images), "video": list(videos), "audio": list(audios)}
        if not any(MEDIA_TOKENS[k] in prompt for k in KINDS):
            content = [{"type": k, k: x} for k in KINDS for x in given[k]]
            content += [{"type": "text", "text": prompt}] if prompt else []
        else:
            for kind in KINDS:
                if prompt.count(MEDIA_TOKENS[kind]) != len(given[kind]):
                    raise InputError("prompt", f"{prompt.count(MEDIA_TOKENS[kind])} {MEDIA_TOKENS[kind]} "
                                               f"placeholders for {len(given[kind])} {kind}s")
            content = []
            pattern = "(" + "|".join(re.escape(MEDIA_TOKENS[k]) for k in KINDS) + ")"
            for piece in re.split(pattern, prompt):
                kind = next((k for k in KINDS if piece == MEDIA_TOKENS[k]), None)
                if kind:
                    content.append({"type": kind, kind: given[kind].pop(0)})
                elif piece:
                    content.append({"type": "text", "text": piece})
        messages = [{"role": "user", "content": content}]
        return ([{"role": "system", "content": system}] if system else []) + messages

    def audio_token_runs(self, tokens: list[int], frames: list[int]) -> list[int]:
        """With speech spliced into the input, each audio token becomes a run of as many audio
        tokens as its recording has adapter outputs (`frames`, in order). With adapter.tokens the
        count is known only once the recording is encoded: the token stays one (audio_inputs)."""
        if self.config.speech.attach != "input" or self.config.speech.adapter.tokens or not frames:
            return tokens
        audio_id, runs, out = self.media_token_ids["audio"], iter(frames), []
        for t in tokens:
            out += [t] * next(runs) if t == audio_id else [t]
        return out

    def prepare(self, conversations: list[list[dict]], max_new_tokens: int = 0) -> Batch:
        """Conversations -> a left-padded Batch on the model's device, media preprocessed."""
        ids, media, rows = [], {k: [] for k in KINDS}, {k: [] for k in KINDS}
        limit = self.decoder.config.max_position_embeddings
        audio = []
        for row, messages in enumerate(conversations):
            text, row_media = self.render(messages)
            row_audio = [self.audio_processor.features(a) for a in row_media["audio"]]
            frames = [int(self.config.speech.adapter_frames(f.shape[0])) for f in row_audio]
            tokens = self.audio_token_runs(self.tokenizer(text, add_special_tokens=False).input_ids, frames)
            size = len(tokens)
            if self.config.speech.adapter.tokens:  # each recording takes at most one position per adapter output
                size += sum(frames) - len(frames)
            if size + max_new_tokens > limit:
                raise InputError("prompt", f"{size} tokens + {max_new_tokens} new exceed the context of {limit}")
            ids.append(tokens)
            audio += row_audio
            for kind, items in row_media.items():
                media[kind] += items
                rows[kind] += [row] * len(items)
        width = max(len(t) for t in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, tokens in enumerate(ids):
            batch[i, width - len(tokens):] = torch.tensor(tokens)
            mask[i, width - len(tokens):] = 1
        images, videos = media["image"], media["video"]
        tiled = self.image_processor(images).to(self.device) if images else None
        frames = self.frame_processor(videos).to(self.device) if videos else None
        features = AudioFeatures.pad(audio).to(self.device) if audio else None

        def row_ids(kind):
            return torch.tensor(rows[kind], dtype=torch.long, device=self.device) if media[kind] else None

        return Batch(batch.to(self.device), mask.to(self.device), tiled, row_ids("image"), frames, row_ids("video"),
                     features, row_ids("audio"))

    # ---- generation ----------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: Batch, max_new_tokens: int, sampler: Sampler,
               min_new_tokens: int = 0) -> Iterator[Tensor]:
        """Yield the next token of every row [b] per step. Media keys/values are computed at the
        first step and reused from the MediaContext for every later one; rows that finished
        get the pad token. End-of-turn tokens cannot be chosen before `min_new_tokens`."""
        inputs = self.media_inputs(batch.ids, batch.attention_mask, **batch.media())
        ids, mask, media, spliced = inputs.ids, inputs.attention_mask, inputs.media, inputs.spliced
        sampler = sampler.bind(inputs)
        self.last_context = media["image"]  # kept for inspection (tests count key/value computations)
        self.last_contexts = media
        stop = torch.tensor(sorted(self.eos_token_ids()), device=ids.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else int(stop[0])
        cache = DynamicCache(config=self.decoder.config)
        embeds, positions = self.embed(ids, spliced), _positions(mask)
        query = torch.arange(ids.shape[1], device=ids.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        # the prompt runs through the decoder's forward; each later token through the lean step
        lean = self._lean_step()
        for step in range(max_new_tokens):
            if lean is not None and step > 0:
                logits = lean(embeds)
            else:
                logits = self._forward(embeds, mask, positions, query, media, cache)
                if lean is not None:
                    self._hand_over(lean, cache, mask, positions, query, media, max_new_tokens)
                    cache = None  # the step holds its own copy
            if step < min_new_tokens:
                logits = logits.index_fill(-1, stop, float("-inf"))
            token = sampler(logits).masked_fill(done, pad)
            yield token
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            embeds = self.embed(token[:, None])
            if lean is None:  # the lean step keeps its own mask and positions
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[:, -1:] + 1
                query = query[-1:] + 1

    def _forward(self, embeds, mask, positions, query, media: dict, cache) -> Tensor:
        """The decoder's forward over new rows (the prompt, or one token) -> last logits [b, vocab]."""
        for context in media.values():
            if context is not None:
                context.set_queries(query)
        with self.fusion.media(**media):
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _hand_over(self, lean: LlamaDecodeStep, cache, mask, positions, query, media: dict, max_new_tokens: int):
        """Give the prompt's cache and the media blocks of every layer to the lean step."""
        for context in media.values():  # every media is visible to every new token
            if context is not None:
                context.set_queries(query[-1:] + 1)
        with self.fusion.media(**media):
            blocks = [self.fusion.active(i) for i in range(len(self.decoder.model.layers))]
        lean.start(cache, mask, positions[:, -1:] + 1, max_new_tokens, blocks)

    def _lean_step(self) -> LlamaDecodeStep | None:
        if self.decode_mode not in DECODE_MODES:
            raise ConfigError("decode_mode", f"{self.decode_mode!r} is not one of {', '.join(DECODE_MODES)}")
        if self.decode_mode == "plain" or not supports(self.decoder):
            return None
        compile = self.decode_mode == "compile"
        if self._lean is None or self._lean.compile != compile:  # kept: a compiled step is reused
            self._lean = LlamaDecodeStep(self.decoder, compile=compile)
        return self._lean

    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.decoder.generation_config.eos_token_id
        ids |= set(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def generate(self, prompt: str | list[str], images: list | list[list] | None = None, *, video=None, audio=None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, system: str | None = None) -> str | list[str]:
        """Answer one prompt (images: a list; video: a path, bytes or uint8 tensor [T, 3, H, W];
        audio: a path, bytes or (samples, sample_rate)) or a batch (prompt: a list; images: a list
        per prompt; video and audio: one per prompt, None for none). With audio and an empty
        prompt, the reply is to what was said (spoken dialogue; speech.dialogue says whether to the
        speech's embeddings or to its transcript, `heard`)."""
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, list, tuple)):
            raise InputError("prompt", f"must be text (str) or a list of texts, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, images, video=video, audio=audio, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, system=system))
        per_row = images if images is not None else [[] for _ in prompt]
        videos = video if video is not None else [None for _ in prompt]
        audios = audio if audio is not None else [None for _ in prompt]
        if len(audios) == len(prompt):
            prompt, audios = self.heard(prompt, audios)
        return self._answer(list(prompt), per_row, videos, audios, max_new_tokens,
                            Sampler(temperature, top_k, top_p, seed), system)

    def respond(self, audio, language: str = "English", *, max_new_tokens: int = 64, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                system: str | None = None) -> tuple[str, str] | list[tuple[str, str]]:
        """Spoken dialogue with what was heard kept: one recording -> (transcript, reply), a list
        -> a list of them. The reply is generate("", audio=...)'s, each recording transcribed once."""
        single = not isinstance(audio, list)
        audios = [audio] if single else list(audio)
        transcripts = self.transcribe(audios, language=language) if audios else []
        prompts, audios = self.heard([""] * len(audios), audios, transcripts)
        replies = self._answer(prompts, [[] for _ in audios], [None] * len(audios), audios, max_new_tokens,
                               Sampler(temperature, top_k, top_p, seed), system)
        pairs = list(zip(transcripts, replies))
        return pairs[0] if single else pairs

    def _answer(self, prompts: list[str], per_row: list, videos: list, audios: list, max_new_tokens: int,
                sampler: Sampler, system: str | None) -> list[str]:
        """generate's batch, its spoken rows already `heard`."""
        if not len(per_row) == len(videos) == len(audios) == len(prompts):
            raise InputError("images", f"{len(per_row)} image lists, {len(videos)} videos and {len(audios)} "
                                       f"recordings for {len(prompts)} prompts")
        conversations = [self.user_messages(p, list(i or []), system, [v] if v is not None else [],
                                            [a] if a is not None else [])
                         for p, i, v, a in zip(prompts, per_row, videos, audios)]
        return self._complete(self.prepare(conversations, max_new_tokens), max_new_tokens, sampler)

    def transcribe(self, audio, language: str = "English", *, max_new_tokens: int | None = None,
                   ctc_weight: float | None = None, method: str | None = None) -> str | list[str]:
        """What was said: one recording -> str, a list -> a list.

        method (default speech.transcriber.method): "characters" reads the Conformer's character
        head, searched with the frozen decoder as a word-level language model (speech/lm_beam.py),
        then cased and punctuated by the decoder (speech/punctuation.py). "decoder" prompts the
        decoder to repeat what was said (the ASR prompt of speech_sft); with the adapter's token
        head, each next token is chosen by the decoder and the head's CTC together
        (speech/ctc_prefix.py), ctc_weight (default speech.adapter.ctc_weight) being the head's
        share, 0 leaving the choice to the decoder. A decoder transcript is cut at
        max_new_tokens, by default at `transcript_budget` of the recording's length: a decoder
        caught repeating itself stops about where the speech ended instead of running on.
        "auto": characters when a stage trained the character head, else decoder."""
        recordings = audio if isinstance(audio, list) else [audio]
        if self.transcription_method(method) == "characters":
            out = self.read_characters(recordings)
            return out if isinstance(audio, list) else out[0]
        prompt = ASR_PROMPT.format(language=language)
        conversations = [self.user_messages(prompt, [], audios=[a]) for a in recordings]
        cap = max_new_tokens or self.transcript_budget(self.config.speech.max_seconds)
        batch = self.prepare(conversations, cap)
        frames = batch.audio.lengths.tolist() if batch.audio is not None else [0] * len(recordings)
        limits = [self.transcript_budget(n * FEATURE_SECONDS) if max_new_tokens is None else cap for n in frames]
        adapter = self.config.speech.adapter
        weight = adapter.ctc_weight if ctc_weight is None else ctc_weight
        if not 0 <= weight <= 1:
            raise InputError("ctc_weight", f"{weight} is not in [0, 1]")
        sampler = Sampler()
        if weight > 0 and adapter.tokens:  # (tokens implies speech spliced into the input)
            sampler = JointSampler(sorted(self.eos_token_ids()), weight, adapter.ctc_candidates)
        out = self._complete(batch, max(limits), sampler, limits)
        return out if isinstance(audio, list) else out[0]

    def transcription_method(self, method: str | None = None) -> str:
        """characters or decoder: `method` (default speech.transcriber.method), auto resolved."""
        method = method or self.config.speech.transcriber.method
        trained = self.encoders["audio"].has_ctc_head()
        if method == "auto":
            return "characters" if trained else "decoder"
        if method not in ("characters", "decoder"):
            raise InputError("method", f"'{method}' is not auto, characters or decoder")
        if method == "characters" and not trained:
            raise InputError("method", "characters needs the Conformer's character head, which no stage of this "
                                       "model trained (speech_ctc, or speech_sft with ctc_weight)")
        return method

    @torch.no_grad()
    def read_characters(self, recordings: list) -> list[str]:
        """Transcripts from the character head and the decoder as language model (speech/lm_beam.py),
        cased and punctuated by the decoder (speech/punctuation.py) when transcriber.punctuate.
        The recordings are searched side by side, their language-model requests batched."""
        from speech.conformer import CHARACTERS
        from speech.lm_beam import WordLM, lockstep, search_steps

        t = self.config.speech.transcriber
        waves = [self.audio_processor.wave(a) for a in recordings]
        heard = self.hear_characters(waves)
        lexicon = self.lexicon()
        lm = WordLM(self.decoder, self.tokenizer, names=lexicon.names)  # its cache lives as long as this call
        found = lockstep([search_steps(x, CHARACTERS, lm, t.lm_weight, t.word_bonus, t.beam, lexicon=lexicon,
                                       unknown=t.unknown_word, unknown_char=t.unknown_char) for x in heard], lm)
        return self.write_out([next(iter(f), "").split() for f in found], waves, heard)

    def lexicon(self):
        """The character search's lexicon (speech/lm_beam.py): the decoder's words and
        speech.transcriber.word_list's, built on first use."""
        from speech.lm_beam import Lexicon, read_word_list

        if self._lexicon is None:
            self._lexicon = Lexicon(self.tokenizer, read_word_list(self.config.speech.transcriber.word_list))
        return self._lexicon

    @torch.no_grad()
    def hear_characters(self, waves: list[Tensor]) -> list[Tensor]:
        """The Conformer's character head on each recording (16 kHz waves, batched): its
        log-probabilities [frames, 1 + len(CHARACTERS)], blank first."""
        encoder = self.encoders["audio"]
        features = AudioFeatures.pad([self.audio_processor.log_mel_of(w) for w in waves])
        features = features.to(self.media_embedding.weight.device)
        logits, mask = encoder.characters(*encoder(features.features.to(self.media_embedding.weight.dtype),
                                                   features.lengths))
        return [row[:n] for row, n in zip(logits.float().log_softmax(-1), mask.sum(1).tolist())]

    @torch.no_grad()
    def write_out(self, read: list[list[str]], waves: list[Tensor],
                  heard: list[Tensor | None] | None = None) -> list[str]:
        """Words as the character search reads them (lower-case, no punctuation) -> sentences as
        written: cased and punctuated by the decoder (speech/punctuation.py) when
        transcriber.punctuate, weighing each recording's (`waves`, 16 kHz) final pitch rise for a
        closing question mark and, where `heard` gives the character head's log-probabilities, the
        pauses between the words for commas; otherwise only the first word and "I" capitalised."""
        from speech.conformer import CHARACTERS
        from speech.intonation import final_rise, question_log_odds
        from speech.lm_beam import WordLM, as_written, lockstep
        from speech.punctuation import punctuation_steps, user_turn, word_gaps

        t = self.config.speech.transcriber
        if t.punctuate:
            context, end = user_turn(self.tokenizer)
            lm = WordLM(self.decoder, self.tokenizer, context=context, end=end, names=self.lexicon().names)
            questions = [(question_log_odds(final_rise(w), t.question_weight) if t.question_weight else 0.0)
                         + t.question_prior if words else 0.0
                         for w, words in zip(waves, read)]  # nothing read: nothing to punctuate
            per_frame = self.encoders["audio"].config.ctc_upsample  # the head's labels per 40 ms frame
            pauses = [None if x is None else word_gaps(x, words, CHARACTERS, per_frame)
                      for x, words in zip(heard or [None] * len(read), read)]
            return lockstep([punctuation_steps(words, lm, t.punctuation_beam, gaps, t.pause_weight, t.pause_frames, q,
                                               t.recase)
                             for words, gaps, q in zip(read, pauses, questions)], lm)
        names = self.lexicon().names
        return [" ".join(as_written(w, n == 0, names) for n, w in enumerate(words)) for words in read]

    def dialogue_method(self) -> str:
        """embeddings or transcript: how generate("", audio=...) replies (speech.dialogue, auto resolved)."""
        method = self.config.speech.dialogue
        if method == "auto":
            return "transcript" if self.transcription_method() == "characters" else "embeddings"
        return method

    def heard(self, prompts: list[str], audios: list,
              transcripts: list[str] | None = None) -> tuple[list[str], list]:
        """Spoken dialogue through transcripts: each row with a recording and an empty prompt becomes
        the transcript as typed text, without the recording, when dialogue_method() is transcript.
        A recording in which nothing was made out stays, for the reply to the speech itself.
        transcripts: every row's, when already made (otherwise the spoken rows are transcribed)."""
        rows = [r for r, (p, a) in enumerate(zip(prompts, audios)) if a is not None and p == ""]
        if not rows or self.dialogue_method() != "transcript":
            return list(prompts), list(audios)
        prompts, audios = list(prompts), list(audios)
        made = [transcripts[r] for r in rows] if transcripts is not None else self.transcribe([audios[r] for r in rows])
        for r, text in zip(rows, made):
            if text:
                prompts[r], audios[r] = text, None
        return prompts, audios

    @staticmethod
    def transcript_budget(seconds: float) -> int:
        """Most tokens a transcript of so many seconds of speech needs: 8 + 6 a second (fast
        English speech is under 4 words, about 5 of the decoder's tokens, a second)."""
        return 8 + math.ceil(6 * seconds)

    def chat(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
        """The assistant's next reply to a transformers-style conversation."""
        return self._complete(self.prepare([messages], max_new_tokens), max_new_tokens,
                              Sampler(temperature, top_k, top_p, seed))[0]

    def stream(self, prompt: str, images: list | None = None, *, video=None, audio=None, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               system: str | None = None) -> Iterator[str]:
        """Yield the reply piece by piece as it is generated."""
        videos = [video] if video is not None else []
        if audio is not None:
            (prompt,), (audio,) = self.heard([prompt], [audio])
        audios = [audio] if audio is not None else []
        batch = self.prepare([self.user_messages(prompt, list(images or []), system, videos, audios)], max_new_tokens)
        stop = self.eos_token_ids()
        tokens = (int(t[0]) for t in self.decode(batch, max_new_tokens, Sampler(temperature, top_k, top_p, seed)))
        yield from incremental_text(self.tokenizer, _until(tokens, stop))

    def _complete(self, batch: Batch, max_new_tokens: int, sampler: Sampler,
                  limits: list[int] | None = None) -> list[str]:
        """Decode a prepared batch -> the text of every row, row r cut at limits[r] tokens."""
        steps = list(self.decode(batch, max_new_tokens, sampler))
        if not steps:
            return ["" for _ in range(batch.ids.shape[0])]
        stop = self.eos_token_ids()
        out = torch.stack(steps, dim=1).tolist()
        if limits is not None:
            out = [row[:limit] for row, limit in zip(out, limits)]
        return [self.tokenizer.decode(list(_until(row, stop)), skip_special_tokens=True) for row in out]

    def save(self, path) -> None:
        from mm.api import save_checkpoint

        save_checkpoint(self, path)


def _text(value) -> str:
    """A prompt's text, or InputError: not a str, or not encodable as UTF-8 (e.g. the lone
    surrogates Python makes of non-UTF-8 bytes on a command line)."""
    if not isinstance(value, str):
        raise InputError("prompt", f"text must be str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError("prompt", f"not valid UTF-8 text (character {e.start}: {value[e.start]!r})") from None
    return value


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding: [0 0 0 1 2 ...] for mask [0 0 1 1 1 ...]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _until(tokens, stop: set[int]):
    for t in tokens:
        if t in stop:
            return
        yield t
