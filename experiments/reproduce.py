"""`make reproduce-table PROFILE=smoke|cpu|paper [GPUS=N] [JOBS_PER_NODE=K] [SEEDS=1,2] [DRY_RUN=1]
[LAUNCHER=joblib|slurm] [RECORDS=dir]`.

Runs every job (table x adapter preset x seed) of a profile, as experiments/paper_tables.yaml declares them
(mode.run.tables), then `mode-aggregate <profile>` writes results/<profile>/. Finished runs are reported and reused (a run shared by several tables trains once),
interrupted ones continue from their last checkpoint, new ones start.

With the basic launcher each job is one `mode-train experiment=<profile>/<table> adapter=<preset>
seed=<k> resume=true` process, tables in the order given (`--tables`), seed-major within a table. With
`--records DIR`, a finished job's light record (config, metrics, predictions, routing, curves, data
stats, timings, provenance; never adapters or checkpoints) is copied to DIR/<table path>/<preset>/seed<k>,
and a job whose record is already there with the same config is skipped: work accumulates across
machines through committed records. A record with another config is refused, naming the keys.
`--dry-run` lists the jobs and their state without running anything (no GPU, model or data needed), and
per job the exact command, processes, devices, batch layout, steps, tokens and evaluation size.

GPUs: `--gpus N` runs each job on N processes (torchrun, DDP; the global batch and the result do not
depend on N); `--jobs-per-node K` instead packs K independent jobs side by side, each pinned to its own
N/K GPUs through CUDA_VISIBLE_DEVICES: never two jobs on one device. With the SLURM launcher, `--gpus N`
asks each job for N GPUs and N tasks, and mode-train forms the process group from SLURM's variables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mode.errors import ModeError, exit_on_user_error
from mode.report.aggregate import profile_root, table_specs
from mode.report.cost import cost_lines, eval_cost
from mode.run.config import compose, to_container
from mode.run.fileio import atomic_write_text
from mode.run.resume import also_differ, config_differences
from mode.run.run_dir import FINISHED, RECORD_FILES, run_state

LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=local_parallel"], "slurm": ["hydra/launcher=slurm"]}
RECORDED = "recorded"


def job_list(profile: str, runs_dir: str | None, records: Path | None = None, tables: list[str] | None = None,
             overrides: list[str] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Every (table, preset, seed) of the profile with its run dir, record dir and state; shared runs
    listed once. A record whose config differs from the job's is refused here, before anything runs."""
    specs = table_specs(profile, runs_dir)
    names = tables or list(specs)
    unknown = [t for t in names if t not in specs]
    if unknown:
        raise ModeError(f"--tables: {unknown[0]!r} is not a table of profile {profile!r} ({', '.join(specs)})")
    root = profile_root(specs)
    jobs, seen = [], set()
    for table in names:
        spec = specs[table]
        for seed in seeds or spec["seeds"]:
            for preset in spec["presets"]:
                run_dir = spec["sweep_dir"] / preset / f"seed{seed}"
                record = records / run_dir.relative_to(root) if records else None
                state = "shared" if run_dir in seen else run_state(run_dir)
                seen.add(run_dir)
                if state != "shared" and record is not None and (record / "metrics.json").is_file():
                    check_record(record, profile, table, preset, seed, overrides or [])
                    state = RECORDED if state != FINISHED else FINISHED
                jobs.append({"table": table, "adapter": preset, "seed": seed, "run_dir": run_dir,
                             "record": record, "state": state})
    return jobs


def job_overrides(profile: str, table: str, preset: str, seed: int) -> list[str]:
    return [f"experiment={profile}/{table}", f"adapter={preset}", f"seed={seed}"]


def job_command(profile: str, job: dict, extra: list[str], gpus: int) -> list[str]:
    """The exact command of one job: `python -m mode.train ...`, under torchrun for several processes."""
    launch = [sys.executable, "-m", "mode.train"]
    if gpus > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                  "-m", "mode.train"]
    return [*launch, *job_overrides(profile, job["table"], job["adapter"], job["seed"]),
            f"hydra.run.dir={job['run_dir']}", "resume=true", *extra]


def device_slices(gpus: int, jobs_per_node: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each concurrent slot: K disjoint slices of the node's GPUs."""
    total = max(gpus, 1) * jobs_per_node
    per = total // jobs_per_node
    return [",".join(str(d) for d in range(k * per, (k + 1) * per)) for k in range(jobs_per_node)]


def describe(profile: str, job: dict, extra: list[str], gpus: int, device: str | None) -> str:
    """What a job will do, from its composed config alone (no model or data is loaded)."""
    cfg = compose("train", job_overrides(profile, job["table"], job["adapter"], job["seed"]) + extra)
    t, enc, ev = cfg.train, cfg.data.encoding, cfg.eval
    world = max(gpus, 1)
    micro = t.micro_batch_size or t.batch_size // world
    accum = max(1, t.batch_size // (micro * world))
    tokens = t.max_steps * t.batch_size * (enc.max_source_length + enc.max_target_length)
    cap = ev.max_instances_per_task
    tasks = len(cfg.data.tasks) if cfg.data.get("tasks") else None
    instances = (f"<= {cap * tasks:,} ({cap} per task x {tasks} tasks)" if cap and tasks else
                 f"<= {cap} per task" if cap else "every held-in instance")
    cost = cost_lines(eval_cost(cfg, world), ev.max_new_tokens)  # instances x tokens, from the data config
    return (f"    {world} process(es) on {device or cfg.train.device}; global batch {t.batch_size} = micro {micro} x "
            f"accumulation {accum} x {world}; {t.max_steps:,} steps, <= {tokens:,} tokens to train; evaluate "
            f"{instances}, <= {ev.max_new_tokens} new tokens each, batch {ev.batch_size}; {t.precision}"
            + "".join(f"\n    {line}" for line in cost))


def check_record(record: Path, profile: str, table: str, preset: str, seed: int, overrides: list[str]) -> None:
    """A committed record stands for this job only if it was made with the same config."""
    saved = to_container(OmegaConf.load(record / "config.yaml"))
    resolved = to_container(compose("train", job_overrides(profile, table, preset, seed) + overrides))
    differ = config_differences(resolved, saved)
    if differ:
        key, now, then = differ[0]
        others = also_differ(differ)
        raise ModeError(f"{record}: recorded with {key}={then!r}, but this job has {key}={now!r}{others}; "
                        "record it elsewhere (--records) or move the old record aside")


def copy_record(run_dir: Path, record: Path) -> None:
    """The finished run's light record into `record` (each file written atomically)."""
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        source = run_dir / name
        if source.is_file():
            atomic_write_text(record / name, source.read_text(encoding="utf-8"))


def print_jobs(jobs: list[dict]) -> None:
    width, tw = max(len(j["adapter"]) for j in jobs), max(len(j["table"]) for j in jobs)
    for j in jobs:
        where = j["record"] if j["state"] == RECORDED else j["run_dir"]
        print(f"{j['table']:<{tw}} adapter={j['adapter']:<{width}} seed={j['seed']:<3} {j['state']:<10} {where}")
    todo = sum(j["state"] in ("new", "unfinished") for j in jobs)
    counts = {s: sum(j["state"] == s for j in jobs) for s in (FINISHED, RECORDED, "shared")}
    print(f"{len(jobs)} jobs listed, {todo} to run ({counts[FINISHED]} finished, {counts[RECORDED]} recorded, "
          f"{counts['shared']} shared with an earlier table)", flush=True)


def run_jobs(jobs: list[dict], profile: str, extra: list[str], gpus: int = 1, jobs_per_node: int = 1) -> None:
    """Every job to run as its own process (torchrun for several GPUs), `jobs_per_node` at a time on
    disjoint devices; records copied as each job finishes. A failed job stops the sweep after the running
    ones end; rerunning continues where it stopped."""
    slots = device_slices(gpus, jobs_per_node) if jobs_per_node > 1 else [None]
    free, running, failed = list(slots), {}, []
    todo = [j for j in jobs if j["state"] not in ("shared", RECORDED)]
    while todo or running:
        while todo and free and not failed:
            j, slot = todo.pop(0), free.pop(0)
            if j["state"] == FINISHED:
                finish(j)
                free.append(slot)
                continue
            cmd = job_command(profile, j, extra, gpus)
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})}
            print(("" if slot is None else f"[devices {slot}] ") + "+ " + " ".join(cmd), flush=True)
            running[subprocess.Popen(cmd, env=env)] = (j, slot)
        if not running:
            break
        proc = _wait_any(running)
        j, slot = running.pop(proc)
        free.append(slot)
        if proc.returncode != 0:
            failed.append(j)
        else:
            finish(j)
    if failed:
        j = failed[0]
        sys.exit(f"reproduce: job {j['adapter']} seed {j['seed']} of {j['table']} failed; rerun the same command "
                 "to continue where it stopped")


def _wait_any(running: dict) -> subprocess.Popen:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(2)


def finish(j: dict) -> None:
    if j["record"] is not None:
        copy_record(j["run_dir"], j["record"])
        print(f"recorded {j['record']}", flush=True)


def run_sweeps(jobs: list[dict], profile: str, extra: list[str], seeds: list[int] | None = None) -> None:
    """One Hydra multirun per table (joblib / SLURM launchers fan the jobs out)."""
    for table in dict.fromkeys(j["table"] for j in jobs):
        cmd = [sys.executable, "-m", "mode.train", "-m", f"experiment={profile}/{table}", "resume=true", *extra,
               *([f"seed={','.join(map(str, seeds))}"] if seeds else [])]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"reproduce: the {table} sweep failed; rerun the same command to continue where it stopped")
    for j in jobs:
        if j["record"] is not None and run_state(j["run_dir"]) == FINISHED:
            copy_record(j["run_dir"], j["record"])


def print_plan(jobs: list[dict], args, extra: list[str]) -> None:
    """DRY_RUN: per job to run, the exact command and what it will do."""
    todo = [j for j in jobs if j["state"] in ("new", "unfinished")]
    if args.launcher != "basic":
        for table in dict.fromkeys(j["table"] for j in todo):
            print("+ " + " ".join([sys.executable, "-m", "mode.train", "-m", f"experiment={args.profile}/{table}",
                                   "resume=true", *LAUNCHERS[args.launcher], *extra]))
    slots = device_slices(args.gpus, args.jobs_per_node) if args.jobs_per_node > 1 else [None]
    for k, j in enumerate(todo):
        slot = slots[k % len(slots)]
        device = f"GPUs {slot} (CUDA_VISIBLE_DEVICES)" if slot is not None else None
        if args.launcher == "basic":
            print(("" if slot is None else f"[slot {k % len(slots)}, devices {slot}] ") + "+ "
                  + " ".join(job_command(args.profile, j, extra, args.gpus)))
        else:
            print(f"job {j['table']} {j['adapter']} seed {j['seed']} -> {j['run_dir']}")
        print(describe(args.profile, j, [o for o in extra if not o.startswith("hydra.")], args.gpus, device))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    parser.add_argument("--launcher", default="basic", choices=sorted(LAUNCHERS))
    parser.add_argument("--runs-dir", help="paths.runs_dir for the sweeps (default: as configured)")
    parser.add_argument("--records", help="copy each finished job's light record here; skip jobs recorded there")
    parser.add_argument("--tables", help="comma-separated tables to run, in this order (default: all, by name)")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per job: torchrun DDP (default 1)")
    parser.add_argument("--jobs-per-node", type=int, default=1, help="independent jobs side by side, each on its "
                        "own --gpus devices (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--seeds", help="comma-separated seeds for every table instead of the profile's")
    parser.add_argument("--no-aggregate", action="store_true", help="run the jobs only")
    parser.add_argument("--out", help="results folder (default: results/<profile>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job, e.g. logger=wandb")
    args = parser.parse_args(argv)

    records = Path(args.records).resolve() if args.records else None
    tables = [t.strip() for t in args.tables.split(",")] if args.tables else None
    if args.gpus < 1 or args.jobs_per_node < 1:
        raise ModeError(f"--gpus={args.gpus} and --jobs-per-node={args.jobs_per_node} must be >= 1")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    jobs = job_list(args.profile, args.runs_dir, records, tables, args.overrides, seeds)
    print_jobs(jobs)
    extra = ([f"paths.runs_dir={args.runs_dir}"] if args.runs_dir else []) + args.overrides
    if args.launcher == "slurm" and args.gpus > 1:
        extra += [f"hydra.launcher.gpus_per_node={args.gpus}", f"hydra.launcher.tasks_per_node={args.gpus}"]
    if args.dry_run:
        print_plan(jobs, args, extra)
        return
    start = time.perf_counter()
    if args.launcher == "basic":
        run_jobs(jobs, args.profile, extra, args.gpus, args.jobs_per_node)
    else:
        run_sweeps(jobs, args.profile, LAUNCHERS[args.launcher] + extra, seeds)
    print(f"sweeps done in {time.perf_counter() - start:.0f} s", flush=True)
    if args.no_aggregate:
        return
    aggregate = [sys.executable, "-m", "mode.report.aggregate", args.profile]
    aggregate += (["--runs-dir", args.runs_dir] if args.runs_dir else []) + (["--out", args.out] if args.out else [])
    aggregate += ["--records", str(records)] if records else []
    sys.exit(subprocess.run(aggregate).returncode)


if __name__ == "__main__":
    main()
