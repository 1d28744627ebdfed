"""The training pipeline on the tiny model: shards, stages, checkpoints, resume, processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from safetensors.torch import load_file

import mm
from mm.data import ShardBatches, batch_loader, expand_shards, read_manifest, write_shards
from mm.stages import load_stage_config
from mm.train import average_checkpoints, train

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Colour swatches of varied sizes, captioned and asked about; written with `write_shards`."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(48):
        name = list(COLOURS)[i % 4]
        size = (16 + 8 * (i % 3), 16 + 4 * (i % 5))
        path = root / f"{i:03d}.png"
        Image.new("RGB", size, COLOURS[name]).save(path)
        rows.append({"image": str(path), "caption": f"a {name} square", "question": "Which colour is it?",
                     "answer": name})
    write_shards(rows, root / "captions", "captions", per_shard=16, log=lambda m: None)
    write_shards(rows, root / "qa", "qa", per_shard=16, log=lambda m: None)
    return root


def stage_file(tmp_path, shards, name="stage.yaml", **changes) -> Path:
    config = {
        "stage": "image_pretrain", "model": "tiny", "loss": "lm",
        "train": ["encoders.image", "projectors.image", "xattn.image", "media_embedding"],
        "data": {"shards": [str(shards / "captions")], "kind": "captions", "batch_size": 8, "workers": 0,
                 "shuffle_buffer": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "steps": 12},
        "output": str(tmp_path / "run"), "save_every": 4,
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


# ---- data ------------------------------------------------------------------------------------------
def test_write_shards_from_folder_jsonl_and_csv_skips_and_counts_bad_rows(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a tiny square\n")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "b.txt").write_text("broken")
    report = write_shards(read_manifest(tmp_path), tmp_path / "out1", "captions", log=lambda m: None)
    assert (report.written, report.skipped, report.shards) == (1, 1, 1)

    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "x"}) + "\n"
                                      + json.dumps({"image": "missing.png", "question": "q?", "answer": "y"}) + "\n")
    report = write_shards(read_manifest(tmp_path / "m.jsonl"), tmp_path / "out2", "qa", log=lambda m: None)
    assert (report.written, report.skipped) == (1, 1)

    (tmp_path / "m.csv").write_text("image,caption\na.png,hello\na.png,\n")
    report = write_shards(read_manifest(tmp_path / "m.csv"), tmp_path / "out3", "captions", log=lambda m: None)
    assert (report.written, report.skipped) == (1, 1)
    sample = next(iter(wds.WebDataset(str(tmp_path / "out3" / "captions-000000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"]) == {"caption": "hello"} and sample["png"][:4] == b"\x89PNG"


def _keys(shards, **kw):
    ds = ShardBatches(expand_shards([str(shards / "captions")]), batch_size=8, seed=1, shuffle_buffer=16,
                      decode=lambda s: s["__key__"], collate=lambda keys: {"keys": keys}, **kw)
    return ds


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch["keys"])
        if len(out) == n:
            return out


def test_batch_order_is_the_same_for_any_workers_processes_and_resume(shards):
    single = _take(batch_loader(_keys(shards), 0), 9)  # crosses an epoch boundary (48 samples)
    assert _take(batch_loader(_keys(shards), 2), 9) == single
    halves = [_take(batch_loader(_keys(shards, rank=r, world_size=2), 0), 9) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == single
    assert _take(batch_loader(_keys(shards, start_batch=4), 0), 5) == single[4:]
    assert len(set(sum(single[:6], []))) == 48
    assert single[:6] != single[6:9] + single[:3]  # the next epoch is shuffled anew


def test_a_source_of_one_shard_is_spread_over_the_epoch(tmp_path, shards):
    """Shards are read a few at a time, interleaved sample by sample: the one shard of a small
    source does not arrive as a block (even with no shuffle buffer), and every sample comes once."""
    from mm.data import OPEN_SHARDS, SkipCounter, raw_samples

    rows = [{"image": str(shards / "000.png"), "caption": f"extra {i}"} for i in range(8)]
    write_shards(rows, tmp_path / "small", "captions", log=lambda m: None)
    urls = expand_shards([str(shards / "captions"), str(tmp_path / "small")])  # 3 shards of 16, 1 of 8
    assert len(urls) <= OPEN_SHARDS
    stream = raw_samples(urls, 0, 1, SkipCounter())
    samples = [next(stream) for _ in range(56)]
    assert len({(s["__url__"], s["__key__"]) for s in samples}) == 56
    epoch = [s["__url__"] for s in samples]
    small = [i for i, url in enumerate(epoch) if "small" in url]
    assert len(small) == 8 and max(small) - min(small) > 16  # a block would span 7
    assert len({url for url in epoch[:8]}) > 1


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, shards):
    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "bad-000000.tar")) as sink:
        sink.write({"__key__": "x1", "png": b"not a png", "json": b'{"caption": "junk"}'})
        sink.write({"__key__": "x2", "png": (shards / "000.png").read_bytes(), "json": b"{broken"})
    (bad / "bad-000001.tar").write_bytes(b"this is not a tar file at all" * 20)
    cfg = stage_file(tmp_path, shards, data__shards=[str(shards / "captions"), str(bad)], optim__steps=7)
    train(load_stage_config(cfg))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 7
    assert records[-1]["skipped"] >= 3  # both bad samples and the unreadable shard, every epoch


# ---- stages ----------------------------------------------------------------------------------------
def test_image_pretrain_learns_and_never_touches_the_decoder(tmp_path, shards):
    before = mm.load("tiny").decoder_sha256()
    final = train(load_stage_config(stage_file(tmp_path, shards, optim__steps=60, save_every=30,
                                               optim__lr=5e-3, optim__min_lr_ratio=1.0)))
    curve = losses(tmp_path / "run")
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (58, 59, 60)) / 3
    assert last < 0.5 * first, curve
    meta = yaml.safe_load((final / "config.yaml").read_text())
    assert meta["decoder"]["sha256"] == before
    tensors = load_file(str(final / "adapters.safetensors"))
    assert not any(k.startswith("decoder.") for k in tensors)
    model = mm.load(final)
    assert model.decoder_sha256() == before
    assert model.xattn["image"][0].attn_gate.scale.item() != 0


def test_checkpoint_holds_only_what_trained(tmp_path, shards):
    final = train(load_stage_config(stage_file(tmp_path, shards, train=["xattn.image"], optim__steps=2,
                                               save_every=2)))
    keys = load_file(str(final / "adapters.safetensors")).keys()
    assert keys and all(k.startswith("xattn.image.") for k in keys)


def test_unknown_train_prefix_and_decoder_training_are_refused(tmp_path, shards):
    with pytest.raises(mm.ConfigError, match="matches no trainable parameter"):
        train(load_stage_config(stage_file(tmp_path, shards, train=["xattn.imag"])))
    with pytest.raises(mm.ConfigError, match="decoder is frozen"):
        load_stage_config(stage_file(tmp_path, shards, train=["decoder.model"]))


def test_clip_tower_becomes_the_image_encoder_then_anneal_and_sft_hot_swap(tmp_path, shards):
    clip = train(load_stage_config(stage_file(
        tmp_path, shards, "clip.yaml", stage="vision_clip", loss="clip", output=str(tmp_path / "clip"),
        optim__steps=3, save_every=3, clip={"embed_dim": 16, "text_width": 16, "text_layers": 1,
                                            "text_heads": 2, "context_length": 12})))
    tower = load_file(str(clip / "adapters.safetensors"))
    assert "encoders.image.transformer.resblocks.0.attn.in_proj_weight" in tower
    pre = train(load_stage_config(stage_file(tmp_path, shards, "pre.yaml", init=str(clip), optim__steps=2,
                                             save_every=2, train=["xattn.image"], output=str(tmp_path / "pre"))))
    model = mm.load(pre)
    own = model.adapter_state_dict()
    assert all(torch.equal(own[k], v) for k, v in tower.items())  # no manual surgery

    anneal = train(load_stage_config(stage_file(
        tmp_path, shards, "anneal.yaml", stage="image_anneal", init=str(pre), output=str(tmp_path / "anneal"),
        optim__steps=2, save_every=2, model={"decoder": "tiny", "vision": {
            **yaml.safe_load((ROOT / "configs/vision/vit_tiny.yaml").read_text()), "image_size": 48}, "image_adapter": {"every": 2}})))
    annealed = mm.load(anneal)
    tokens = (48 // 8) ** 2 + 1  # trained at the new resolution, not resampled afterwards
    assert load_file(str(anneal / "adapters.safetensors"))["encoders.image.positional_embedding"].shape[0] == tokens
    assert annealed.encoders["image"].positional_embedding.shape[0] == tokens

    other = tmp_path / "instruct"
    decoder, tokenizer = mm.decoders.tiny_decoder(seed=5)
    decoder.save_pretrained(other)
    tokenizer.save_pretrained(other)
    sft = train(load_stage_config(stage_file(
        tmp_path, shards, "sft.yaml", stage="image_sft", init=str(anneal), decoder=str(other),
        output=str(tmp_path / "sft"), optim__steps=2, save_every=2,
        data__kind="qa", data__shards=[str(shards / "qa")], model={"decoder": "tiny", "vision": {
            **yaml.safe_load((ROOT / "configs/vision/vit_tiny.yaml").read_text()), "image_size": 48}, "image_adapter": {"every": 2}})))
    tuned = mm.load(sft)
    assert torch.equal(tuned.decoder.model.embed_tokens.weight, decoder.model.embed_tokens.weight)
    assert tuned.decoder_sha256() != annealed.decoder_sha256()

    moved = tmp_path / "elsewhere"  # final/ names the stage it came from relative to itself
    moved.mkdir()
    for name in ("clip", "pre"):
        shutil.move(tmp_path / name, moved / name)
    again = mm.load(moved / "pre" / "final")
    assert all(torch.equal(again.adapter_state_dict()[k], v) for k, v in own.items())


def test_average_of_checkpoints(tmp_path, shards):
    train(load_stage_config(stage_file(tmp_path, shards, optim__steps=4, save_every=2, keep=5)))
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    average_checkpoints(steps, tmp_path / "avg")
    a, b = (load_file(str(s / "adapters.safetensors")) for s in steps)
    avg = load_file(str(tmp_path / "avg" / "adapters.safetensors"))
    name = "xattn.image.0.attn_gate.scale"
    assert torch.allclose(avg[name], (a[name] + b[name]) / 2)
    assert mm.load(tmp_path / "avg") is not None

    # a later stage's final/ names its start relative to itself; the average, written at another
    # depth, names the same start relative to itself
    later = train(load_stage_config(stage_file(tmp_path, shards, "later.yaml", init=str(tmp_path / "run" / "final"),
                                               output=str(tmp_path / "later"), optim__steps=4, save_every=2, keep=5)))
    other = tmp_path / "later" / "checkpoints" / "step_000002"
    average_checkpoints([later, other], tmp_path / "soup")
    soup = mm.load(tmp_path / "soup")
    start = mm.load(tmp_path / "run" / "final").adapter_state_dict()
    assert not torch.equal(soup.adapter_state_dict()[name], start[name])
    with pytest.raises(mm.CheckpointError, match="must start from the same checkpoint"):
        average_checkpoints([later, steps[0]], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# ---- faults and processes --------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:  # a port no other run (another test session) is using now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_stage(config: Path, extra_env=None, nproc: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mm", "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "mm.train", str(config)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path, shards):
    reference = stage_file(tmp_path, shards, "ref.yaml", output=str(tmp_path / "ref"), optim__steps=40,
                           save_every=5)
    assert _run_stage(reference).wait(timeout=600) == 0
    expected = losses(tmp_path / "ref")

    config = stage_file(tmp_path, shards, output=str(tmp_path / "run"), optim__steps=40, save_every=5)
    proc = _run_stage(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 13):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    assert _run_stage(config).wait(timeout=600) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed = records[killed_at:]
    assert resumed[0]["step"] <= killed_at  # restarted from the last checkpoint, before the kill
    for r in resumed:
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5, abs=1e-6)
    assert resumed[-1]["step"] == 40


def test_two_processes_give_the_losses_of_one(tmp_path, shards):
    one = stage_file(tmp_path, shards, "one.yaml", output=str(tmp_path / "one"), optim__steps=4, save_every=4)
    two = stage_file(tmp_path, shards, "two.yaml", output=str(tmp_path / "two"), optim__steps=4, save_every=4)
    assert _run_stage(one).wait(timeout=600) == 0
    proc = _run_stage(two, nproc=2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)


def test_shared_prefix_reuse_gives_the_same_loss_and_gradients(shards):
    from mm.stages import LMExamples, LMObjective, collate_lm
    from tests.conftest import open_gates

    model = mm.load("tiny")
    open_gates(model)
    samples = list(wds.WebDataset(str(shards / "qa" / "qa-000000.tar"), shardshuffle=False))[:4]
    batch = collate_lm([LMExamples(model, "qa", 256)(s) for s in samples], model.tokenizer.pad_token_id)
    batch.pop("examples")
    objective = LMObjective(model)
    assert objective.shared_prefix(batch["ids"], batch["attention_mask"]) == 6  # <|im_start|> u s e r \n
    results = []
    for minimum in (1, 10_000):  # with and without the cached prefix
        objective.min_shared_prefix = minimum
        model.zero_grad()
        loss, logged = objective(**batch)
        loss.backward()
        results.append((logged.item(), model.xattn["image"][1].cross_attn.q_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_answer_matching():
    from mm.evaluate import is_correct

    assert is_correct("It is a 7.", "7") and is_correct("That is the number 7", "7")
    assert not is_correct("It is a 17.", "7") and not is_correct("I see a 1.", "7")
    assert is_correct("The colour is Red!", "red")


def test_cli_data_and_eval(tmp_path, shards, capsys):
    from mm.cli import main

    rows = [{"image": str(shards / f"{i:03d}.png"), "question": "Which colour is it?",
             "answer": list(COLOURS)[i % 4]} for i in range(6)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "qa", str(tmp_path / "qa.jsonl"), str(tmp_path / "qa")]) == 0
    assert "wrote 6 samples in 1 shards" in capsys.readouterr().out
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "shards": [str(tmp_path / "qa")], "max_new_tokens": 3,
                                      "output": str(tmp_path / "answers.jsonl")}))
    assert main(["eval", str(config)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 6 and 0 <= result["accuracy"] <= 1
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == [r["answer"] for r in rows]
    assert main(["data", "qa", str(tmp_path / "missing.jsonl"), str(tmp_path / "x")]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_param_groups_split_gates_and_scaled_prefixes():
    from mm.stages import OptimConfig, select_trainable
    from mm.train import make_optimizer, param_groups

    model = mm.load("tiny")
    params = select_trainable(model, ["encoders.image", "xattn.image"])
    cfg = OptimConfig(lr=1e-3, gate_lr=1e-2, lr_scale={"encoders.image": 0.1})
    groups = {name: (names, s) for name, names, s in param_groups(params, cfg)}
    gate_names, gate_settings = groups["gatesx1"]
    assert "xattn.image.0.attn_gate.scale" in gate_names and gate_settings["base_lr"] == 1e-2
    assert "encoders.image.pre_tile_embedding.gate" in groups["gatesx0.1"][0]
    assert groups["gatesx0.1"][1]["base_lr"] == pytest.approx(1e-3)
    assert groups["matricesx0.1"][1] == {"weight_decay": cfg.weight_decay, "base_lr": pytest.approx(1e-4)}
    assert groups["vectorsx1"][1]["weight_decay"] == 0.0
    assert sorted(n for names, _ in groups.values() for n in names) == sorted(params)
    assert sum(len(g["params"]) for g in make_optimizer(params, cfg).param_groups) == len(params)
