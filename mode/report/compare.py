"""`mode-compare RUN_A RUN_B [RUN_C ...]`: task-level win rates between runs (MoDE paper, Table 3).

Reads each run directory's metrics.json (and predictions.jsonl, when present, to check that the runs
evaluated the same instances). For each pair it reports how often one run's per-task score beats the
other's, with two confidence measures that treat tasks as the unit: an exact two-sided sign test
(ties dropped) and a paired bootstrap over tasks for the win rate and the mean per-task difference.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mode.errors import ModeError, exit_on_user_error

TASK_KEY = re.compile(r"^task\d+")
METRICS = ("rougeL", "exact_match")


@dataclass
class Run:
    label: str
    overall: float
    scores: dict[str, float]               # task -> metric
    instances: dict[str, frozenset] | None  # task -> evaluated instance ids (None without predictions.jsonl)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModeError(f"{path}: not found (is {path.parent} a mode run directory?)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModeError(f"{path}: not valid JSON ({err})") from err


def load_run(run_dir, metric: str = "rougeL") -> Run:
    """Per-task scores of a run (its `per_task` table, or `<metric>_for_task...` keys of older runs)."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict) or metric not in metrics:
        raise ModeError(f"{run_dir / 'metrics.json'}: has no {metric!r} key")
    if isinstance(metrics.get("per_task"), dict):
        scores = {task: row[metric] for task, row in metrics["per_task"].items()}
    else:
        prefix = f"{metric}_for_"
        scores = {k[len(prefix):]: v for k, v in metrics.items()
                  if k.startswith(prefix) and TASK_KEY.match(k[len(prefix):])}
    if not scores:
        raise ModeError(f"{run_dir / 'metrics.json'}: no per-task {metric} scores")
    instances = None
    predictions = run_dir / "predictions.jsonl"
    if predictions.is_file():
        by_task = defaultdict(set)
        for n, line in enumerate(predictions.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                by_task[row["task"]].add(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ModeError(f"{predictions}: line {n} is not a prediction row with 'task' and 'id' ({err})") from err
        instances = {task: frozenset(ids) for task, ids in by_task.items()}
    return Run(label=str(run_dir), overall=metrics[metric], scores=scores, instances=instances)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins vs losses under p = 1/2 (ties already dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_pair(a: Run, b: Run, n_boot: int = 10000, seed: int = 0) -> dict:
    """Win/loss/tie counts over the tasks both runs scored, the sign test, and bootstrap intervals."""
    import numpy as np

    tasks = sorted(set(a.scores) & set(b.scores))
    if not tasks:
        raise ModeError(f"{a.label} and {b.label} share no evaluated task")
    if a.instances is not None and b.instances is not None:
        differ = [t for t in tasks if a.instances.get(t) != b.instances.get(t)]
        if differ:
            t = differ[0]
            raise ModeError(
                f"{a.label} and {b.label} evaluated different instances of {len(differ)} task(s), e.g. {t} "
                f"({len(a.instances.get(t, ()))} vs {len(b.instances.get(t, ()))} instances); compare runs with the "
                "same data split (data.split_seed, data.protocol) and eval.max_instances_per_task")
    diff = np.array([a.scores[t] - b.scores[t] for t in tasks], dtype=np.float64)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    rng = np.random.default_rng(seed)
    sample = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))]
    win_rates, means = (sample > 0).mean(axis=1), sample.mean(axis=1)
    return {
        "a": a.label, "b": b.label, "tasks": len(tasks), "wins": wins, "losses": losses,
        "ties": len(tasks) - wins - losses, "win_rate": wins / len(tasks), "loss_rate": losses / len(tasks),
        "win_rate_ci95": [float(np.quantile(win_rates, 0.025)), float(np.quantile(win_rates, 0.975))],
        "sign_test_p": sign_test(wins, losses),
        "mean_difference": float(diff.mean()),
        "mean_difference_ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "per_task": {t: [a.scores[t], b.scores[t]] for t in tasks},
    }


def _pair_text(r: dict, metric: str, names=("A", "B")) -> str:
    a, b = names
    lo, hi = r["win_rate_ci95"]
    dlo, dhi = r["mean_difference_ci95"]
    return "\n".join([
        f"task-level {metric}, {r['tasks']} tasks in common",
        f"  {a} beats {b} on {r['wins']} tasks ({100 * r['win_rate']:.1f}%, 95% CI {100 * lo:.1f}-{100 * hi:.1f}), "
        f"{b} beats {a} on {r['losses']} ({100 * r['loss_rate']:.1f}%), {r['ties']} tie(s)",
        f"  sign test (two-sided, ties dropped): p = {r['sign_test_p']:.3g}",
        f"  mean per-task difference {a} - {b}: {r['mean_difference']:+.2f} (95% bootstrap CI {dlo:+.2f} to {dhi:+.2f})",
    ])


def report(runs: list[Run], metric: str, per_task: bool, n_boot: int, seed: int) -> tuple[str, dict]:
    names = [chr(ord("A") + i) for i in range(len(runs))]
    lines = [f"{n} = {r.label}  ({metric} {r.overall:.2f} over {len(r.scores)} tasks)" for n, r in zip(names, runs)]
    pairs = {}
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            pairs[(i, j)] = compare_pair(runs[i], runs[j], n_boot, seed)
    if len(runs) == 2:
        r = pairs[(0, 1)]
        lines += ["", _pair_text(r, metric)]
        if per_task:
            lines += ["", f"{'task':<60} {'A':>8} {'B':>8} {'A-B':>8}"]
            for t, (x, y) in sorted(r["per_task"].items(), key=lambda kv: kv[1][1] - kv[1][0]):
                lines.append(f"{t[:60]:<60} {x:8.2f} {y:8.2f} {x - y:+8.2f}")
    else:
        lines += ["", f"task-level win rate, row beats column ({metric}; sign-test p in brackets)"]
        lines.append(" " * 4 + "".join(f"{n:>18}" for n in names))
        for i, n in enumerate(names):
            cells = []
            for j in range(len(runs)):
                if i == j:
                    cells.append(f"{'-':>18}")
                    continue
                r = pairs[(min(i, j), max(i, j))]
                rate = r["win_rate"] if i < j else r["loss_rate"]
                cells.append(f"{100 * rate:>8.1f}% (p={r['sign_test_p']:.2g})".rjust(18))
            lines.append(f"{n:<4}" + "".join(cells))
        for (i, j), r in pairs.items():
            lines += ["", f"{names[i]} vs {names[j]}: " + _pair_text(r, metric, (names[i], names[j]))]
    data = {"metric": metric, "runs": [{"name": n, "dir": r.label, metric: r.overall} for n, r in zip(names, runs)],
            "pairs": [{k: v for k, v in r.items() if per_task or k != "per_task"} for r in pairs.values()]}
    return "\n".join(lines), data


@exit_on_user_error
def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mode-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or mode-eval output folders)")
    parser.add_argument("--metric", choices=METRICS, default="rougeL")
    parser.add_argument("--per-task", action="store_true", help="list every task's scores (two runs)")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples over tasks")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise ModeError("mode-compare needs at least two run directories")
    if args.bootstrap < 1:
        raise ModeError(f"--bootstrap={args.bootstrap} must be a positive integer")
    runs = [load_run(d, args.metric) for d in args.runs]
    text, data = report(runs, args.metric, args.per_task, args.bootstrap, args.seed)
    print(json.dumps(data, indent=2) if args.json else text)


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
