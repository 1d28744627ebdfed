"""Timing, memory and machine description shared by the benchmarks."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Setting:
    """Where and how a benchmark runs; `quick` shrinks every measurement (for a smoke run)."""

    device: torch.device
    dtype: torch.dtype
    repeats: int = 3
    quick: bool = False
    decode_mode: str = "lean"  # MultimodalModel.decode_mode: lean | compile | plain (the "before")

    @property
    def label(self) -> str:
        kind = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{kind} {str(self.dtype).removeprefix('torch.')}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class TokenClock:
    """Timestamps of a decode: prefill = start -> first token, decode = the mean gap after it.

    Call `start()` just before generation begins and `tick()` as each new token arrives.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self.t0, self.times = time.perf_counter(), []

    def tick(self) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    @property
    def prefill_s(self) -> float:
        return self.times[0] - self.t0

    @property
    def decode_s_per_token(self) -> float:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident set (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine(setting: Setting) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"label": setting.label, "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(), "dtype": str(setting.dtype)}
    if setting.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(setting.device)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
