"""The `mm` command line. Each subcommand is a plain function of its parsed arguments.

User mistakes (InputError and its kinds) end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_ask(args: argparse.Namespace) -> int:
    import mm
    from video.frames import probe_video
    from vision.transforms import load_image

    for path in args.image:  # check files before spending time loading the model
        load_image(path)
    if args.video:
        probe_video(args.video)
    model = mm.load(args.model, overrides=args.set, force=args.force)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed)
    if args.stream:
        for piece in model.stream(args.question, args.image, video=args.video, **kwargs):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(args.question, args.image, video=args.video, **kwargs))
    if args.compare_bare:
        bare = _bare_reply(model, args.question, args.max_new_tokens)
        print(f"bare decoder, text only: {bare}")
    return 0


def _bare_reply(model, question: str, max_new_tokens: int) -> str:
    """The frozen decoder's own greedy reply to the text, without any adapter or media."""
    batch = model.prepare([model.user_messages(question, [])], max_new_tokens)
    out = model.decoder.generate(batch.ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False)
    return model.tokenizer.decode(out[0, batch.ids.shape[1]:], skip_special_tokens=True)


def cmd_talk(args: argparse.Namespace) -> int:
    """Speech in: print what was said, then the reply; --speak also says the reply with espeak-ng."""
    import mm
    from speech.audio import load_audio
    from speech.speak import speak, speaker_problem

    load_audio(args.audio)  # refuse a bad recording before spending time loading the model
    if args.speak and speaker_problem():
        raise mm.InputError(args.speak, speaker_problem())
    model = mm.load(args.model, overrides=args.set, force=args.force)
    transcript, reply = model.respond(args.audio, args.language, max_new_tokens=args.max_new_tokens)
    print(f"you said: {transcript}")
    print(f"reply: {reply}")
    if args.speak:
        speak(reply, args.speak, voice=args.voice)
        print(f"spoken reply: {args.speak}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mm.stages import load_stage_config
    from mm.train import train

    final = train(load_stage_config(args.config, args.overrides))
    print(f"final checkpoint: {final}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mm.data import read_manifest, write_shards

    report = write_shards(read_manifest(args.source), args.out, args.kind, per_shard=args.per_shard,
                          log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {report.written} samples in {report.shards} shards to {args.out}; skipped {report.skipped}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mm.train import average_checkpoints

    average_checkpoints([Path(p) for p in args.checkpoints], Path(args.out))
    print(f"averaged {len(args.checkpoints)} checkpoints into {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mm.evaluate import evaluate, load_eval_config

    result = evaluate(load_eval_config(args.config, args.overrides))
    print(json.dumps(result))
    return 0


def cmd_import_mllama(args: argparse.Namespace) -> int:
    from mm.mllama import import_mllama

    import_mllama(args.hf_dir, args.out, tokenizer=args.tokenizer)
    print(f"wrote {args.out} (decoder in {args.out}/decoder); load it with mm.load({str(args.out)!r})")
    return 0


def cmd_export_mllama(args: argparse.Namespace) -> int:
    import torch

    from mm.mllama import export_mllama

    left_out = export_mllama(args.checkpoint, args.out, dtype=getattr(torch, args.dtype), force=args.force)
    print(f"wrote {args.out} (MllamaForConditionalGeneration)")
    if left_out:
        print(f"left out (no Mllama counterpart): {', '.join(left_out)}")
    return 0


def cmd_import_open_clip(args: argparse.Namespace) -> int:
    import mm
    from vision.openclip import load_open_clip, open_clip_tensors

    open_clip_tensors(args.source)  # refuse a bad file before building the model
    model = mm.load(args.model, overrides=args.overrides)
    load_open_clip(model.encoders["image"], args.source)
    model.save(args.out)
    print(f"wrote {args.out}: {args.model} with the open_clip image tower of {args.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm", description="Multimodal adapters on a frozen Llama decoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about images and/or a video")
    ask.add_argument("question")
    ask.add_argument("--model", default="smollm2", help="model name, checkpoint directory or config (default: smollm2)")
    ask.add_argument("--image", action="append", default=[], metavar="PATH", help="an image; repeat for several")
    ask.add_argument("--video", metavar="PATH", help="a video file (mp4, webm, avi, mkv, gif, ...)")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--compare-bare", action="store_true",
                     help="also print the bare decoder's greedy reply to the text alone")
    ask.add_argument("--force", action="store_true", help="load a checkpoint trained on another decoder")
    ask.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change the model's config for this run, e.g. video.frames=32; repeat for several")
    ask.set_defaults(func=cmd_ask)

    talk = sub.add_parser("talk", help="speech in: the transcript, then the reply to what was said")
    talk.add_argument("audio", help="a recording (wav, flac, ogg, mp3, ...), resampled to 16 kHz mono")
    talk.add_argument("--model", default="smollm2", help="model name or checkpoint directory (a speech_sft final/)")
    talk.add_argument("--language", default="English")
    talk.add_argument("--max-new-tokens", type=int, default=128)
    talk.add_argument("--speak", metavar="OUT.wav", help="also speak the reply into this file (espeak-ng)")
    talk.add_argument("--voice", default="en-us", help="espeak-ng voice of --speak")
    talk.add_argument("--force", action="store_true", help="load a checkpoint trained on another decoder")
    talk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="change the model's config for this run, e.g. speech.transcriber.beam=32; repeat for several")
    talk.set_defaults(func=cmd_talk)

    tr = sub.add_parser("train", help="run (or resume) a training stage; torchrun -m mm.train for N processes")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="build webdataset shards from a folder or a manifest")
    data.add_argument("kind", choices=["captions", "qa"],
                      help="captions: media+caption (for audio: the transcript); qa: media+question+answer "
                           "(for audio: the typed question and the reply); media: an image, a video or audio")
    data.add_argument("source", help="folder of images/videos/audio (+ same-name .txt captions), or a .jsonl/.csv "
                                     "manifest whose rows name an 'image', a 'video' or an 'audio' file")
    data.add_argument("out", help="output folder for the .tar shards")
    data.add_argument("--per-shard", type=int, default=1000)
    data.set_defaults(func=cmd_data)

    avg = sub.add_parser("average", help="average the weights of checkpoints of one stage")
    avg.add_argument("out")
    avg.add_argument("checkpoints", nargs="+")
    avg.set_defaults(func=cmd_average)

    ev = sub.add_parser("eval", help="answer accuracy on image-QA or video-QA shards")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    ev.set_defaults(func=cmd_eval)

    im = sub.add_parser("import-mllama", help="convert a transformers Llama 3.2 Vision (Mllama) checkpoint")
    im.add_argument("hf_dir", help="MllamaForConditionalGeneration directory (config.json + .safetensors)")
    im.add_argument("out", help="mm checkpoint directory to write (the decoder goes in OUT/decoder)")
    im.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, when HF_DIR has none")
    im.set_defaults(func=cmd_import_mllama)

    ex = sub.add_parser("export-mllama", help="write an mm checkpoint as a transformers Mllama directory")
    ex.add_argument("checkpoint")
    ex.add_argument("out")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ex.add_argument("--force", action="store_true", help="load a checkpoint trained on another decoder")
    ex.set_defaults(func=cmd_export_mllama)

    oc = sub.add_parser("import-open-clip", help="a model whose image encoder trunk is an open_clip ViT")
    oc.add_argument("source", help="open_clip state dict (.safetensors) or pretrained NAME:TAG (network)")
    oc.add_argument("out", help="checkpoint directory to write (use it as a stage's init)")
    oc.add_argument("--model", default="smollm2", help="model name or config whose vision sizes match")
    oc.add_argument("overrides", nargs="*", metavar="key=value")
    oc.set_defaults(func=cmd_import_open_clip)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mm.errors import InputError

    args = build_parser().parse_args(argv)
    _quiet()
    try:
        return args.func(args)
    except InputError as e:
        print(f"mm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
