"""Faults during training: a kill in the middle of a checkpoint write, a full disk, a corrupt shard
in the middle of a run, a process of a distributed run that dies. Nothing trained before the
fault is lost, and the run resumes on the same loss curve."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mm
import mm.train
from mm.errors import CheckpointError
from mm.stages import load_stage_config
from tests.test_training import ROOT, _free_port, _run_stage, losses, shards, stage_file  # noqa: F401

KILL_IN_WRITE = """
import os, pathlib, sys, time
import mm.train as t
original = t.save_file
def save_file(tensors, path, *args, **kwargs):
    original(tensors, path, *args, **kwargs)
    if "step_000010" in str(path):  # half of the checkpoint is on disk: wait to be killed
        pathlib.Path(os.environ["MM_TEST_MARKER"]).write_text("in the write")
        time.sleep(600)
t.save_file = save_file
sys.exit(t.main(sys.argv[1:]))
"""

DIE_ON_RANK_1 = """
import os, sys
import mm.stages as s
forward, calls = s.LMObjective.forward, [0]
def dying_forward(self, *args, **kwargs):
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 3:
        os._exit(7)  # the process vanishes mid-step, as with an OOM kill
    return forward(self, *args, **kwargs)
s.LMObjective.forward = dying_forward
import mm.train as t
sys.exit(t.main(sys.argv[1:]))
"""


def reference_losses(tmp_path, shards, steps=20):  # noqa: F811
    config = stage_file(tmp_path, shards, "ref.yaml", output=str(tmp_path / "ref"), optim__steps=steps, save_every=5)
    assert _run_stage(config).wait(timeout=600) == 0
    return losses(tmp_path / "ref")


def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, shards):  # noqa: F811
    expected = reference_losses(tmp_path, shards)
    config = stage_file(tmp_path, shards, output=str(tmp_path / "run"), optim__steps=20, save_every=5)
    (tmp_path / "kill_in_write.py").write_text(KILL_IN_WRITE)
    marker = tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MM_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "kill_in_write.py"), str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the checkpoint write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000005"]  # the half-written one is invisible
    mm.load(checkpoints / "step_000005")  # the previous one is whole
    assert _run_stage(config).wait(timeout=600) == 0  # resumes
    assert not list(checkpoints.glob(".*.tmp"))  # the debris of the killed write is gone
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records[9:] if r["step"] > 5]
    assert resumed and resumed[-1]["step"] == 20
    for r in resumed:
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5, abs=1e-6)


def test_full_disk_fails_the_write_cleanly_and_the_run_resumes(tmp_path, shards, monkeypatch):  # noqa: F811
    expected = reference_losses(tmp_path, shards, steps=12)
    config = stage_file(tmp_path, shards, output=str(tmp_path / "run"), optim__steps=12, save_every=4)
    original = mm.train.save_file

    def disk_full(tensors, path, *args, **kwargs):
        if "step_000008" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(mm.train, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="step_000008: could not be written .No space left on device."):
        mm.train.train(load_stage_config(config))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004"]  # nothing partial left
    mm.load(checkpoints / "step_000004")

    monkeypatch.setattr(mm.train, "save_file", original)  # space again
    mm.train.train(load_stage_config(config))
    got = losses(tmp_path / "run")
    assert max(got) == 12
    for step in range(5, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_a_corrupt_shard_in_the_middle_is_skipped_and_counted(tmp_path, shards):  # noqa: F811
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(shards / "captions", data)
    middle = sorted(data.glob("*.tar"))[1]
    content = middle.read_bytes()
    middle.write_bytes(content[: len(content) // 2] + b"\xff" * 512)  # cut and scribbled on
    config = stage_file(tmp_path, shards, output=str(tmp_path / "run"), optim__steps=10, save_every=5,
                        data__shards=[str(data)])
    final = mm.train.train(load_stage_config(config))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 10 and records[-1]["skipped"] > 0
    assert mm.load(final) is not None


def test_a_dying_process_ends_the_distributed_run_with_an_error(tmp_path, shards):  # noqa: F811
    config = stage_file(tmp_path, shards, output=str(tmp_path / "run"), optim__steps=20, save_every=100)
    (tmp_path / "die.py").write_text(DIE_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(tmp_path / "die.py"), str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "exitcode  : 7" in proc.stderr + proc.stdout  # torchrun names the rank that failed and how
    assert time.time() - start < 300
    survivors = subprocess.run(["pgrep", "-f", str(tmp_path / "die.py")], capture_output=True, text=True)
    assert survivors.stdout.strip() == ""  # no process left waiting on the dead one
