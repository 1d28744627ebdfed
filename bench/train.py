"""Training throughput, memory, data supply and FLOP utilisation of a stage.

Each variant runs in its own process (peak resident memory is per process):

    python -m bench.train --shards DIR --batch 16 [--trainable-decoder] [--data] [--precision bfloat16]
    python -m bench.train --stage configs/stages/espeak_speech_ctc_masked.yaml --shards data/speech/shards/asr_train

prints one JSON line. The step is mm.train.train_step on the stage (default: image_pretrain of
configs/stages/image_pretrain.yaml), built fresh (no init) on the given shards, at the given
precision (bfloat16: the forward under autocast, as the stage option `precision` does). With
--trainable-decoder the same model also trains every decoder parameter (the comparison the
frozen decoder is measured against; the project itself never trains the decoder).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import median, peak_memory_mb, sync
from mm.config import CONFIG_DIR
from mm.data import ShardBatches, batch_loader, expand_shards, to_tensor_dict, write_shards
from mm.stages import load_stage_config
from mm.train import Task, make_optimizer, train_step

WORDS = ("a red house near the river at dusk with two boats and an old bridge over green water "
         "small dog runs across wide field under grey sky while children play beside tall trees").split()


def write_picture_shards(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n JPEG pictures (size x size, smooth random colour fields) with captions -> tar shards."""
    from bench.decode import picture

    rng = random.Random(seed)
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = files / f"{i:05d}.jpg"
        picture(size, size, seed + i).save(path, quality=90)
        rows.append({"image": str(path), "caption": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))})
    shards = folder / "shards"
    write_shards(rows, shards, "captions", per_shard=max(1, n // 4), log=lambda _: None)
    return shards


def stage(shards: Path, batch: int, workers: int, config: Path = CONFIG_DIR / "stages" / "image_pretrain.yaml",
          precision: str = "float32"):
    return load_stage_config(config, [
        "init=null", f"data.shards=[{shards}]", f"data.batch_size={batch}", f"data.workers={workers}",
        "data.shuffle_buffer=64", "optim.warmup_steps=1", "output=/nonexistent", f"precision={precision}"])


def data_rate(task: Task, cfg, batches: int) -> dict:
    """Images per second through shard reading, JPEG decoding, tiling and collation."""
    rates = {}
    for workers in sorted({0, cfg.data.workers}):
        data = ShardBatches(expand_shards(cfg.data.shards), batch_size=cfg.data.batch_size, decode=task.decode,
                            collate=task.collate, seed=0, shuffle_buffer=cfg.data.shuffle_buffer)
        stream = iter(batch_loader(data, workers))
        next(stream)  # worker start-up and the first batch are not throughput
        t0, images = time.perf_counter(), 0
        for _ in range(batches):
            images += next(stream)["examples"]
        rates[f"workers_{workers}"] = images / (time.perf_counter() - t0)
    return rates


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = stage(Path(args.shards), args.batch, args.workers, Path(args.stage), args.precision)
    task = Task(cfg)
    params = dict(task.trainable)
    if args.trainable_decoder:
        for name, p in task.model.decoder.named_parameters():
            p.requires_grad_(True)
            params[f"decoder.{name}"] = p
    objective = task.objective.to(device).train()
    optimizer = make_optimizer(params, cfg.optim)
    out = {"stage": cfg.stage, "precision": cfg.precision, "trainable_decoder": args.trainable_decoder,
           "batch_size": args.batch,
           "trainable_params": sum(p.numel() for p in params.values())}
    if args.data:
        out["data_images_per_s"] = data_rate(task, cfg, args.data_batches)
    data = ShardBatches(expand_shards(cfg.data.shards), batch_size=args.batch, decode=task.decode,
                        collate=task.collate, seed=0, shuffle_buffer=cfg.data.shuffle_buffer)
    batches = iter(batch_loader(data, 0))
    batch = to_tensor_dict(next(batches), device)  # one batch, reused: the step alone is timed
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(objective, optimizer, params, batch, step, cfg.optim, cfg.precision)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    out["step_s"] = median(times)
    out["samples_per_s"] = args.batch / out["step_s"]
    out["peak_memory_mb"] = peak_memory_mb(device)
    if args.flops:
        with FlopCounterMode(display=False) as counter, \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            loss, _ = objective(**batch)
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        out["step_flops"] = counter.get_total_flops()
        out["achieved_flops_per_s"] = out["step_flops"] / out["step_s"]
    return out


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """The machine's measured dense matmul rate (the denominator of utilisation)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--stage", default=str(CONFIG_DIR / "stages" / "image_pretrain.yaml"),
                        help="the stage config to time (init is ignored: a fresh model)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trainable-decoder", action="store_true")
    parser.add_argument("--data", action="store_true", help="also measure the data pipeline's images/s")
    parser.add_argument("--data-batches", type=int, default=8)
    parser.add_argument("--flops", action="store_true", help="also count the FLOPs of one step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    print(json.dumps(measure(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
