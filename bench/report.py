"""Printing, plotting and the RESULTS.md table of benchmark results."""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"text": ">= 0.98", "prefill": ">= 1.0", "decode": ">= 1.0 (aim 1.3)"}


def say(title: str, result: dict) -> None:
    ratios = {k: round(v, 3) for k, v in _flat(result).items() if k.endswith("ratio")}
    print(f"{title}: {ratios}", flush=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def plot(results: dict, path: Path) -> None:
    """Decode time per token against the number of images and the prompt length, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = results["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, x, label in ((axes[0], "by_images", "images", "images in the prompt (one tile each)"),
                              (axes[1], "by_prompt", "prompt_tokens", "prompt tokens (one image)")):
        points = scaling[key]
        xs = [p[x] for p in points]
        for side, name in (("ours", "mm (this project)"), ("reference", "transformers Mllama")):
            ax.plot(xs, [1000 * p[side]["decode_s_per_token"] for p in points], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("decode ms / token")
        ax.set_ylim(bottom=0)
        if key == "by_prompt":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Decode cost, {results['machine']['label']}, {scaling['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(s: float) -> str:
    return f"{1000 * s:.1f} ms"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _section(name: str, r: dict) -> list[str]:
    m = r["machine"]
    where = "" if "gpu" in m else f", {m['cpu']}"  # CPU rows of different processors sit side by side
    lines = [f"## {m['label']}{where}{' (quick run)' if r.get('quick') else ''}{_variant(name)}", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB" + (f", {m['gpu']}" if "gpu" in m else "")
             + f"; torch {m['torch']}, transformers {m['transformers']}; {r['date']}, {r['seconds']} s.", "",
             _row("measurement", "mm", "reference", "ratio (mm faster > 1)", "target"), _row(*["---"] * 5)]
    lines += _generation_rows(r) + _training_rows(r) + _speech_rows(r)
    if name.endswith("compile-decode"):
        firsts = ", ".join(f"{r[k]['ours_first_call_s']:.0f} s ({k})" for k in ("text_only", "image_qa") if k in r)
        lines.append(f"\nFirst reply, compilation included (not in the table): {firsts}.")
    compared = [r[k] for k in ("text_only", "image_qa") if k in r]
    if compared:
        same = all(c["same_tokens"] for c in compared)
        lines += ["", f"Both sides produced {'the same tokens' if same else 'DIFFERENT tokens'} "
                      f"(medians of {compared[0]['repeats']} alternating repeats)."]
    return lines + _scaling_rows(name, r) + [""]


def _generation_rows(r: dict) -> list[str]:
    rows = []
    if "text_only" in r:
        t, o, ref = r["text_only"], r["text_only"]["ours"], r["text_only"]["reference"]
        rows += [_row(f"1. text only, decode per token ({t['tokens']} new, greedy)", _ms(o["decode_s_per_token"]),
                      f"{_ms(ref['decode_s_per_token'])} (LlamaForCausalLM.generate)",
                      f"**{t['decode_speed_ratio']:.3f}**", TARGETS["text"]),
                 _row("1. text only, whole reply incl. prompt", f"{o['total_s']:.2f} s", f"{ref['total_s']:.2f} s",
                      f"{t['total_speed_ratio']:.3f}", "")]
    if "image_qa" in r:
        q, o, ref = r["image_qa"], r["image_qa"]["ours"], r["image_qa"]["reference"]
        rows += [_row(f"2. image QA prefill ({q['tiles']} tiles, {q['prompt_tokens']} prompt tokens)",
                      _ms(o["prefill_s"]), f"{_ms(ref['prefill_s'])} (MllamaForConditionalGeneration)",
                      f"**{q['prefill_speed_ratio']:.3f}**", TARGETS["prefill"]),
                 _row(f"2. image QA decode per token ({q['tokens']} new)", _ms(o["decode_s_per_token"]),
                      _ms(ref["decode_s_per_token"]), f"**{q['decode_speed_ratio']:.3f}**", TARGETS["decode"])]
    return rows


def _training_rows(r: dict) -> list[str]:
    if "training" not in r:
        return []
    t = r["training"]
    f, tr, data, use = t["frozen"], t["trainable"], t["data"], t["utilisation"]
    workers = ", ".join(k.removeprefix("workers_") for k in data["images_per_s"])
    return [
        _row(f"4. image_pretrain samples/s, batch {f['batch_size']} (decoder frozen vs trainable)",
             f"{f['samples_per_s']:.2f}", f"{tr['samples_per_s']:.2f}", f"**{t['throughput_ratio']:.2f}**", ""),
        _row("4. peak memory (trainable / frozen)", f"{f['peak_memory_mb']:.0f} MiB", f"{tr['peak_memory_mb']:.0f} MiB",
             f"**{t['memory_ratio']:.2f}**", ""),
        _row(f"5. data: images/s read+decoded+tiled (best of workers {workers}) vs images/s a step consumes",
             f"{max(data['images_per_s'].values()):.0f}", f"{data['consumed_per_s']:.2f}",
             f"**{data['supply_ratio']:.0f}**", "> 1"),
        _row(f"6. utilisation: training FLOP/s vs measured {use['matmul_dtype'].removeprefix('torch.')} matmul FLOP/s",
             f"{use['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s", f"{use['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"**{use['ratio']:.2f}**", ""),
    ]


def _speech_rows(r: dict) -> list[str]:
    rows = []
    if "conformer_training" in r:
        c = r["conformer_training"]
        rows += [_row(f"8. Conformer speech_ctc step, batch {c['batch']}: speech.dropout vs nn.Dropout (float32)",
                      f"{c['ours']['s_per_step']:.2f} s", f"{c['reference']['s_per_step']:.2f} s",
                      f"**{c['dropout_ratio']:.2f}**", "")]
        if "bfloat16" in c:
            rows.append(_row("8. the same step, precision bfloat16 (autocast) vs float32",
                             f"{c['bfloat16']['s_per_step']:.2f} s", f"{c['ours']['s_per_step']:.2f} s",
                             f"**{c['bfloat16_ratio']:.2f}**", ""))
        else:
            rows.append(_row("8. the same step, precision bfloat16 (autocast) vs float32", "not run",
                             f"{c['ours']['s_per_step']:.2f} s", "-", c["bfloat16_skipped"]))
    if "speech_search" not in r:
        return rows
    t = r["speech_search"]
    return rows + [_row(f"7. character search + punctuation with the decoder as LM, per sentence ({t['sentences']}; "
                 f"{'same' if t['same_transcripts'] else 'DIFFERENT'} transcripts)",
                 f"{t['ours']['s_per_sentence']:.2f} s (key/value cache)",
                 f"{t['reference']['s_per_sentence']:.2f} s (re-reading each text)", f"**{t['speed_ratio']:.2f}**", ""),
            _row(f"7. the same, the {t['sentences']} recordings side by side (lockstep) vs one at a time",
                 f"{t['side_by_side']['s_per_sentence']:.2f} s", f"{t['ours']['s_per_sentence']:.2f} s",
                 f"**{t['side_by_side_ratio']:.2f}**", "")]


def _scaling_rows(name: str, r: dict) -> list[str]:
    if "scaling" not in r:
        return []
    s = r["scaling"]
    lines = ["", f"3. Decode time per token ({s['new_tokens']} new tokens); plot: "
                 f"[{name}-scaling.png]({Path('results') / (name + '-scaling.png')})", "",
             _row("images", "prompt tokens", "mm", "Mllama", "ratio", "media k/v computed per prompt (mm)"),
             _row(*["---"] * 6)]
    for p in s["by_images"] + s["by_prompt"][1:]:  # by_prompt[0] is the one-image, 128-token point again
        lines.append(_row(p["images"], p["prompt_tokens"], _ms(p["ours"]["decode_s_per_token"]),
                          _ms(p["reference"]["decode_s_per_token"]), f"{p['decode_speed_ratio']:.3f}",
                          p.get("kv_computations_per_prompt", "-")))
    return lines


def _variant(name: str) -> str:
    if name.endswith("plain-decode"):
        return " — decode_mode plain (generated tokens through the decoder's forward: the 'before')"
    if name.endswith("compile-decode"):
        return " — decode_mode compile (the lean step through torch.compile; compilation not timed)"
    return ""


HEADER = """# Benchmarks

`.venv/bin/python -m bench` (see bench/__main__.py) measures this project against its references
in one run — text-only decoding against transformers' LlamaForCausalLM with the same bundled
SmolLM2-135M-Instruct decoder; image question answering against transformers'
MllamaForConditionalGeneration built with the same sizes, layer placement and weights (random,
gates open; both sides produce the same tokens) — plus training, data and utilisation figures.
Ratios are reference time / our time: above 1, this project is faster. Generated from
bench/results/*.json; each section names the machine it ran on.
"""


def write_markdown(results_dir: Path, path: Path) -> None:
    lines = [HEADER]
    for f in sorted(results_dir.glob("*.json"), key=lambda f: ("-decode" in f.stem, "-quick" in f.stem, f.stem)):
        lines += _section(f.stem, json.loads(f.read_text()))
    path.write_text("\n".join(lines))
