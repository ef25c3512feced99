"""The paper's tables as declared once, in experiments/paper_tables.yaml: which experiment files, presets and
seeds form each table in each profile. `make reproduce-table`, the experiment files' sweeps (through the
`${mode.table:<profile>/<name>,<key>}` resolver) and `mode-aggregate` all read it here, so a table's jobs
have no second list anywhere."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from mode.errors import ModeError

PAPER_TABLES = Path(__file__).resolve().parents[2] / "experiments" / "paper_tables.yaml"


@functools.cache
def declarations(path: Path = PAPER_TABLES) -> dict:
    """Every table's declaration (title, rows, runs, ...), in file order."""
    try:
        tables = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ModeError(f"{path}: cannot read the table declarations ({err})") from err
    if not isinstance(tables, dict) or not all(isinstance(spec, dict) for spec in tables.values()):
        raise ModeError(f"{path}: expected a mapping of table name -> declaration")
    return tables


def table_presets(table: dict) -> list[str]:
    """A table's own presets: its rows' (in row order), else its `presets` (Table 3: Table 2's headline rows)."""
    return [row["preset"] for row in table.get("rows", [])] or list(table.get("presets", []))


def profile_experiments(profile: str, path: Path = PAPER_TABLES) -> dict[str, dict]:
    """experiment name -> {table, seeds, presets, and any other key of its `runs` entry}, sorted by name: the
    experiment files of conf/experiment/<profile>/ that the declarations give jobs to."""
    found: dict[str, dict] = {}
    for table, spec in declarations(path).items():
        for name, run in ((spec.get("runs") or {}).get(profile) or {}).items():
            where = f"{Path(path).name}: {table}.runs.{profile}.{name}"
            if name in found:
                raise ModeError(f"{where}: experiment {profile}/{name} is declared twice (also in {found[name]['table']})")
            seeds, presets = run.get("seeds"), run.get("presets", table_presets(spec))
            if not seeds or not all(isinstance(s, int) for s in seeds):
                raise ModeError(f"{where}.seeds={seeds!r}: give a list of integer seeds")
            if not presets:
                raise ModeError(f"{where}.presets: no presets (and the table has no rows to default to)")
            found[name] = {**run, "table": table, "seeds": list(seeds), "presets": list(presets)}
    if not found:
        known = sorted({p for spec in declarations(path).values() for p in (spec.get("runs") or {})})
        raise ModeError(f"profile {profile!r} has no tables in {Path(path).name} (profiles: {', '.join(known)})")
    return dict(sorted(found.items()))


def sweep_value(experiment: str, key: str):
    """`${mode.table:cpu/table6,presets}` in an experiment file: its sweep's presets or seeds as Hydra's
    comma list, or another key of its `runs` entry (e.g. target_modules) as declared."""
    profile, _, name = experiment.partition("/")
    run = profile_experiments(profile).get(name)
    if run is None:
        raise ModeError(f"experiment {experiment!r} has no runs entry in {PAPER_TABLES.name}")
    if key not in run:
        raise ModeError(f"{PAPER_TABLES.name}: {run['table']}.runs.{profile}.{name} has no key {key!r}")
    if key in ("presets", "seeds"):
        return ",".join(str(v) for v in run[key])
    return run[key]
