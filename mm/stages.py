"""What a training stage is: a typed config, and the task it turns into.

A stage is data: which modules train, which loss, which data, which schedule. A Task builds the
trained module(s) for a stage, turns raw shard samples into examples (in data workers), collates
them, and computes the loss. Two kinds serve every stage:

    lm        image_pretrain / image_anneal / image_sft / video_pretrain / video_sft / speech_sft:
              next-token loss on caption, transcript, answer or reply tokens of the frozen
              decoder, through the adapters
    clip      vision_clip: open_clip's CLIP model and its contrastive loss
    bestrq    speech_ssl: BEST-RQ masked prediction of random-projection codewords (speech/bestrq.py)
    ctc       speech_ctc (optional, between speech_ssl and speech_sft): the Conformer with a
              linear character head and CTC on transcripts; no decoder in the loop, so steps
              are cheap and the encoder learns what was said before the adapter meets the decoder
"""
from __future__ import annotations

from dataclasses import dataclass, field

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mm.config import ModelConfig, apply_overrides, from_dict, read_yaml
from mm.data import decode_audio, decode_image, decode_video, sample_json
from mm.errors import ConfigError, InputError
from speech import AudioFeatures, BestRQConfig
from speech.audio import SAMPLE_RATE
from speech.adapter import best_path
from speech.conformer import CHARACTERS
from vision import ImageProcessor, VisionConfig
from vision.tiling import aspect_ratio_id
from vision.transforms import TiledImages

STAGES = ("vision_clip", "image_pretrain", "image_anneal", "image_sft", "video_pretrain", "video_sft", "speech_ssl",
          "speech_ctc", "speech_sft")
MEDIA_OF_STAGE = {"vision": "image", "image": "image", "video": "video", "speech": "audio"}
LOSSES = {"lm": "next-token", "clip": "contrastive", "bestrq": "BEST-RQ", "ctc": "character CTC"}
IGNORE = -100


@dataclass
class AugmentConfig:
    """Random affine jitter of each training image before tiling (off by default). Small data
    needs it: without it CLIP memorises the training scans and its features get worse on new ones."""

    degrees: float = 0.0  # rotation in [-degrees, degrees]
    translate: float = 0.0  # shift up to this fraction of width / height
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    fill: int = 0  # grey level of the pixels the transform uncovers (255 for paper scans)

    def transform(self):
        if self.degrees == 0 and self.translate == 0 and self.scale == [1.0, 1.0]:
            return None
        from torchvision.transforms import RandomAffine

        t = self.translate
        return RandomAffine(self.degrees, (t, t) if t else None, tuple(self.scale), fill=self.fill)


@dataclass
class SpecAugmentConfig:
    """SpecAugment masking of each training recording's log-mel features (speech.audio.SpecAugment;
    off by default): bands of mel channels and stretches of frames set to the utterance mean."""

    freq_masks: int = 0
    freq_width: int = 27  # most mel channels per band (the paper's LibriSpeech setting)
    time_masks: int = 0
    time_width: int = 40  # most 10 ms frames per stretch
    time_ratio: float = 0.05  # and at most this share of the recording per stretch

    def transform(self):
        if not self.freq_masks and not self.time_masks:
            return None
        from speech.audio import SpecAugment

        return SpecAugment(self.freq_masks, self.freq_width, self.time_masks, self.time_width, self.time_ratio)

    def validate(self) -> list[str]:
        if min(self.freq_masks, self.freq_width, self.time_masks, self.time_width) < 0 or not 0 < self.time_ratio <= 1:
            return ["data.spec_augment: counts and widths must be >= 0 and 0 < time_ratio <= 1"]
        return []


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # .tar files, brace patterns or folders
    kind: str = "captions"  # captions | qa (audio: each sample's json decides: a caption is a
    # transcript to repeat (ASR), an answer the reply to what was said (spoken dialogue))
    media: str = "image"  # image | video | audio: what the shards' samples hold
    batch_size: int = 32  # global: split across processes
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    group_by_size: int = 0  # G > 0: batches of samples of similar size, cut from G batches' worth
    # (less padding for recordings of different lengths; see mm.data.ShardBatches)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)  # audio only
    speed: list[float] = field(default_factory=list)  # audio only: speed perturbation, one factor drawn
    # per training recording ([0.9, 1.0, 1.1]: 10% slower and lower, as is, 10% faster and higher;
    # speech.audio.SpeedPerturbation); empty: off

    def speed_perturbation(self):
        if not self.speed:
            return None
        from speech.audio import SpeedPerturbation

        return SpeedPerturbation(self.speed)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    steps: int = 1000
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    gate_lr: float | None = None  # learning rate of the scalar tanh gates (default: lr). Gates start
    # closed; with a short schedule at the lr of the weights they barely open, so the adapters
    # can't carry the image. Same warm-up and decay as lr.
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr multiplier
    # (e.g. {encoders.image: 0.1}: a pretrained encoder learns slower than the new adapters)


@dataclass
class ClipConfig:
    """The text tower and joint embedding of vision_clip (the image tower is the model's vision)."""

    embed_dim: int = 256
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32


@dataclass
class StageConfig:
    stage: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: list[str] = field(default_factory=list)  # parameter-name prefixes that train
    loss: str = "lm"  # lm | clip | bestrq | ctc
    init: str | None = None  # checkpoint of the previous stage to start from
    decoder: str | None = None  # swap in another decoder of the same architecture (base -> instruct)
    output: str = "runs/stage"
    save_every: int = 100
    keep: int = 5  # step checkpoints kept besides final/ (for averaging)
    log_every: int = 10
    max_text_tokens: int = 256
    clip: ClipConfig = field(default_factory=ClipConfig)
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)
    ctc_weight: float = 0.0  # speech_sft: add this times a character CTC loss on the Conformer's
    # output (transcripts of ASR samples, typed questions of dialogue samples); a linear head
    # trained beside the model and dropped afterwards. 0: off
    token_ctc_weight: float = 0.0  # speech_sft with speech.adapter.tokens: add this times a CTC loss
    # of the adapter's TokenHead on the decoder's tokens of what was said (the classes are the
    # frozen decoder's input embeddings). 0: off
    precision: str = "float32"  # float32 | bfloat16: the forward passes run under bfloat16 autocast
    # (weights, gradients and optimizer state stay float32; losses are taken in float32). Faster
    # where the matrix products have bfloat16 hardware (speech_ctc, 2-core Xeon with AMX: 1.24x)
    init_video_from_image: bool = False  # video_pretrain: video blocks/projector start as copies of
    # the trained image blocks of their layers and the image projector (gates still closed)

    def validate(self, source: str) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage '{self.stage}' is not one of {', '.join(STAGES)}")
        if self.precision not in ("float32", "bfloat16"):
            problems.append(f"precision '{self.precision}' is not float32 or bfloat16")
        if self.loss not in LOSSES:
            problems.append(f"loss '{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.data.kind not in ("captions", "qa"):
            problems.append(f"data.kind '{self.data.kind}' is not captions or qa")
        if self.data.media not in ("image", "video", "audio"):
            problems.append(f"data.media '{self.data.media}' is not image, video or audio")
        media = MEDIA_OF_STAGE.get(self.stage.split("_")[0])
        if media and self.data.media != media:
            problems.append(f"stage {self.stage} needs data.media: {media}")
        if (self.loss == "bestrq") != (self.stage == "speech_ssl"):
            problems.append("the bestrq loss is the loss of speech_ssl, and only of it")
        if (self.loss == "ctc") != (self.stage == "speech_ctc"):
            problems.append("the ctc loss is the loss of speech_ctc, and only of it")
        problems += self.bestrq.validate()
        if self.ctc_weight < 0 or (self.ctc_weight and self.stage != "speech_sft"):
            problems.append("ctc_weight must be >= 0 and is for speech_sft only")
        if self.token_ctc_weight < 0 or (self.token_ctc_weight and self.stage != "speech_sft"):
            problems.append("token_ctc_weight must be >= 0 and is for speech_sft only")
        if self.token_ctc_weight and not self.model.speech.adapter.tokens:
            problems.append("token_ctc_weight trains the adapter's token head: it needs speech.adapter.tokens")
        if self.init_video_from_image and self.stage != "video_pretrain":
            problems.append("init_video_from_image is for video_pretrain (it replaces the video path)")
        if self.data.media != "image" and self.data.augment.transform() is not None:
            problems.append("data.augment applies to images only")
        problems += self.data.spec_augment.validate()
        if self.data.media != "audio" and self.data.spec_augment.transform() is not None:
            problems.append("data.spec_augment applies to audio only")
        if any(not 0.5 <= f <= 2 for f in self.data.speed):
            problems.append(f"data.speed: factors must lie in [0.5, 2], got {self.data.speed}")
        if self.data.media != "audio" and self.data.speed:
            problems.append("data.speed applies to audio only")
        if self.loss == "clip" and self.data.kind != "captions":
            problems.append("the clip loss needs data.kind: captions")
        if any(p == "decoder" or p.startswith("decoder.") for p in self.train):
            problems.append("the decoder is frozen: 'decoder' cannot be in train")
        if not self.data.shards:
            problems.append("data.shards is empty")
        a = self.data.augment
        if len(a.scale) != 2 or not 0 < a.scale[0] <= a.scale[1] or not 0 <= a.translate < 1 or not 0 <= a.fill <= 255:
            problems.append("data.augment needs scale [lo, hi] with 0 < lo <= hi, 0 <= translate < 1, fill 0..255")
        if self.optim.steps < 1 or self.data.batch_size < 1:
            problems.append("optim.steps and data.batch_size must be >= 1")
        if problems:
            raise ConfigError(source, "; ".join(problems))


def load_stage_config(path, overrides: list[str] = ()) -> StageConfig:
    data = apply_overrides(read_yaml(path), list(overrides), str(path))
    config = from_dict(StageConfig, data, str(path))
    config.validate(str(path))
    config.model.validate(str(path))
    return config


def select_trainable(model: nn.Module, prefixes: list[str]) -> dict[str, nn.Parameter]:
    """The one place that decides what trains: parameters under `prefixes`, nothing else."""
    chosen = {}
    for name, param in model.named_parameters():
        trains = any(name == p or name.startswith(p + ".") for p in prefixes) and not name.startswith("decoder.")
        param.requires_grad_(trains)
        if trains:
            chosen[name] = param
    unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in chosen)]
    if unmatched:
        raise ConfigError("train", f"'{unmatched[0]}' matches no trainable parameter of the model")
    return chosen


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: Tensor) -> Tensor:
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# ---- next-token loss through the adapters -------------------------------------------------------
class LMObjective(nn.Module):
    """Mean next-token cross-entropy over the labelled tokens of the whole global batch.

    Returns (loss to backpropagate, loss to log). Logits are computed only where a label is,
    so the 49k-way LM head costs a few tokens per sample, not the whole sequence. The loss is
    scaled so that gradients averaged over processes equal the single-process gradient.
    A text prefix that every row shares (the chat template's system turn) is run once and its
    keys/values reused: rows before the first media token are exactly the frozen decoder's.
    """

    min_shared_prefix = 8

    def __init__(self, model, ctc_weight: float = 0.0, token_ctc_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self._prefixes: dict[tuple[int, ...], list] = {}
        self.ctc_weight, self.token_ctc_weight = ctc_weight, token_ctc_weight
        self.ctc = SpeechCTC(model.encoders["audio"]) if ctc_weight else None
        if self.ctc is not None:  # reads the Conformer's output of the same forward pass
            model.encoders["audio"].register_forward_hook(self.ctc.keep)
        self._token_logits: tuple[Tensor, Tensor] | None = None
        self.terms: dict[str, float] = {}
        if token_ctc_weight:  # reads the token head's logits of the same forward pass
            model.speech_adapter.tokens.register_forward_hook(self._keep_token_logits)

    def _keep_token_logits(self, module, args, output) -> None:
        self._token_logits = (output, args[1])

    def forward(self, ids, attention_mask, labels, tiles=None, aspect_ratio_ids=None, n_tiles=None, image_rows=None,
                videos=None, video_rows=None, audio_features=None, audio_lengths=None, audio_rows=None,
                ctc_targets=None, ctc_lengths=None, token_targets=None, token_lengths=None, **_) -> tuple:
        images = TiledImages(tiles, aspect_ratio_ids, n_tiles) if tiles is not None else None
        audio = AudioFeatures(audio_features, audio_lengths) if audio_features is not None else None
        inputs = self.model.media_inputs(ids, attention_mask, images, image_rows, videos, video_rows, audio,
                                         audio_rows, labels)
        ids = inputs.ids
        start = self.shared_prefix(ids, inputs.attention_mask)
        prefix = None
        if start >= self.min_shared_prefix:
            key = tuple(ids[0, :start].tolist())
            if key not in self._prefixes:
                self._prefixes[key] = self.model.prefix_cache(ids[0, :start])
            prefix = self._prefixes[key]
        else:
            start = 0
        hidden = self.model.hidden_states(inputs, prefix)
        target = inputs.labels[:, start + 1:]
        keep = target != IGNORE
        logits = self.model.decoder.lm_head(hidden[:, :-1][keep])
        loss_sum = F.cross_entropy(logits.float(), target[keep], reduction="sum")
        count = all_reduce_sum(keep.sum().to(loss_sum))
        logged = all_reduce_sum(loss_sum.detach()) / count
        loss = loss_sum * world()[1] / count
        self.terms = {}  # the auxiliary losses of this step, for the log (this process's batch)
        if self.ctc is not None and ctc_targets is not None:
            term = self.ctc.loss(ctc_targets, ctc_lengths)
            loss, self.terms["ctc"] = loss + self.ctc_weight * term, float(term.detach())
        if self.token_ctc_weight and token_targets is not None:
            (logits, mask), self._token_logits = self._token_logits, None
            term = ctc_loss(logits, mask, token_targets + 1, token_lengths)
            loss, self.terms["token_ctc"] = loss + self.token_ctc_weight * term, float(term.detach())
        return loss, logged

    def shared_prefix(self, ids: Tensor, attention_mask: Tensor) -> int:
        """Length of the leading tokens that all rows share, unpadded and before any media token."""
        same = (ids == ids[:1]).all(0) & attention_mask.bool().all(0)
        same &= ~torch.isin(ids, self.model.media_embedding.new_ids).any(0)
        return int(same.long().cumprod(0).sum())


def training_features(audio_processor, sample: dict, speed=None) -> torch.Tensor:
    """A shard sample's recording -> its log-mel features, played at a drawn speed first where the
    stage perturbs it (data.speed)."""
    wave = audio_processor.wave((decode_audio(sample), SAMPLE_RATE))
    return audio_processor.log_mel_of(speed(wave) if speed else wave)


class LMExamples:
    """Raw shard sample -> example: image tiles, token ids and labels (runs in data workers)."""

    def __init__(self, model, kind: str, max_tokens: int, augment=None, media: str = "image", speed=None) -> None:
        self.tokenizer, self.kind, self.max_tokens = model.tokenizer, kind, max_tokens
        self.augment, self.media, self.speed = augment, media, speed
        self.media_id = model.media_token_ids[media]
        self.frame_processor, self.frames = model.frame_processor, model.config.video.frames
        self.eos_id = model.tokenizer.eos_token_id
        self.processor = model.image_processor
        self.render, self.user_messages = model.render, model.user_messages
        self.audio_processor, self.speech = model.audio_processor, model.config.speech
        self.audio_token_runs = model.audio_token_runs

    def __call__(self, sample: dict) -> dict:
        if self.media == "audio":
            return self._speech(sample)
        if self.media == "video":
            example = {"frames": self.frame_processor.tiles(decode_video(sample, self.frames).frames)}
        else:
            image = decode_image(sample)
            tiles, grid_id, n_tiles = self._image(self.augment(image) if self.augment else image)
            example = {"tiles": tiles, "aspect_ratio_id": grid_id, "n_tiles": n_tiles}
        fields = sample_json(sample)
        if self.kind == "captions":
            prompt = [self.media_id]
            target = fields["caption"]
        else:
            media = {"image": [None], "video": []} if self.media == "image" else {"image": [], "video": [None]}
            text, _ = self.render(self.user_messages(fields["question"], media["image"], videos=media["video"]))
            prompt = self.tokenizer(text, add_special_tokens=False).input_ids
            target = fields["answer"]
        answer = self.tokenizer(str(target), add_special_tokens=False).input_ids + [self.eos_id]
        ids = (prompt + answer)[: self.max_tokens]
        labels = ([IGNORE] * len(prompt) + answer)[: self.max_tokens]
        if self.media_id not in ids:
            raise InputError(sample.get("__key__", "sample"), "prompt longer than max_text_tokens")
        return {"ids": ids, "labels": labels, **example}

    def _speech(self, sample: dict) -> dict:
        """ASR (json caption: the transcript; prompt "Repeat after me in {language}:") or spoken
        dialogue (json answer: the reply; no prompt). The audio token becomes one token per
        adapter output when speech is spliced into the input."""
        from mm.model import ASR_PROMPT

        features = training_features(self.audio_processor, sample, self.speed)
        if self.augment:
            features = self.augment(features)
        fields = sample_json(sample)
        if "caption" in fields:
            prompt, target = ASR_PROMPT.format(language=fields.get("language", "English")), fields["caption"]
        elif "answer" in fields:
            prompt, target = "", fields["answer"]
        else:
            raise InputError(sample.get("__key__", "sample"), "audio sample json has neither caption nor answer")
        text, _ = self.render(self.user_messages(prompt, [], audios=[None]))
        frames = int(self.speech.adapter_frames(features.shape[0]))
        prompt_ids = self.audio_token_runs(self.tokenizer(text, add_special_tokens=False).input_ids, [frames])
        answer = self.tokenizer(str(target), add_special_tokens=False).input_ids + [self.eos_id]
        if len(prompt_ids) >= self.max_tokens:
            raise InputError(sample.get("__key__", "sample"), f"prompt of {len(prompt_ids)} tokens (recording "
                                                              f"included) is not shorter than max_text_tokens")
        ids = (prompt_ids + answer)[: self.max_tokens]
        labels = ([IGNORE] * len(prompt_ids) + answer)[: self.max_tokens]
        spoken = str(fields.get("caption", fields.get("question", "")))
        return {"ids": ids, "labels": labels, "audio": features, "ctc": ctc_labels(spoken),
                "tokens": self.tokenizer(spoken, add_special_tokens=False).input_ids}

    def _image(self, image):
        tiles, grid = self.processor.tile(image)
        return tiles, aspect_ratio_id(grid, self.processor.max_tiles), grid[0] * grid[1]


def collate_lm(examples: list[dict], pad_id: int) -> dict:
    """Right-padded ids/labels/mask and stacked tiles (or frames); one image or video per example."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["ids"]), torch.tensor(e["labels"]), 1
    batch = {"ids": ids, "labels": labels, "attention_mask": mask, "examples": len(examples)}
    if "audio" in examples[0]:
        audio = AudioFeatures.pad([e["audio"] for e in examples])
        return {**batch, "audio_features": audio.features, "audio_lengths": audio.lengths,
                "audio_rows": torch.arange(len(examples)), **ctc_batch(examples)}
    if "frames" in examples[0]:
        return {**batch, "videos": torch.stack([e["frames"] for e in examples]),
                "video_rows": torch.arange(len(examples))}
    return {
        **batch,
        "tiles": torch.stack([e["tiles"] for e in examples]),
        "aspect_ratio_ids": torch.tensor([e["aspect_ratio_id"] for e in examples]),
        "n_tiles": torch.tensor([e["n_tiles"] for e in examples]),
        "image_rows": torch.arange(len(examples)),
    }


# ---- CLIP -------------------------------------------------------------------------------------
def clip_model(vision: VisionConfig, clip: ClipConfig) -> open_clip.CLIP:
    """An open_clip CLIP whose image tower has the sizes (and parameter names) of our ViT trunk."""
    vision_cfg = dict(layers=vision.layers, width=vision.width, head_width=vision.width // vision.heads,
                      mlp_ratio=vision.mlp_dim / vision.width, patch_size=vision.patch_size,
                      image_size=vision.image_size)
    text_cfg = dict(context_length=clip.context_length, vocab_size=49408, width=clip.text_width,
                    heads=clip.text_heads, layers=clip.text_layers)
    return open_clip.CLIP(embed_dim=clip.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


def image_tower_tensors(clip: open_clip.CLIP) -> dict[str, Tensor]:
    """The CLIP image tower as image-encoder tensors of the composite model (names match:
    our trunk uses open_clip's names; only the pooled projection `proj` has no counterpart)."""
    return {f"encoders.image.{k}": v for k, v in clip.visual.state_dict().items() if k != "proj"}


class ClipObjective(nn.Module):
    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        self.clip = clip
        rank, size = world()
        self.loss = open_clip.ClipLoss(gather_with_grad=True, rank=rank, world_size=size)

    def forward(self, images: Tensor, texts: Tensor, **_) -> tuple:
        image_features, text_features, logit_scale = self.clip(images, texts)
        loss = self.loss(image_features, text_features, logit_scale)
        return loss, loss.detach()


class ClipExamples:
    def __init__(self, vision: VisionConfig, clip: ClipConfig, augment=None) -> None:
        self.processor = ImageProcessor(vision.image_size, 1, vision.mean, vision.std)
        self.augment = augment
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)

    def __call__(self, sample: dict) -> dict:
        image = decode_image(sample)
        tiles, _ = self.processor.tile(self.augment(image) if self.augment else image)
        return {"image": tiles[0], "text": self.tokenizer([sample_json(sample)["caption"]])[0]}


def collate_clip(examples: list[dict]) -> dict:
    return {"images": torch.stack([e["image"] for e in examples]),
            "texts": torch.stack([e["text"] for e in examples]), "examples": len(examples)}


# ---- BEST-RQ ------------------------------------------------------------------------------------
class SpeechExamples:
    """Raw audio sample -> log-mel features (speech_ssl), and the transcript's characters
    (speech_ctc: the caption, or the spoken question of a dialogue sample)."""

    def __init__(self, model, transcripts: bool = False, augment=None, speed=None) -> None:
        self.audio_processor, self.transcripts, self.augment = model.audio_processor, transcripts, augment
        self.speed = speed

    def __call__(self, sample: dict) -> dict:
        features = training_features(self.audio_processor, sample, self.speed)
        example = {"audio": self.augment(features) if self.augment else features}
        if self.transcripts:
            fields = sample_json(sample)
            example["ctc"] = ctc_labels(str(fields.get("caption", fields.get("question", ""))))
        return example


def collate_speech(examples: list[dict]) -> dict:
    audio = AudioFeatures.pad([e["audio"] for e in examples])
    batch = {"features": audio.features, "lengths": audio.lengths, "examples": len(examples)}
    if "ctc" in examples[0]:
        batch.update(ctc_batch(examples))
    return batch


def ctc_batch(examples: list[dict]) -> dict:
    """CTC targets, padded: characters (ctc_*) and, where the examples have them, the decoder's
    tokens (token_*) of what was said."""
    batch = {}
    for key, name in (("ctc", "ctc"), ("tokens", "token")):
        if key in examples[0]:
            seqs = [torch.tensor(e[key], dtype=torch.long) for e in examples]
            batch[f"{name}_targets"] = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
            batch[f"{name}_lengths"] = torch.tensor([len(c) for c in seqs])
    return batch


# ---- auxiliary CTC on the speech encoder ----------------------------------------------------------
def ctc_labels(text: str) -> list[int]:
    """Lower-cased characters of the alphabet (others dropped, runs of spaces merged) -> ids."""
    text = " ".join("".join(c for c in text.lower() if c in CHARACTERS).split())
    return [CHARACTERS.index(c) + 1 for c in text]


class SpeechCTC:
    """CTC of the Conformer's character head (encoder.ctc_head) on the transcript, beside the LM
    loss: a direct signal for the encoder while the path through the frozen decoder is weak.
    `keep` takes the encoder's output of the same forward pass (a forward hook)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self._encoded: tuple[Tensor, Tensor] | None = None

    def keep(self, module, args, output) -> None:
        self._encoded = output

    def loss(self, targets: Tensor, target_lengths: Tensor) -> Tensor:
        (states, mask), self._encoded = self._encoded, None
        return ctc_loss(*self.encoder.characters(states, mask), targets, target_lengths)


def ctc_loss(logits: Tensor, mask: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
    """CTC (blank = class 0) of frame logits [b, T, C] with a frame mask [b, T], per target
    unit, averaged over rows."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, b, C]
    per_row = F.ctc_loss(log_probs, targets, mask.sum(1), target_lengths, blank=0, reduction="none",
                         zero_infinity=True)
    return (per_row / target_lengths.clamp(min=1)).mean()


class CTCObjective(nn.Module):
    """speech_ctc: the Conformer and its character head, CTC on the transcript; no decoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.ctc = encoder, SpeechCTC(encoder)

    def forward(self, features: Tensor, lengths: Tensor, ctc_targets: Tensor, ctc_lengths: Tensor, **_) -> tuple:
        self.ctc.keep(None, None, self.encoder(features, lengths))
        loss = self.ctc.loss(ctc_targets, ctc_lengths)
        return loss, all_reduce_sum(loss.detach()) / world()[1]

    @torch.no_grad()
    def greedy(self, features: Tensor, lengths: Tensor) -> list[str]:
        """Best-path decoding of the character head (for a quick look at what the encoder hears)."""
        states, mask = self.encoder(features, lengths)
        return ["".join(CHARACTERS[i - 1] for i in ids) for ids in best_path(*self.encoder.characters(states, mask))]
