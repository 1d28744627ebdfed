"""The Conformer speech encoder (Llama 3's speech encoder, at configurable size).

    log-mel [b, T, 80] (10 ms frames)
      -> stack 4 consecutive frames (40 ms) -> linear to the width
      -> layers of: x + FFN/2, x + rotary self-attention, x + depthwise-conv module, x + FFN/2, LayerNorm
         (Macaron feed-forwards around attention and convolution, Gulati et al. 2020)
      -> [b, T / 4, width], with a mask of the frames that are not padding

The encoder also carries a linear character head (`ctc_head`, CTC over CHARACTERS with blank 0),
trained by speech_ctc and saved with the encoder: it spells what the encoder hears, and
transcription can read it with the decoder as the language model (speech/lm_beam.py). It starts
at zero, so a head that no stage trained is all zeros and known to be untrained; a stage that
trains it from nothing first gives it nn.Linear's initialisation (mm/train.py, Task).

Padded frames of a batch never influence real ones: attention masks them as keys, and the
convolution sees zeros there (its input is zeroed at padding before the depthwise conv). The
convolution module normalises with LayerNorm rather than BatchNorm, so that a frame's output
depends on its own utterance only (batch composition, padding and eval mode change nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.dropout import Dropout


CHARACTERS = " abcdefghijklmnopqrstuvwxyz0123456789'"  # the character head's classes, index + 1; 0 is the blank


@dataclass
class SpeechAdapterConfig:
    """Conv (kernel 3, stride 2: 40 -> 80 ms), one rotary transformer layer, linear to the decoder."""

    width: int = 256  # the paper: 3072
    ffn_dim: int = 1024  # the paper: 4096
    heads: int = 4
    kernel: int = 3
    stride: int = 2
    tokens: bool = False  # read each output as one of the decoder's tokens or blank, and splice one
    # embedding per run of the same token (blank outputs dropped): speech/adapter.py, TokenHead
    ctc_weight: float = 0.5  # with tokens: transcripts are chosen by the decoder and the token head's
    # CTC together, this the head's share (speech/ctc_prefix.py; 0: the decoder alone)
    ctc_candidates: int = 8  # the decoder's likeliest tokens scored at each step of that search


@dataclass
class TranscriberConfig:
    """How model.transcribe reads speech."""

    method: str = "auto"  # characters: the Conformer's character head, searched with the frozen
    # decoder as a word-level language model (speech/lm_beam.py); decoder: the decoder repeating
    # what was said (with the token head's CTC when adapter.tokens); auto: characters when a stage
    # trained the character head, else decoder
    lm_weight: float = 0.5  # alpha: the language model's share of a prefix's score
    word_bonus: float = 1.0  # beta: added per word, against the cost each word's LM score adds
    beam: int = 32  # prefixes kept per label frame of the character head (README, Speech: 16 -> 32)
    unknown_word: float = 10.0  # charged to a partial word that no word of the lexicon starts with
    unknown_char: float = 5.0  # and more for each further character it runs past the longest
    # start of a word (speech/lm_beam.py): against unknown words running on through spaces (dev
    # WER by it, with and without word_list: README, Speech)
    word_list: str | None = "/usr/share/dict/words"  # a file of words, one a line (Debian's
    # wamerican), that the search's lexicon knows besides the decoder's whole-word tokens; its
    # names are written with a capital. Empty (word_list= on a command line): the tokens alone;
    # missing: a warning, and the tokens alone
    punctuate: bool = True  # characters: casing and punctuation chosen by the decoder
    # (speech/punctuation.py); false: lower case, the first letter and "I" capitalised
    punctuation_beam: int = 4
    pause_weight: float = 2.8  # a comma's log-odds per 40 ms frame of pause past pause_frames
    pause_frames: float = 3.1  # (speech/punctuation.py, pause_log_odds); 0: pauses are not heard
    question_weight: float = 0.7  # share of the final rise's log-odds for a closing "?"
    # (speech/intonation.py, question_log_odds); 0: the voice's pitch is not heard
    question_prior: float = 1.5  # log-odds added to a closing "?": the decoder, scoring a user's
    # turn, expects a statement more often than half the time. With question_weight, fitted by
    # `speech_proof.py fit-closing` on as many questions as statements (decoder weight 1.02, voice
    # 0.72, prior 1.54); 0 leaves the decoder's expectation as it is (dictation: mostly statements)
    recase: int = 3  # rounds of capitals chosen with the whole sentence in view, after the
    # punctuation beam (speech/punctuation.py, recase_steps: "Faye Dunaway"); 0: the beam's alone


@dataclass
class SpeechConfig:
    n_mels: int = 80
    stack: int = 4  # input frames (10 ms) stacked into one encoder frame (40 ms)
    width: int = 144  # the paper: 1536
    layers: int = 4  # the paper: 24
    heads: int = 4  # the paper: 24
    ffn_dim: int = 576  # the paper: 4096
    conv_kernel: int = 7
    dropout: float = 0.1
    rope_theta: float = 10000.0
    ctc_upsample: int = 1  # character-head labels per encoder frame: 2 reads 20 ms labels from 40 ms
    # frames, room for fast speech, whose letters (and the blank between doubled ones) crowd 40 ms
    max_seconds: float = 60.0  # longer recordings are refused (memory is bounded by this)
    attach: str = "input"  # input: adapter outputs spliced into the decoder input between audio
    # tokens; cross_attention: gated cross-attention blocks at the image blocks' layers
    adapter: SpeechAdapterConfig = field(default_factory=SpeechAdapterConfig)
    transcriber: TranscriberConfig = field(default_factory=TranscriberConfig)
    dialogue: str = "auto"  # how generate("", audio=...) replies to what was said: embeddings: to
    # the adapter's outputs in the decoder (what speech_sft's dialogue shards train); transcript: to
    # model.transcribe's text, as if it had been typed; auto: transcript when transcripts are read
    # by the character head (transcriber.method resolves to characters), else embeddings

    def validate(self) -> list[str]:
        problems = []
        for name, width, heads in (("", self.width, self.heads), ("adapter.", self.adapter.width, self.adapter.heads)):
            if width % heads or (width // heads) % 2:
                problems.append(f"{name}width {width} must split into {heads} heads of even size")
        if self.attach not in ("input", "cross_attention"):
            problems.append(f"attach '{self.attach}' is not input or cross_attention")
        if self.adapter.tokens and self.attach != "input":
            problems.append("adapter.tokens shapes the decoder's input: it needs attach: input")
        if not 0 <= self.adapter.ctc_weight <= 1 or self.adapter.ctc_candidates < 1:
            problems.append("adapter.ctc_weight must be in [0, 1] and adapter.ctc_candidates at least 1")
        t = self.transcriber
        if t.method not in ("auto", "characters", "decoder"):
            problems.append(f"transcriber.method '{t.method}' is not auto, characters or decoder")
        weights = (t.lm_weight, t.unknown_word, t.unknown_char, t.pause_weight, t.question_weight)
        if min(weights) < 0 or min(t.beam, t.punctuation_beam) < 1 or t.recase < 0:
            problems.append("transcriber.lm_weight, unknown_word, unknown_char, pause_weight and question_weight "
                            "must be at least 0, beam and punctuation_beam at least 1, recase at least 0")
        if self.dialogue not in ("auto", "embeddings", "transcript"):
            problems.append(f"dialogue '{self.dialogue}' is not auto, embeddings or transcript")
        if self.conv_kernel % 2 == 0 or self.adapter.kernel % 2 == 0:
            problems.append("conv_kernel and adapter.kernel must be odd")
        if min(self.stack, self.adapter.stride, self.layers, self.n_mels, self.ctc_upsample) < 1 or self.max_seconds <= 0:
            problems.append("stack, adapter.stride, layers, n_mels, ctc_upsample and max_seconds must be positive")
        return problems

    def encoder_frames(self, feature_frames: Tensor | int):
        """Encoder frames (40 ms) for a number of feature frames (10 ms): ceil(T / stack)."""
        return -(-feature_frames // self.stack)

    def adapter_frames(self, feature_frames: Tensor | int):
        """Adapter outputs (80 ms), i.e. decoder input positions, for T feature frames."""
        return -(-self.encoder_frames(feature_frames) // self.adapter.stride)


# ---- rotary position embedding --------------------------------------------------------------------
def rotary_tables(length: int, head_dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [length, head_dim] for rotating pairs (i, i + head_dim / 2)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, h, L, hd] rotated by position."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class RotarySelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, theta: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.theta, self.dropout = heads, theta, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [b, L, d], mask [b, L] (True = real frame)."""
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(length, d // self.heads, self.theta, x.device, x.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class FeedForward(nn.Sequential):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), Dropout(dropout),
                         nn.Linear(hidden, width), Dropout(dropout))


class ConvModule(nn.Module):
    """LayerNorm -> pointwise (2x) -> GLU -> depthwise conv (kernel k) -> LayerNorm -> SiLU -> pointwise."""

    def __init__(self, width: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.pointwise_in = nn.Linear(width, 2 * width)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.depthwise_norm = nn.LayerNorm(width)
        self.pointwise_out = nn.Linear(width, width)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1) * mask[..., None]
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(F.silu(self.depthwise_norm(h))))


class ConformerLayer(nn.Module):
    def __init__(self, c: SpeechConfig) -> None:
        super().__init__()
        self.ffn1 = FeedForward(c.width, c.ffn_dim, c.dropout)
        self.attn_norm = nn.LayerNorm(c.width)
        self.attn = RotarySelfAttention(c.width, c.heads, c.rope_theta, c.dropout)
        self.attn_dropout = Dropout(c.dropout)
        self.conv = ConvModule(c.width, c.conv_kernel, c.dropout)
        self.ffn2 = FeedForward(c.width, c.ffn_dim, c.dropout)
        self.norm = nn.LayerNorm(c.width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), mask))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


def stack_frames(features: Tensor, lengths: Tensor, stack: int) -> tuple[Tensor, Tensor]:
    """[b, T, n_mels], lengths [b] -> [b, ceil(T / stack), stack * n_mels] (zero-padded), new lengths."""
    b, t, n = features.shape
    pad = -t % stack
    if pad:
        features = F.pad(features, (0, 0, 0, pad))
    return features.reshape(b, (t + pad) // stack, stack * n), -(-lengths // stack)


def length_mask(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device) < lengths[:, None]


class ConformerEncoder(nn.Module):
    """log-mel [b, T, n_mels] + lengths [b] -> states [b, ceil(T / 4), width] + mask [b, ceil(T / 4)]."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.stack * config.n_mels, config.width)
        self.layers = nn.ModuleList([ConformerLayer(config) for _ in range(config.layers)])
        self.ctc_head = nn.Linear(config.width, config.ctc_upsample * (len(CHARACTERS) + 1))
        nn.init.zeros_(self.ctc_head.weight)
        nn.init.zeros_(self.ctc_head.bias)

    def has_ctc_head(self) -> bool:
        """Whether a stage trained the character head (an untrained one is all zeros)."""
        return bool(self.ctc_head.weight.detach().any())

    def characters(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The character head's logits [b, T * ctc_upsample, 1 + len(CHARACTERS)] (blank first) for
        the encoder's states [b, T, width], with their mask: each frame gives ctc_upsample labels."""
        k = self.config.ctc_upsample
        logits = self.ctc_head(states)
        return logits.reshape(logits.shape[0], -1, len(CHARACTERS) + 1), mask.repeat_interleave(k, dim=1)

    def resize_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """A character head trained with fewer labels per frame (ctc_upsample a multiple of its
        own) -> this head: each of its labels repeated, so that the head reads as before (CTC
        merges a label repeated without a blank between) and the extra labels start there.
        Other tensors are returned unchanged."""
        classes = len(CHARACTERS) + 1
        if name in ("ctc_head.weight", "ctc_head.bias") and tensor.shape[0] % classes == 0:
            k, old = self.config.ctc_upsample, tensor.shape[0] // classes
            if k % old == 0:
                rows = tensor.reshape(old, classes, *tensor.shape[1:])
                return rows.repeat_interleave(k // old, dim=0).reshape(k * classes, *tensor.shape[1:])
        return tensor

    def stack(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return stack_frames(features, lengths, self.config.stack)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_stacked(*self.stack(features, lengths))

    def forward_stacked(self, stacked: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Stacked frames [b, L, stack * n_mels] (BEST-RQ masks them here) -> states, mask."""
        mask = length_mask(lengths, stacked.shape[1])
        x = self.input_proj(stacked.to(self.input_proj.weight.dtype)) * mask[..., None]
        for layer in self.layers:
            x = layer(x, mask)
        return x * mask[..., None], mask
