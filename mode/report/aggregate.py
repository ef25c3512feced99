"""`mode-aggregate PROFILE`: the paper's tables from finished run directories, beside the paper's numbers.

Reads only run directories (metrics.json, predictions.jsonl), so it works on runs copied back from a
cluster (`--runs-dir`). Which runs make a table comes from the profile's experiment files
(conf/experiment/<profile>/table*.yaml): their sweep dir, adapter presets and seeds; run `<preset>/seed<k>`
of a sweep dir is one cell. Paper numbers come from experiments/paper_tables.yaml, matched by adapter
shape. Writes results/<profile>/: each table as Markdown, CSV and LaTeX, the Table 3 win-rate matrix,
summary.json and PNG plots. Same run directories in, same bytes out.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mode.errors import ModeError, exit_on_user_error
from mode.report.compare import Run, compare_pair, load_run
from mode.run.config import CONF_DIR, REPO_DIR
from mode.run.fileio import atomic_path, atomic_write_text

PAPER_TABLES = REPO_DIR / "experiments" / "paper_tables.yaml"


@dataclass
class Cell:
    """One adapter configuration of a table: its runs (one per seed) and the paper's row, if any."""

    preset: str
    shape: tuple                       # (method, experts, rank, block_rank)
    seeds: list[int]
    label: str
    paper: dict | None
    runs: dict[int, Path] = field(default_factory=dict)   # seed -> finished run dir
    metrics: dict[int, dict] = field(default_factory=dict)

    @property
    def scores(self) -> list[float]:
        return [self.metrics[s]["rougeL"] for s in sorted(self.metrics)]


def shape_label(shape: tuple) -> str:
    method, m, r, p = shape
    name = {"lora": "LoRA", "molora": "MoLoRA", "molora_sd": "MoLoRA-SD", "mode": "MoDE", "more": "MoRE"}[method]
    if method == "lora":
        return f"{name} {r}"
    if method == "more":
        return f"{name} R{r}"
    if method == "mode" and p != 1:
        return f"{name} {m}x{r}x{p}"
    return f"{name} {m}x{r}"


def table_specs(profile: str, runs_dir: str | None) -> dict[str, dict]:
    """table name -> {sweep_dir, presets, seeds} from conf/experiment/<profile>/*.yaml (all but base.yaml)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    files = sorted(p for p in (CONF_DIR / "experiment" / profile).glob("*.yaml") if p.stem != "base")
    if not files:
        raise ModeError(f"profile {profile!r} has no table experiments (conf/experiment/{profile}/*.yaml)")
    specs = {}
    for path in files:
        overrides = [f"experiment={profile}/{path.stem}"] + ([f"paths.runs_dir={runs_dir}"] if runs_dir else [])
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        specs[path.stem] = {
            "sweep_dir": Path(str(cfg.hydra.sweep.dir)),
            "presets": [p.strip() for p in str(params.adapter).split(",")],
            "seeds": [int(s) for s in str(params.seed).split(",")],
        }
    GlobalHydra.instance().clear()
    return specs


def preset_shape(preset: str) -> tuple:
    from mode.run.config import compose

    a = compose("train", [f"adapter={preset}"]).adapter
    return (a.method, int(a.experts), int(a.rank), int(a.block_rank))


def paper_row(paper: dict, table: str, shape: tuple) -> dict | None:
    for row in paper.get(table, {}).get("rows", []):
        if (row["method"], row["experts"], row["rank"], row["block_rank"]) == shape:
            return row
    return None


def default_records(profile: str) -> Path | None:
    """results/<profile>/runs: the committed light records of finished jobs, when the profile has them."""
    path = REPO_DIR / "results" / profile / "runs"
    return path if path.is_dir() else None


def collect(profile: str, runs_dir: str | None, records: Path | None = None) -> tuple[dict[str, list[Cell]], dict]:
    """Cells of every table of the profile, with the finished runs found for them: a run directory of the
    sweep, else the job's light record under `records` (same relative path below the profile's sweeps)."""
    import os

    paper = yaml.safe_load(PAPER_TABLES.read_text())
    specs = table_specs(profile, runs_dir)
    root = Path(os.path.commonpath([str(s["sweep_dir"]) for s in specs.values()]))
    tables: dict[str, list[Cell]] = {}
    for name, spec in specs.items():
        cells = []
        for preset in spec["presets"]:
            shape = preset_shape(preset)
            row = paper_row(paper, name, shape) or paper_row(paper, "table2", shape)
            cell = Cell(preset, shape, spec["seeds"], row["label"] if row else shape_label(shape), row)
            for seed in spec["seeds"]:
                run = spec["sweep_dir"] / preset / f"seed{seed}"
                if not (run / "metrics.json").is_file() and records is not None:
                    run = records / run.relative_to(root)
                if (run / "metrics.json").is_file():
                    cell.runs[seed] = run
                    cell.metrics[seed] = json.loads((run / "metrics.json").read_text())
            cells.append(cell)
        tables[name] = cells
    return tables, paper


# -- formatting -----------------------------------------------------------------------------------------
def _num(value, digits=2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(cells: list[Cell]) -> list[dict]:
    rows = []
    for c in cells:
        mean, std = _mean_std(c.scores)
        first = c.metrics[min(c.metrics)] if c.metrics else {}
        trainable, base = first.get("trainable_parameters"), first.get("base_non_embedding_parameters")
        rows.append({
            "row": c.label, "preset": c.preset, "seeds": f"{len(c.metrics)}/{len(c.seeds)}",
            "rougeL": mean, "rougeL_std": std,
            "paper_rougeL": (c.paper or {}).get("rougeL"),
            "trainable_params": trainable,
            "params_pct": 100.0 * trainable / base if trainable and base else None,
            "paper_params_pct": (c.paper or {}).get("params"),
        })
    return rows


COLUMNS = [("row", "adapter"), ("seeds", "seeds"), ("rougeL", "ROUGE-L (ours)"), ("rougeL_std", "± sd"),
           ("paper_rougeL", "ROUGE-L (paper)"), ("trainable_params", "trainable params"),
           ("params_pct", "% of base (ours)"), ("paper_params_pct", "% of base (paper)")]


def _cell_text(key: str, value) -> str:
    if value is None:
        return ""
    if key == "trainable_params":
        return f"{value:,}"
    if key in ("rougeL", "rougeL_std", "paper_rougeL", "params_pct", "paper_params_pct"):
        return _num(value)
    return str(value)


def to_markdown(rows: list[dict], title: str) -> str:
    header = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k in ("row", "seeds") else "---:" for k, _ in COLUMNS) + "|"
    lines = [f"# {title}", "", header, sep]
    lines += ["| " + " | ".join(_cell_text(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([k for k, _ in COLUMNS])
    for r in rows:
        writer.writerow(["" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k, _ in COLUMNS])
    return out.getvalue()


def _tex_escape(text: str) -> str:
    return text.replace("%", r"\%").replace("&", r"\&").replace("_", r"\_").replace("±", r"$\pm$")


def to_latex(rows: list[dict], title: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(COLUMNS) - 1) + "}", r"\toprule",
             " & ".join(_tex_escape(h) for _, h in COLUMNS) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(_cell_text(k, r[k])) for k, _ in COLUMNS) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex_escape(title) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- Table 3: task-level win rates ---------------------------------------------------------------------
def pooled_run(label: str, runs: list[Path]) -> Run:
    """A method's per-task ROUGE-L averaged over its seeds (each seed evaluates the same instances)."""
    loaded = [load_run(r) for r in runs]
    tasks = sorted(set.intersection(*(set(r.scores) for r in loaded)))
    scores = {t: statistics.fmean(r.scores[t] for r in loaded) for t in tasks}
    return Run(label=label, overall=statistics.fmean(r.overall for r in loaded), scores=scores,
               instances=loaded[0].instances)


def win_rate_matrix(tables: dict[str, list[Cell]], paper: dict) -> dict | None:
    """Row-beats-column task win rates of the headline methods, with sign-test p-values."""
    headline = paper.get("table3", {}).get("methods", [])
    runs_by_label: dict[str, list[Path]] = {}
    for cell in itertools.chain.from_iterable(tables.values()):
        if cell.label in headline:
            runs_by_label.setdefault(cell.label, [])
            runs_by_label[cell.label] += [p for p in cell.runs.values() if p not in runs_by_label[cell.label]]
    methods = [m for m in headline if runs_by_label.get(m)]
    if len(methods) < 2:
        return None
    pooled = {m: pooled_run(m, sorted(runs_by_label[m])) for m in methods}
    paper_rates = paper.get("table3", {}).get("win_rates", {})
    cells = {}
    for a, b in itertools.permutations(methods, 2):
        r = compare_pair(pooled[a], pooled[b], n_boot=2000, seed=0)
        cells[f"{a} > {b}"] = {"win_rate": 100.0 * r["win_rate"], "sign_test_p": r["sign_test_p"],
                               "tasks": r["tasks"], "paper": paper_rates.get(a, {}).get(b)}
    return {"methods": methods, "seeds": {m: len(runs_by_label[m]) for m in methods}, "cells": cells}


def win_rate_markdown(w: dict) -> str:
    methods = w["methods"]
    lines = ["# Table 3: task-level win rate (row beats column), ours (paper in brackets); sign-test p below", "",
             "| row beats column | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for a in methods:
        cells = []
        for b in methods:
            if a == b:
                cells.append("")
                continue
            c = w["cells"][f"{a} > {b}"]
            paper = f" [{c['paper']}]" if c["paper"] is not None else ""
            cells.append(f"{c['win_rate']:.0f}%{paper} (p={c['sign_test_p']:.2g})")
        lines.append(f"| {a} ({w['seeds'][a]} seed{'s' if w['seeds'][a] > 1 else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def win_rate_csv(w: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "column", "win_rate", "sign_test_p", "tasks", "paper_win_rate"])
    pairs = [(a, b) for a in w["methods"] for b in w["methods"] if f"{a} > {b}" in w["cells"]]
    for a, b in pairs:  # row-major in table order, however the cells dict was ordered (e.g. read back from JSON)
        c = w["cells"][f"{a} > {b}"]
        writer.writerow([a, b, f"{c['win_rate']:.4f}", f"{c['sign_test_p']:.6g}", c["tasks"],
                         "" if c["paper"] is None else c["paper"]])
    return out.getvalue()


def win_rate_latex(w: dict) -> str:
    methods = w["methods"]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * len(methods) + "}",
             r"\toprule", " & ".join(["row beats column"] + methods) + r" \\", r"\midrule"]
    for a in methods:
        cells = [a]
        for b in methods:
            c = w["cells"].get(f"{a} > {b}")
            cells.append("" if c is None else f"{c['win_rate']:.0f}" + (f" ({c['paper']})" if c["paper"] is not None else ""))
        lines.append(_tex_escape(" & ".join(cells)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{Task-level win rate (\%), ours (paper in parentheses).}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------------------
def _save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def plot_table(rows: list[dict], cells: list[Cell], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["row"] for r in rows]
    x = range(len(rows))
    fig, (ours, theirs) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 4.2), sharex=False)
    means = [r["rougeL"] if r["rougeL"] is not None else math.nan for r in rows]
    stds = [r["rougeL_std"] or 0.0 for r in rows]
    ours.bar(x, means, yerr=stds, capsize=3, color="#4C72B0")
    for i, c in enumerate(cells):  # individual seeds as dots
        ours.scatter([i] * len(c.scores), c.scores, color="black", s=8, zorder=3)
    ours.set_title("ours (bars: mean over seeds, dots: seeds)", fontsize=9)
    theirs.bar(x, [r["paper_rougeL"] if r["paper_rougeL"] is not None else math.nan for r in rows], color="#DD8452")
    theirs.set_title("paper (Gemma 2B)", fontsize=9)
    for ax in (ours, theirs):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("ROUGE-L")
        finite = [v for v in (means if ax is ours else [r["paper_rougeL"] for r in rows]) if v is not None and not math.isnan(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(1.0, 0.25 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad - max(stds, default=0)), hi + pad + max(stds, default=0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def task_number(task: str) -> tuple:
    head = task.split("_")[0]
    return (int(head[4:]) if head[4:].isdigit() else 10**9, task)


def plot_heatmap(cells: list[Cell], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [c for c in cells if c.metrics]
    tasks = sorted({t for c in cells for m in c.metrics.values() for t in m.get("per_task", {})}, key=task_number)
    if not cells or not tasks:
        return
    grid = np.full((len(cells), len(tasks)), np.nan)
    for i, c in enumerate(cells):
        for j, t in enumerate(tasks):
            vals = [m["per_task"][t]["rougeL"] for m in c.metrics.values() if t in m.get("per_task", {})]
            if vals:
                grid[i, j] = statistics.fmean(vals)
    fig, ax = plt.subplots(figsize=(0.55 * len(tasks) + 3, 0.4 * len(cells) + 2.2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([t.split("_")[0] for t in tasks], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels([c.label for c in cells], fontsize=8)
    for i in range(len(cells)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < 60 else "black")
    fig.colorbar(image, ax=ax, label="ROUGE-L (mean over seeds)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def setting(cells: list[Cell]) -> str:
    """What our runs of a table trained on, read from the first run's files (model, task count)."""
    for cell in cells:
        for seed in sorted(cell.runs):
            run = cell.runs[seed]
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            stats = json.loads((run / "data_stats.json").read_text()) if (run / "data_stats.json").is_file() else {}
            tasks = len(stats.get("tasks", [])) or "?"
            return f"{cfg['model']['id']}, {tasks} tasks, {cfg['train']['max_steps']} steps"
    return "no finished run yet"


# -- entry point -----------------------------------------------------------------------------------------
def aggregate(profile: str, runs_dir: str | None, out_dir: Path, records: Path | None = None) -> dict:
    tables, paper = collect(profile, runs_dir, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"profile": profile, "tables": {}}
    found = sum(len(c.metrics) for cells in tables.values() for c in cells)
    if not found:
        raise ModeError(f"no finished run of profile {profile!r} found (looked in the experiments' sweep dirs; "
                        "pass --runs-dir for runs copied elsewhere)")
    for name, cells in tables.items():
        title = paper.get(name, {}).get("title", name) + f" -- ours: {setting(cells)}"
        rows = table_rows(cells)
        summary["tables"][name] = rows
        atomic_write_text(out_dir / f"{name}.md", to_markdown(rows, title))
        atomic_write_text(out_dir / f"{name}.csv", to_csv(rows))
        atomic_write_text(out_dir / f"{name}.tex", to_latex(rows, title))
        if any(r["rougeL"] is not None for r in rows):
            plot_table(rows, cells, title, out_dir / f"{name}.png")
            plot_heatmap(cells, f"per-task ROUGE-L, {name} ({profile})", out_dir / f"{name}_per_task.png")
    wins = win_rate_matrix(tables, paper)
    if wins:
        summary["win_rates"] = wins
        atomic_write_text(out_dir / "table3_win_rates.md", win_rate_markdown(wins))
        atomic_write_text(out_dir / "table3_win_rates.csv", win_rate_csv(wins))
        atomic_write_text(out_dir / "table3_win_rates.tex", win_rate_latex(wins))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


@exit_on_user_error
def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mode-aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="smoke | cpu | paper (a folder of conf/experiment/)")
    parser.add_argument("--runs-dir", help="where the runs are (paths.runs_dir of the sweeps; default: as configured)")
    parser.add_argument("--records", help="committed light records of finished jobs (default: results/<profile>/runs)")
    parser.add_argument("--out", help="output folder (default: results/<profile>)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else REPO_DIR / "results" / args.profile
    records = Path(args.records) if args.records else default_records(args.profile)
    summary = aggregate(args.profile, args.runs_dir, out, records)
    done = sum(int(r["seeds"].split("/")[0]) for rows in summary["tables"].values() for r in rows)
    print(f"{len(summary['tables'])} tables ({done} run cells) -> {out}")


def main() -> None:
    run()


if __name__ == "__main__":
    main()
