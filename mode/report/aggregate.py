"""`mode-aggregate PROFILE`: the paper's tables from finished run directories, beside the paper's numbers,
with the analysis a careful reader asks for.

Reads only run directories or their committed light records (config.yaml, metrics.json, predictions.jsonl,
routing.json, curves.json), so it works on runs copied back from a cluster (`--runs-dir`). Which runs make a
table, and the paper's numbers beside them, come from the tables' one declaration, experiments/paper_tables.yaml
(mode.run.tables): per profile, each experiment file's presets and seeds; its sweep dir and W&B group come
from composing that experiment (conf/experiment/<profile>/<name>.yaml). Run `<preset>/seed<k>` of a sweep
dir is one cell; an experiment that `adds_seeds_to` another pools its runs into that one's table (cpu/table6_seeds
-> cpu/table6). A cell takes its table's paper row for its preset, else Table 2's.

Writes results/<profile>/, for each table <T>:
- <T>.md/.csv/.tex: mean ROUGE-L over seeds with its 95% t interval, beside the paper's; <T>.png (with
  CI error bars and the paper's bars), <T>_per_task.png;
- <T>_paired.*: paired per-instance differences against the reference configurations (two-level bootstrap
  CI, sign-flip permutation p), <T>_paired.png per task;
- <T>_task_wins.*: task-level win rates (row beats column) with Wilson intervals and sign tests;
- <T>_routing.* and <T>_routing_<adapter>.png (mixtures): does routing specialise by task;
  <T>_routing_entropy.png, <T>_curves.png: routing entropy, eval ROUGE-L and loss over training;
and table3_win_rates.* (the paper's Table 3 methods, when the profile has them) and summary.json, from
which every table file is rendered (`render_tables`). Procedures: mode/report/analysis.py. Same records
in, same bytes out. `--wandb` also logs each table's CSVs and PNGs to one W&B run (offline by default).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mode.errors import ModeError, exit_on_user_error
from mode.report import analysis as an
from mode.report.compare import Run, load_run
from mode.run.config import CONF_DIR, REPO_DIR
from mode.run.fileio import atomic_write_text
from mode.run.tables import PAPER_TABLES, declarations, profile_experiments, table_presets


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
    """experiment name -> {sweep_dir, presets, seeds, table, adds_seeds_to, group, logger}: the profile's
    experiments as declared in experiments/paper_tables.yaml (presets, seeds, the paper table they report
    under), each composed for what its file sets (sweep dir; `logger` is {name, project, mode} of its logger
    config). Every conf/experiment/<profile>/*.yaml but base.yaml must be declared, and only those."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    declared = profile_experiments(profile)
    files = {p.stem for p in (CONF_DIR / "experiment" / profile).glob("*.yaml") if p.stem != "base"}
    missing, undeclared = sorted(set(declared) - files), sorted(files - set(declared))
    if missing:
        raise ModeError(f"{PAPER_TABLES.name} declares runs of {profile}/{missing[0]}, but "
                        f"conf/experiment/{profile}/{missing[0]}.yaml does not exist")
    if undeclared:
        raise ModeError(f"conf/experiment/{profile}/{undeclared[0]}.yaml has no runs entry in {PAPER_TABLES.name} "
                        f"(add it under the table it reports: runs.{profile}.{undeclared[0]})")
    specs = {}
    for name, run in declared.items():
        overrides = [f"experiment={profile}/{name}"] + ([f"paths.runs_dir={runs_dir}"] if runs_dir else [])
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        specs[name] = {
            "sweep_dir": Path(str(cfg.hydra.sweep.dir)),
            "presets": run["presets"],
            "seeds": run["seeds"],
            "table": run["table"],
            "adds_seeds_to": run.get("adds_seeds_to"),
            "group": cfg.logger.get("group"),
            "logger": {"name": cfg.logger.get("name"), "project": cfg.logger.get("project"),
                       "mode": cfg.logger.get("mode")},
        }
    GlobalHydra.instance().clear()
    return specs


@functools.cache
def preset_shape(preset: str) -> tuple:
    from mode.run.config import compose

    a = compose("train", [f"adapter={preset}"]).adapter
    return (a.method, int(a.experts), int(a.rank), int(a.block_rank))


def paper_row(paper: dict, table: str, preset: str) -> dict | None:
    for row in (paper.get(table) or {}).get("rows", []):
        if row["preset"] == preset:
            return row
    return None


def paper_label(paper: dict, preset: str) -> str:
    """The paper's name for a preset (its first row in any table), else ours: one name across tables."""
    for table in paper.values():
        for row in table.get("rows", []) if isinstance(table, dict) else []:
            if row["preset"] == preset:
                return row["label"]
    return shape_label(preset_shape(preset))


def default_records(profile: str) -> Path | None:
    """results/<profile>/runs: the committed light records of finished jobs, when the profile has them."""
    path = REPO_DIR / "results" / profile / "runs"
    return path if path.is_dir() else None


def merge_specs(specs: dict[str, dict]) -> dict[str, dict]:
    """One results table per experiment, except those that `adds_seeds_to` another: their runs are more
    seeds of its cells, in its table (cpu/table6_seeds -> cpu/table6). Each merged spec has `preset_seeds`
    {preset: seeds} (a preset's seeds over the merged experiments, in order) and `parts`."""
    merged: dict[str, dict] = {}
    for name, spec in specs.items():
        if not spec.get("adds_seeds_to"):
            merged[name] = {**spec, "preset_seeds": {}, "parts": []}
    for name, spec in sorted(specs.items(), key=lambda item: bool(item[1].get("adds_seeds_to"))):
        target = spec.get("adds_seeds_to") or name
        if target not in merged:
            raise ModeError(f"{PAPER_TABLES.name}: {spec.get('table')}.runs.*.{name}.adds_seeds_to={target!r} is not "
                            "an experiment of the same profile")
        m = merged[target]
        if spec["sweep_dir"] != m["sweep_dir"]:
            raise ModeError(f"experiment {name} adds seeds to {target}, but its sweep dir {spec['sweep_dir']} is not "
                            f"{target}'s ({m['sweep_dir']}): set the same hydra.sweep.dir")
        m["parts"].append(name)
        for preset in spec["presets"]:
            seeds = m["preset_seeds"].setdefault(preset, [])
            seeds += [s for s in spec["seeds"] if s not in seeds]
    for m in merged.values():
        m["presets"] = list(m["preset_seeds"])
    return merged


def profile_root(specs: dict) -> Path:
    """The folder all of a profile's sweep dirs are in: a job's record path is its run dir relative to it."""
    import os

    return Path(os.path.commonpath([str(s["sweep_dir"]) for s in specs.values()]))


def collect_tables(profile: str, runs_dir: str | None, records: Path | None = None) -> tuple[dict, dict, dict]:
    """(tables, paper, specs): `collect` plus the merged specs (sweep dir, group, logger, parts) by table."""
    paper = declarations()
    specs = merge_specs(table_specs(profile, runs_dir))
    root = profile_root(specs)
    tables: dict[str, list[Cell]] = {}
    for name, spec in specs.items():
        cells = []
        for preset in spec["presets"]:
            shape = preset_shape(preset)
            row = paper_row(paper, spec["table"], preset) or paper_row(paper, "table2", preset)
            seeds = spec["preset_seeds"][preset]
            cell = Cell(preset, shape, seeds, row["label"] if row else paper_label(paper, preset), row)
            for seed in seeds:
                run = spec["sweep_dir"] / preset / f"seed{seed}"
                if not (run / "metrics.json").is_file() and records is not None:
                    run = records / run.relative_to(root)
                if (run / "metrics.json").is_file():
                    cell.runs[seed] = run
                    cell.metrics[seed] = json.loads((run / "metrics.json").read_text())
            cells.append(cell)
        tables[name] = cells
    for spec in specs.values():
        spec["root"] = root
    return tables, paper, specs


def collect(profile: str, runs_dir: str | None, records: Path | None = None) -> tuple[dict[str, list[Cell]], dict]:
    """Cells of every table of the profile, with the finished runs found for them: a run directory of the
    sweep, else the job's light record under `records` (same relative path below the profile's sweeps)."""
    tables, paper, _ = collect_tables(profile, runs_dir, records)
    return tables, paper


# -- formatting -----------------------------------------------------------------------------------------
def _num(value, digits=2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(cells: list[Cell]) -> list[dict]:
    """One row per configuration: mean ROUGE-L over its seeds with the 95% t interval (`rougeL_ci95`, None
    for one seed), the seeds' own scores, trainable parameters, and the paper's numbers."""
    rows = []
    for c in cells:
        ci = an.seed_ci(c.scores)
        first = c.metrics[min(c.metrics)] if c.metrics else {}
        trainable, base = first.get("trainable_parameters"), first.get("base_non_embedding_parameters")
        rows.append({
            "row": c.label, "preset": c.preset, "seeds": f"{len(c.metrics)}/{len(c.seeds)}",
            "rougeL": ci["mean"], "rougeL_std": ci["sd"], "n_seeds": ci["n"],
            "rougeL_ci95": None if ci["ci95"] is None else [an._r(x) for x in ci["ci95"]],
            "seed_rougeL": {str(s): c.metrics[s]["rougeL"] for s in sorted(c.metrics)},
            "paper_rougeL": (c.paper or {}).get("rougeL"),
            "trainable_params": trainable,
            "params_pct": 100.0 * trainable / base if trainable and base else None,
            "paper_params_pct": (c.paper or {}).get("params"),
            "params_split": _params_split(c),
        })
    return rows


def _params_split(c: Cell) -> str | None:
    """MoRE rows: where the trainable parameters go (its per-projection task tables can dominate), from the
    first seed's run rebuilt on the meta device (mode.report.params); None for other methods."""
    if c.shape[0] != "more" or not c.runs:
        return None
    from mode.report.params import run_parameter_split, split_text

    found = run_parameter_split(c.runs[min(c.runs)])
    if found is None:
        return "split not computed (the base model's architecture is not readable here)"
    return split_text(found["split"], found["method"], found["task_embedding"])


# Rows written before the seed intervals (no `rougeL_ci95` key) render as they were then.
COLUMNS = [("row", "adapter"), ("seeds", "seeds"), ("rougeL", "ROUGE-L (ours)"), ("rougeL_std", "± sd"),
           ("paper_rougeL", "ROUGE-L (paper)"), ("trainable_params", "trainable params"),
           ("params_pct", "% of base (ours)"), ("paper_params_pct", "% of base (paper)")]
CI_COLUMNS = [("row", "adapter"), ("seeds", "seeds"), ("rougeL_ci", "ROUGE-L (ours, mean ± 95% CI)"),
              ("rougeL_std", "sd over seeds"), ("paper_rougeL", "ROUGE-L (paper)"),
              ("trainable_params", "trainable params"), ("params_pct", "% of base (ours)"),
              ("paper_params_pct", "% of base (paper)")]
CI_CSV = ["row", "seeds", "rougeL", "rougeL_ci95_lo", "rougeL_ci95_hi", "n_seeds", "rougeL_std", "paper_rougeL",
          "trainable_params", "params_pct", "paper_params_pct"]
CI_NOTE = ("Mean over seeds ± half-width of the 95% Student-t interval, mean ± t(0.975, n-1)·sd/sqrt(n) "
           "(no interval for n = 1); the per-seed scores are in summary.json.")


def _has_ci(rows: list[dict]) -> bool:
    return any("rougeL_ci95" in r for r in rows)


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    return CI_COLUMNS if _has_ci(rows) else COLUMNS


def _row_value(key: str, row: dict):
    if key == "rougeL_ci":
        if row["rougeL"] is None:
            return None
        ci = row.get("rougeL_ci95")
        spread = f" ± {(ci[1] - ci[0]) / 2:.2f}" if ci else ""
        return f"{row['rougeL']:.2f}{spread} (n={row.get('n_seeds', 0)})"
    if key in ("rougeL_ci95_lo", "rougeL_ci95_hi"):
        ci = row.get("rougeL_ci95")
        return None if ci is None else ci[key.endswith("hi")]
    return row.get(key)


def _cell_text(key: str, value) -> str:
    if value is None:
        return ""
    if key == "trainable_params":
        return f"{value:,}"
    if key in ("rougeL", "rougeL_std", "paper_rougeL", "params_pct", "paper_params_pct"):
        return _num(value)
    return str(value)


def to_markdown(rows: list[dict], title: str) -> str:
    columns = _columns(rows)
    header = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" if k in ("row", "seeds") else "---:" for k, _ in columns) + "|"
    lines = [f"# {title}", "", header, sep]
    lines += ["| " + " | ".join(_cell_text(k, _row_value(k, r)) for k, _ in columns) + " |" for r in rows]
    if _has_ci(rows):
        lines += ["", CI_NOTE]
    if _split_note(rows):
        lines += ["", _split_note(rows)]
    return "\n".join(lines) + "\n"


def _split_note(rows: list[dict]) -> str:
    """MoRE's total is not one budget like the others': what it is made of ('' without MoRE rows)."""
    splits = [f"{r['row']}: {r['params_split']}" for r in rows if r.get("params_split")]
    return ("Trainable parameters of " + "; ".join(splits) + ".") if splits else ""


def to_csv(rows: list[dict]) -> str:
    keys = CI_CSV if _has_ci(rows) else [k for k, _ in COLUMNS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        values = [_row_value(k, r) for k in keys]
        writer.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in values])
    return out.getvalue()


def _tex_escape(text: str) -> str:
    return text.replace("%", r"\%").replace("&", r"\&").replace("_", r"\_").replace("±", r"$\pm$")


def to_latex(rows: list[dict], title: str) -> str:
    columns = _columns(rows)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", r"\toprule",
             " & ".join(_tex_escape(h) for _, h in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(_cell_text(k, _row_value(k, r))) for k, _ in columns) + r" \\" for r in rows]
    caption = title + (f". {_split_note(rows)}" if _split_note(rows) else "")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex_escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- Table 3: task-level win rates ---------------------------------------------------------------------
def pooled_run(label: str, runs: list[Path]) -> Run:
    """A method's per-task ROUGE-L averaged over its seeds (each seed evaluates the same instances)."""
    loaded = [load_run(r) for r in runs]
    tasks = sorted(set.intersection(*(set(r.scores) for r in loaded)))
    scores = {t: statistics.fmean(r.scores[t] for r in loaded) for t in tasks}
    return Run(label=label, overall=statistics.fmean(r.overall for r in loaded), scores=scores,
               instances=loaded[0].instances)


def _same_instances(a: Run, b: Run) -> None:
    """Paired runs must have evaluated the same instances of every task both scored (as `compare_pair`)."""
    if a.instances is None or b.instances is None:
        return
    differ = [t for t in sorted(set(a.scores) & set(b.scores)) if a.instances.get(t) != b.instances.get(t)]
    if differ:
        raise ModeError(f"{a.label} and {b.label} evaluated different instances of {len(differ)} task(s), e.g. "
                        f"{differ[0]}; pair runs with the same data split and eval.max_instances_per_task")


def win_block(runs: dict[str, dict[int, Path]], methods: list[str], paper_rates: dict | None = None,
              title: str | None = None, cache: dict | None = None) -> dict | None:
    """Row-beats-column task win rates among `methods` ({label: {seed: run}}), each pair on the seeds both
    ran (`analysis.task_win_rate`: ties excluded, Wilson 95% interval, sign test)."""
    cache = {} if cache is None else cache
    methods = [m for m in methods if runs.get(m)]
    if len(methods) < 2:
        return None

    def loaded(path: Path) -> Run:
        if ("run", path) not in cache:
            cache[("run", path)] = load_run(path)
        return cache[("run", path)]

    cells = {}
    for a, b in itertools.permutations(methods, 2):
        for s in sorted(set(runs[a]) & set(runs[b])):
            _same_instances(loaded(runs[a][s]), loaded(runs[b][s]))
        r = an.task_win_rate({s: loaded(p).scores for s, p in runs[a].items()},
                             {s: loaded(p).scores for s, p in runs[b].items()})
        if r is not None:
            cells[f"{a} > {b}"] = {**r, "paper": (paper_rates or {}).get(a, {}).get(b)}
    if not cells:
        return None
    out = {"methods": methods, "seeds": {m: len(runs[m]) for m in methods}, "cells": cells}
    if title:
        out["title"] = title
    return out


def win_rate_matrix(tables: dict[str, list[Cell]], paper: dict, cache: dict | None = None) -> dict | None:
    """Row-beats-column task win rates of the paper's Table 3 methods over all tables' runs, with Wilson
    intervals and sign-test p-values. The methods are Table 3's `methods` labels, else its presets' labels."""
    table3 = paper.get("table3", {})
    headline = table3.get("methods") or [paper_label(paper, p) for p in table_presets(table3)]
    runs_by_label: dict[str, dict[int, Path]] = {}
    for cell in itertools.chain.from_iterable(tables.values()):
        if cell.label in headline:
            for seed, path in cell.runs.items():
                runs_by_label.setdefault(cell.label, {}).setdefault(seed, path)
    return win_block(runs_by_label, headline, paper.get("table3", {}).get("win_rates", {}), cache=cache)


LEGACY_WIN_TITLE = "Table 3: task-level win rate (row beats column), ours (paper in brackets); sign-test p below"
WIN_TITLE = "Table 3: task-level win rate (row beats column), ours (paper in brackets), 95% Wilson CI and sign-test p"
WIN_NOTE = ("Win rate: tasks where the row's ROUGE-L is higher / tasks where the two differ (ties excluded; "
            "counts in the CSV), each task's score averaged over the seeds both methods ran; in brackets after "
            "it the paper's; then the 95% Wilson interval over those tasks and the exact two-sided sign test.")


def _is_legacy(w: dict) -> bool:
    return not any("win_rate_ci95" in c for c in w["cells"].values())


def _win_text(c: dict) -> str:
    if c["win_rate"] is None:
        return f"all {c['ties']} tied"
    paper = f" [{c['paper']}]" if c["paper"] is not None else ""
    lo, hi = c["win_rate_ci95"]
    return f"{c['win_rate']:.0f}%{paper} ({lo:.0f}-{hi:.0f}%, p={c['sign_test_p']:.2g})"


def win_rate_markdown(w: dict) -> str:
    methods = w["methods"]
    legacy = _is_legacy(w)
    title = LEGACY_WIN_TITLE if legacy else w.get("title", WIN_TITLE)
    lines = [f"# {title}", "",
             "| row beats column | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for a in methods:
        cells = []
        for b in methods:
            c = w["cells"].get(f"{a} > {b}")
            if a == b or c is None:
                cells.append("")
            elif legacy:
                paper = f" [{c['paper']}]" if c["paper"] is not None else ""
                cells.append(f"{c['win_rate']:.0f}%{paper} (p={c['sign_test_p']:.2g})")
            else:
                cells.append(_win_text(c))
        lines.append(f"| {a} ({w['seeds'][a]} seed{'s' if w['seeds'][a] > 1 else ''}) | " + " | ".join(cells) + " |")
    if not legacy:
        lines += ["", WIN_NOTE]
    return "\n".join(lines) + "\n"


def win_rate_csv(w: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    legacy = _is_legacy(w)
    if legacy:
        writer.writerow(["row", "column", "win_rate", "sign_test_p", "tasks", "paper_win_rate"])
    else:
        writer.writerow(["row", "column", "win_rate", "win_rate_ci95_lo", "win_rate_ci95_hi", "wins", "losses", "ties",
                         "tasks", "sign_test_p", "paired_seeds", "paper_win_rate"])
    pairs = [(a, b) for a in w["methods"] for b in w["methods"] if f"{a} > {b}" in w["cells"]]
    for a, b in pairs:  # row-major in table order, however the cells dict was ordered (e.g. read back from JSON)
        c = w["cells"][f"{a} > {b}"]
        paper = "" if c["paper"] is None else c["paper"]
        if legacy:
            writer.writerow([a, b, f"{c['win_rate']:.4f}", f"{c['sign_test_p']:.6g}", c["tasks"], paper])
            continue
        ci = c["win_rate_ci95"] or ["", ""]
        writer.writerow([a, b, "" if c["win_rate"] is None else f"{c['win_rate']:.4f}",
                         *("" if x == "" else f"{x:.4f}" for x in ci), c["wins"], c["losses"], c["ties"], c["tasks"],
                         f"{c['sign_test_p']:.6g}", " ".join(str(s) for s in c["paired_seeds"]), paper])
    return out.getvalue()


def win_rate_latex(w: dict) -> str:
    methods = w["methods"]
    legacy = _is_legacy(w)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * len(methods) + "}",
             r"\toprule", " & ".join(["row beats column"] + methods) + r" \\", r"\midrule"]
    for a in methods:
        cells = [a]
        for b in methods:
            c = w["cells"].get(f"{a} > {b}")
            if c is None or (a == b):
                cells.append("")
            elif legacy or c["win_rate"] is None:
                cells.append("" if c["win_rate"] is None else
                             f"{c['win_rate']:.0f}" + (f" ({c['paper']})" if c["paper"] is not None else ""))
            else:
                lo, hi = c["win_rate_ci95"]
                cells.append(f"{c['win_rate']:.0f}" + (f" ({c['paper']})" if c["paper"] is not None else "")
                             + f" [{lo:.0f}-{hi:.0f}]")
        lines.append(_tex_escape(" & ".join(cells)) + r" \\")
    caption = (r"Task-level win rate (\%), ours (paper in parentheses)." if legacy else
               r"Task-level win rate (\%, ties excluded), ours (paper in parentheses), 95\% Wilson interval in "
               r"brackets. " + _tex_escape(w.get("title", "")))
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + caption.rstrip() + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------------------
_save_png = an.save_png
task_number = an.task_number


def plot_table(rows: list[dict], cells: list[Cell], title: str, path: Path) -> None:
    """Ours (bars: mean over seeds, error bars: 95% t interval, dots: seeds) beside the paper's bars."""
    plt = an._pyplot()
    labels = [r["row"] for r in rows]
    x = range(len(rows))
    fig, (ours, theirs) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 4.2), sharex=False)
    means = [r["rougeL"] if r["rougeL"] is not None else math.nan for r in rows]
    errs = [(r["rougeL_ci95"][1] - r["rougeL_ci95"][0]) / 2 if r.get("rougeL_ci95") else 0.0 for r in rows]
    ours.bar(x, means, yerr=errs, capsize=3, color="#4C72B0")
    for i, c in enumerate(cells):  # individual seeds as dots
        ours.scatter([i] * len(c.scores), c.scores, color="black", s=8, zorder=3)
    ours.set_title("ours (bars: mean over seeds, 95% t interval; dots: seeds)", fontsize=9)
    paper = [r["paper_rougeL"] if r["paper_rougeL"] is not None else math.nan for r in rows]
    theirs.bar(x, paper, color="#DD8452")
    theirs.set_title("paper (Gemma 2B)", fontsize=9)
    seeds = [s for c in cells for s in c.scores]
    ranges = {ours: [m - e for m, e in zip(means, errs)] + [m + e for m, e in zip(means, errs)] + seeds,
              theirs: paper}
    for ax in (ours, theirs):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("ROUGE-L")
        finite = [v for v in ranges[ax] if v is not None and not math.isnan(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(1.0, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def plot_heatmap(cells: list[Cell], title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [c for c in cells if c.metrics]
    tasks = sorted({t for c in cells for m in c.metrics.values() for t in m.get("per_task", {})}, key=task_number)
    if not cells or not tasks:
        return False
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
    return True


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


# -- analysis of a table --------------------------------------------------------------------------------
REFERENCE_METHODS = ("lora", "molora_sd")


def reference_cells(cells: list[Cell]) -> list[Cell]:
    """What a table's configurations are paired against: its first LoRA (the dense baseline) and its first
    MoLoRA-SD (the paper's strongest baseline in the case study), else its first configuration with runs."""
    with_runs = [c for c in cells if c.runs]
    refs = [next((c for c in with_runs if c.shape[0] == m), None) for m in REFERENCE_METHODS]
    return [c for c in refs if c is not None] or with_runs[:1]


def _cached(cache: dict, kind: str, path: Path):
    if (kind, path) not in cache:
        if kind == "instances":
            cache[(kind, path)] = an.instance_rouge(path)
        else:
            cache[(kind, path)] = an.read_json(path / f"{kind}.json")
    return cache[(kind, path)]


def paired_block(cells: list[Cell], title: str, cache: dict) -> dict | None:
    """Each configuration minus each reference (`reference_cells`), per instance, paired by seed and id."""
    rows, refs = [], []
    for ref in reference_cells(cells):
        loaded = {s: _cached(cache, "instances", p) for s, p in sorted(ref.runs.items())}
        b = {s: v[0] for s, v in loaded.items() if v}
        tasks = {i: t for v in loaded.values() if v for i, t in v[1].items()}
        for c in cells:
            if c is ref or not c.runs or not b:
                continue
            mine = {s: _cached(cache, "instances", p) for s, p in sorted(c.runs.items())}
            r = an.paired_difference({s: v[0] for s, v in mine.items() if v}, b, tasks)
            if r is not None:
                rows.append({"method": c.label, "reference": ref.label, **r})
                refs += [ref.label] if ref.label not in refs else []
    if not rows:
        return None
    return {"title": title, "references": refs, "rows": rows,
            "procedure": {"n_boot": an.N_BOOT, "n_boot_per_task": an.N_BOOT_TASK, "n_perm": an.N_PERM,
                          "rng_seed": an.RNG_SEED, "ci": "two-level percentile bootstrap (seeds, instances)",
                          "test": "two-sided paired sign-flip permutation test on per-instance seed means"}}


def routing_table(cells: list[Cell], title: str, cache: dict) -> dict | None:
    """Routing specialisation of each mixture configuration whose records have per-task usage."""
    configs = []
    for c in cells:
        per_seed = {s: r for s, r in ((s, _cached(cache, "routing", p)) for s, p in sorted(c.runs.items())) if r}
        block = an.routing_block(per_seed)
        if block is not None:
            configs.append({"label": c.label, **block})
    return {"title": title, "configs": configs} if configs else None


def curves_table(cells: list[Cell], cache: dict) -> tuple[dict, dict]:
    """({label: curves summary}, {label: {seed: curves.json}}) of the configurations with curves.json."""
    block, raw = {}, {}
    for c in cells:
        per_seed = {s: r for s, r in ((s, _cached(cache, "curves", p)) for s, p in sorted(c.runs.items())) if r}
        summary = an.curves_block(per_seed)
        if summary is not None:
            block[c.label], raw[c.label] = summary, per_seed
    return block, raw


def render_tables(summary: dict, titles: dict | None = None) -> dict[str, str]:
    """Every table file of a results folder, {file name: text}, rendered from its summary.json alone (main
    tables' titles from summary["titles"], else from `titles`)."""
    titles = {**(titles or {}), **summary.get("titles", {})}
    out = {}
    for name, rows in summary["tables"].items():
        out[f"{name}.md"] = to_markdown(rows, titles[name])
        out[f"{name}.csv"] = to_csv(rows)
        out[f"{name}.tex"] = to_latex(rows, titles[name])
    for name, block in summary.get("paired", {}).items():
        out[f"{name}_paired.md"] = an.paired_markdown(block)
        out[f"{name}_paired.csv"] = an.paired_csv(block)
        out[f"{name}_paired.tex"] = an.paired_latex(block)
    for name, w in summary.get("task_wins", {}).items():
        out[f"{name}_task_wins.md"] = win_rate_markdown(w)
        out[f"{name}_task_wins.csv"] = win_rate_csv(w)
        out[f"{name}_task_wins.tex"] = win_rate_latex(w)
    for name, block in summary.get("routing", {}).items():
        out[f"{name}_routing.md"] = an.routing_markdown(block)
        out[f"{name}_routing.csv"] = an.routing_csv(block)
        out[f"{name}_routing.tex"] = an.routing_latex(block)
    if "win_rates" in summary:
        out["table3_win_rates.md"] = win_rate_markdown(summary["win_rates"])
        out["table3_win_rates.csv"] = win_rate_csv(summary["win_rates"])
        out["table3_win_rates.tex"] = win_rate_latex(summary["win_rates"])
    return out


def analyse_table(name: str, cells: list[Cell], paper: dict, out_dir: Path, summary: dict, cache: dict) -> list[str]:
    """Fill summary's entries for one table and draw its plots; returns the PNG file names written."""
    where = setting(cells)
    title = paper.get(name, {}).get("title", name) + f" -- ours: {where}"
    rows = table_rows(cells)
    summary["tables"][name], summary["titles"][name] = rows, title
    pngs = []
    if any(r["rougeL"] is not None for r in rows):
        plot_table(rows, cells, title, out_dir / f"{name}.png")
        pngs.append(f"{name}.png")
        if plot_heatmap(cells, f"per-task ROUGE-L, {name} ({summary['profile']})", out_dir / f"{name}_per_task.png"):
            pngs.append(f"{name}_per_task.png")
    paired = paired_block(cells, f"{name}: paired per-instance ROUGE-L differences, method - reference -- ours: {where}",
                          cache)
    if paired:
        summary["paired"][name] = paired
        an.plot_paired(paired, out_dir / f"{name}_paired.png")
        pngs.append(f"{name}_paired.png")
    wins = win_block({c.label: c.runs for c in cells}, [c.label for c in cells],
                     title=f"{name}: task-level win rate (row beats column), 95% Wilson CI and sign-test p -- ours: {where}",
                     cache=cache)
    if wins:
        summary["task_wins"][name] = wins
    routing = routing_table(cells, f"{name}: does routing specialise by task? -- ours: {where}", cache)
    if routing:
        summary["routing"][name] = routing
        for r in routing["configs"]:
            png = f"{name}_routing_{an.slug(r['label'])}.png"
            an.plot_routing(r["label"], r, f"{name}: routing by task", out_dir / png)
            pngs.append(png)
    curves, raw = curves_table(cells, cache)
    if curves:
        summary["curves"][name] = curves
        an.plot_curves(curves, raw, f"{name}: learning curves -- ours: {where}", out_dir / f"{name}_curves.png")
        pngs.append(f"{name}_curves.png")
        if an.plot_routing_entropy(curves, raw, f"{name}: routing entropy over training", out_dir / f"{name}_routing_entropy.png"):
            pngs.append(f"{name}_routing_entropy.png")
    return pngs


# -- entry point -----------------------------------------------------------------------------------------
def aggregate(profile: str, runs_dir: str | None, out_dir: Path, records: Path | None = None,
              wandb: bool = False, wandb_mode: str | None = None, wandb_dir: Path | None = None,
              wandb_module=None) -> dict:
    """Write results/<profile>/ (see the module docstring) and return the summary. With `wandb` (or when the
    profile's logger config is wandb) each table's CSVs and PNGs also go to one W&B run in its group."""
    tables, paper, specs = collect_tables(profile, runs_dir, records)
    summary: dict = {"profile": profile, "tables": {}, "titles": {}, "paired": {}, "task_wins": {}, "routing": {},
                     "curves": {}}
    found = sum(len(c.metrics) for cells in tables.values() for c in cells)
    if not found:  # checked before --out is created: a refused command leaves no folder behind
        raise ModeError(f"no finished run of profile {profile!r} found (looked in the experiments' sweep dirs; "
                        "pass --runs-dir for runs copied elsewhere)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    pngs = {name: analyse_table(name, cells, paper, out_dir, summary, cache) for name, cells in tables.items()}
    wins = win_rate_matrix(tables, paper, cache)
    if wins:
        summary["win_rates"] = wins
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    rendered = render_tables(json.loads(text))  # from summary.json as written: what the committed test checks
    for name, body in rendered.items():
        atomic_write_text(out_dir / name, body)
    atomic_write_text(out_dir / "summary.json", text)
    loggers = [spec["logger"] for spec in specs.values() if spec.get("logger", {}).get("name") == "wandb"]
    if wandb or loggers:
        files = {name: [f"{name}{part}.csv" for part in ("", "_paired", "_task_wins", "_routing")
                        if f"{name}{part}.csv" in rendered] + pngs[name] for name in tables}
        groups = {name: spec.get("group") or f"{profile}-{name}" for name, spec in specs.items()}
        if wins:
            files["table3_win_rates"], groups["table3_win_rates"] = ["table3_win_rates.csv"], f"{profile}-win-rates"
        logger = loggers[0] if loggers else {}
        an.log_to_wandb(an.wandb_payloads(groups, files, out_dir), project=logger.get("project") or "mode",
                        mode=wandb_mode or logger.get("mode") or "offline",
                        directory=wandb_dir or next(iter(specs.values()))["root"],
                        config={"profile": profile, "tables": list(tables)}, wandb=wandb_module)
    return summary


@exit_on_user_error
def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mode-aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="smoke | cpu | paper (a folder of conf/experiment/)")
    parser.add_argument("--runs-dir", help="where the runs are (paths.runs_dir of the sweeps; default: as configured)")
    parser.add_argument("--records", help="committed light records of finished jobs (default: results/<profile>/runs)")
    parser.add_argument("--out", help="output folder (default: results/<profile>)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log each table's CSVs and PNGs to one W&B run in the table's group (job_type "
                             "aggregate); on by itself when the profile's logger config is wandb")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"],
                        help="W&B mode (default: the logger config's, else offline)")
    parser.add_argument("--wandb-dir", help="where W&B writes its files (default: the profile's sweep root)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else REPO_DIR / "results" / args.profile
    records = Path(args.records) if args.records else default_records(args.profile)
    summary = aggregate(args.profile, args.runs_dir, out, records, wandb=args.wandb, wandb_mode=args.wandb_mode,
                        wandb_dir=Path(args.wandb_dir) if args.wandb_dir else None)
    done = sum(int(r["seeds"].split("/")[0]) for rows in summary["tables"].values() for r in rows)
    print(f"{len(summary['tables'])} tables ({done} run cells) -> {out}")


def main() -> None:
    run()


if __name__ == "__main__":
    main()
