"""`make reproduce-table PROFILE=smoke|cpu|paper [DRY_RUN=1] [LAUNCHER=joblib|slurm]`.

Runs each table of a profile as one Hydra multirun (`mode-train -m experiment=<profile>/<table>
resume=true`): finished runs are reported and reused (a run shared by several tables trains once),
interrupted ones continue from their last checkpoint, new ones start. Then `mode-aggregate <profile>`
writes results/<profile>/. `--dry-run` lists the jobs and their state without running anything (no GPU,
model or data needed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from mode.aggregate import table_specs
from mode.errors import exit_on_user_error
from mode.run_dir import run_state

LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=local_parallel"], "slurm": ["hydra/launcher=slurm"]}


def job_list(profile: str, runs_dir: str | None) -> list[dict]:
    """Every (table, preset, seed) of the profile with its run dir and state; shared runs listed once."""
    jobs, seen = [], set()
    for table, spec in table_specs(profile, runs_dir).items():
        for preset in spec["presets"]:
            for seed in spec["seeds"]:
                run_dir = spec["sweep_dir"] / preset / f"seed{seed}"
                shared = run_dir in seen
                seen.add(run_dir)
                jobs.append({"table": table, "adapter": preset, "seed": seed, "run_dir": run_dir,
                             "state": "shared" if shared else run_state(run_dir)})
    return jobs


def print_jobs(jobs: list[dict]) -> None:
    width = max(len(j["adapter"]) for j in jobs)
    for j in jobs:
        print(f"{j['table']:<8} adapter={j['adapter']:<{width}} seed={j['seed']:<3} {j['state']:<10} {j['run_dir']}")
    todo = sum(j["state"] in ("new", "unfinished") for j in jobs)
    print(f"{len(jobs)} jobs listed, {todo} to run ({sum(j['state'] == 'finished' for j in jobs)} finished, "
          f"{sum(j['state'] == 'shared' for j in jobs)} shared with an earlier table)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    parser.add_argument("--launcher", default="basic", choices=sorted(LAUNCHERS))
    parser.add_argument("--runs-dir", help="paths.runs_dir for the sweeps (default: as configured)")
    parser.add_argument("--out", help="results folder (default: results/<profile>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job, e.g. logger=wandb")
    args = parser.parse_args(argv)

    jobs = job_list(args.profile, args.runs_dir)
    print_jobs(jobs)
    if args.dry_run:
        return
    extra = LAUNCHERS[args.launcher] + ([f"paths.runs_dir={args.runs_dir}"] if args.runs_dir else []) + args.overrides
    start = time.perf_counter()
    for table in dict.fromkeys(j["table"] for j in jobs):
        cmd = [sys.executable, "-m", "mode.train", "-m", f"experiment={args.profile}/{table}", "resume=true", *extra]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"reproduce: the {table} sweep failed; rerun the same command to continue where it stopped")
    print(f"sweeps done in {time.perf_counter() - start:.0f} s", flush=True)
    aggregate = [sys.executable, "-m", "mode.aggregate", args.profile]
    aggregate += (["--runs-dir", args.runs_dir] if args.runs_dir else []) + (["--out", args.out] if args.out else [])
    sys.exit(subprocess.run(aggregate).returncode)


if __name__ == "__main__":
    main()
