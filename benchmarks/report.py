"""The benchmark's goals and its Markdown report, computed from bench.json alone.

Every number in the report comes from the measurements; a missed goal gets a sentence that explains it
from the same numbers (the frozen base's share of the step, each setup's cost above it, the spread).
"""

from __future__ import annotations

import statistics

# (what, part, numerator, denominator, "<=" or ">=", target): a ratio numerator / denominator of step
# times, memory, or generation tokens/s.
GOALS = [
    ("our LoRA r16 step vs PEFT LoRA r16", "step", "lora16", "peft_lora16", "<=", 1.00),
    ("our LoRA r64 step vs PEFT LoRA r64", "step", "lora64", "peft_lora64", "<=", 1.00),
    ("MoDE 16x4 step vs LoRA r64", "step", "mode16x4x1", "lora64", "<=", 1.05),
    ("per-expert loop MoDE 16x4 step vs MoDE 16x4 (speed-up)", "step", "loop_mode16x4x1", "mode16x4x1", ">=", 2.00),
    ("MoDE 16x4 peak memory vs LoRA r64", "memory", "mode16x4x1", "lora64", "<=", 1.10),
    ("MoDE 16x4 step memory (above the loaded model) vs LoRA r64", "memory_step", "mode16x4x1", "lora64", "<=", 1.10),
    ("MoDE 16x4 generation tokens/s vs LoRA r64", "generate", "mode16x4x1", "lora64", ">=", 0.85),
]
# Shown with the goals, without a target: the loop as MoLoRA code usually writes it (other experts, same
# m x r), and the same comparisons on one adapted projection alone (the layer part).
EXTRA = [("per-expert loop MoLoRA 16x4 step vs MoDE 16x4 (speed-up)", "step", "loop_molora16x4", "mode16x4x1"),
         ("one layer: our LoRA r16 vs PEFT LoRA r16", "layer", "lora16", "peft_lora16"),
         ("one layer: our LoRA r64 vs PEFT LoRA r64", "layer", "lora64", "peft_lora64"),
         ("one layer: MoDE 16x4 vs LoRA r64", "layer", "mode16x4x1", "lora64"),
         ("one layer: per-expert loop MoDE 16x4 vs MoDE 16x4 (speed-up)", "layer", "loop_mode16x4x1", "mode16x4x1"),
         ("one layer: per-expert loop MoLoRA 16x4 vs MoDE 16x4 (speed-up)", "layer", "loop_molora16x4", "mode16x4x1")]

# (variant, the setup it is measured against, in the same rounds): the top-k and bf16 sections
TOP_K = [("molora16x4_top2", "molora16x4"), ("molora16x4_top1", "molora16x4"),
         ("mode16x4x1_top2", "mode16x4x1"), ("mode16x4x1_top1", "mode16x4x1")]
BF16 = [("floor_bf16", "floor"), ("lora64_bf16", "lora64"), ("mode16x4x1_bf16", "mode16x4x1")]


def ratio(a: list[float], b: list[float]) -> dict:
    """Median (and quartiles) over rounds of a[i] / b[i]: the two were measured within seconds of each other."""
    rs = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
    return {"median": statistics.median(rs), "q25": q[0], "q75": q[2]}


def above_floor(times: list[float], floor: list[float]) -> float:
    """Median over rounds of a setup's time minus the floor's time in the same round."""
    return statistics.median(t - f for t, f in zip(times, floor))


def _value(results: dict, part: str, num: str, den: str) -> dict | None:
    key = "memory" if part.startswith("memory") else part
    setups = results.get(key, {}).get("setups", {})
    if not {num, den} <= set(setups):
        return None
    a, b = setups[num], setups[den]
    if part in ("step", "layer"):
        return ratio(a["times_s"], b["times_s"])
    if part == "generate":  # tokens/s ratio = the inverse ratio of times
        return ratio(b["times_s"], a["times_s"])
    field = "step_mib" if part == "memory_step" else "peak_mib"
    v = a[field] / b[field]
    return {"median": v, "q25": v, "q75": v}


def goal_rows(results: dict) -> list[dict]:
    rows = []
    for what, part, num, den, op, target in GOALS:
        value = _value(results, part, num, den)
        if value is not None:
            met = value["median"] <= target if op == "<=" else value["median"] >= target
            rows.append({"goal": what, "part": part, "num": num, "den": den, "ratio": value,
                         "target": f"{op} {target:.2f}", "target_value": target, "op": op, "met": met})
    for what, part, num, den in EXTRA:
        value = _value(results, part, num, den)
        if value is not None:
            rows.append({"goal": what, "part": part, "num": num, "den": den, "ratio": value, "target": "",
                         "met": None})
    return rows


def why(results: dict, goal: dict) -> str:
    """One paragraph explaining a missed goal from the measurements."""
    r, target, part = goal["ratio"], goal["target_value"], goal["part"]
    spread = (f"The per-round ratios' quartiles ({r['q25']:.3f}-{r['q75']:.3f}) straddle the target: the gap is "
              "within this machine's round-to-round noise. " if r["q25"] <= target <= r["q75"] else "")
    if part == "step":
        s = results["step"]["setups"]
        if "floor" not in s:
            return spread
        floor = statistics.median(s["floor"]["times_s"])
        num, den = (above_floor(s[k]["times_s"], s["floor"]["times_s"]) for k in (goal["num"], goal["den"]))
        label_n, label_d = s[goal["num"]]["label"], s[goal["den"]]["label"]
        text = (f"{spread}The frozen base's forward + backward alone takes {floor:.3f} s; above it, {label_n} "
                f"adds {num:.3f} s and {label_d} {den:.3f} s per step")
        if goal["op"] == ">=":  # a speed-up bounded by the shared floor
            bound = statistics.median(s[goal["num"]]["times_s"]) / floor
            text += (f" ({num / den:.1f}x as much adapter work). No implementation of {label_d} can make the whole "
                     f"step faster than the floor, so the speed-up over {label_n} is at most {bound:.2f}x on this "
                     "model shape: the loop's cost is real, but the frozen base dominates a step")
            if bound < target:
                text += f", and {target:.0f}x is out of reach whatever the adapter does"
        return text + "."
    if part == "generate":
        s = results["generate"]["setups"]
        per_token = {k: 1000 * v["median_s"] / results["generate"]["tokens_per_call"] for k, v in s.items()}
        text = f"{spread}Per generated token (batch of {results['generate'].get('run', {}).get('gen_batch', '?')}): "
        text += ", ".join(f"{s[k]['label']} {per_token[k]:.2f} ms" for k in ("floor", goal["den"], goal["num"])
                          if k in s)
        return text + (". Decoding runs one token per sequence through every layer: launch overhead, not "
                       "arithmetic, dominates, and a mixture runs a few more small operations per adapted layer "
                       "(router, softmax, routing statistics).")
    s = results["memory"]["setups"]
    return (f"{spread}Step memory: {s[goal['num']]['label']} {s[goal['num']]['step_mib']:.0f} MiB, "
            f"{s[goal['den']]['label']} {s[goal['den']]['step_mib']:.0f} MiB"
            + (f", the frozen base alone {s['floor']['step_mib']:.0f} MiB." if "floor" in s else "."))


def fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def code_version(m: dict) -> str:
    """`commit abc123 (clean tree)`, `... with uncommitted changes`, or that it was not recorded (older runs)."""
    if not m.get("commit"):
        return "commit not recorded"
    if not m.get("dirty"):
        return f"commit {m['commit'][:12]} (clean tree)"
    changed = m.get("changed")
    return f"commit {m['commit'][:12]} with uncommitted changes" + (f" to {', '.join(changed)}" if changed else "")


def machine_text(m: dict) -> str:
    features = f" ({', '.join(m['cpu_features'])})" if m.get("cpu_features") else ""
    return f"{m['cpu']}{features}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['platform']}"


def _measured(run: dict, threads: bool = True) -> str:
    return (f"Measured by `{run['command'].strip()}` at {code_version(run.get('machine', {}))} on {run['date']} "
            f"(load average {fmt_load(run['load_start'])} at the start, {fmt_load(run['load_end'])} at the end"
            + (f"; {run['threads']} torch thread(s))." if threads else ")."))


def _shape(run: dict) -> str:
    return (f"Model: `{run['model']}` with {run['layers']} decoder layers (hidden {run['hidden']}, ffn {run['ffn']}, "
            f"{run['heads']} heads / {run['kv_heads']} kv heads, vocab {run['vocab']}), fp32, adapters on q, k, v, o.")


def render(results: dict) -> str:
    lines = ["# mode benchmark", "",
             "Written by `python -m benchmarks.bench` (`make bench`); every number below comes from the run named "
             "in its section. Speed is compared as ratios of setups measured in the same round, because other jobs "
             "may share the machine.", ""]
    parts = [k for k in ("step", "layer", "generate", "memory", "profile", "padding", "data") if k in results]
    machines: dict[str, list[str]] = {}  # parts measured by separate commands may come from other machines
    for k in parts:
        machines.setdefault(machine_text(results[k]["run"]["machine"]), []).append(k)
    if len(machines) == 1:
        lines += [f"Machine: {next(iter(machines))}.", ""]
    elif machines:
        lines += [f"Machine ({', '.join(names)}): {text}." for text, names in machines.items()] + [""]
    versions: dict[str, list[str]] = {}
    for k in parts:
        versions.setdefault(code_version(results[k]["run"]["machine"]), []).append(k)
    if len(versions) == 1:
        lines += [f"Code: {next(iter(versions))}.", ""]
    elif versions:
        lines += [f"Code ({', '.join(names)}): {text}." for text, names in versions.items()] + [""]
    goals = goal_rows(results)
    if goals:
        lines += ["## Goals", "", "| goal | ratio (median) | quartiles over rounds | target | met |",
                  "|---|---|---|---|---|"]
        for g in goals:
            r = g["ratio"]
            met = "" if g["met"] is None else "yes" if g["met"] else "**no**"
            lines.append(f"| {g['goal']} | {r['median']:.3f} | {r['q25']:.3f}-{r['q75']:.3f} | {g['target']} | {met} |")
        lines.append("")
        for g in goals:
            if g["met"] is False:
                lines += [f"*{g['goal']}* (missed): {why(results, g)}", ""]
    if "step" in results:
        step = results["step"]
        s, mem = step["setups"], results.get("memory", {}).get("setups", {})
        ref = "lora64" if "lora64" in s else next(iter(s))
        run = step["run"]
        lines += ["## Training step", "", _measured(run), _shape(run),
                  f"Batch {run['batch']} x {run['seq']} tokens (the last {run['answer']} of each are the answer); "
                  f"AnswerLoss forward + backward + gradient clipping + AdamW, routing statistics on, as mode-train "
                  f"runs them; {run['rounds']} rounds. The floor is the frozen base's forward + backward down to "
                  "the embeddings, with nothing to train. Time ratios: median over rounds of the per-round ratio.",
                  "", "Memory (from the memory part): peak resident memory (VmHWM) of the training steps in a fresh "
                  "process per setup, the kernel's peak mark reset once the model is loaded; 'step memory' is that "
                  "peak minus the resident memory of the loaded model (adapter state + activations + temporaries).",
                  "", f"| setup | trainable | step (s, median) | above floor (s) | x floor | x {s[ref]['label']} | "
                  f"peak RSS (MiB) | step memory (MiB) | step memory x {s[ref]['label']} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in s.items():
            floor = ratio(row["times_s"], s["floor"]["times_s"])["median"] if "floor" in s else float("nan")
            extra = above_floor(row["times_s"], s["floor"]["times_s"]) if "floor" in s else float("nan")
            rel = ratio(row["times_s"], s[ref]["times_s"])["median"]
            m = mem.get(name)
            cells = (f"{m['peak_mib']:.0f} | {m['step_mib']:.0f} | {m['step_mib'] / mem[ref]['step_mib']:.3f}"
                     if m and ref in mem else " | | ")
            lines.append(f"| {row['label']} | {row['trainable_parameters']:,} | {row['median_s']:.3f} | {extra:+.3f} | "
                         f"{floor:.3f} | {rel:.3f} | {cells} |")
        lines.append("")
    elif "memory" in results:
        mem = results["memory"]["setups"]
        lines += ["## Training-step memory", "", _measured(results["memory"]["run"]), "",
                  "| setup | peak RSS (MiB) | step memory (MiB) |", "|---|---|---|"]
        lines += [f"| {m['label']} | {m['peak_mib']:.0f} | {m['step_mib']:.0f} |" for m in mem.values()]
        lines.append("")
    if "layer" in results:
        layer = results["layer"]
        s, run = layer["setups"], layer["run"]
        ref = "lora64" if "lora64" in s else next(iter(s))
        tokens, P, Q = layer["shape"]
        lines += ["## One adapted layer", "", _measured(run),
                  f"Forward + backward of one projection of the base ({P} -> {Q}, the model's first q_proj, frozen) "
                  f"with each setup's adapter, on {tokens} tokens whose input needs a gradient (as inside a network); "
                  f"{4 * run['rounds']} rounds. The floor is the frozen projection alone.", "",
                  f"| setup | median (ms) | above floor (ms) | x {s[ref]['label']} |", "|---|---|---|---|"]
        for row in s.values():
            extra = above_floor(row["times_s"], s["floor"]["times_s"]) * 1000 if "floor" in s else float("nan")
            lines.append(f"| {row['label']} | {1000 * row['median_s']:.2f} | {extra:+.2f} | "
                         f"{ratio(row['times_s'], s[ref]['times_s'])['median']:.3f} |")
        lines.append("")
    lines += variant_section(results, TOP_K, "## Top-k routing (`adapter.top_k`)",
                             "Each top-k mixture against the same mixture with dense routing", top_k_why)
    lines += variant_section(results, BF16, "## bf16 autocast (`train.precision=bf16`)",
                             "Each setup's forward under bf16 autocast (fp32 weights, bf16 matmuls, as accelerate "
                             "applies train.precision=bf16) against the same setup in fp32", bf16_why)
    if "generate" in results:
        g = results["generate"]
        s, run = g["setups"], g["run"]
        ref = "lora64" if "lora64" in s else next(iter(s))
        lines += ["## Generation (the evaluation path)", "", _measured(run), _shape(run),
                  f"`mode.evaluation.generate` (greedy, KV cache, left padding): {run['gen_batch']} prompts of "
                  f"{run['gen_prompt']} tokens, {run['gen_tokens']} new tokens each with end-of-sequence suppressed "
                  f"(every setup decodes the same {g['tokens_per_call']} tokens), routing statistics on as in "
                  f"mode-train's evaluation; {run['rounds']} rounds.", "",
                  f"| setup | tokens/s (median) | x {s[ref]['label']} |", "|---|---|---|"]
        for row in s.values():
            lines.append(f"| {row['label']} | {row['tokens_per_s']:.1f} | "
                         f"{ratio(s[ref]['times_s'], row['times_s'])['median']:.3f} |")
        lines.append("")
    if "profile" in results:
        p = results["profile"]
        names = list(p["setups"])
        labels = [p["setups"][n]["label"] for n in names]
        lines += ["## Profile of one training step", "", _measured(p["run"]),
                  "torch.profiler, self CPU time per operator (ms) in one step, the operators that take the most "
                  "time in any of these setups:", "", "| operator | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(names)]
        for op in p["operators"]:
            lines.append(f"| `{op}` | " + " | ".join(f"{p['setups'][n]['ops'].get(op, 0.0):.1f}" for n in names) + " |")
        lines.append("| total | " + " | ".join(f"{p['setups'][n]['total_ms']:.1f}" for n in names) + " |")
        lines.append("")
    if "padding" in results:
        p = results["padding"]
        lines += ["## Length-grouped micro-batches", "", _measured(p["run"], threads=False),
                  f"Tokens a step processes (padding included) per real token, over {p['steps']} global batches of "
                  f"the `{p['data']}` data ({p['tokenizer']} tokenizer): micro-batches cut in sampling order vs "
                  "mode-train's (the global batch sorted by length, then cut; the same step exactly, "
                  "tests/test_throughput.py), and what packing each length-grouped micro-batch into rows as wide as "
                  "its longest sequence would process (counted, not implemented).", "",
                  "| global batch | micro-batch | in sampling order | length-grouped (mode-train) | grouped + packed |",
                  "|---|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['global_batch']} | {r['micro_batch']} | {r['padded_per_real_in_order']:.3f} | "
                         f"{r['padded_per_real_grouped']:.3f} | {r['padded_per_real_packed']:.3f} |")
        lines.append("")
    if "data" in results:
        d = results["data"]
        lines += ["## Data path (the tokenised-data cache)", "", _measured(d["run"], threads=False),
                  f"`{d['command']}` with an empty cache folder, then again (a fresh process: a real cache hit):", "",
                  "| run | what | seconds |", "|---|---|---|"]
        for key in ("first", "second"):
            if key in d["runs"]:
                lines.append(f"| {key} | {d['runs'][key]['what']} | {d['runs'][key]['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _pair(results: dict, part: str, num: str, den: str) -> dict | None:
    setups = results.get(part, {}).get("setups", {})
    return ratio(setups[num]["times_s"], setups[den]["times_s"]) if {num, den} <= set(setups) else None


def variant_section(results: dict, pairs: list[tuple[str, str]], title: str, what: str, explain) -> list[str]:
    """A variant (top-k, bf16) against its twin, both timed in the same rounds of the step and layer parts."""
    step, layer = results.get("step", {}).get("setups", {}), results.get("layer", {}).get("setups", {})
    mem = results.get("memory", {}).get("setups", {})
    rows = [(v, d) for v, d in pairs if {v, d} <= set(step) or {v, d} <= set(layer)]
    if not rows:
        return []
    run = results["step" if "step" in results else "layer"]["run"]
    lines = [title, "", _measured(run),
             f"{what}, timed in the same rounds (training step and one adapted layer, as in the sections of those "
             "names); ratios are medians over rounds of the per-round ratio, with quartiles.", "",
             "| setup | against | step ratio | quartiles | one-layer ratio | quartiles | step memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for v, d in rows:
        cells = []
        for part in ("step", "layer"):
            r = _pair(results, part, v, d)
            cells += [f"{r['median']:.3f}", f"{r['q25']:.3f}-{r['q75']:.3f}"] if r else ["", ""]
        memory = f"{mem[v]['step_mib'] / mem[d]['step_mib']:.3f}" if {v, d} <= set(mem) else ""
        label = (step.get(v) or layer[v])["label"], (step.get(d) or layer[d])["label"]
        lines.append(f"| {label[0]} | {label[1]} | " + " | ".join(cells) + f" | {memory} |")
    return lines + ["", explain(results, rows), ""]


def _ratios_text(results: dict, rows: list[tuple[str, str]], part: str) -> str:
    setups = results[part]["setups"]
    return ", ".join(f"{setups[v]['label']} {_pair(results, part, v, d)['median']:.2f}x {setups[d]['label']}"
                     for v, d in rows if {v, d} <= set(setups))


def top_k_why(results: dict, rows: list[tuple[str, str]]) -> str:
    """Why masking saves nothing, with the measured ratios and the most any sparse kernel could save."""
    text = []
    if "step" in results:
        text.append(f"Training step: {_ratios_text(results, rows, 'step')}.")
    if "layer" in results:
        text.append(f"One layer: {_ratios_text(results, rows, 'layer')}.")
    text.append("Top-k is a mask in the fused layer: the dropped experts' logits are set to -inf before the softmax, "
                "so their gates are exact zeros, but the gated activations z keep their [tokens, r*m] width and the "
                "up-projection stays the one [tokens, r*m] x [r*m, Q] GEMM of dense routing (MoLoRA's down-projection "
                "still computes every expert's A x): the same multiply-adds, plus a topk, a scatter and a masked_fill "
                "on the [tokens, blocks, m] logits and their backward. Multiplying by an exact zero costs what "
                "multiplying by a gate costs, so sparsity cannot save time in this form, on a CPU or elsewhere.")
    found = [r for part in ("step", "layer") for v, d in rows if (r := _pair(results, part, v, d))]
    low = min(found, key=lambda r: r["median"])
    if low["median"] >= 0.95:
        text.append("Measured: no ratio is below 0.95, as the arithmetic says.")
    elif low["q75"] >= 1:
        text.append(f"The lowest ratio measured ({low['median']:.3f}) is within the rounds' spread (quartiles "
                    f"{low['q25']:.3f}-{low['q75']:.3f}): noise on a shared machine, not a saving.")
    else:
        text.append(f"The lowest ratio measured ({low['median']:.3f}, quartiles {low['q25']:.3f}-{low['q75']:.3f}) "
                    "is below 1 in most rounds, which the arithmetic does not explain: measure again with more "
                    "rounds (`--rounds`) on a quieter machine before reading it as a saving.")
    bounds = []
    for part, unit, scale in (("step", "s", 1), ("layer", "ms", 1000)):
        setups = results.get(part, {}).get("setups", {})
        for d in sorted({d for _, d in rows if d in setups and "floor" in setups}):
            extra = above_floor(setups[d]["times_s"], setups["floor"]["times_s"])
            total = statistics.median(setups[d]["times_s"])
            where = "step" if part == "step" else "one layer"
            bounds.append(f"{setups[d]['label']} {scale * extra:.3f} {unit} of {scale * total:.3f} {unit} ({where})"
                          if extra > 0 else f"{setups[d]['label']} nothing measurable ({where}: its median is not "
                          "above the floor's in this run)")
    if bounds:
        text.append("A kernel that gathers each token's k experts could save at most the adapter's time above the "
                    f"frozen base: {'; '.join(bounds)}.")
    return " ".join(text)


def bf16_why(results: dict, rows: list[tuple[str, str]]) -> str:
    """bf16 speed is the CPU's: native bf16 instructions (avx512_bf16, AMX), AVX-512 without them, or AVX2 only."""
    run = results["step" if "step" in results else "layer"]["run"]
    m = run["machine"]
    features = set(m.get("cpu_features", []))
    text = []
    if "step" in results:
        text.append(f"Training step: {_ratios_text(results, rows, 'step')}.")
    if "layer" in results:
        text.append(f"One layer: {_ratios_text(results, rows, 'layer')}.")
    have = ", ".join(sorted(features)) or "no AVX2"
    if features & {"avx512_bf16", "amx_bf16"}:
        text.append(f"This CPU ({m['cpu']}: {have}) multiplies bf16 natively, so bf16 autocast halves the bytes each "
                    "matmul reads and runs on bf16 instructions.")
    elif "avx512f" in features:
        text.append(f"This CPU ({m['cpu']}: {have}) has AVX-512 but no bf16 instructions (avx512_bf16, AMX): "
                    "its bf16 matmuls are not native.")
    else:
        text.append(f"This CPU ({m['cpu']}: {have}) has neither AVX-512 nor bf16 instructions (avx512_bf16, AMX).")
    if m.get("mkldnn_bf16") is False:
        text.append("torch does not send bf16 matmuls to oneDNN here (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` "
                    "is False: it needs AVX-512 BW/VL/DQ), so they run ATen's fallback GEMM instead of MKL's fp32 "
                    "kernels: every matmul of the base and the adapter pays it. Train in fp32 on such a CPU "
                    "(`train.precision=fp32`); bf16 is for GPUs and CPUs with AMX or avx512_bf16.")
    return " ".join(text)
