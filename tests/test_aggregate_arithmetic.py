"""mode-aggregate's arithmetic against hand-computed values: mean and s.d. over seeds, the seed interval,
% of the base's non-embedding parameters (`table_rows`), and task win rates averaged over the seeds both
methods ran (`win_rate_matrix`), on small synthetic Cells and run records."""

from __future__ import annotations

import json
import math

import pytest

from mode.report.aggregate import Cell, table_rows, win_rate_matrix


def metrics(rouge: float, trainable: int = 1_000, base: int = 200_000) -> dict:
    return {"rougeL": rouge, "trainable_parameters": trainable, "base_non_embedding_parameters": base}


def test_table_rows_mean_sd_interval_and_percent_of_base():
    three = Cell("lora_64", ("lora", 1, 64, 1), [1, 2, 3], "LoRA 64", {"rougeL": 55.0, "params": 6.31},
                 metrics={2: metrics(22.0, 999, 1), 1: metrics(20.0), 3: metrics(27.0)})
    one_of_two = Cell("mode_16x4x1", ("mode", 16, 4, 1), [1, 2], "MoDE 16x4", None,
                      metrics={2: metrics(30.5, 3_000, 600_000)})
    none = Cell("more_8", ("more", 1, 8, 1), [1], "MoRE R8", None)
    rows = table_rows([three, one_of_two, none])
    assert [r["row"] for r in rows] == ["LoRA 64", "MoDE 16x4", "MoRE R8"]

    a = rows[0]
    # mean (20 + 22 + 27) / 3 = 23; s.d. (n - 1) sqrt((9 + 1 + 16) / 2) = sqrt(13)
    assert a["seeds"] == "3/3" and a["rougeL"] == pytest.approx(23.0) and a["rougeL_std"] == pytest.approx(math.sqrt(13))
    # parameters come from the lowest seed's metrics: 100 * 1,000 / 200,000 = 0.5 %
    assert a["trainable_params"] == 1_000 and a["params_pct"] == pytest.approx(0.5)
    assert a["paper_rougeL"] == 55.0 and a["paper_params_pct"] == 6.31
    if "rougeL_ci95" in a:  # the 95% t interval: t(0.975, 2) = 4.302653 (tables), half-width t * sd / sqrt(3)
        half = 4.302653 * math.sqrt(13) / math.sqrt(3)
        assert a["rougeL_ci95"] == pytest.approx([23.0 - half, 23.0 + half], abs=1e-5)
        assert a["n_seeds"] == 3 and a["seed_rougeL"] == {"1": 20.0, "2": 22.0, "3": 27.0}

    b = rows[1]
    assert b["seeds"] == "1/2" and b["rougeL"] == 30.5 and b["rougeL_std"] is None
    assert b["params_pct"] == pytest.approx(0.5) and b["paper_rougeL"] is None
    if "rougeL_ci95" in b:
        assert b["rougeL_ci95"] is None

    c = rows[2]
    assert c["seeds"] == "0/1" and c["rougeL"] is None and c["rougeL_std"] is None
    assert c["trainable_params"] is None and c["params_pct"] is None


def write_run(path, per_task: dict[str, float]):
    path.mkdir(parents=True)
    body = {"rougeL": sum(per_task.values()) / len(per_task),
            "per_task": {t: {"rougeL": v, "exact_match": 0.0, "num_instances": 2, "category": "qa"}
                         for t, v in per_task.items()}}
    (path / "metrics.json").write_text(json.dumps(body))
    return path


# per-task ROUGE-L by seed; B's seed 3 has no partner in A and must not enter the pairing
A = {1: {"task001_a": 50, "task002_b": 10, "task003_c": 30, "task004_d": 80, "task005_e": 40, "task006_f": 90},
     2: {"task001_a": 70, "task002_b": 90, "task003_c": 30, "task004_d": 80, "task005_e": 40, "task006_f": 10}}
B = {1: {"task001_a": 62, "task002_b": 20, "task003_c": 30, "task004_d": 70, "task005_e": 45, "task006_f": 49},
     2: {"task001_a": 62, "task002_b": 60, "task003_c": 30, "task004_d": 70, "task005_e": 45, "task006_f": 49},
     3: {"task001_a": 0, "task002_b": 0, "task003_c": 0, "task004_d": 0, "task005_e": 0, "task006_f": 0}}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * (centre - half), 100 * (centre + half)]


def test_win_rates_average_each_task_over_the_seeds_both_methods_ran(tmp_path):
    """Seed-averaged differences A - B over seeds 1 and 2: task001 60 - 62 < 0 (with B's seed 3 it would be
    60 - 41.3 > 0), task002 50 - 40 > 0 (though seed 1 alone loses), task003 tie, task004 +10, task005 -5,
    task006 50 - 49 > 0: A wins 3, loses 2, ties 1; win rate 3 / 5 = 60% (ties excluded)."""
    cells = []
    for label, scores in (("LoRA 64", A), ("MoDE 16x4", B), ("MoLoRA 16x4", {})):
        runs = {s: write_run(tmp_path / label.replace(" ", "_") / f"seed{s}", t) for s, t in scores.items()}
        cells.append(Cell(label, ("lora", 1, 1, 1), sorted(scores), label, None, runs=runs))
    paper = {"table3": {"methods": ["LoRA 64", "MoLoRA 16x4", "MoDE 16x4"],
                        "win_rates": {"LoRA 64": {"MoDE 16x4": 22}}}}
    w = win_rate_matrix({"table2": cells}, paper)
    assert w["methods"] == ["LoRA 64", "MoDE 16x4"]          # a method without runs drops out
    assert w["seeds"] == {"LoRA 64": 2, "MoDE 16x4": 3}
    ab, ba = w["cells"]["LoRA 64 > MoDE 16x4"], w["cells"]["MoDE 16x4 > LoRA 64"]
    assert (ab["wins"], ab["losses"], ab["ties"], ab["tasks"]) == (3, 2, 1, 6)
    assert (ba["wins"], ba["losses"], ba["ties"], ba["tasks"]) == (2, 3, 1, 6)
    assert ab["win_rate"] == pytest.approx(60.0) and ba["win_rate"] == pytest.approx(40.0)
    assert ab["paired_seeds"] == [1, 2]
    # mean seed-averaged difference: (-2 + 10 + 0 + 10 - 5 + 1) / 6
    assert ab["mean_task_difference"] == pytest.approx(14 / 6, abs=1e-6)
    assert ba["mean_task_difference"] == pytest.approx(-14 / 6, abs=1e-6)
    # exact two-sided sign test of 3 vs 2: 2 * (C(5,0) + C(5,1) + C(5,2)) / 2^5 = 1, capped at 1
    assert ab["sign_test_p"] == ba["sign_test_p"] == 1.0
    assert ab["win_rate_ci95"] == pytest.approx(wilson(3, 5), abs=1e-4)
    assert ba["win_rate_ci95"] == pytest.approx(wilson(2, 5), abs=1e-4)
    assert ab["paper"] == 22 and ba["paper"] is None
