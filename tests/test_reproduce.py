"""`make reproduce-table`: the smoke profile end to end, reuse of finished runs, byte-identical
re-aggregation, and the paper profile's job list without a GPU."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, needs_shared_sni, needs_stories

DRIVER = [sys.executable, str(REPO / "experiments" / "reproduce.py")]


def run(args, **kw):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_paper_profile_dry_run_lists_jobs_without_a_gpu(tmp_path):
    out = run(DRIVER + ["paper", "--dry-run", "--runs-dir", str(tmp_path)])
    lines = [line for line in out.splitlines() if line.startswith("table")]
    assert len(lines) == 50 and all(" new " in line or " shared " in line for line in lines)
    assert "adapter=paper/mode_12x16x8" in out and "case_study/paper/mode_14x4x1/seed1" in out
    assert "50 jobs listed, 47 to run" in out  # Table 3's headline methods with seeds 2 and 3
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
def test_paper_profile_on_an_8_gpu_node_and_on_slurm_prints_the_commands_a_cluster_runs(tmp_path):
    out = run(DRIVER + ["paper", "--dry-run", "--gpus", "8", "--runs-dir", str(tmp_path)])
    cmds = [line for line in out.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 47 and all("-m torch.distributed.run --standalone --nproc_per_node=8 -m mode.train" in c
                                   and " resume=true" in c and " hydra.run.dir=" in c for c in cmds)
    assert "8 process(es) on cuda; global batch 128 = micro 8 x accumulation 2 x 8; 20,000 steps" in out
    packed = run(DRIVER + ["paper", "--dry-run", "--gpus", "2", "--jobs-per-node", "4", "--runs-dir", str(tmp_path)])
    slots = [line.split("]")[0] for line in packed.splitlines() if line.startswith("[slot")]
    assert slots[:5] == ["[slot 0, devices 0,1", "[slot 1, devices 2,3", "[slot 2, devices 4,5",
                         "[slot 3, devices 6,7", "[slot 0, devices 0,1"]  # never two jobs on one device
    slurm = run(DRIVER + ["paper", "--dry-run", "--gpus", "8", "--launcher", "slurm", "--runs-dir", str(tmp_path)])
    sweeps = [line for line in slurm.splitlines() if line.startswith("+ ")]
    assert len(sweeps) == 5 and all("hydra/launcher=slurm" in c and "hydra.launcher.gpus_per_node=8" in c
                                    and "hydra.launcher.tasks_per_node=8" in c for c in sweeps)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@needs_stories
@needs_shared_sni
def test_smoke_profile_on_two_processes_per_job_equals_one_process_and_aggregates(tmp_path):
    """GPUS=2 on CPU: each job runs on 2 gloo processes under torchrun; its adapter equals the
    single-process run's (the same micro-batches) to 1e-4 absolute, about 0.1% of the weights' scale: the two
    micro-batch gradients are summed by an all-reduce instead of in place, which changes their last bits, and
    AdamW's normalised update turns that into differences up to 1e-5 after 3 steps (MoDE 16x4, measured); the
    finished sweep aggregates."""
    from safetensors.torch import load_file
    two, one = tmp_path / "two", tmp_path / "one"
    log = run(DRIVER + ["smoke", "--gpus", "2", "--tables", "table4", "--runs-dir", str(two), "--out", str(tmp_path / "a")])
    assert "--nproc_per_node=2" in log
    run(DRIVER + ["smoke", "--tables", "table4", "--runs-dir", str(one), "--no-aggregate"])
    for job in sorted((two / "reproduce" / "smoke" / "paper").iterdir()):
        a = load_file(job / "seed1" / "adapter" / "adapter_model.safetensors")
        b = load_file(one / "reproduce" / "smoke" / "paper" / job.name / "seed1" / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys(), job.name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=f"{job.name} {key}")
    assert "0 to run" in run(DRIVER + ["smoke", "--tables", "table4", "--dry-run", "--runs-dir", str(two)])


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
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


def test_a_refused_aggregation_leaves_no_out_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mode.report.aggregate", "smoke", "--runs-dir", str(tmp_path / "none"),
                           "--records", str(tmp_path / "no_records"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no finished run of profile 'smoke'" in proc.stderr
    assert not (tmp_path / "out").exists()
