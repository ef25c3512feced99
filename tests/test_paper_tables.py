"""experiments/paper_tables.yaml, the tables' one declaration: every table composes (its experiments and
presets exist, each row's preset has the row's shape), the experiment files sweep exactly what it declares,
its paper numbers are ../shared/PAPERS.md's, and Table 6's paper-profile budget is what it says."""

from __future__ import annotations

import itertools
import re

import pytest
from conftest import SHARED

from mode.errors import ModeError
from mode.report.aggregate import preset_shape, table_specs
from mode.run.config import CONF_DIR
from mode.run.tables import declarations, profile_experiments, sweep_value, table_presets

TABLES = declarations()
PROFILES = sorted({p for spec in TABLES.values() for p in spec.get("runs", {})})
PAPERS = SHARED / "PAPERS.md"
needs_papers = pytest.mark.skipif(not PAPERS.is_file(), reason=f"{PAPERS} not found (set MODE_SHARED_DIR)")
METHODS = {"LoRA": "lora", "MoLoRA": "molora", "MoLoRA-SD": "molora_sd", "MoDE": "mode", "MoRE": "more"}


def label_shape(label: str) -> tuple:
    """'MoDE 4x16x16' -> ('mode', 4, 16, 16); 'LoRA 64' / 'LoRA 1x60' -> ('lora', 1, r, 1); 'MoRE R8'."""
    name, shape = label.split(" ")
    dims = [int(d) for d in shape.lstrip("R").split("x")]
    if name in ("LoRA", "MoRE"):
        return (METHODS[name], 1, dims[-1], 1)
    return (METHODS[name], dims[0], dims[1], dims[2] if len(dims) == 3 else 1)


def all_presets() -> set[str]:
    found = set()
    for spec in TABLES.values():
        found |= set(table_presets(spec))
        for profile in spec.get("runs", {}).values():
            for run in profile.values():
                found |= set(run.get("presets", []))
    return found


# -- every declaration composes ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(all_presets()))
def test_every_declared_preset_is_an_adapter_config(preset):
    assert (CONF_DIR / "adapter" / f"{preset}.yaml").is_file(), preset
    assert preset_shape(preset)[0] in METHODS.values()


@pytest.mark.parametrize("table,label,preset", [(t, r["label"], r["preset"]) for t, spec in TABLES.items()
                                                for r in spec.get("rows", [])])
def test_each_rows_preset_has_the_rows_shape(table, label, preset):
    assert preset_shape(preset) == label_shape(label), f"{table}: {label} -> {preset}"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_composes_from_the_declaration(profile, tmp_path):
    """Each declared experiment exists as conf/experiment/<profile>/<name>.yaml and every such file is declared;
    `mode-train -m experiment=<profile>/<name>` sweeps exactly the declared presets and seeds."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    specs = table_specs(profile, str(tmp_path))
    assert list(specs) == list(profile_experiments(profile))
    for name, spec in specs.items():
        assert spec["table"] in TABLES and spec["sweep_dir"].is_relative_to(tmp_path)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={profile}/{name}"], return_hydra_config=True)
        GlobalHydra.instance().clear()
        assert str(cfg.hydra.sweeper.params.adapter) == ",".join(spec["presets"])
        assert str(cfg.hydra.sweeper.params.seed) == ",".join(map(str, spec["seeds"]))
        text = (CONF_DIR / "experiment" / profile / f"{name}.yaml").read_text()
        assert f"${{mode.table:{profile}/{name},presets}}" in text  # no second list of the jobs in the file


def test_the_records_of_the_running_cpu_sweep_keep_their_paths(tmp_path):
    """results/cpu/runs/ holds records at <preset>/seed<k> (Table 6) and <study>/<preset>/seed<k>: the
    declaration must give the cpu profile the same jobs at the same paths as the pinned sweep's files did."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("reproduce", REPO / "experiments" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    jobs = reproduce.job_list("cpu", str(tmp_path), tmp_path / "records")
    paths = {(j["table"], str(j["record"].relative_to(tmp_path / "records"))) for j in jobs}
    assert len(jobs) == 5 * 3 + 2 * 4 + 3 + 3 + 2
    assert ("table6", "paper/lora_60/seed1") in paths and ("table6_seeds", "paper/mode_14x4x1/seed7") in paths
    assert ("lr_3e-3", "lr_3e-3/paper/lora_4/seed1") in paths and ("long", "long/paper/mode_14x4x1/seed1") in paths


def write(tmp_path, text: str):
    path = tmp_path / "tables.yaml"
    path.write_text(text)
    declarations.cache_clear()
    return path


def test_a_bad_declaration_is_one_line_naming_the_key(tmp_path):
    try:
        twice = write(tmp_path, "a:\n  runs: {p: {t1: {seeds: [1], presets: [paper/lora_4]}}}\n"
                                "b:\n  runs: {p: {t1: {seeds: [2], presets: [paper/lora_4]}}}\n")
        with pytest.raises(ModeError, match=r"b.runs.p.t1: experiment p/t1 is declared twice \(also in a\)"):
            profile_experiments("p", twice)
        seeds = write(tmp_path, "a:\n  runs: {p: {t1: {seeds: one, presets: [paper/lora_4]}}}\n")
        with pytest.raises(ModeError, match=r"a.runs.p.t1.seeds='one': give a list of integer seeds"):
            profile_experiments("p", seeds)
        with pytest.raises(ModeError, match=r"profile 'q' has no tables in tables.yaml \(profiles: p\)"):
            profile_experiments("q", seeds)
        broken = write(tmp_path, "a:\n  runs: {p: [\n")
        with pytest.raises(ModeError, match=r"tables.yaml: cannot read the table declarations"):
            profile_experiments("p", broken)
        listed = write(tmp_path, "- a\n- b\n")
        with pytest.raises(ModeError, match=r"tables.yaml: expected a mapping of table name -> declaration"):
            profile_experiments("p", listed)
    finally:
        declarations.cache_clear()
    with pytest.raises(ModeError, match=r"table6.runs.cpu.table6 has no key 'target_modules'"):
        sweep_value("cpu/table6", "target_modules")


# -- the paper's numbers are PAPERS.md's ---------------------------------------------------------------------
def section(text: str, number: int) -> str:
    return text.split(f"## Table {number} ")[1].split("\n## ")[0]


def rows(table: str) -> dict[str, dict]:
    return {r["label"]: r for r in TABLES[table]["rows"]}


@needs_papers
def test_tables_2_4_5_are_the_papers():
    text = PAPERS.read_text(encoding="utf-8").replace("×", "x")
    table2 = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"\| (\S+ [\dx]+) \| ([\d.]+) \| ([\d.]+)%",
                                                                    section(text, 2))}
    assert len(table2) == 10
    assert {k: (r["rougeL"], r["params"]) for k, r in rows("table2").items() if r["rougeL"] is not None} == table2
    table4 = {f"MoDE {m[1]}x{m[2]}x{m[3]}": (float(m[4]), float(m[5]))
              for m in re.finditer(r"(\d+) (\d+) (\d+) → ([\d.]+) \(([\d.]+)%\)", section(text, 4))}
    assert len(table4) == 8 and {k: (r["rougeL"], r["params"]) for k, r in rows("table4").items()} == table4
    table5 = {f"MoDE {m[1]}": float(m[2]) for m in re.finditer(r"(\d+x\d+x\d+) ([\d.]+)", section(text, 5))}
    assert len(table5) == 12 and {k: r["rougeL"] for k, r in rows("table5").items()} == table5


@needs_papers
def test_table_3_win_rates_are_the_papers():
    labels = {label.split(" ")[0]: label for label in map(lambda p: label_for(p), table_presets(TABLES["table3"]))}
    found: dict[str, dict[str, int]] = {}
    for clause in section(PAPERS.read_text(encoding="utf-8"), 3).split("\n", 1)[1].strip().rstrip(".").split(";"):
        row, rest = clause.strip().split(">", 1)
        for part in rest.split(", >"):
            column, rate = part.rsplit(" ", 1)
            found.setdefault(labels[row], {})[labels[column]] = int(rate.rstrip("%"))
    assert TABLES["table3"]["win_rates"] == found and len(found) == 3


def label_for(preset: str) -> str:
    return next(r["label"] for spec in TABLES.values() for r in spec.get("rows", []) if r["preset"] == preset)


@needs_papers
def test_table_6_overall_and_per_task_are_the_papers():
    text = section(PAPERS.read_text(encoding="utf-8").replace("×", "x"), 6)
    overall, method = {}, None
    listing = " ".join(text.split("Per task")[0].split("\n")[1:]).strip().rstrip(".")  # wraps over lines
    for part in listing.split(" · "):
        m = re.fullmatch(r"(?:([A-Za-z-]+) )?(\d+x\d+)(?: \(.*\))? ([\d.]+)", part.strip())
        method = m[1] or method
        overall[f"{method} {m[2]}"] = float(m[3])
    assert overall.pop("LoRA 15x4") == 53.83  # one LoRA per task: a training setup, not reproduced
    assert {k: r["rougeL"] for k, r in rows("table6").items()} == overall
    per_task = {m[1]: [float(x) for x in m[2].split()][1:]  # the LoRA 15x4 column dropped
                for m in re.finditer(r"- (task\d+): ([\d. ]+)", text)}
    assert {name.split("_")[0]: scores for name, scores in TABLES["table6"]["per_task"].items()} == per_task
    assert len(per_task) == 15


# -- Table 6's budget on the paper profile -----------------------------------------------------------------
GEMMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def params(overrides: list[str]) -> dict:
    from mode.report.params import parameter_table
    from mode.run.config import compose

    return parameter_table(compose("train", overrides))


def test_table_6_paper_presets_are_within_the_stated_distance_of_6m():
    """`mode-params experiment=paper/table6 adapter=<preset>`: every row on the declared projections, within
    its method's stated distance of the paper's 6M."""
    budget = TABLES["table6"]["budget"]
    declared = profile_experiments("paper")["table6"]
    counts = {}
    for preset in declared["presets"]:
        table = params(["experiment=paper/table6", f"adapter={preset}"])
        assert list(table["adapter"].target_modules) == declared["target_modules"] == ["q_proj", "v_proj"]
        counts[preset] = table["trainable"]
        distance = abs(table["trainable"] - budget["parameters"]) / budget["parameters"]
        assert distance <= budget["within"][preset_shape(preset)[0]], f"{preset}: {table['trainable']:,}"
    assert counts["paper/lora_60"] == 6_912_000 and counts["paper/mode_14x4x1"] == 6_746_112


def test_q_v_brings_lora_1x60_closest_to_6m_of_every_set_of_gemma_projections():
    """LoRA 1x60 on every subset of Gemma 2B's seven projections (a subset's count is the sum of its
    per-module rows): none comes closer to 6M than the declared q,v."""
    targets = "[" + ",".join(GEMMA_PROJECTIONS) + "]"
    table = params(["model=gemma_2b", "adapter=paper/lora_60", f"adapter.target_modules={targets}"])
    per_module = {r["module"]: r["layers"] * r["per_layer"] for r in table["rows"]}
    distance = {subset: abs(sum(per_module[m] for m in subset) - TABLES["table6"]["budget"]["parameters"])
                for k in range(1, 8) for subset in itertools.combinations(GEMMA_PROJECTIONS, k)}
    best = min(distance.values())
    assert distance[("q_proj", "v_proj")] == best == 912_000
    assert distance[("q_proj", "k_proj", "v_proj", "o_proj")] == 7_824_000  # Tables 2-5's set: 13.8M
