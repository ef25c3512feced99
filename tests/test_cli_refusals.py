"""mode-aggregate's and mode-eval's refusals: exit status 2, one line naming the problem, no traceback, and
no output folder left behind (mode-eval's own refusals of bad overrides: tests/test_train_eval.py)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def aggregate_empty(tmp_path, profile: str = "smoke") -> tuple[subprocess.CompletedProcess, object]:
    runs, records, out = tmp_path / "runs", tmp_path / "records", tmp_path / "out"
    runs.mkdir()
    records.mkdir()
    proc = run("mode.report.aggregate", profile, "--runs-dir", str(runs), "--records", str(records), "--out", str(out))
    return proc, out


def test_aggregate_of_a_profile_without_runs_is_refused_and_leaves_no_out_folder(tmp_path):
    proc, out = aggregate_empty(tmp_path)
    assert_one_line_refusal(proc, "no finished run of profile 'smoke' found")
    assert not out.exists()


def test_aggregate_of_an_unknown_profile_is_refused_and_writes_nothing(tmp_path):
    proc = run("mode.report.aggregate", "no_such_profile", "--runs-dir", str(tmp_path / "runs"),
               "--out", str(tmp_path / "out"))
    assert_one_line_refusal(proc, "profile 'no_such_profile' has no tables in paper_tables.yaml")
    assert not any(tmp_path.iterdir())


def test_eval_of_a_run_without_an_adapter_is_refused_and_leaves_no_folder(tmp_path, sni_fixture):
    from omegaconf import OmegaConf

    from mode.run.config import compose

    run_dir, out = tmp_path / "run", tmp_path / "eval"
    run_dir.mkdir()
    cfg = compose("train", ["model=tiny_random", f"data.sni_dir={sni_fixture}", "data.tasks=[task001_add_numbers]"])
    OmegaConf.save(cfg, run_dir / "config.yaml")
    proc = run("mode.eval", f"run_dir={run_dir}", f"hydra.run.dir={out}")
    assert_one_line_refusal(proc, "no such file (not an adapter folder)")
    assert not out.exists() and sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
