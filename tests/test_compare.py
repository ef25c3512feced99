"""mode-compare: task-level win rates, the sign test and bootstrap intervals, from run directories."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

from mode.evaluation import score
from mode.report.compare import Run, compare_pair, load_run, sign_test
from mode.run.results import write_results


def make_run(path, task_scores: dict[str, float], n_per_task=2, ids=None):
    """A run directory whose predictions give each task (close to) the wanted ROUGE-L."""
    rows = []
    for task, target in task_scores.items():
        for k in range(n_per_task):
            good = round(target / 100 * 10)
            pred = " ".join(f"w{i}" for i in range(good)) + " " + " ".join(f"x{i}" for i in range(10 - good))
            rows.append({"id": (ids or {}).get(task, f"{task}-")+str(k), "task": task, "prediction": pred,
                         "references": [" ".join(f"w{i}" for i in range(10))]})
    metrics = score(rows, {r["id"]: ["Question Answering"] for r in rows})
    write_results(path, metrics, rows)
    return metrics


def test_sign_test_is_the_exact_binomial():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 2**10)
    assert sign_test(2, 8) == sign_test(8, 2)


def test_win_rates_and_intervals(tmp_path):
    a = {f"task{i:03d}_x": 60.0 for i in range(20)}
    b = {f"task{i:03d}_x": 40.0 if i < 15 else (60.0 if i < 17 else 80.0) for i in range(20)}
    make_run(tmp_path / "a", a)
    make_run(tmp_path / "b", b)
    r = compare_pair(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert (r["tasks"], r["wins"], r["losses"], r["ties"]) == (20, 15, 3, 2)
    assert r["win_rate"] == 0.75 and r["loss_rate"] == 0.15
    assert r["sign_test_p"] == pytest.approx(sign_test(15, 3)) and r["sign_test_p"] < 0.01
    lo, hi = r["win_rate_ci95"]
    assert lo < 0.75 < hi and 0.4 < lo and hi <= 1.0
    assert r["mean_difference"] == pytest.approx((15 * 20 - 3 * 20) / 20)
    dlo, dhi = r["mean_difference_ci95"]
    assert dlo < r["mean_difference"] < dhi
    assert compare_pair(load_run(tmp_path / "a"), load_run(tmp_path / "b")) == r  # seeded


def test_bootstrap_intervals_cover_a_known_difference_about_95_percent_of_the_time():
    """Simulated pairs of runs whose per-task differences are N(2, 5^2): the true mean difference is 2 and the
    true chance that A beats B on a task is Phi(2/5) = 0.655. Over 200 simulated comparisons of 40 tasks the
    95% intervals must contain the truth about 95% of the time (percentile bootstrap: a little less for 40
    tasks; the bounds allow 3 binomial s.d. of 200 draws on either side and that small bias)."""
    import numpy as np

    mu, sigma, n_tasks, reps = 2.0, 5.0, 40, 200
    p_win = 0.5 * (1 + math.erf(mu / sigma / math.sqrt(2)))
    rng = np.random.default_rng(1)
    tasks = [f"task{i:03d}_x" for i in range(n_tasks)]
    covered_mean = covered_win = 0
    for rep in range(reps):
        base = rng.uniform(20, 80, n_tasks)
        diff = rng.normal(mu, sigma, n_tasks)
        a = Run("a", 0.0, dict(zip(tasks, base + diff)), None)
        b = Run("b", 0.0, dict(zip(tasks, base)), None)
        r = compare_pair(a, b, n_boot=1000, seed=rep)
        lo, hi = r["mean_difference_ci95"]
        covered_mean += lo <= mu <= hi
        lo, hi = r["win_rate_ci95"]
        covered_win += lo <= p_win <= hi
    assert 0.87 <= covered_mean / reps <= 0.99, covered_mean
    assert 0.85 <= covered_win / reps <= 0.99, covered_win


def test_bootstrap_interval_of_the_mean_matches_the_normal_theory_width():
    """For one sample the bootstrap distribution of the mean is close to N(mean, s^2/n) (s with ddof=0): the
    interval's half-width is 1.96 s / sqrt(n) within a few percent, centred on the sample mean."""
    import numpy as np

    diff = np.random.default_rng(3).normal(1.0, 4.0, 60)
    tasks = [f"task{i:03d}_x" for i in range(len(diff))]
    r = compare_pair(Run("a", 0.0, dict(zip(tasks, diff)), None), Run("b", 0.0, dict.fromkeys(tasks, 0.0), None))
    lo, hi = r["mean_difference_ci95"]
    half = 1.96 * diff.std() / math.sqrt(len(diff))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (hi + lo) / 2 == pytest.approx(diff.mean(), abs=0.1 * half)


def test_cli_prints_table3_style_lines_and_json(tmp_path):
    make_run(tmp_path / "a", {"task001_a": 80.0, "task002_b": 50.0, "task003_c": 30.0})
    make_run(tmp_path / "b", {"task001_a": 70.0, "task002_b": 50.0, "task003_c": 40.0})
    make_run(tmp_path / "c", {"task001_a": 10.0, "task002_b": 10.0, "task003_c": 10.0})
    cmd = [sys.executable, "-m", "mode.report.compare"]
    out = subprocess.run(cmd + [str(tmp_path / "a"), str(tmp_path / "b"), "--per-task"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "A beats B on 1 tasks (33.3%" in out and "B beats A on 1 (33.3%), 1 tie(s)" in out
    assert "sign test (two-sided, ties dropped): p = 1" in out and "task003_c" in out
    three = subprocess.run(cmd + [str(tmp_path / d) for d in "abc"] + ["--json"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    data = json.loads(three)
    assert len(data["pairs"]) == 3 and data["pairs"][1]["wins"] == 3  # A vs C
    matrix = subprocess.run(cmd + [str(tmp_path / d) for d in "abc"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    assert "row beats column" in matrix and "100.0% (p=0.25)" in matrix


def test_runs_that_evaluated_different_instances_are_refused(tmp_path):
    make_run(tmp_path / "a", {"task001_a": 80.0})
    make_run(tmp_path / "b", {"task001_a": 70.0}, n_per_task=3)
    proc = subprocess.run([sys.executable, "-m", "mode.report.compare", str(tmp_path / "a"), str(tmp_path / "b")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "evaluated different instances of 1 task(s), e.g. task001_a (2 vs 3 instances)" in proc.stderr


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "metrics.json: not found"),
    (lambda d: (d / "metrics.json").write_text("{oops"), "metrics.json: not valid JSON"),
    (lambda d: (d / "metrics.json").write_text(json.dumps({"rougeL": 3.0})), "no per-task rougeL scores"),
])
def test_bad_run_dirs_are_one_line_errors(tmp_path, setup, message):
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_run(good, {"task001_a": 80.0})
    bad.mkdir()
    setup(bad)
    proc = subprocess.run([sys.executable, "-m", "mode.report.compare", str(good), str(bad)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
