"""`python -m mode.eval run_dir=<run>` (`mode-eval`): evaluate a finished run again.

Reloads the run's base model and saved adapter, rebuilds the same evaluation instances and writes
metrics.json + predictions.jsonl under `<run>/evals/<time>/`, then says whether they reproduce the run's
own metrics. Generation and scoring live in `mode.evaluation`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mode.errors import ModeError, exit_on_user_error
from mode.evaluation import evaluate
from mode.run import config as mode_config
from mode.run.results import write_results

log = logging.getLogger(__name__)


def _run_config(cfg: DictConfig) -> DictConfig:
    """The run's own resolved config, with this command's overrides (except run_dir) applied on top."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(str(cfg.run_dir))
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ModeError(f"run_dir={str(run_dir)!r} has no config.yaml (is it a mode run directory?)")
    run_cfg = OmegaConf.load(path)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("run_dir=")]
    check_overrides(overrides)
    return OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(overrides))


# What mode-eval may change: how it evaluates and where things are. Everything else (model, adapter, data
# selection and split, training) is the run's own: another data.split_seed would evaluate training instances.
EVAL_OVERRIDABLE = ("eval.", "paths.", "data.sni_dir", "hydra.", "run_dir")


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if not key.startswith(EVAL_OVERRIDABLE):
            raise ModeError(f"mode-eval evaluates the run as it was trained: {key} cannot be overridden (only "
                            "eval.*, paths.* and data.sni_dir can); train a new run to change it")


def evaluate_run(cfg: DictConfig, out_dir: str) -> dict:
    from mode.adapters import apply_adapters, load_adapters, read_adapter_config
    from mode.adapters.diagnostics import AdapterDiagnostics
    from mode.data.dataset import build_data
    from mode.models import load_model_and_tokenizer

    run_cfg = _run_config(cfg)
    run_dir = Path(str(cfg.run_dir))
    adapter_dir = run_dir / "adapter"
    saved = read_adapter_config(adapter_dir)
    model, tokenizer = load_model_and_tokenizer(run_cfg.model)
    apply_adapters(model, saved)
    load_adapters(model, adapter_dir)
    device = torch.device(run_cfg.eval.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    data = build_data(run_cfg.data, run_cfg.eval, tokenizer, need_train=False,
                      cache_dir=OmegaConf.select(run_cfg, "paths.cache_dir", default=None))
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("tasks")
    if saved.method == "more" and trained_on is not None and trained_on != data.tasks:
        raise ModeError(f"{adapter_dir}: the MoRE adapter was trained on other tasks (or another order) than "
                        f"data.tasks gives now ({len(trained_on)} vs {len(data.tasks)}); task ids would not match")
    diagnostics = AdapterDiagnostics(model)
    names = [*data.tasks, *[t for t in data.eval_tasks if t not in data.tasks]]
    diagnostics.start(tasks=len(names))
    metrics, rows = evaluate(model, tokenizer, data.eval, run_cfg.eval)
    write_results(out_dir, metrics, rows, diagnostics.summary(tasks=names))
    print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
          f"({metrics['num_instances']} instances) -> {out_dir}", flush=True)
    original = run_dir / "metrics.json"
    if original.is_file():
        before = json.loads(original.read_text())
        keys = [k for k in metrics if k.startswith(("rougeL", "exact_match")) or k == "num_instances"]
        differ = [k for k in keys if before.get(k) != metrics[k]]
        print("reproduces the run's metrics exactly" if not differ else
              f"differs from the run's metrics.json in {len(differ)} key(s), e.g. {differ[0]}: "
              f"{before.get(differ[0])} -> {metrics[differ[0]]}", flush=True)
    return metrics


@hydra.main(config_path=str(mode_config.CONF_DIR), config_name="eval", version_base="1.3")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return evaluate_run(cfg, str(out_dir))["rougeL"]
    except BaseException:
        if not (out_dir / "metrics.json").exists():  # nothing half-written is left behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


@exit_on_user_error
def precheck(argv: list[str]) -> None:
    if any(a in ("--help", "-h") for a in argv):
        print(mode_config.help_text("mode-eval", "eval"))
        raise SystemExit(0)
    mode_config.precheck_cli("eval", argv)
    check_overrides([a for a in argv if not a.startswith("-")])


def main() -> None:
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
