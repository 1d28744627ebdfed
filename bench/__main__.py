"""Benchmarks of the project against its references, in one run:

    .venv/bin/python -m bench                  # CPU, float32: the full run (about 25 min on 2 cores)
    .venv/bin/python -m bench --quick          # every measurement, shrunk (a smoke run)
    .venv/bin/python -m bench --device cuda --dtype bfloat16   # on a GPU: its own labelled rows

Writes bench/results/<machine>.json and the scaling plot beside it, then rebuilds
bench/RESULTS.md from every results file there (rows of other machines are kept).
Ratios are printed, never asserted: a benchmark does not fail on speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import decode, report, speech
from bench.common import Setting, machine
from bench.train import matmul_flops_per_s, write_picture_shards

RESULTS = Path(__file__).parent / "results"
PARTS = ("text", "image", "scaling", "train", "speech", "conformer")


def run_training(setting: Setting, folder: Path) -> dict:
    """image_pretrain steps with the decoder frozen and trainable (a process each), the data
    pipeline's rate and the FLOP utilisation of the frozen step."""
    gpu = setting.device.type == "cuda"
    batch = 32 if gpu else (2 if setting.quick else 4)
    shards = write_picture_shards(folder, n=max(64, batch * 12), size=224)
    steps = ["--warmup", "1", "--steps", "1" if setting.quick else "3"]
    common = [sys.executable, "-m", "bench.train", "--shards", str(shards), "--batch", str(batch),
              "--device", str(setting.device), "--data-batches", "4" if setting.quick else "8", *steps]
    out = {}
    for name, extra in (("frozen", ["--data", "--flops"]), ("trainable", ["--trainable-decoder"])):
        done = subprocess.run(common + extra, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench.train ({name}) failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    frozen, trainable = out["frozen"], out["trainable"]
    out["throughput_ratio"] = frozen["samples_per_s"] / trainable["samples_per_s"]
    out["memory_ratio"] = trainable["peak_memory_mb"] / frozen["peak_memory_mb"]
    rates = frozen.pop("data_images_per_s")
    out["data"] = {"images_per_s": rates, "consumed_per_s": frozen["samples_per_s"],
                   "supply_ratio": max(rates.values()) / frozen["samples_per_s"]}
    matmul_dtype = setting.dtype if gpu else torch.float32
    peak = matmul_flops_per_s(setting.device, matmul_dtype, n=8192 if gpu else 2048)
    out["utilisation"] = {"step_flops": frozen["step_flops"], "achieved_flops_per_s": frozen["achieved_flops_per_s"],
                          "matmul_flops_per_s": peak, "matmul_dtype": str(matmul_dtype),
                          "ratio": frozen["achieved_flops_per_s"] / peak}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--decode-mode", default="lean", choices=["lean", "compile", "plain"],
                        help="MultimodalModel.decode_mode; plain: generated tokens through the decoder's forward "
                             "(the 'before' of mm.llama_step)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only rebuild RESULTS.md and the plots from the JSON files")
    args = parser.parse_args(argv)
    if args.render:
        for f in args.out.glob("*.json"):
            if "scaling" in json.loads(f.read_text()):
                report.plot(json.loads(f.read_text()), args.out / f"{f.stem}-scaling.png")
        report.write_markdown(args.out, args.out.parent / "RESULTS.md")
        return 0
    setting = Setting(torch.device(args.device), getattr(torch, args.dtype), args.repeats, args.quick,
                      args.decode_mode)
    parts = args.only.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    slug = re.sub(r"[^a-z0-9]+", "-", setting.label.lower()).strip("-")
    slug += ("-quick" if args.quick else "") + ("" if args.decode_mode == "lean" else f"-{args.decode_mode}-decode")
    here = machine(setting)
    path = args.out / f"{slug}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # a partial run updates its parts
    if results and results["machine"]["cpu"] != here["cpu"]:  # ...of this kind of machine only
        slug += "-" + re.sub(r"[^a-z0-9]+", "-", here["cpu"].lower()).strip("-")
        path = args.out / f"{slug}.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"machine": here, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M")})
    started = time.time()
    if "text" in parts:
        results["text_only"] = decode.text_only(setting)
        report.say("text-only decode", results["text_only"])
        gc.collect()  # the text-only models (reference cycles through their hooks) before the next part
    pair = decode.mllama_pair(setting) if {"image", "scaling"} & set(parts) else None
    if "image" in parts:
        results["image_qa"] = decode.image_qa(setting, pair)
        report.say("image QA vs Mllama", results["image_qa"])
    if "scaling" in parts:
        results["scaling"] = decode.scaling(setting, pair)
    if "train" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results["training"] = run_training(setting, Path(tmp))
        report.say("training", results["training"])
    if "speech" in parts:
        results["speech_search"] = speech.search(setting)
        report.say("character search, key/value cache vs re-reading", results["speech_search"])
    if "conformer" in parts:
        results["conformer_training"] = speech.conformer_training(setting)
        report.say("Conformer training step", results["conformer_training"])
    results["seconds"] = round(time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    if "scaling" in results:
        report.plot(results, args.out / f"{slug}-scaling.png")
    report.write_markdown(args.out, args.out.parent / "RESULTS.md")
    print(f"wrote {path} and {args.out.parent / 'RESULTS.md'} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
