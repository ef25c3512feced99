"""`make reproduce-table`: the smoke profile end to end, reuse of finished runs, byte-identical
re-aggregation, and the paper profile's job list without a GPU."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys

import pytest
from conftest import REPO, needs_shared_sni, needs_stories

DRIVER = [sys.executable, str(REPO / "experiments" / "reproduce.py")]


def run(args, **kw):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_paper_profile_dry_run_lists_jobs_without_a_gpu(tmp_path):
    out = run(DRIVER + ["paper", "--dry-run", "--runs-dir", str(tmp_path)])
    lines = [line for line in out.splitlines() if line.startswith("table")]
    assert len(lines) == 42 and all(" new " in line or " shared " in line for line in lines)
    assert "adapter=paper/mode_12x16x8" in out and "case_study/paper/mode_14x4x1/seed1" in out
    assert "42 jobs listed, 39 to run" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@needs_stories
@needs_shared_sni
def test_smoke_profile_end_to_end_reuses_runs_and_reaggregates_identically(tmp_path):
    runs, out_a, out_b = tmp_path / "runs", tmp_path / "a", tmp_path / "b"
    log = run(DRIVER + ["smoke", "--runs-dir", str(runs), "--out", str(out_a)])
    assert "sweeps done" in log
    for name in ("table2.md", "table2.csv", "table2.tex", "table2.png", "table2_per_task.png", "table4.md",
                 "table3_win_rates.md", "summary.json"):
        assert (out_a / name).is_file(), name
    summary = json.loads((out_a / "summary.json").read_text())
    rows = {r["row"]: r for r in summary["tables"]["table2"]}
    assert rows["MoDE 16x4"]["paper_rougeL"] == 60.0 and rows["MoDE 16x4"]["seeds"] == "1/1"
    assert rows["MoRE R8"]["rougeL"] is not None and rows["LoRA 64"]["trainable_params"] > 0
    assert set(summary["win_rates"]["methods"]) == {"LoRA 64", "MoLoRA 16x4", "MoLoRA-SD 16x4", "MoDE 16x4"}

    # A second invocation trains nothing: every job is finished or shared.
    listing = run(DRIVER + ["smoke", "--dry-run", "--runs-dir", str(runs)])
    assert "0 to run" in listing
    # Aggregation reads run directories only, and the same runs give the same bytes.
    run([sys.executable, "-m", "mode.report.aggregate", "smoke", "--runs-dir", str(runs), "--out", str(out_b)])
    names = sorted(p.name for p in out_a.iterdir())
    assert names == sorted(p.name for p in out_b.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(out_a, out_b, names, shallow=False)
    assert not mismatch and not errors, mismatch


def test_committed_results_match_their_summary():
    """Committed `results/<profile>/` tables are exactly what `mode-aggregate` renders from the committed
    `summary.json`: nobody edited a number by hand (re-aggregation from the run dirs is checked above)."""
    from mode.report.aggregate import to_csv, to_latex, to_markdown, win_rate_csv, win_rate_latex, win_rate_markdown

    summaries = sorted((REPO / "results").glob("*/summary.json"))
    assert summaries or not (REPO / "results" / "cpu").exists()
    for path in summaries:
        folder, summary = path.parent, json.loads(path.read_text())
        for name, rows in summary["tables"].items():
            markdown = (folder / f"{name}.md").read_text()
            title = markdown.splitlines()[0].removeprefix("# ")
            assert markdown == to_markdown(rows, title), folder / f"{name}.md"
            assert (folder / f"{name}.csv").read_text() == to_csv(rows), folder / f"{name}.csv"
            assert (folder / f"{name}.tex").read_text() == to_latex(rows, title), folder / f"{name}.tex"
        if "win_rates" in summary:
            assert (folder / "table3_win_rates.md").read_text() == win_rate_markdown(summary["win_rates"])
            assert (folder / "table3_win_rates.csv").read_text() == win_rate_csv(summary["win_rates"])
            assert (folder / "table3_win_rates.tex").read_text() == win_rate_latex(summary["win_rates"])


def test_committed_records_stand_for_their_jobs_and_a_changed_config_is_refused(tmp_path):
    """Work accumulates across machines through committed records: a job recorded with the same config is
    skipped; one recorded with another config is refused before anything runs, naming the key."""
    import importlib.util

    from omegaconf import OmegaConf

    from mode.errors import ModeError
    from mode.run.config import compose, to_container

    spec = importlib.util.spec_from_file_location("reproduce", REPO / "experiments" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)

    records = tmp_path / "records"
    jobs = reproduce.job_list("smoke", str(tmp_path / "runs"), records)
    first = jobs[0]
    assert first["state"] == "new" and first["record"] == records / first["adapter"] / f"seed{first['seed']}"
    cfg = to_container(compose("train", reproduce.job_overrides("smoke", first["table"], first["adapter"], first["seed"])))
    first["record"].mkdir(parents=True)
    (first["record"] / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (first["record"] / "metrics.json").write_text('{"rougeL": 1.0}')
    again = reproduce.job_list("smoke", str(tmp_path / "runs"), records)
    assert again[0]["state"] == "recorded" and all(j["state"] != "recorded" for j in again[1:])

    cfg["train"]["max_steps"] += 1
    (first["record"] / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    with pytest.raises(ModeError, match=r"recorded with train.max_steps=\d+, but this job has train.max_steps="):
        reproduce.job_list("smoke", str(tmp_path / "runs"), records)
