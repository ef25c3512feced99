"""The analysis behind `mode-aggregate`'s tables: seed intervals, paired differences, win rates, routing
specialisation and learning curves, with the tables and plots that show them.

Every statistic here is a pure function of the run records it is given, with fixed RNG seeds: the same
records give the same numbers (rounded to 6 decimals in summary.json) and the same bytes.

Procedures (what a reader of the tables needs to know):

- **Configuration mean** (`seed_ci`): mean ROUGE-L over a configuration's seeds with a 95% Student-t
  interval, mean ± t(0.975, n-1) · sd / sqrt(n); no interval for one seed.
- **Paired difference** (`paired_difference`): d[s, i] = ROUGE-L of the method minus that of the reference
  on instance i (matched by instance id) for seed s (seeds both ran); the estimate is the mean of d. Its
  95% interval is a two-level percentile bootstrap (`two_level_bootstrap`): each resample draws the seeds
  with replacement and, independently, the instances with replacement (one draw of instances shared by
  all drawn seeds and by both methods, since d is formed before resampling), and takes the mean of d over
  the drawn seeds x drawn instances. Resampling few seeds understates seed-to-seed variance (by (n-1)/n, and
  3 seeds have only 10 distinct resamples), so when seed variance dominates, 3-4 seeds give an interval that
  covers less than 95% (simulated: about 84% with 4 seeds and seed variance as large as the instance
  terms' share); with 5+ seeds and realistic instance noise it covers about 95% (tests/test_analysis.py).
  The p-value is a two-sided paired sign-flip permutation test
  (`sign_flip_p`) on the per-instance seed-averaged differences: under "no difference" each instance's
  difference is as likely to have either sign. The test holds the trained models fixed (it asks whether
  these runs differ on this population of instances); the bootstrap interval also carries seed-to-seed
  variation, so with few seeds the interval can include 0 while p is small: read both.
- **Task-level win rate** (`task_win_rate`, the paper's Table 3): each task's ROUGE-L averaged over the
  seeds both methods ran; wins / (wins + losses) over tasks, **ties excluded** (as in the sign test), with
  a 95% Wilson score interval over the tasks that are not ties.
- **Routing specialisation** (`routing_specialisation`): for each routed layer, router block and task, the
  task's mean gate distribution over the experts (routing.json `task_usage`); its entropy normalised by
  log(experts) (1 = uniform); the Jensen-Shannon divergence between two tasks' distributions, normalised
  by log 2 (0 = same usage, 1 = disjoint experts), averaged over task pairs and then router blocks.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np

from mode.errors import ModeError
from mode.run.fileio import atomic_path

Z975 = 1.959963984540054  # standard normal 0.975 quantile

# Two-sided 95% critical values of Student's t, t(0.975, df) for df = 1..30: the standard table (e.g. the
# NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2, "Critical values of the Student's t
# distribution", there to 3 decimals; here to 8 significant digits, as scipy.stats.t.ppf(0.975, df) gives).
T975 = (12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425, 2.30600414,
        2.26215716, 2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669, 2.13144955, 2.11990530,
        2.10981558, 2.10092204, 2.09302405, 2.08596345, 2.07961384, 2.07387307, 2.06865761, 2.06389856,
        2.05953855, 2.05552944, 2.05183052, 2.04840714, 2.04522964, 2.04227246)

N_BOOT = 10_000     # bootstrap resamples of a paired difference
N_BOOT_TASK = 2_000  # ... of a per-task paired difference (plots)
N_PERM = 10_000     # sign flips of the permutation test
RNG_SEED = 0        # every resampling starts from this seed: the same records give the same numbers


def _r(x, digits: int = 6):
    return None if x is None else round(float(x), digits) + 0.0  # + 0.0: no "-0" in the tables


# -- seeds: t interval -----------------------------------------------------------------------------------
def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table above for df <= 30, beyond it the Cornish-Fisher expansion of the t quantile
    in the normal one (Abramowitz & Stegun 26.7.5; error < 1e-6 for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z, n = Z975, float(df)
    return (z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4))


def seed_ci(values: list[float]) -> dict:
    """Mean over seeds with its 95% t interval: {n, mean, sd, half_width, ci95} (no interval for n < 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "half_width": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "half_width": None, "ci95": None}
    sd = statistics.stdev(values)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half_width": half, "ci95": [mean - half, mean + half]}


# -- paired differences: two-level bootstrap, sign-flip test -----------------------------------------------
def two_level_bootstrap(d, n_boot: int = N_BOOT, seed: int = RNG_SEED, chunk: int = 1000) -> np.ndarray:
    """Bootstrap replicates of mean(d) for d[seeds, instances]: each replicate draws the seeds with
    replacement (multinomial counts c over seeds) and, independently, the instances with replacement
    (counts w over instances, the same for every drawn seed), and returns c·d·w / (n_seeds · n_instances),
    the mean of d over the drawn seed x instance grid. One seed: only the instances vary."""
    d = np.asarray(d, dtype=np.float64)
    n, m = d.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        seeds = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)      # k x n
        instances = rng.multinomial(m, np.full(m, 1.0 / m), size=k).astype(np.float64)  # k x m
        out[start:start + k] = ((seeds @ d) * instances).sum(axis=1) / (n * m)
    return out


def percentile_ci(replicates: np.ndarray) -> list[float]:
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return [float(lo), float(hi)]


def sign_flip_p(diffs, n_perm: int = N_PERM, seed: int = RNG_SEED, chunk: int = 1000) -> float:
    """Two-sided paired permutation test of mean(diffs) = 0 by random sign flips of the per-unit
    differences: p = (1 + #{|mean(e·diffs)| >= |mean(diffs)|}) / (1 + n_perm), e uniform in {-1, +1}^n."""
    diffs = np.asarray(diffs, dtype=np.float64)
    observed = abs(diffs.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        signs = rng.integers(0, 2, size=(k, len(diffs))) * 2.0 - 1.0
        hits += int((np.abs(signs @ diffs) / len(diffs) >= observed - 1e-9).sum())
    return (hits + 1) / (n_perm + 1)


def paired_difference(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], tasks: dict[str, str],
                      n_boot: int = N_BOOT, n_perm: int = N_PERM, seed: int = RNG_SEED) -> dict | None:
    """Method a minus reference b from per-instance scores {seed: {instance id: ROUGE-L}}, paired by seed
    (seeds in both) and by instance id (ids that every paired run scored); `tasks` maps ids to tasks.
    Returns the mean difference, its two-level bootstrap 95% CI, the sign-flip p-value, the per-seed and
    per-task means (each task with its own bootstrap CI) and the counts; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    ids = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    ids = sorted(ids, key=lambda i: (tasks.get(i, ""), i))
    if not ids:
        return None
    d = np.array([[a[s][i] - b[s][i] for i in ids] for s in seeds], dtype=np.float64)
    per_task = {}
    by_task: dict[str, list[int]] = {}
    for j, i in enumerate(ids):
        by_task.setdefault(tasks.get(i, "?"), []).append(j)
    for task in sorted(by_task, key=task_number):
        sub = d[:, by_task[task]]
        per_task[task] = {"difference": _r(sub.mean()), "n_instances": sub.shape[1],
                          "ci95": [_r(x) for x in percentile_ci(two_level_bootstrap(sub, N_BOOT_TASK, seed))]}
    return {
        "difference": _r(d.mean()),
        "ci95": [_r(x) for x in percentile_ci(two_level_bootstrap(d, n_boot, seed))],
        "p_value": _r(sign_flip_p(d.mean(axis=0), n_perm, seed)),
        "seeds": seeds, "n_seeds": len(seeds), "n_instances": len(ids), "n_tasks": len(by_task),
        "per_seed": {str(s): _r(d[k].mean()) for k, s in enumerate(seeds)},
        "per_task": per_task,
    }


# -- task-level win rates -------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z975) -> list[float] | None:
    """95% Wilson score interval for a binomial proportion k/n (None for n = 0)."""
    if n == 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def task_win_rate(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> dict | None:
    """Row method a against column method b from per-task scores {seed: {task: ROUGE-L}}: each task's score
    averaged over the seeds both ran, then wins / losses / ties over the tasks both scored. The win rate
    excludes ties (wins / (wins + losses), in %), with a 95% Wilson interval over those tasks and the exact
    two-sided sign test. None without a common seed or task."""
    from mode.report.compare import sign_test

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    tasks = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)), key=task_number)
    if not tasks:
        return None
    diff = {t: statistics.fmean(a[s][t] for s in seeds) - statistics.fmean(b[s][t] for s in seeds) for t in tasks}
    wins = sum(1 for v in diff.values() if v > 0)
    losses = sum(1 for v in diff.values() if v < 0)
    decided = wins + losses
    ci = wilson_interval(wins, decided)
    return {"win_rate": _r(100.0 * wins / decided) if decided else None,
            "win_rate_ci95": [_r(100.0 * x) for x in ci] if ci else None,
            "wins": wins, "losses": losses, "ties": len(tasks) - decided, "tasks": len(tasks),
            "sign_test_p": _r(sign_test(wins, losses)), "paired_seeds": seeds,
            "mean_task_difference": _r(statistics.fmean(diff.values()))}


# -- routing ----------------------------------------------------------------------------------------------
def _plogp(p: np.ndarray) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * np.log(safe), 0.0)


def normalized_entropy(p, axis: int = -1) -> np.ndarray:
    """Entropy of distributions along `axis` divided by log(size): 1 for uniform, 0 for one-hot."""
    p = np.asarray(p, dtype=np.float64)
    size = p.shape[axis]
    if size < 2:
        return np.zeros(np.delete(p.shape, axis % p.ndim))
    return -_plogp(p).sum(axis=axis) / math.log(size)


def js_divergence(p, q, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence of distributions along `axis`, divided by log 2 (0 same, 1 disjoint)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    h = lambda x: -_plogp(x).sum(axis=axis)  # noqa: E731
    return np.clip((h(m) - (h(p) + h(q)) / 2) / math.log(2), 0.0, 1.0)


def layer_order(path: str) -> list:
    """Natural order of module paths: layers.2 before layers.10."""
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", path)]


def routing_specialisation(routing: dict) -> dict | None:
    """Per routed layer with `task_usage` (routing.json): the tasks' [task, block, expert] gate
    distributions (each renormalised to sum 1), the mean pairwise JS divergence between tasks (averaged over
    blocks) and each task's normalised entropy (averaged over blocks); then the means over layers. None
    when no layer has per-task usage for two tasks (older records)."""
    layers = {}
    for path, record in (routing or {}).get("routed_layers", {}).items():
        usage = record.get("task_usage") or {}
        tasks = sorted(usage, key=task_number)
        if len(tasks) < 2:
            continue
        u = np.array([usage[t] for t in tasks], dtype=np.float64)  # task x block x expert
        totals = u.sum(axis=-1, keepdims=True)
        u = np.divide(u, totals, out=np.full_like(u, 1.0 / u.shape[-1]), where=totals > 0)
        pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
        js = js_divergence(u[[i for i, _ in pairs]], u[[j for _, j in pairs]])  # pair x block
        entropy = normalized_entropy(u)                                          # task x block
        layers[path] = {"js": float(js.mean()), "js_by_block": js.mean(axis=0).tolist(),
                        "task_entropy": dict(zip(tasks, entropy.mean(axis=1).tolist())),
                        "tasks": tasks, "usage": u}
    if not layers:
        return None
    tasks = sorted(set.intersection(*(set(v["tasks"]) for v in layers.values())), key=task_number)
    return {"layers": layers, "mean_js": statistics.fmean(v["js"] for v in layers.values()),
            "task_entropy": {t: statistics.fmean(v["task_entropy"][t] for v in layers.values()) for t in tasks},
            "overall_entropy": routing.get("mean_normalized_entropy")}


def routing_block(per_seed: dict[int, dict], top: int = 3) -> dict | None:
    """A configuration's routing summary over its seeds: mean JS (over layers, then seeds), each layer's JS
    (mean over seeds), the top layers, per-task entropies, and the heatmap data of its lowest seed's `top`
    layers of highest JS (experts are not aligned across seeds, so usage is never averaged over seeds)."""
    analyses = {s: a for s, a in ((s, routing_specialisation(r)) for s, r in sorted(per_seed.items())) if a}
    if not analyses:
        return None
    layers = sorted(set.intersection(*(set(a["layers"]) for a in analyses.values())), key=layer_order)
    layer_js = {p: statistics.fmean(a["layers"][p]["js"] for a in analyses.values()) for p in layers}
    tasks = sorted(set.intersection(*(set(a["task_entropy"]) for a in analyses.values())), key=task_number)
    task_entropy = {t: statistics.fmean(a["task_entropy"][t] for a in analyses.values()) for t in tasks}
    ranked = sorted(layers, key=lambda p: (-layer_js[p], layer_order(p)))[:top]
    first_seed = min(analyses)
    first = analyses[first_seed]["layers"]
    heat_layers = sorted(first, key=lambda p: (-first[p]["js"], layer_order(p)))[:top]
    overall = [a["overall_entropy"] for a in analyses.values() if a["overall_entropy"] is not None]
    return {
        "seeds": sorted(analyses), "n_layers": len(layers),
        "mean_js": _r(statistics.fmean(a["mean_js"] for a in analyses.values())),
        "seed_mean_js": {str(s): _r(a["mean_js"]) for s, a in analyses.items()},
        "layer_js": {p: _r(v) for p, v in layer_js.items()},
        "top_layers": [[p, _r(layer_js[p])] for p in ranked],
        "task_entropy": {t: _r(v) for t, v in task_entropy.items()},
        "mean_task_entropy": _r(statistics.fmean(task_entropy.values())) if task_entropy else None,
        "overall_entropy": _r(statistics.fmean(overall)) if overall else None,
        "heatmap": {"seed": first_seed, "layers": [
            {"layer": p, "js": _r(first[p]["js"]), "tasks": first[p]["tasks"],
             "usage": np.round(first[p]["usage"], 4).tolist()} for p in heat_layers]},
    }


# -- learning curves ------------------------------------------------------------------------------------
def _series(points: list[dict], key: str) -> dict[int, float]:
    """step -> value of `key` (the last record of a step wins: a resumed run may repeat steps)."""
    out = {}
    for row in points:
        if row.get(key) is not None and row.get("step") is not None:
            out[int(row["step"])] = float(row[key])
    return out


def _mean_curve(per_seed: dict[int, dict[int, float]], digits: int = 4) -> dict | None:
    per_seed = {s: c for s, c in per_seed.items() if c}
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(c) for c in per_seed.values())))
    return {"steps": steps, "mean": [_r(statistics.fmean(c[t] for c in per_seed.values()), digits) for t in steps],
            "seeds": sorted(per_seed)}


def curves_block(curves: dict[int, dict]) -> dict | None:
    """A configuration's curves over its seeds ({seed: curves.json}): eval ROUGE-L on the curve subset at
    each evaluated step (mean and each seed), training loss and routing entropy (mean over seeds) at the
    steps every seed logged."""
    if not curves:
        return None
    evals = {s: _series(c.get("eval", []), "rougeL") for s, c in curves.items()}
    out = {"eval": _mean_curve(evals),
           "train_loss": _mean_curve({s: _series(c.get("train", []), "train/loss") for s, c in curves.items()}),
           "routing_entropy": _mean_curve({s: _series(c.get("train", []), "routing/normalized_entropy")
                                           for s, c in curves.items()}, 6)}
    if out["eval"]:
        out["eval"]["per_seed"] = {str(s): [_r(evals[s][t], 4) for t in out["eval"]["steps"]]
                                   for s in out["eval"]["seeds"]}
    return out if any(out.values()) else None


# -- run records ----------------------------------------------------------------------------------------
def task_number(task: str) -> tuple:
    head = task.split("_")[0]
    return (int(head[4:]) if head[4:].isdigit() else 10**9, task)


def instance_rouge(run: Path) -> tuple[dict[str, float], dict[str, str]] | None:
    """({instance id: ROUGE-L x 100}, {instance id: task}) from a run's predictions.jsonl (None without it)."""
    from mode.evaluation.metrics import instance_scores

    path = Path(run) / "predictions.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ModeError(f"{path}: instance ids repeat; paired comparisons match instances by id")
    scores = instance_scores([r.get("prediction") or "" for r in rows], [r["references"] for r in rows])
    return ({r["id"]: 100.0 * s[1] for r, s in zip(rows, scores)}, {r["id"]: r["task"] for r in rows})


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# -- tables -------------------------------------------------------------------------------------------------
def _sgn(x, digits=2) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def _p(p) -> str:
    return "" if p is None else f"{p:.2g}"


def _csv(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return out.getvalue()


def _markdown(title: str, header: list[str], align: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def tex_escape(text: str) -> str:
    return (text.replace("%", r"\%").replace("&", r"\&").replace("_", r"\_").replace("±", r"$\pm$")
            .replace("−", "--"))


def _latex(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
             r"\toprule", " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + tex_escape(title) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


PAIRED_HEADER = ["method", "reference", "difference", "95% CI", "p (permutation)", "seeds", "instances", "tasks"]


def _paired_cells(r: dict) -> list[str]:
    lo, hi = r["ci95"]
    return [r["method"], r["reference"], _sgn(r["difference"]), f"{_sgn(lo)} to {_sgn(hi)}", _p(r["p_value"]),
            str(r["n_seeds"]), str(r["n_instances"]), str(r["n_tasks"])]


def paired_notes(block: dict) -> list[str]:
    proc = block["procedure"]
    return [f"Difference: mean over paired seeds (seeds both ran) and paired instances (matched by id) of the "
            f"per-instance ROUGE-L difference, method minus reference. 95% CI: two-level percentile bootstrap, "
            f"{proc['n_boot']} resamples of the seeds and, independently, the instances (with replacement; one "
            f"instance draw for every drawn seed and both methods), RNG seed {proc['rng_seed']}. p: two-sided "
            f"paired permutation test, {proc['n_perm']} random sign flips of the per-instance seed-averaged "
            f"differences, RNG seed {proc['rng_seed']}; it holds the trained runs fixed, the CI also carries "
            "seed-to-seed variation."]


def paired_markdown(block: dict) -> str:
    return _markdown(block["title"], PAIRED_HEADER, ["---", "---"] + ["---:"] * 6,
                     [_paired_cells(r) for r in block["rows"]], paired_notes(block))


def paired_csv(block: dict) -> str:
    return _csv(["method", "reference", "difference", "ci95_lo", "ci95_hi", "p_value", "seeds", "instances", "tasks"],
                [[r["method"], r["reference"], r["difference"], r["ci95"][0], r["ci95"][1], r["p_value"],
                  r["n_seeds"], r["n_instances"], r["n_tasks"]] for r in block["rows"]])


def paired_latex(block: dict) -> str:
    return _latex(block["title"], PAIRED_HEADER, [_paired_cells(r) for r in block["rows"]])


ROUTING_HEADER = ["adapter", "seeds", "layers", "JS between tasks", "top layers (JS)", "task entropy",
                  "overall entropy"]


def _short_layer(path: str) -> str:
    return path.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def _routing_cells(label: str, r: dict) -> list[str]:
    seeds = list(r["seed_mean_js"].values())
    spread = f" ({min(seeds):.3f}-{max(seeds):.3f})" if len(seeds) > 1 else ""
    ent = list(r["task_entropy"].values())
    return [label, str(len(r["seeds"])), str(r["n_layers"]), f"{r['mean_js']:.3f}{spread}",
            ", ".join(f"{_short_layer(p)} {v:.3f}" for p, v in r["top_layers"]),
            f"{r['mean_task_entropy']:.3f} ({min(ent):.3f}-{max(ent):.3f})" if ent else "",
            "" if r["overall_entropy"] is None else f"{r['overall_entropy']:.3f}"]


def routing_notes() -> list[str]:
    return ["JS between tasks: Jensen-Shannon divergence between two tasks' mean gate distributions over a router "
            "block's experts (routing.json task_usage, evaluation tokens), divided by log 2 (0: the tasks use the "
            "experts alike, 1: disjoint experts), averaged over task pairs, router blocks and routed layers, then "
            "seeds (range over seeds in brackets); top layers: highest JS (mean over seeds). Task entropy: each "
            "task's gate distribution's entropy / log(experts) (1: uniform), averaged over blocks, layers and "
            "seeds; mean over tasks (range over tasks). Overall entropy: routing.json mean_normalized_entropy "
            "(per token, all tasks)."]


def routing_markdown(block: dict) -> str:
    rows = [_routing_cells(r["label"], r) for r in block["configs"]]
    return _markdown(block["title"], ROUTING_HEADER, ["---"] + ["---:"] * 6, rows, routing_notes())


def routing_csv(block: dict) -> str:
    rows = []
    for r in block["configs"]:
        top = r["top_layers"] + [[None, None]] * (3 - len(r["top_layers"]))
        rows.append([r["label"], len(r["seeds"]), r["n_layers"], r["mean_js"], *[x for pair in top[:3] for x in pair],
                     r["mean_task_entropy"], r["overall_entropy"]])
    return _csv(["adapter", "seeds", "layers", "mean_js", "top1_layer", "top1_js", "top2_layer", "top2_js",
                 "top3_layer", "top3_js", "mean_task_entropy", "overall_entropy"], rows)


def routing_latex(block: dict) -> str:
    return _latex(block["title"], ROUTING_HEADER, [_routing_cells(r["label"], r) for r in block["configs"]])


# -- plots ------------------------------------------------------------------------------------------------
def save_png(fig, path: Path) -> None:
    """PNG with no time or version metadata: the same figure gives the same bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD"]


def short_task(task: str) -> str:
    return task.split("_")[0]


def plot_paired(block: dict, path: Path) -> None:
    """Per-task paired differences (method - reference) with bootstrap CIs, one panel per reference; the
    top row of each panel is the overall difference."""
    plt = _pyplot()
    refs = block["references"]
    tasks = sorted({t for r in block["rows"] for t in r["per_task"]}, key=task_number)
    methods = list(dict.fromkeys(r["method"] for r in block["rows"]))
    fig, axes = plt.subplots(1, len(refs), figsize=(5.2 * len(refs), 0.32 * (len(tasks) + 1) * max(1, len(methods)) + 1.8),
                             squeeze=False)
    ylabels = ["all"] + [short_task(t) for t in tasks]
    for ax, ref in zip(axes[0], refs):
        rows = [r for r in block["rows"] if r["reference"] == ref]
        width = 0.8 / max(1, len(rows))
        for k, r in enumerate(rows):
            color = COLORS[methods.index(r["method"]) % len(COLORS)]
            vals = [r["difference"]] + [r["per_task"].get(t, {}).get("difference", math.nan) for t in tasks]
            cis = [r["ci95"]] + [r["per_task"].get(t, {}).get("ci95", [math.nan, math.nan]) for t in tasks]
            y = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(vals))]
            err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
            ax.barh(y, vals, height=width, xerr=err, color=color, capsize=2, error_kw={"lw": 0.8},
                    label=f"{r['method']} ({r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''})")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels(ylabels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"ROUGE-L difference vs {ref} (95% CI)")
        ax.set_title(f"method - {ref}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(block["title"], fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    core = np.convolve(values, kernel, mode="valid")
    return [math.nan] * (window - 1) + core.tolist()


def plot_curves(block: dict, per_seed: dict[str, dict[int, dict]], title: str, path: Path) -> None:
    """Eval ROUGE-L (curve subset) and training loss against step per configuration: mean over seeds thick,
    each seed thin; the loss is a running mean over `window` logged steps."""
    plt = _pyplot()
    fig, (ev, loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    window = 1
    for k, (label, c) in enumerate(block.items()):
        color = COLORS[k % len(COLORS)]
        if c.get("eval"):
            e = c["eval"]
            for vals in e["per_seed"].values():
                ev.plot(e["steps"], vals, color=color, lw=0.6, alpha=0.35)
            ev.plot(e["steps"], e["mean"], color=color, lw=2, marker="o", ms=3, label=f"{label} (n={len(e['seeds'])})")
        if c.get("train_loss"):
            t = c["train_loss"]
            window = max(1, len(t["steps"]) // 15)
            for s in t["seeds"]:
                series = _series(per_seed[label][s].get("train", []), "train/loss")
                steps = sorted(series)
                loss.plot(steps, _smooth([series[x] for x in steps], window), color=color, lw=0.6, alpha=0.35)
            loss.plot(t["steps"], _smooth(t["mean"], window), color=color, lw=2, label=label)
    ev.set_xlabel("step")
    ev.set_ylabel("ROUGE-L (curve subset; last point: final)")
    ev.set_title("evaluation ROUGE-L (mean over seeds; thin: seeds)", fontsize=9)
    loss.set_xlabel("step")
    loss.set_ylabel("training loss")
    loss.set_title(f"training loss (running mean of {window} steps; thin: seeds)", fontsize=9)
    for ax in (ev, loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_routing_entropy(block: dict, per_seed: dict[str, dict[int, dict]], title: str, path: Path) -> bool:
    """Routing normalised entropy over training steps, each mixture configuration (mean thick, seeds thin)."""
    configs = {label: c for label, c in block.items() if c.get("routing_entropy")}
    if not configs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, c) in enumerate(block.items()):
        if label not in configs:
            continue
        color, r = COLORS[k % len(COLORS)], c["routing_entropy"]
        for s in r["seeds"]:
            series = _series(per_seed[label][s].get("train", []), "routing/normalized_entropy")
            ax.plot(sorted(series), [series[x] for x in sorted(series)], color=color, lw=0.6, alpha=0.35)
        ax.plot(r["steps"], r["mean"], color=color, lw=2, label=f"{label} (n={len(r['seeds'])})")
    ax.set_xlabel("step")
    ax.set_ylabel("routing entropy / log(experts)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def plot_routing(label: str, r: dict, title: str, path: Path) -> None:
    """Task x expert mean-gate heatmaps of the lowest seed's highest-JS layers (router blocks side by side,
    split by white lines), and each layer's JS between tasks (mean over seeds) in layer order."""
    plt = _pyplot()
    heat = r["heatmap"]["layers"]
    fig, axes = plt.subplots(len(heat) + 1, 1, figsize=(10, 2.6 * len(heat) + 2.8), squeeze=False)
    for ax, h in zip(axes[:, 0], heat):
        u = np.array(h["usage"])                         # task x block x expert
        blocks, experts = u.shape[1], u.shape[2]
        image = ax.imshow(u.reshape(u.shape[0], -1), aspect="auto", cmap="viridis", vmin=0)
        for b in range(1, blocks):
            ax.axvline(b * experts - 0.5, color="white", lw=1.5)
        ax.set_yticks(range(len(h["tasks"])))
        ax.set_yticklabels([short_task(t) for t in h["tasks"]], fontsize=7)
        ax.set_xticks([b * experts + (experts - 1) / 2 for b in range(blocks)])
        ax.set_xticklabels([f"block {b}" for b in range(blocks)], fontsize=7)
        ax.set_title(f"{_short_layer(h['layer'])}: JS between tasks {h['js']:.3f} (seed {r['heatmap']['seed']})",
                     fontsize=8)
        fig.colorbar(image, ax=ax, label="mean gate", fraction=0.03)
    ax = axes[-1, 0]
    names = list(r["layer_js"])
    kinds = list(dict.fromkeys(re.sub(r"^.*?layers\.\d+\.", "", p) for p in names))
    for k, kind in enumerate(kinds):
        pts = [(int(m.group(1)), v) for p, v in r["layer_js"].items()
               if (m := re.search(r"layers\.(\d+)\.", p)) and p.endswith(kind)]
        if pts:
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", ms=2, lw=1, color=COLORS[k % len(COLORS)],
                    label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("JS between tasks")
    ax.set_title(f"JS between tasks by layer (mean over {len(r['seeds'])} seed(s))", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"{title}: {label}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


# -- Weights & Biases ------------------------------------------------------------------------------------
def _cell_value(text: str):
    try:
        return float(text) if text != "" else None
    except ValueError:
        return text


def wandb_payloads(groups: dict[str, str], files: dict[str, list[str]], out_dir: Path) -> list[dict]:
    """One summary run per table: {name, group, tables: {stem: (columns, rows)}, images: {stem: path}} from the
    table's CSV files (numbers as floats) and PNGs, in a fixed order."""
    payloads = []
    for table, names in files.items():
        tables, images = {}, {}
        for name in sorted(names):
            path = out_dir / name
            stem = path.stem
            if name.endswith(".csv"):
                rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
                tables[stem] = (rows[0], [[_cell_value(v) for v in row] for row in rows[1:]])
            elif name.endswith(".png"):
                images[stem] = str(path)
        payloads.append({"name": f"aggregate-{table}", "group": groups.get(table) or table,
                         "tables": tables, "images": images})
    return payloads


def log_to_wandb(payloads: list[dict], project: str = "mode", mode: str = "offline", directory: Path | None = None,
                 config: dict | None = None, wandb=None) -> list[str]:
    """Log each payload to its own W&B run (job_type "aggregate", in the table's group): CSV tables as
    wandb.Table, PNGs as wandb.Image. Offline unless told otherwise. Returns the run names."""
    import os

    if wandb is None:
        import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    names = []
    for p in payloads:
        run = wandb.init(project=project, group=p["group"], job_type="aggregate", name=p["name"], mode=mode,
                         dir=None if directory is None else str(directory), config=config or {},
                         reinit="finish_previous")
        data = {f"table/{stem}": wandb.Table(columns=cols, data=rows) for stem, (cols, rows) in p["tables"].items()}
        data.update({f"plot/{stem}": wandb.Image(path) for stem, path in p["images"].items()})
        run.log(data)
        run.finish()
        names.append(p["name"])
    return names
