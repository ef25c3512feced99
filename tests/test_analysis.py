"""mode-aggregate's analysis (mode/report/analysis.py): seed intervals, the paired bootstrap and permutation
test (calibration by simulation), Wilson intervals and win rates, routing divergences, and the cpu profile
aggregated from synthetic records (tests/analysis_records.py): every table and plot, byte-identical twice."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
from analysis_records import SPECIALISED, write_cpu_profile
from conftest import REPO

from mode.report import analysis as an


# -- seeds: t interval --------------------------------------------------------------------------------------
def _t_mass(q: float, df: int) -> float:
    """P(|T| < q) for Student's t with df degrees of freedom, by the trapezoid rule on its density."""
    x = np.linspace(0.0, q, 200_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return 2 * np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)


def test_t_quantiles_are_the_tables_and_hold_95_percent():
    # NIST/SEMATECH e-Handbook of Statistical Methods 1.3.6.7.2, two-sided 95% column (3 decimals).
    printed = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 10: 2.228, 20: 2.086,
               30: 2.042, 40: 2.021, 60: 2.000, 100: 1.984}
    for df, value in printed.items():
        assert round(an.t_quantile_975(df), 3) == value, df
    for df in [*range(1, 31), 31, 45, 120, 1000]:   # the table and the expansion beyond it
        assert _t_mass(an.t_quantile_975(df), df) == pytest.approx(0.95, abs=2e-6), df


def test_seed_interval_by_hand():
    r = an.seed_ci([20.0, 22.0, 27.0])            # mean 23, sd sqrt(13), t(0.975, 2) = 4.30265273
    assert (r["n"], r["mean"]) == (3, 23.0) and r["sd"] == pytest.approx(math.sqrt(13))
    assert r["half_width"] == pytest.approx(4.30265273 * math.sqrt(13) / math.sqrt(3))   # 8.9567
    assert r["ci95"] == pytest.approx([23 - 8.95667, 23 + 8.95667], abs=1e-4)
    r = an.seed_ci([1.0, 2.0, 3.0, 4.0])          # sd sqrt(5/3), t(0.975, 3) = 3.18244631
    assert r["half_width"] == pytest.approx(3.18244631 * math.sqrt(5 / 3) / 2)
    assert an.seed_ci([27.35])["ci95"] is None and an.seed_ci([27.35])["mean"] == 27.35
    assert an.seed_ci([])["mean"] is None


# -- paired differences -------------------------------------------------------------------------------------
def _crossed(rng, seeds, instances, delta, seed_sd=2.0, instance_sd=10.0, noise_sd=15.0):
    """d[s, i] = delta + seed effect + instance effect + seed x instance noise (ROUGE-L points)."""
    return (delta + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, instance_sd, (1, instances))
            + rng.normal(0, noise_sd, (seeds, instances)))


def test_two_level_bootstrap_covers_the_true_difference_about_95_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(200):
        lo, hi = an.percentile_ci(an.two_level_bootstrap(_crossed(rng, 5, 300, 2.0), n_boot=1000, seed=k))
        covered += lo <= 2.0 <= hi
    # about 0.94 here; resampling only seeds (0.81) or only instances (0.79) falls below the bound
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_interval_narrows_with_instances_and_is_seeded():
    rng = np.random.default_rng(2)
    width = {}
    for m in (50, 800):
        d = _crossed(rng, 3, m, 1.0, seed_sd=0.0)
        lo, hi = an.percentile_ci(an.two_level_bootstrap(d, n_boot=2000))
        width[m] = hi - lo
    assert width[800] < 0.5 * width[50]               # ~ sqrt(50/800) = 0.25
    d = _crossed(rng, 3, 40, 1.0)
    assert np.array_equal(an.two_level_bootstrap(d, 500), an.two_level_bootstrap(d, 500))


def test_sign_flip_p_is_uniform_under_the_null_and_small_for_a_clear_effect():
    rng = np.random.default_rng(3)
    ps = np.array([an.sign_flip_p(rng.normal(0, 20, 60), n_perm=1000, seed=k) for k in range(400)])
    assert 0.02 <= (ps < 0.05).mean() <= 0.09
    assert 0.42 <= ps.mean() <= 0.58 and 0.4 <= (ps < 0.5).mean() <= 0.6
    assert an.sign_flip_p(rng.normal(5, 10, 200)) == pytest.approx(1 / 10001)   # no flip reaches it
    assert an.sign_flip_p(np.zeros(10)) == 1.0


def test_paired_difference_pairs_by_seed_and_instance_id():
    tasks = {"a1": "task001_x", "a2": "task001_x", "b1": "task002_y", "b2": "task002_y", "c1": "task003_z"}
    method = {1: {"a1": 50.0, "a2": 40.0, "b1": 30.0, "b2": 20.0, "c1": 10.0},
              2: {"a1": 52.0, "a2": 42.0, "b1": 32.0, "b2": 22.0, "c1": 12.0},
              3: {"a1": 99.0, "a2": 99.0, "b1": 99.0, "b2": 99.0}}            # seed 3: the reference lacks it
    reference = {1: {"b2": 0.0, "b1": 10.0, "a2": 20.0, "a1": 30.0},          # another order; no c1
                 2: {"b2": 0.0, "b1": 10.0, "a2": 20.0, "a1": 30.0}}
    r = an.paired_difference(method, reference, tasks, n_boot=500, n_perm=500)
    assert (r["seeds"], r["n_seeds"], r["n_instances"], r["n_tasks"]) == ([1, 2], 2, 4, 2)
    assert r["difference"] == pytest.approx(21.0)                             # 20 on seed 1, 22 on seed 2
    assert r["per_seed"] == {"1": 20.0, "2": 22.0}
    assert r["per_task"]["task001_x"]["difference"] == pytest.approx(21.0)
    assert r["ci95"][0] <= 21.0 <= r["ci95"][1] and r["ci95"][0] >= 20.0      # every resample lies in [20, 22]
    assert an.paired_difference(method, {4: reference[1]}, tasks) is None


# -- win rates -----------------------------------------------------------------------------------------------
def test_wilson_interval_matches_newcombe():
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (score interval without continuity correction).
    for k, n, lo, hi in [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                         (1, 29, 0.0061, 0.1718)]:
        assert [round(x, 4) for x in an.wilson_interval(k, n)] == [lo, hi]
    assert an.wilson_interval(0, 10)[1] == pytest.approx(1.959964**2 / (10 + 1.959964**2))
    assert an.wilson_interval(0, 0) is None


def test_task_win_rate_by_hand():
    a = {1: {"task1_a": 50, "task2_b": 40, "task3_c": 30, "task4_d": 20, "task5_e": 10},
         2: {"task1_a": 52, "task2_b": 42, "task3_c": 32, "task4_d": 18, "task5_e": 10},
         9: {"task1_a": 0, "task2_b": 0, "task3_c": 0, "task4_d": 0, "task5_e": 0}}   # unpaired: ignored
    b = {1: {"task1_a": 40, "task2_b": 45, "task3_c": 20, "task4_d": 30, "task5_e": 10},
         2: {"task1_a": 40, "task2_b": 35, "task3_c": 20, "task4_d": 30, "task5_e": 10},
         3: {"task1_a": 90, "task2_b": 90, "task3_c": 90, "task4_d": 90, "task5_e": 90}}   # unpaired: ignored
    # seed means a: 51, 41, 31, 19, 10; b: 40, 40, 20, 30, 10 -> wins task1-3, loses task4, ties task5
    r = an.task_win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["tasks"], r["paired_seeds"]) == (3, 1, 1, 5, [1, 2])
    assert r["win_rate"] == 75.0                                              # ties excluded: 3 / 4
    assert r["win_rate_ci95"] == pytest.approx([100 * x for x in an.wilson_interval(3, 4)], abs=1e-5)
    assert r["sign_test_p"] == 0.625                                          # 2 * (1 + 4) / 16
    back = an.task_win_rate(b, a)
    assert back["win_rate"] == 25.0 and back["sign_test_p"] == 0.625


# -- routing ----------------------------------------------------------------------------------------------------
def test_entropy_and_js_divergence_bounds():
    assert an.normalized_entropy(np.full(7, 1 / 7)) == pytest.approx(1.0)
    assert an.normalized_entropy(np.eye(5)[2]) == pytest.approx(0.0)
    p = np.array([0.5, 0.3, 0.2])
    assert an.js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert an.js_divergence(np.eye(4)[0], np.eye(4)[3]) == pytest.approx(1.0)
    assert an.js_divergence(p, np.array([0.2, 0.3, 0.5])) == pytest.approx(an.js_divergence([0.2, 0.3, 0.5], p))
    # JS(p, q) = H((p+q)/2) - (H(p) + H(q))/2, in bits: ([1, 0], [1/2, 1/2]) -> H(3/4, 1/4) - 1/2
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert an.js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(h - 0.5)


def test_routing_specialisation_per_layer_and_without_task_usage():
    same = {"t1": [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]], "t2": [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]]}
    apart = {"t1": [[1, 0, 0, 0], [0, 1, 0, 0]], "t2": [[0, 0, 1, 0], [0, 0, 0, 1]]}
    routing = {"routed_layers": {"layers.0.q": {"task_usage": same}, "layers.1.q": {"task_usage": apart},
                                 "layers.2.q": {"usage": [[0.25] * 4]}},              # an older record's layer
               "mean_normalized_entropy": 0.9}
    r = an.routing_specialisation(routing)
    assert set(r["layers"]) == {"layers.0.q", "layers.1.q"}
    assert r["layers"]["layers.0.q"]["js"] == pytest.approx(0.0, abs=1e-12)
    assert r["layers"]["layers.1.q"]["js"] == pytest.approx(1.0)
    assert r["mean_js"] == pytest.approx(0.5)
    uniform_block = 1.0
    skewed_block = float(an.normalized_entropy([0.1, 0.2, 0.3, 0.4]))
    assert r["layers"]["layers.0.q"]["task_entropy"]["t1"] == pytest.approx((uniform_block + skewed_block) / 2)
    assert r["task_entropy"]["t2"] == pytest.approx((uniform_block + skewed_block) / 4)   # one-hot layer: 0
    block = an.routing_block({1: routing, 2: routing}, top=1)
    assert block["top_layers"] == [["layers.1.q", 1.0]] and block["seeds"] == [1, 2]
    assert block["heatmap"]["layers"][0]["layer"] == "layers.1.q"
    assert an.routing_specialisation({"routed_layers": {"x": {"usage": [[1.0]]}}}) is None
    half = {"t1": [[0.25] * 4, [1, 0, 0, 0]], "t2": [[0.25] * 4, [0, 1, 0, 0]], "t3": [[0.25] * 4, [0, 1, 0, 0]]}
    r = an.routing_specialisation({"routed_layers": {"layers.0.q": {"task_usage": half}}})
    assert r["mean_js"] == pytest.approx((0 + (1 + 1 + 0) / 3) / 2)   # blocks averaged; pairs t1-t2, t1-t3, t2-t3


def test_curves_mean_over_seeds_at_common_steps():
    c1 = {"train": [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0}],
          "eval": [{"step": 2, "rougeL": 10.0}]}
    c2 = {"train": [{"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.0}, {"step": 3, "train/loss": 0.5}],
          "eval": [{"step": 2, "rougeL": 20.0}]}
    r = an.curves_block({1: c1, 2: c2})
    assert r["train_loss"] == {"steps": [1, 2], "mean": [3.0, 2.0], "seeds": [1, 2]}
    assert r["eval"]["mean"] == [15.0] and r["eval"]["per_seed"] == {"1": [10.0], "2": [20.0]}
    assert r["routing_entropy"] is None


# -- the cpu profile, aggregated -----------------------------------------------------------------------------
class FakeWandb(types.SimpleNamespace):
    """Records what mode-aggregate hands W&B."""

    def __init__(self):
        super().__init__(runs=[])

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = run.logged.append
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    @staticmethod
    def Table(columns, data):  # noqa: N802 (wandb's names)
        return ("table", tuple(columns), data)

    @staticmethod
    def Image(path):  # noqa: N802
        return ("image", path)


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
def test_cpu_profile_aggregates_every_analysis_identically_twice(tmp_path):
    from mode.report.aggregate import aggregate, render_tables

    runs, records = tmp_path / "runs", tmp_path / "records"
    write_cpu_profile(runs, records)
    fake = FakeWandb()
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    summary = aggregate("cpu", str(runs), out_a, records, wandb=True, wandb_dir=tmp_path / "wandb", wandb_module=fake)
    # the second time in another process, through the command line: no state carries over
    proc = subprocess.run([sys.executable, "-m", "mode.report.aggregate", "cpu", "--runs-dir", str(runs),
                           "--records", str(records), "--out", str(out_b)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = sorted(p.name for p in out_a.iterdir())
    assert names == sorted(p.name for p in out_b.iterdir())
    for name in names:
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name   # PNGs included
    for name in ["table6.md", "table6_paired.md", "table6_paired.png", "table6_task_wins.md", "table6_routing.md",
                 "table6_routing_mode_14x4.png", "table6_routing_molora_sd_24x8.png", "table6_routing_entropy.png",
                 "table6_curves.png", "table6.png", "lr_3e-3_paired.md", "long_curves.png", "summary.json"]:
        assert name in names, name
    assert not any(n.startswith("table6_seeds") for n in names)               # pooled into table6

    # Every table file is what summary.json renders (the committed-results check, all file kinds).
    written = json.loads((out_a / "summary.json").read_text())
    rendered = render_tables(written)
    assert {n for n in names if n.endswith((".md", ".csv", ".tex"))} == set(rendered)
    for name, text in rendered.items():
        assert (out_a / name).read_text() == text, name

    rows = {r["row"]: r for r in summary["tables"]["table6"]}
    assert set(summary["tables"]) == {"table6", "lr_3e-4", "lr_3e-3", "long"}
    assert rows["LoRA 1x60"]["seeds"] == "5/7" and rows["MoLoRA 12x4"]["seeds"] == "3/3"
    scores = list(rows["LoRA 1x60"]["seed_rougeL"].values())
    assert rows["LoRA 1x60"]["rougeL_ci95"] == pytest.approx(an.seed_ci(scores)["ci95"], abs=1e-5)
    assert "± " in (out_a / "table6.md").read_text() and "(n=5)" in (out_a / "table6.md").read_text()
    assert summary["tables"]["lr_3e-3"][0]["seeds"] == "1/1"                  # found among the records

    paired = {(r["method"], r["reference"]): r for r in summary["paired"]["table6"]["rows"]}
    assert summary["paired"]["table6"]["references"] == ["LoRA 1x60", "MoLoRA-SD 24x8"]
    assert paired[("MoDE 14x4", "LoRA 1x60")]["seeds"] == [1, 2, 3, 4, 5]
    assert paired[("MoLoRA 12x4", "MoLoRA-SD 24x8")]["n_seeds"] == 3
    assert paired[("MoDE 14x4", "LoRA 1x60")]["n_instances"] == 32
    mode_lora = paired[("MoDE 14x4", "LoRA 1x60")]
    assert mode_lora["difference"] > 0 and mode_lora["ci95"][0] > 0 and mode_lora["p_value"] < 0.01

    wins = summary["task_wins"]["table6"]["cells"]["MoDE 14x4 > LoRA 1x60"]
    assert wins["paired_seeds"] == [1, 2, 3, 4, 5] and wins["tasks"] == 4

    routing = {r["label"]: r for r in summary["routing"]["table6"]["configs"]}
    assert set(routing) == {"MoDE 14x4", "MoLoRA-SD 24x8"}                    # MoLoRA 12x4's records lack task_usage
    assert routing["MoDE 14x4"]["top_layers"][0][0] == SPECIALISED
    assert routing["MoDE 14x4"]["heatmap"]["layers"][0]["layer"] == SPECIALISED
    assert routing["MoDE 14x4"]["layer_js"][SPECIALISED] > 0.5 > routing["MoDE 14x4"]["mean_js"]
    curves = summary["curves"]["long"]["MoDE 14x4"]
    assert curves["eval"]["steps"][-1] == 450 and curves["routing_entropy"]["steps"][-1] == 450

    # W&B: one aggregate run per table, in the table's group, offline, its CSVs as tables and PNGs as images.
    by_name = {r.kwargs["name"]: r for r in fake.runs}
    assert set(by_name) == {"aggregate-table6", "aggregate-lr_3e-4", "aggregate-lr_3e-3", "aggregate-long"}
    run = by_name["aggregate-table6"]
    assert (run.kwargs["group"], run.kwargs["job_type"], run.kwargs["mode"]) == ("cpu-table6", "aggregate", "offline")
    assert by_name["aggregate-lr_3e-3"].kwargs["group"] == "cpu-lr" and run.finished
    logged = run.logged[0]
    assert logged["table/table6_paired"][1][:3] == ("method", "reference", "difference")
    assert logged["plot/table6_routing_mode_14x4"] == ("image", str(out_a / "table6_routing_mode_14x4.png"))
    assert {k for k in logged if k.startswith("table/")} == {"table/table6", "table/table6_paired",
                                                             "table/table6_task_wins", "table/table6_routing"}


def test_committed_results_render_from_their_summary():
    """Committed results/<profile>/ folders: every table file render_tables knows is what it renders from the
    committed summary.json (older summaries: main-table titles from their Markdown, the old formats)."""
    from mode.report.aggregate import render_tables

    for path in sorted((REPO / "results").glob("*/summary.json")):
        folder, summary = path.parent, json.loads(path.read_text())
        titles = {n: (folder / f"{n}.md").read_text().splitlines()[0].removeprefix("# ") for n in summary["tables"]}
        for name, text in render_tables(summary, titles).items():
            assert (folder / name).read_text() == text, folder / name
