"""`make bench`: speed and memory of every adapter method against the frozen base, PEFT's LoRA and the
per-expert Python loop, as RATIOS measured in one interleaved run (shared machines are noisy).

    python -m benchmarks.bench                 # step, layer, generate, profile, memory, padding (~20 min on
                                               # a 2-core VM without the bf16 rows, --no-bf16; on a CPU
                                               # without native bf16 they take ~20x fp32 and dominate)
    python -m benchmarks.bench --parts data    # tokenising every bundled train task, twice (~7 min)
    python -m benchmarks.bench --quick         # the same code paths at toy size, for CI-like checks (minutes:
                                               # the bf16 rows dominate on a CPU without native bf16)

Parts (each replaces its own section of `<out>/bench.json`; `<out>/bench.md` is rendered from the whole file):
- step:     one training step per setup (benchmarks/setups.py). All setups share the frozen base weights
            in one process and are timed in rotating order, round after round; a ratio is the median over
            rounds of the two setups' times in the same round. Top-k routing and bf16 autocast are setups
            too (`*_top1`, `*_top2`, `*_bf16`), so each is timed in the same rounds as its dense / fp32 twin.
- layer:    forward + backward of one adapted q_proj alone (its input needing a gradient, as inside a
            network): the adapters' own cost, without the frozen model around it. Interleaved the same way.
- generate: greedy decoding tokens/s through `mode.evaluation.generate` (the evaluation path), interleaved the same way.
- memory:   peak resident memory of the training steps, each setup in a fresh process (`memory_child`).
- profile:  torch.profiler of one step of LoRA r64, MoDE 16x4 and its per-expert loop: where the time goes.
- padding:  tokens processed per real token on the case-study data, with and without length grouping.
- data:     `scripts/bench_tokenise.py` on `data=sni_train` (first run tokenises, second hits the cache).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import BF16, TOP_K, render
from benchmarks.setups import (
    BY_NAME,
    GENERATE,
    NUM_TASKS,
    SETUPS,
    LayerStep,
    OneLayer,
    TrainStep,
    build,
    load_base,
    synthetic_batch,
)
from benchmarks.setups import trainable_parameters as count_trainable

REPO = Path(__file__).resolve().parents[1]
PARTS = ("step", "layer", "generate", "profile", "memory", "padding", "data")  # the order they run in
PROFILED = ["lora64", "mode16x4x1", "loop_mode16x4x1"]
# --quick: the setups the goals name, and the top-k and bf16 variants with what they are measured against
QUICK = ["floor", "peft_lora16", "lora16", "peft_lora64", "lora64", "mode16x4x1", "loop_mode16x4x1", "molora16x4",
         *(v for v, _ in TOP_K), *(v for v, _ in BF16)]


# -- timing -------------------------------------------------------------------------------------------------------
def interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, `rounds` times, in an order rotated (and reversed every other
    round) so that no setup always follows the same one, after one untimed warm-up call each."""
    names = list(runs)
    for name in names:
        runs[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in reversed(order) if r % 2 else order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return times


def part_step(args, base, tokenizer) -> dict:
    batch = synthetic_batch(args.batch, args.seq, args.answer, base.config.vocab_size, tokenizer.pad_token_id)
    runs, params = {}, {}
    for s in selected(args):
        model = build(base, s)
        params[s.name] = count_trainable(model)
        runs[s.name] = TrainStep(model, batch, precision=s.precision)
    print(f"step: {len(runs)} setups x {args.rounds} rounds", file=sys.stderr, flush=True)
    times = interleaved(runs, args.rounds)
    return {"setups": {n: {"label": BY_NAME[n].label, "trainable_parameters": params[n],
                           "median_s": statistics.median(times[n]), "times_s": times[n]} for n in runs}}


def part_generate(args, base, tokenizer) -> dict:
    from mode.evaluation import generate

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, base.config.vocab_size, (args.gen_prompt,), generator=gen).tolist()
               for _ in range(args.gen_batch)]
    tasks = [i % NUM_TASKS for i in range(args.gen_batch)]
    chosen = {s.name for s in selected(args)}
    def run(model):
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            generate(model, tokenizer, prompts, args.gen_batch, args.gen_tokens, "cpu", task_ids=tasks,
                     min_new_tokens=args.gen_tokens)

    runs = {n: functools.partial(run, build(base, BY_NAME[n]).eval()) for n in GENERATE if n in chosen}
    print(f"generate: {len(runs)} setups x {args.rounds} rounds", file=sys.stderr, flush=True)
    times = interleaved(runs, args.rounds)
    tokens = args.gen_batch * args.gen_tokens
    return {"tokens_per_call": tokens,
            "setups": {n: {"label": BY_NAME[n].label, "median_s": statistics.median(times[n]),
                           "tokens_per_s": tokens / statistics.median(times[n]), "times_s": times[n]} for n in runs}}


def part_layer(args, base, tokenizer) -> dict:
    """One q_proj-shaped projection (real frozen weights) at the step's token count, each setup's adapter on it."""
    linear = base.get_decoder().layers[0].self_attn.q_proj
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, args.seq, linear.in_features, generator=gen).requires_grad_()
    tasks = torch.arange(args.batch) % NUM_TASKS
    runs = {s.name: LayerStep(build(OneLayer(linear), s, ["q_proj"]), x, tasks, s.precision) for s in selected(args)}
    rounds = args.rounds * 4  # a layer takes milliseconds: more rounds, tighter medians
    print(f"layer: {len(runs)} setups x {rounds} rounds", file=sys.stderr, flush=True)
    times = interleaved(runs, rounds)
    return {"shape": [args.batch * args.seq, linear.in_features, linear.out_features],
            "setups": {n: {"label": BY_NAME[n].label, "median_s": statistics.median(times[n]), "times_s": times[n]}
                       for n in runs}}


def part_profile(args, base, tokenizer, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    batch = synthetic_batch(args.batch, args.seq, args.answer, base.config.vocab_size, tokenizer.pad_token_id)
    chosen = {s.name for s in selected(args)}
    out = {}
    for name in (n for n in PROFILED if n in chosen):
        step = TrainStep(build(base, BY_NAME[name]), batch)
        step()  # warm-up: optimizer state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        ops = {e.key: e.self_cpu_time_total / 1000 for e in events if e.key.startswith("aten::")}
        out[name] = {"label": BY_NAME[name].label, "ops": ops,
                     "total_ms": sum(e.self_cpu_time_total for e in events) / 1000}
    keys = sorted({k for v in out.values() for k in v["ops"]}, key=lambda k: -max(v["ops"].get(k, 0) for v in out.values()))
    return {"setups": out, "operators": keys[:top]}


# -- memory ---------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(args) -> None:
    """Print the peak resident memory of `--steps` training steps of one setup, in this fresh process.

    Once the model is loaded, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs` = 5), so the
    peak is training's (weights + adapter state + activations + temporaries), not loading's.
    """
    import resource

    base, tokenizer = load_base(args.model, args.layers)
    setup = BY_NAME[args.memory_child]
    model = build(base, setup)
    del base
    step = TrainStep(model, synthetic_batch(args.batch, args.seq, args.answer, model.config.vocab_size,
                                            tokenizer.pad_token_id), precision=setup.precision)
    gc.collect()
    linux = Path("/proc/self/clear_refs").exists()
    if linux:
        Path("/proc/self/clear_refs").write_text("5")
        loaded = _status_kib("VmRSS")
    for _ in range(args.steps):
        step()
    if linux:
        peak, method = _status_kib("VmHWM"), "VmHWM after clear_refs"
    else:  # ru_maxrss (bytes on macOS, KiB elsewhere) includes loading
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        loaded, method = 0, "ru_maxrss (includes loading)"
    print(json.dumps({"peak_mib": peak / 1024, "loaded_mib": loaded / 1024, "step_mib": (peak - loaded) / 1024,
                      "method": method}))


def part_memory(args) -> dict:
    # glibc: a fixed 64 KiB mmap threshold maps and unmaps every larger tensor, so resident memory follows the
    # live tensors rather than what the heap keeps after a free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    for s in selected(args):
        cmd = [sys.executable, "-m", "benchmarks.bench", "--memory-child", s.name, "--model", args.model,
               "--layers", str(args.layers or 0), "--batch", str(args.batch), "--seq", str(args.seq),
               "--answer", str(args.answer), "--steps", str(args.steps), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"memory child {s.name} failed:\n{proc.stderr[-3000:]}")
        out[s.name] = {"label": s.label, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(f"  memory {s.name}: {out[s.name]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return {"setups": out}


# -- padding and the data path ---------------------------------------------------------------------------------------
class _Lengths:
    """Rows that expose only their length, for `mode.training.distributed.micro_batches`."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __getitem__(self, i):
        return {"input_ids": range(self.lengths[i])}


def part_padding(args, steps: int = 200) -> dict:
    """Exact token counts on the case-study data with the model's tokenizer (no timing involved)."""
    from mode.data.dataset import build_data
    from mode.data.sampling import MixtureSampler
    from mode.models import load_model_and_tokenizer
    from mode.run.config import compose
    from mode.training.distributed import micro_batches

    cfg = compose("train", [f"model={args.model}"])
    _, tokenizer = load_model_and_tokenizer(cfg.model)
    data = build_data(cfg.data, cfg.eval, tokenizer, cache_dir=cfg.paths.cache_dir)
    lengths = data.train.column("length")
    rows = []
    for batch in (cfg.train.batch_size, 32):
        sampler = MixtureSampler(data.train.column("task_index"), batch, cfg.seed, cfg.data.sampling)
        for micro in sorted({batch, 8, 4, 2}, reverse=True):
            real = grouped = plain = packed = 0
            for step in range(steps):
                indices = sampler.indices(step)
                real += sum(lengths[i] for i in indices)
                groups = micro_batches(_Lengths(lengths), indices, 0, 1, batch // micro, micro)
                grouped += sum(len(g) * max(lengths[i] for i in g) for g in groups)
                plain += sum(micro * max(lengths[i] for i in indices[k:k + micro]) for k in range(0, batch, micro))
                packed += sum(packed_tokens([lengths[i] for i in g]) for g in groups)
            rows.append({"global_batch": batch, "micro_batch": micro, "padded_per_real_grouped": grouped / real,
                         "padded_per_real_in_order": plain / real, "padded_per_real_packed": packed / real})
    return {"data": "sni_case_study", "tokenizer": args.model, "steps": steps, "rows": rows}


def packed_tokens(lengths: list[int]) -> int:
    """Tokens processed if these sequences were packed first-fit-decreasing into rows as wide as the
    longest (what packing could save beyond length grouping; mode-train does not pack)."""
    width, rows = max(lengths), []
    for n in sorted(lengths, reverse=True):
        for r, used in enumerate(rows):
            if used + n <= width:
                rows[r] += n
                break
        else:
            rows.append(n)
    return width * len(rows)


def part_data(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mode-bench-cache-") as cache:
        cmd = [sys.executable, "scripts/bench_tokenise.py", cache, "data=sni_train", "eval.max_instances_per_task=null"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"scripts/bench_tokenise.py failed:\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    runs = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(first|second) run\s+(.*): ([0-9.]+) s", line)
        if m:
            runs[m.group(1)] = {"seconds": float(m.group(3)), "what": m.group(2)}
    return {"command": "python scripts/bench_tokenise.py <cache dir> data=sni_train eval.max_instances_per_task=null",
            "runs": runs}


# -- command line ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers trace to: the code (commit, and whether the tracked files had uncommitted changes;
    the reports in benchmarks/results/, which the benchmarks themselves rewrite, do not count), the CPU
    (model and the features that decide bf16 speed; whether torch sends bf16 matmuls to oneDNN) and the
    software."""
    from mode.run.provenance import cpu_info, git_commit

    return {**cpu_info(), "cores": os.cpu_count(), "torch": torch.__version__, "mkldnn_bf16": mkldnn_bf16(),
            "python": platform.python_version(), "platform": platform.platform(),
            **git_commit(REPO, ignore=("benchmarks/results",))}


def mkldnn_bf16() -> bool | None:
    """torch's own test for a oneDNN bf16 matmul on this CPU (it needs AVX-512 BW/VL/DQ; else a fallback GEMM)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def exact_command(argv: list[str]) -> str:
    """The command as typed (shell-quoted), so that it can be pasted to measure again."""
    return shlex.join(["python", "-m", "benchmarks.bench", *argv])


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def selected(args):
    names = args.only.split(",") if args.only else [s.name for s in SETUPS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"error: --only {unknown[0]!r} is not one of {list(BY_NAME)}")
    return [BY_NAME[n] for n in names if not (args.no_bf16 and BY_NAME[n].precision == "bf16")]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="step,layer,generate,profile,memory,padding",
                   help=f"comma list of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes (2 layers, 4 x 64 tokens, 3 rounds) and only the setups the goals, top-k and bf16 "
                        "rows name")
    p.add_argument("--model", default="smollm2_135m", help="a conf/model name (default smollm2_135m)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers kept (0: all; default 8, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="training sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per training sequence (default 128)")
    p.add_argument("--answer", type=int, default=None, help="answer tokens per sequence (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    p.add_argument("--steps", type=int, default=2, help="training steps per memory process (default 2)")
    p.add_argument("--gen-batch", type=int, default=None, help="prompts per generation call (default 8)")
    p.add_argument("--gen-prompt", type=int, default=None, help="tokens per prompt (default 96)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens per prompt (default 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, busy cores stall multi-thread barriers)")
    p.add_argument("--only", default=None, help="comma list of setup names (default: all)")
    p.add_argument("--no-bf16", action="store_true",
                   help="leave out the bf16 autocast setups (on a CPU without native bf16 a bf16 step takes ~20x "
                        "an fp32 one, and these rows then dominate the run)")
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results, quick: .../quick)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = {"layers": 8, "batch": 8, "seq": 128, "answer": 16, "rounds": 9, "gen_batch": 8, "gen_prompt": 96,
            "gen_tokens": 32}
    quick = {"layers": 2, "batch": 4, "seq": 64, "answer": 8, "rounds": 3, "gen_batch": 4, "gen_prompt": 32,
             "gen_tokens": 8, "only": ",".join(QUICK)}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.layers = args.layers or None
    selected(args)  # an unknown --only name fails before anything loads
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
    return args


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"error: --parts {unknown[0]!r} is not one of {','.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    command = exact_command(list(sys.argv[1:] if argv is None else argv))
    code = machine()  # read once, first thing: later edits and the parts' own bench.json writes are not the code run
    base = tokenizer = None
    if {"step", "layer", "generate", "profile", "memory"} & set(parts):
        base, tokenizer = load_base(args.model, args.layers)
        c = base.config
        shape = {"model": args.model, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                 "ffn": c.intermediate_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                 "vocab": c.vocab_size, "batch": args.batch, "seq": args.seq, "answer": args.answer,
                 "rounds": args.rounds, "gen_batch": args.gen_batch, "gen_prompt": args.gen_prompt,
                 "gen_tokens": args.gen_tokens}
    for part in (p for p in PARTS if p in parts):  # in this order: memory runs after the in-process parts
        if part == "memory" and base is not None:
            base = None
            gc.collect()
        start = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "load_start": load_average(), "threads": args.threads, "machine": code}
        if part in ("step", "layer", "generate", "profile"):
            result = globals()[f"part_{part}"](args, base, tokenizer)
        else:
            result = globals()[f"part_{part}"](args)
        result["run"] = {**start, **(shape if part in ("step", "layer", "generate", "memory", "profile") else {}),
                         "load_end": load_average()}
        results[part] = result
        path.write_text(json.dumps(results, indent=1) + "\n")  # a part at a time: an interrupted run keeps them
    report = render(results)
    (out / "bench.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {path} and {out / 'bench.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
