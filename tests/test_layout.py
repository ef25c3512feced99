"""The package layout shows the data flow, and imports flow one way:

    errors < run < data, adapters < models < training < evaluation < report, export < entry points (train, eval)

A module may import its own package and any package of a lower layer, never a higher one or a sibling of
its own layer (data and adapters stay independent). Function-level imports count too.
"""

from __future__ import annotations

import ast
import importlib
import warnings

import pytest
from conftest import REPO

LAYERS = {"errors": 0, "run": 1, "data": 2, "adapters": 2, "models": 3, "training": 4, "evaluation": 5,
          "report": 6, "export": 6, "train": 7, "eval": 7, "__init__": 7}
PACKAGE = REPO / "mode"


def unit(module: str) -> str:
    """'mode.training.loop' -> 'training'; 'mode.train' -> 'train'; 'mode' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mode"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mode" and not node.level:
            found |= {node.module} if node.module != "mode" else {f"mode.{a.name}" for a in node.names}
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts), path


def test_every_module_belongs_to_a_known_layer_and_no_flat_grab_bag():
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top_level == ["__init__", "errors", "eval", "train"]  # everything else lives in a package
    for name, _ in modules():
        assert unit(name) in LAYERS, f"{name}: add its package to LAYERS (and to mode/__init__.py's picture)"


def violations(name: str, targets: set[str]) -> list[str]:
    own = unit(name)
    return [f"{name} imports {t} ({own}: layer {LAYERS[own]}, {unit(t)}: layer {LAYERS[unit(t)]})"
            for t in sorted(targets) if unit(t) != own and own != "__init__" and LAYERS[unit(t)] >= LAYERS[own]]


def test_imports_flow_one_way():
    bad = [line for name, path in modules() for line in violations(name, imports_of(path))]
    assert not bad, "\n".join(bad)


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nfrom mode.run.fileio import fsync_dir\n\n\ndef f():\n"
                       "    from mode.evaluation import evaluate\n    import mode.adapters\n")
    assert [v.split(" imports ")[1].split()[0] for v in violations("mode.training.planted", imports_of(planted))] == [
        "mode.evaluation"]                                   # upward, inside a function
    assert [v.split(" imports ")[1].split()[0] for v in violations("mode.data.planted", imports_of(planted))] == [
        "mode.adapters", "mode.evaluation"]                  # sideways (same layer) and upward


@pytest.mark.parametrize("old,new", [("mode.config", "mode.run.config"), ("mode.checkpoint", "mode.training.checkpoint"),
                                     ("mode.aggregate", "mode.report.aggregate"), ("mode.adapters.mode", "mode.adapters.dyadic")])
def test_old_import_paths_still_work_with_a_deprecation_warning(old, new):
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_public_contract_paths_import_without_warning():
    import sys

    sys.modules.pop("mode.metrics", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from mode.metrics import sni_metrics  # SPEC's path

        import mode.adapters  # noqa: F401
    assert sni_metrics(["a"], [["a"]])["exact_match"] == 100.0
