"""One training loop for every stage.

    mm train configs/stages/image_pretrain.yaml key=value ...
    torchrun --nproc_per_node N -m mm.train configs/stages/image_pretrain.yaml key=value ...

The run directory (`output:`) gets metrics.jsonl (and TensorBoard events when tensorboard is
installed), step checkpoints under checkpoints/step_NNNNNN/ and the last one as final/. A run
started again with the same output resumes from its newest checkpoint: trained tensors,
optimizer, schedule, RNG and data position, so the loss curve continues as if never stopped.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mm.api import CONFIG_FILE, FORMAT, WEIGHTS_FILE, build, init_of, load_checkpoint, load_adapter_tensors
from mm.checkpoint import load_tensors, remove_stale_temporaries, write_dir_atomically
from mm.data import ShardBatches, batch_loader, expand_shards, to_tensor_dict
from mm.errors import CheckpointError, ConfigError
from mm.stages import (ClipExamples, ClipObjective, CTCObjective, LMExamples, LMObjective, SpeechExamples, StageConfig,
                       all_reduce_sum, clip_model, collate_clip, collate_lm, collate_speech, image_tower_tensors,
                       select_trainable, world)
from speech import BestRQ

STATE_FILE = "trainer.safetensors"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    batches: int = 0  # global batches consumed (data position)
    skipped: int = 0  # corrupt samples skipped so far


class Task:
    """A stage made concrete: the module to run, what trains, how data becomes batches.

    `aux` holds what trains beside the model but is not part of it (the CLIP text tower and
    joint projections, the BEST-RQ heads): step checkpoints keep it with the optimizer state
    so that a run resumes exactly; the stage's output holds the model tensors only."""

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg
        self.aux: torch.nn.Module | None = None
        if cfg.decoder:
            cfg.model.decoder = cfg.decoder  # hot-swap: same architecture, other weights
        if cfg.loss == "clip":
            self.model = None
            self.clip = self.aux = clip_model(cfg.model.vision, cfg.clip)
            self.objective = ClipObjective(self.clip)
            self.trainable = dict(self.clip.named_parameters())
            self.decode, self.collate = ClipExamples(cfg.model.vision, cfg.clip, cfg.data.augment.transform()), collate_clip
            return
        if cfg.init:  # the stage's own model config: it may raise the resolution or swap the decoder
            self.model = load_checkpoint(cfg.init, config=cfg.model, force=bool(cfg.decoder))
        else:
            self.model = build(cfg.model)
        if cfg.init_video_from_image:
            self.model.init_video_from_image()
        self.trainable = select_trainable(self.model, cfg.train)
        if not (cfg.loss == "ctc" or (cfg.loss == "lm" and cfg.ctc_weight)):
            # the Conformer's character head trains only where a CTC loss reads it
            for name in [n for n in self.trainable if n.startswith("encoders.audio.ctc_head.")]:
                self.trainable.pop(name).requires_grad_(False)
        elif "encoders.audio.ctc_head.weight" in self.trainable and not self.model.encoders["audio"].has_ctc_head():
            # a head trained from nothing starts at nn.Linear's initialisation, not at the zeros
            # that mark it untrained: from zeros the encoder gets no gradient at the first step,
            # and speech_ctc stayed on CTC's blank-only plateau (loss 2.9 after 250 steps, 1.1
            # from nn.Linear's initialisation; README, Training: precision)
            self.model.encoders["audio"].ctc_head.reset_parameters()
        if cfg.loss in ("bestrq", "ctc"):
            if cfg.loss == "bestrq":
                self.objective = BestRQ(self.model.encoders["audio"], cfg.bestrq)
                self.aux = self.objective.heads
                self.trainable.update({f"bestrq.heads.{k}": v for k, v in self.aux.named_parameters()})
            else:
                self.objective = CTCObjective(self.model.encoders["audio"])
            self.decode, self.collate = SpeechExamples(self.model, cfg.loss == "ctc", cfg.data.spec_augment.transform(),
                                                       cfg.data.speed_perturbation()), collate_speech
            return
        self.objective = LMObjective(self.model, cfg.ctc_weight, cfg.token_ctc_weight)
        pad = self.model.tokenizer.pad_token_id or 0
        augment = (cfg.data.spec_augment if cfg.data.media == "audio" else cfg.data.augment).transform()
        self.decode = LMExamples(self.model, cfg.data.kind, cfg.max_text_tokens, augment, cfg.data.media,
                                 cfg.data.speed_perturbation())
        self.collate = lambda examples: collate_lm(examples, pad)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: only what this stage trains (as composite-model names)."""
        if self.model is None:
            return image_tower_tensors(self.clip)
        return {k: v.detach() for k, v in self.trainable.items() if not k.startswith("bestrq.")}

    def decoder_identity(self) -> dict | None:
        if self.model is None:
            return None
        return {"source": self.model.config.decoder, "sha256": self.model.decoder_sha256()}

    def frozen_names(self) -> list[str]:
        """Parameters and buffers DDP should neither broadcast nor synchronise (the decoder)."""
        if not isinstance(self.objective, LMObjective):
            return []
        names = [f"model.{n}" for n, _ in self.model.decoder.named_parameters(prefix="decoder")]
        return names + [f"model.{n}" for n, _ in self.model.decoder.named_buffers(prefix="decoder")]


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(params: dict[str, torch.nn.Parameter], cfg) -> list[tuple[str, list[str], dict]]:
    """(group name, parameter names, settings): weight-decayed matrices; other 1-d parameters
    (norms, biases) without decay; scalar tanh gates without decay at gate_lr; each split
    further by the lr multiplier of the longest matching `lr_scale` prefix."""
    def scale(name: str) -> float:
        matches = [p for p in cfg.lr_scale if name == p or name.startswith(p + ".")]
        return float(cfg.lr_scale[max(matches, key=len)]) if matches else 1.0

    def kind(name: str, p: torch.nn.Parameter) -> str:
        return "gates" if p.numel() == 1 else "matrices" if p.dim() >= 2 else "vectors"

    groups: dict[tuple[str, float], list[str]] = {}
    for name, p in params.items():
        groups.setdefault((kind(name, p), scale(name)), []).append(name)
    gate_lr = cfg.gate_lr if cfg.gate_lr is not None else cfg.lr
    out = []
    for (k, mult), names in sorted(groups.items()):
        settings = {"weight_decay": cfg.weight_decay if k == "matrices" else 0.0,
                    "base_lr": (gate_lr if k == "gates" else cfg.lr) * mult}
        out.append((f"{k}x{mult:g}", names, settings))
    return out


def param_order(params: dict[str, torch.nn.Parameter], cfg) -> list[str]:
    """Parameter names in the optimizer's order."""
    return [n for _, names, _ in param_groups(params, cfg) for n in names]


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    groups = [{"params": [params[n] for n in names], "lr": s["base_lr"], **s}
              for _, names, s in param_groups(params, cfg) if names]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


# ---- checkpoints of a run -------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer, order: list[str]) -> dict[str, torch.Tensor]:
    """AdamW state as flat named tensors (safetensors holds no nested dicts, and no pickle)."""
    return {f"optim.{order[i]}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, order: list[str], tensors: dict) -> None:
    state = {}
    for i, name in enumerate(order):
        entries = {k[len(f"optim.{name}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        if entries:
            state[i] = entries
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def save_run_checkpoint(task: Task, optimizer, progress: Progress, out: Path) -> Path:
    cfg = task.cfg
    state = optimizer_tensors(optimizer, param_order(task.trainable, cfg.optim))
    state["rng.torch"] = torch.get_rng_state()
    if task.aux is not None:
        state.update({f"aux.{k}": v for k, v in task.aux.state_dict().items()})
    meta = {
        "format": FORMAT,
        "model": asdict(cfg.model),
        "decoder": task.decoder_identity(),
        "stage": cfg.stage,
        "init": str(Path(cfg.init).resolve()) if cfg.init else None,
        "trainer": asdict(progress),
        "stage_config": asdict(cfg),
    }
    trained = {k: v.contiguous().cpu() for k, v in task.trained_tensors().items()}
    state = {k: v.contiguous().cpu() for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(trained, str(tmp / WEIGHTS_FILE))
        save_file(state, str(tmp / STATE_FILE))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))

    path = out / "checkpoints" / f"step_{progress.step:06d}"
    write_dir_atomically(path, write)
    for old in sorted((out / "checkpoints").glob("step_*"))[: -cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def copy_as_final(source: Path, tmp: Path, final: Path) -> None:
    """The last step checkpoint's files, with `init` made relative to final/: a tree of runs
    (runs/digits/{vision_clip,image_pretrain,image_sft}) can then be moved or copied whole."""
    for f in source.iterdir():
        shutil.copy2(f, tmp / f.name)
    meta = yaml.safe_load((source / CONFIG_FILE).read_text())
    if meta.get("init"):
        meta["init"] = os.path.relpath(meta["init"], final.resolve())
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))


def resume(task: Task, optimizer, path: Path) -> Progress:
    meta = yaml.safe_load((path / CONFIG_FILE).read_text())
    trained = load_tensors(path / WEIGHTS_FILE)
    state = load_tensors(path / STATE_FILE)
    if task.aux is not None:
        task.aux.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("aux.")})
    if task.model is not None:
        load_adapter_tensors(task.model, trained, path)
    load_optimizer_tensors(optimizer, param_order(task.trainable, task.cfg.optim), state)
    torch.set_rng_state(state["rng.torch"])
    return Progress(**meta["trainer"])


# ---- logging ---------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl + TensorBoard (if installed) + a progress bar, on rank 0 only."""

    def __init__(self, out: Path, cfg: StageConfig, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None
        self.bar = tqdm(total=cfg.optim.steps, initial=start, desc=cfg.stage, unit="step",
                        dynamic_ncols=True,
                        disable=False if os.environ.get("MM_PROGRESS") else None)  # None: only on a terminal

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "samples_per_s", "grad_norm"):
                self.tb.add_scalar(k, record[k], record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                             skipped=record["skipped"], refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ---- the loop ---------------------------------------------------------------------------------------
def run_summary(run: Path) -> dict:
    """A run's figures from its metrics.jsonl: steps, batch, training seconds, median step time,
    peak memory, first and last loss, skipped samples."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    step_times = sorted(r["step_time"] for r in records)
    return {
        "steps": records[-1]["step"], "batch_size": records[-1]["samples"],
        "train_seconds": round(sum(step_times), 1),
        "median_step_seconds": round(step_times[len(step_times) // 2], 3),
        "peak_memory_mb": round(max(r.get("peak_memory_mb", 0) for r in records)),
        "first_loss": round(records[0]["loss"], 4), "last_loss": round(records[-1]["loss"], 4),
        "skipped_samples": records[-1]["skipped"],
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run on hardware made for them: a GPU that supports
    bfloat16, or a CPU on which oneDNN has a bfloat16 path (AVX-512 or AMX). On a CPU with AVX2
    only they take a slow fallback: a 2048x1024 by 1024x1024 product 4.3 s against float32's
    0.027 s, and a speech_ctc step of the speech proof over 50 s against 1.7 s (2-core AMD EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: trust the user's choice
        return True


def check_precision(precision: str, device: torch.device) -> None:
    """ConfigError for precision bfloat16 where it would be many times slower, not faster."""
    if precision == "bfloat16" and not bfloat16_is_fast(device):
        where = (f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512 or AMX)" if device.type == "cpu"
                 else f"this {device.type} device")
        raise ConfigError("precision", f"bfloat16 has no matrix hardware on {where}: its products would run "
                                       f"tens of times slower than float32's; use precision=float32")


def init_distributed() -> torch.device:
    """Join the torchrun process group if there is one; -> this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def train_step(objective, optimizer, params: dict[str, torch.nn.Parameter], batch: dict, step: int, cfg,
               precision: str = "float32") -> tuple:
    """One optimizer step at the scheduled learning rate -> (loss to log, gradient norm).
    precision "bfloat16": the forward pass under bfloat16 autocast (no loss scaling: bfloat16 has
    float32's range); the backward pass follows it, the optimizer works on the float32 weights."""
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    device_type = next(iter(params.values()), torch.empty(0)).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        loss, logged = objective(**batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logged, grad_norm


def train(cfg: StageConfig) -> Path:
    """Run (or resume) a stage; returns its final checkpoint directory."""
    device = init_distributed()
    check_precision(cfg.precision, device)
    rank, size = world()
    torch.manual_seed(cfg.data.seed)
    task = Task(cfg)
    task.objective.to(device)  # before the optimizer, so that its state lives beside the parameters
    out = Path(cfg.output)
    if rank == 0:  # a run killed in the middle of a checkpoint write left its temp dir behind
        remove_stale_temporaries(out / "checkpoints")
        remove_stale_temporaries(out)
    params = task.trainable
    optimizer = make_optimizer(params, cfg.optim)
    last = latest_checkpoint(out)
    progress = resume(task, optimizer, last) if last else Progress()
    objective = task.objective
    if size > 1:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, task.frozen_names())
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    objective.train()
    data = ShardBatches(expand_shards(cfg.data.shards), batch_size=cfg.data.batch_size, decode=task.decode,
                        collate=task.collate, seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                        rank=rank, world_size=size, start_batch=progress.batches,
                        group_by_size=cfg.data.group_by_size)
    log = RunLog(out, cfg, progress.step, enabled=rank == 0)
    started, samples = time.time(), 0
    for batch in batch_loader(data, cfg.data.workers):
        if progress.step >= cfg.optim.steps:
            break
        t0 = time.time()
        lr = cfg.optim.lr * lr_factor(progress.step, cfg.optim)
        logged, grad_norm = train_step(objective, optimizer, params, to_tensor_dict(batch, device), progress.step,
                                       cfg.optim, cfg.precision)
        n = int(all_reduce_sum(torch.tensor(batch["examples"])))
        progress.step, progress.batches = progress.step + 1, batch["batch_index"] + 1
        progress.skipped += int(all_reduce_sum(torch.tensor(batch["skipped"])))
        samples += n
        log.step({"step": progress.step, "loss": float(logged), "lr": lr, "grad_norm": float(grad_norm),
                  "samples": n, "skipped": progress.skipped, "step_time": time.time() - t0,
                  "samples_per_s": samples / (time.time() - started), "elapsed": time.time() - started,
                  "peak_memory_mb": peak_memory_mb(), **getattr(objective, "terms", {})})
        if progress.step % cfg.save_every == 0 or progress.step == cfg.optim.steps:
            if rank == 0:
                save_run_checkpoint(task, optimizer, progress, out)
            if size > 1:
                dist.barrier()
    log.close()
    final = out / "final"
    if rank == 0:
        source = latest_checkpoint(out)
        if source is None:
            raise CheckpointError(out, "the run ended before its first checkpoint")
        write_dir_atomically(final, lambda tmp: copy_as_final(source, tmp, final))
    if size > 1:
        dist.barrier()
    return final


def average_checkpoints(paths: list[Path], out: Path) -> None:
    """Average the trained tensors of several checkpoints of one stage (e.g. the best of a sweep)
    that start from the same checkpoint; `out` names that start relative to itself, as final/ does."""
    metas = [yaml.safe_load((Path(p) / CONFIG_FILE).read_text()) for p in paths]
    tensors = [load_tensors(Path(p) / WEIGHTS_FILE) for p in paths]
    if any(set(t) != set(tensors[0]) for t in tensors) or len({m.get("stage") for m in metas}) != 1:
        raise CheckpointError(paths[0], "checkpoints to average must come from the same stage, with the same tensors")
    starts = {init_of(Path(p).resolve(), m) for p, m in zip(paths, metas)}
    if len(starts) != 1:
        raise CheckpointError(paths[0], "checkpoints to average must start from the same checkpoint (init), "
                              f"not {sorted(map(str, starts))}")
    mean = {k: torch.stack([t[k].float() for t in tensors]).mean(0).to(tensors[0][k].dtype) for k in tensors[0]}
    meta = {**metas[0], "averaged_from": [str(Path(p).resolve()) for p in paths]}
    meta.pop("trainer", None)
    start = starts.pop()
    if start is not None:
        meta["init"] = os.path.relpath(start, Path(out).resolve())

    def write(tmp: Path) -> None:
        save_file(mean, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))

    write_dir_atomically(out, write)


def main(argv: list[str] | None = None) -> int:
    from mm.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
