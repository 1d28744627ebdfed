"""Safe, atomic checkpoint files: safetensors for weights, YAML for configs, never pickle."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mm.errors import CheckpointError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _write_errors(path: Path):
    """A write that fails (disk full, quota, permissions) -> CheckpointError naming the target;
    raised before anything is swapped in, so the previous version stays as it was."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(path, f"could not be written ({e.strerror or e}); the previous version, "
                                    "if any, is unchanged") from None


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _write_errors(path):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Build a directory (subdirectories allowed) in a sibling temp dir, then swap it in; an old
    one is removed only after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old")
    try:
        with _write_errors(path):
            write(tmp)
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Temp files/dirs of writes that never finished (the process was killed mid-write) in
    `folder`: they are invisible to readers; this removes them. Call before writing again."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file. Pickle-based formats are refused: loading them runs code."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(path, "pickle-based checkpoint refused (loading it could run code); use safetensors")
    if not path.is_file():
        raise CheckpointError(path, "no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a valid safetensors file ({e})") from None


def write_yaml(path: str | Path, data: dict) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
