"""`make bench-data-scale`: the training data path (`data=sni_train`) at full SNI size, with 1 and 2 processes.

    python scripts/make_synthetic_sni.py /tmp/sni-full --split train     # ~2.0M instances, ~0.5 GB (once)
    python -m benchmarks.data_scale --sni-dir /tmp/sni-full             # first build + cached load, 1 and 2 processes

For each process count, a fresh cache is filled ("first build") and then read again by new processes
("cached load"). Each process runs what `mode.training.session.setup` runs for the data: the main process
builds (or finds) the cache entries under the cache lock, the others wait and memory-map them
(`mode.training.distributed.data_on_main`), then the data fingerprint and the sampler's task column.
Per process it records the wall time of that stage, the peak resident memory (VmHWM) and its growth over
the stage, and the peak of the tokenising workers (`datasets.map` children). 2 processes run under torchrun
(gloo, CPU). Results: `<out>/data_scale.json` and `<out>/data_scale.md`, with the goals of issue 13.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "DATA_SCALE "
GiB = 1024**3
GOALS = {"first_build_s": 30 * 60, "cached_load_s": 60, "peak_rss_gib": 6.0, "second_process_gib": 1.0}


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(args) -> None:
    """One process of a run: the data stage of `setup`, measured; prints one JSON line."""
    import resource

    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mode.data.dataset import _num_proc, build_data, load_data
    from mode.models import resolve_model_path
    from mode.run.config import compose
    from mode.training.checkpoint import data_fingerprint
    from mode.training.distributed import data_on_main

    accelerator = Accelerator(cpu=True)
    cfg = compose("train", ["data=sni_train", f"data.sni_dir={args.sni_dir}", "eval.max_instances_per_task=null",
                            *args.overrides])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    accelerator.wait_for_everyone()
    before = _status("VmRSS")
    start = time.perf_counter()
    data = data_on_main(accelerator, lambda: build_data(cfg.data, cfg.eval, tokenizer, cache_dir=args.cache_dir),
                        load_data)
    fingerprint = data_fingerprint(data.train)
    task_column = data.train.column("task_index")
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(MARK + json.dumps({
        "rank": accelerator.process_index, "seconds": seconds, "rss_before": before, "peak_rss": _status("VmHWM"),
        "rss_end": _status("VmRSS"), "rss_anon_end": _status("RssAnon"), "rss_file_end": _status("RssFile"),
        "workers_peak_rss": children, "tasks": len(data.tasks), "train": len(task_column), "eval": len(data.eval),
        "tokenising_workers": _num_proc(cfg.data, len(task_column)),
        "fingerprint": fingerprint}), flush=True)
    accelerator.wait_for_everyone()


def launch(processes: int, sni_dir: str, cache_dir: str, overrides: list[str]) -> dict:
    """One run (1 process, or N under torchrun): {wall seconds, per-rank records}."""
    prefix = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*prefix, "-m", "benchmarks.data_scale", "--child", "--sni-dir", sni_dir, "--cache-dir", cache_dir,
           "--", *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    ranks = sorted((json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)),
                   key=lambda r: r["rank"])
    if len(ranks) != processes:
        raise SystemExit(f"expected {processes} measurements, got {len(ranks)}:\n{proc.stdout[-2000:]}")
    return {"wall_s": wall, "ranks": ranks}


def folder_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def run(args) -> dict:
    sni = Path(args.sni_dir)
    if not (sni / "tasks").is_dir():
        raise SystemExit(f"error: --sni-dir {sni} has no tasks/ folder (make one: scripts/make_synthetic_sni.py)")
    work = Path(tempfile.mkdtemp(prefix="mode-data-scale-", dir=args.work_dir))
    runs = []
    try:
        for n in args.processes:
            cache = work / f"cache-{n}"
            for label in ("first build", "cached load"):
                print(f"data_scale: {n} process(es), {label} ...", file=sys.stderr, flush=True)
                result = launch(n, str(sni), str(cache), args.overrides)
                runs.append({"processes": n, "run": label, **result})
                print(f"  {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
            cache_bytes = folder_bytes(cache / "sni")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prints = {r["fingerprint"] for run_ in runs for r in run_["ranks"]}
    if len(prints) != 1:
        raise SystemExit(f"the data fingerprint differs between processes or runs: {sorted(prints)}")
    first = runs[0]["ranks"][0]
    readme = sni / "README.md"  # make_synthetic_sni.py says there what it wrote (scale, cap, counts)
    upstream = manifest_instances(sni / "manifest.tsv")
    return {"sni_dir": str(sni), "sni_note": readme.read_text().strip() if readme.is_file() else "", "sni_json_bytes": folder_bytes(sni / "tasks", "*.json"), "cache_bytes": cache_bytes,
            "tasks": first["tasks"], "train": first["train"], "eval": first["eval"], "fingerprint": prints.pop(),
            "overrides": args.overrides, "runs": runs, "goals": GOALS, "verdict": verdict(runs),
            "instances_written": upstream[1], "instances_upstream": upstream[0]}


def manifest_instances(path: Path) -> tuple[int | None, int | None]:
    """(upstream, written) instance totals of a synthetic folder's manifest.tsv (None, None without one)."""
    if not path.is_file():
        return None, None
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return sum(int(r[2]) for r in rows), sum(int(r[3]) for r in rows)


def projection(result: dict) -> list[str]:
    """The first build at full upstream size, projected from this run's own throughput (tokenising is linear in
    the instances and divides over the workers; reading, writing and digesting are a small part)."""
    written, upstream = result.get("instances_written"), result.get("instances_upstream")
    builds = [(r, k) for r in result["runs"] if r["run"] == "first build" for k in r["ranks"] if k["rank"] == 0]
    if not written or not upstream or not builds or "tokenising_workers" not in builds[0][1]:
        return []
    lines = ["", f"Projection to the full upstream size ({upstream:,} instances; this folder has {written:,}), "
             "from each first build's own rate:", "",
             "| processes | tokenising workers | instances/s | per worker | full size, these workers (min) "
             "| workers for the 30 min goal |", "|---|---|---|---|---|---|"]
    for run_, rank0 in builds:
        rate = written / rank0["seconds"]
        workers = rank0["tokenising_workers"]
        lines.append(f"| {run_['processes']} | {workers} | {rate:.0f} | {rate / workers:.0f} | "
                     f"{upstream / rate / 60:.0f} | {math.ceil(upstream / (rate / workers) / GOALS['first_build_s'])} |")
    if not result["verdict"]["first_build_s"]["met"]:
        run_, rank0 = builds[-1]
        rate = written / rank0["seconds"] / rank0["tokenising_workers"]
        lines += ["", f"Why the first build misses its goal: tokenising is its cost (Tk-Instruct's fit check tokenises "
                  f"each prompt once per example offered, plus the prompt), {rate:.0f} instances/s per worker here; "
                  f"it divides over `data.num_proc` workers (default: all cores, at most 8), and this machine gave "
                  f"{rank0['tokenising_workers']}: the goal needs "
                  f"{math.ceil(upstream / rate / GOALS['first_build_s'])}. It is paid once; later runs load the cache."]
    return lines


def verdict(runs: list[dict]) -> dict:
    """Each goal: the measured figure and whether it is met."""
    def worst(label, key):
        return max(r[key] for run_ in runs if run_["run"] == label for r in run_["ranks"])

    second = [r["peak_rss"] - r["rss_before"] for run_ in runs for r in run_["ranks"] if r["rank"] > 0]
    peak = max(max(r["peak_rss"], r["workers_peak_rss"]) for run_ in runs for r in run_["ranks"])
    out = {"first_build_s": worst("first build", "seconds"), "cached_load_s": worst("cached load", "seconds"),
           "peak_rss_gib": peak / GiB, "second_process_gib": max(second) / GiB if second else None}
    return {k: {"measured": v, "goal": GOALS[k], "met": v is not None and v <= GOALS[k]} for k, v in out.items()}


def render(result: dict, run_info: dict) -> str:
    m = run_info["machine"]
    lines = ["# The data path on a synthetic SNI folder (`data=sni_train`): first build and cached load", "",
             f"Measured {run_info['date']} on {m.get('cpu', '?')} ({m.get('cores')} cores), torch {m.get('torch')}, "
             f"commit {m.get('commit', 'unknown')[:12]}{' (uncommitted changes)' if m.get('dirty') else ''}; "
             f"load average {', '.join(f'{x:.1f}' for x in run_info['load_start'] or [])} at the start.", "",
             f"Command: `{run_info['command']}`", "",
             f"Input: {result['sni_dir']}: {result['tasks']} tasks, {result['train']:,} training + {result['eval']:,} "
             f"evaluation instances after encoding; {result['sni_json_bytes'] / GiB:.2f} GiB of task JSON, "
             f"{result['cache_bytes'] / GiB:.2f} GiB of cache (Arrow). Overrides: {result['overrides'] or 'none'}.", "",
             *([f"The folder: {result['sni_note']}", ""] if result.get("sni_note") else []),
             "| processes | run | rank | data stage (s) | whole run (s) | peak RSS (GiB) | growth in stage (GiB) "
             "| RSS at end: anon / file (GiB) | tokenising workers' peak (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for k in r["ranks"]:
            lines.append(f"| {r['processes']} | {r['run']} | {k['rank']} | {k['seconds']:.1f} | {r['wall_s']:.1f} | "
                         f"{k['peak_rss'] / GiB:.2f} | {(k['peak_rss'] - k['rss_before']) / GiB:.2f} | "
                         f"{k['rss_anon_end'] / GiB:.2f} / {k['rss_file_end'] / GiB:.2f} | "
                         f"{k['workers_peak_rss'] / GiB:.2f} |")
    names = {"first_build_s": "first build (s, slowest process)", "cached_load_s": "cached load (s, slowest process)",
             "peak_rss_gib": "peak RSS per process (GiB, workers included)",
             "second_process_gib": "a second process adds (GiB: rank 1's growth over the data stage)"}
    lines += ["", "| goal (issue 13) | measured | limit | met |", "|---|---|---|---|"]
    for key, v in result["verdict"].items():
        shown = "n/a" if v["measured"] is None else f"{v['measured']:.2f}"
        lines.append(f"| {names[key]} | {shown} | {v['goal']} | {'yes' if v['met'] else 'NO'} |")
    lines += projection(result)
    lines += ["", "Every process and run computed the same data fingerprint "
              f"(`{result['fingerprint'][:16]}…`). Growth counts the file pages a process maps (shared with the page "
              "cache and with the other process) as well as its own memory: an upper bound on what it adds."]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sni-dir", required=True, help="an SNI folder (scripts/make_synthetic_sni.py writes one)")
    p.add_argument("--processes", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--work-dir", default=None, help="where the temporary caches go (default: the system temp dir)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="report folder")
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides after `--` (e.g. model=stories260k)")
    args = p.parse_args(argv)
    try:
        args.processes = [int(n) for n in str(args.processes).split(",")]
    except ValueError:
        raise SystemExit(f"error: --processes={args.processes!r} must be a comma list of integers") from None
    if any(n < 1 for n in args.processes):
        raise SystemExit(f"error: --processes={args.processes} must be positive")
    return args


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        return child(args)
    from benchmarks.bench import load_average, machine

    info = {"command": " ".join(["python", "-m", "benchmarks.data_scale", *argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_start": load_average(),
            "machine": machine()}
    result = run(args)
    info["load_end"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps({**result, "run_info": info}, indent=1) + "\n")
    report = render(result, info)
    (out / "data_scale.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out / 'data_scale.json'} and {out / 'data_scale.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
