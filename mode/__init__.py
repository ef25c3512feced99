"""mode: Mixture of Dyadic Experts and its baselines for multi-task PEFT on Super-NaturalInstructions.

The packages follow a run's data flow, and imports flow one way (tests/test_layout.py checks it):

    conf/ -> data/ -> adapters/ -> training/ -> evaluation/ -> report/
             models/                                          export/  (beside report: runs leave the framework)
                                     (the entry points train.py and eval.py sit on top)
    run/ and errors.py underneath everything

`mode.train` / `mode.eval` are the commands (`mode-train`, `mode-eval`; mode-eval also evaluates any base
model, alone or with a PEFT LoRA); `mode.export` is `mode-export` (PEFT, merged, Hub folders);
`mode.adapters` and `mode.metrics` are the public Python API (docs/python_api.md).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Import paths of the flat layout before 0.2, kept for one release. `mode.metrics` is a public contract
# (SPEC) and stays without a warning.
_MOVED = {
    "mode.metrics": ("mode.evaluation.metrics", False),
    "mode.config": ("mode.run.config", True),
    "mode.run_dir": ("mode.run.run_dir", True),
    "mode.fileio": ("mode.run.fileio", True),
    "mode.loggers": ("mode.run.loggers", True),
    "mode.provenance": ("mode.run.provenance", True),
    "mode.validation": ("mode.training.checks", True),
    "mode.losses": ("mode.training.losses", True),
    "mode.optim": ("mode.training.optim", True),
    "mode.checkpoint": ("mode.training.checkpoint", True),
    "mode.preemption": ("mode.training.preemption", True),
    "mode.aggregate": ("mode.report.aggregate", True),
    "mode.compare": ("mode.report.compare", True),
    "mode.params": ("mode.report.params", True),
    "mode.adapters.mode": ("mode.adapters.dyadic", True),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old import path to the module's new home (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        new = self._new(module.__name__)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import returns the real module

    def get_code(self, name):  # `python -m <old path>` runs the new module as __main__
        return importlib.util.find_spec(self._new(name)).loader.get_code(self._new(name))

    @staticmethod
    def _new(name: str) -> str:
        new, deprecated = _MOVED[name]
        if deprecated:
            warnings.warn(f"{name} moved to {new}; the old path goes in mode 0.3", DeprecationWarning, stacklevel=3)
        return new


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
