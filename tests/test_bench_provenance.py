"""Benchmark numbers trace to what produced them: every part of bench.json records the commit (and whether
the tree was clean), the CPU model, the torch version and the exact command, and bench.md says them."""

from __future__ import annotations

import shlex

import torch

from benchmarks.bench import exact_command, machine
from benchmarks.report import render
from mode.run.provenance import cpu_info, git_commit


def test_machine_records_commit_cpu_and_torch():
    m = machine()
    assert m["torch"] == torch.__version__ and m["cpu"] == cpu_info()["cpu"] and m["cores"] > 0
    recorded = git_commit()
    if recorded:  # a git checkout (CI's fresh clone is one)
        assert m["commit"] == recorded["commit"] and len(m["commit"]) == 40 and m["dirty"] == recorded["dirty"]


def test_the_command_is_recorded_exactly():
    argv = ["--quick", "--only", "floor,lora64", "--out", "/tmp/a folder"]
    command = exact_command(argv)
    assert command.startswith("python -m benchmarks.bench ") and shlex.split(command)[3:] == argv


def padding_part(commit: str | None, dirty: bool, cpu: str = "Test CPU 9000") -> dict:
    m = {"cpu": cpu, "cpu_features": ["avx2"], "cores": 2, "torch": "2.13.0+cpu", "python": "3.11.7",
         "platform": "Linux-test"}
    if commit:
        m.update(commit=commit, dirty=dirty)
    run = {"command": "python -m benchmarks.bench --parts padding", "date": "2026-12-03T10:00:00",
           "load_start": [0.1, 0.2, 0.3], "load_end": [0.1, 0.2, 0.3], "threads": 1, "machine": m}
    return {"run": run, "steps": 2, "data": "sni_case_study", "tokenizer": "byte", "rows": []}


def test_report_names_commit_tree_state_cpu_torch_and_command():
    text = render({"padding": padding_part("0123456789abcdef" * 2 + "01234567", dirty=False)})
    assert "Machine: Test CPU 9000 (avx2), 2 cores, torch 2.13.0+cpu" in text
    assert "Code: commit 0123456789ab (clean tree)." in text
    assert "Measured by `python -m benchmarks.bench --parts padding` at commit 0123456789ab (clean tree)" in text
    dirty = render({"padding": padding_part("f" * 40, dirty=True)})
    assert "commit ffffffffffff with uncommitted changes" in dirty
    part = padding_part("f" * 40, dirty=True)
    part["run"]["machine"]["changed"] = ["README.md", "mode/train.py"]
    assert "commit ffffffffffff with uncommitted changes to README.md, mode/train.py" in render({"padding": part})
    old = render({"padding": padding_part(None, dirty=False)})  # bench.json written before commits were recorded
    assert "Code: commit not recorded." in old


def test_parts_from_different_commits_or_machines_are_named_apart():
    results = {"padding": padding_part("a" * 40, dirty=False), "data": padding_part("b" * 40, dirty=True, cpu="Other")}
    results["data"].update(command="python scripts/bench_tokenise.py <cache dir>", runs={})
    text = render(results)
    assert "Machine (padding): Test CPU 9000" in text and "Machine (data): Other" in text
    assert "Code (padding): commit aaaaaaaaaaaa (clean tree)." in text
    assert "Code (data): commit bbbbbbbbbbbb with uncommitted changes." in text


def test_a_benchmarks_own_reports_do_not_make_the_code_dirty(tmp_path):
    """bench.py writes bench.json after each part: that must not mark the next part's code as changed."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.json").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_commit(tmp_path, ignore=("results",))["dirty"] is False
    (tmp_path / "results" / "bench.json").write_text('{"step": {}}\n')
    assert git_commit(tmp_path, ignore=("results",))["dirty"] is False
    assert git_commit(tmp_path)["dirty"] is True
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path, ignore=("results",)) == {"commit": git_commit(tmp_path)["commit"], "dirty": True,
                                                          "changed": ["code.py"]}
