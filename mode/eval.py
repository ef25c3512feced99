"""`python -m mode.eval` (`mode-eval`): evaluate with the official SNI metrics.

    mode-eval run_dir=<run>                                     a finished run again, with its own config
    mode-eval model=<m> [model.name_or_path=...] data... out=<folder>                 a base model alone
    mode-eval model=<m> [model.name_or_path=...] adapter_path=<folder> data... out=<folder>
                                                                a base + a PEFT LoRA (or mode) adapter folder

run_dir: reloads the run's base model and saved adapter, rebuilds the same evaluation instances and writes
metrics.json + predictions.jsonl under `<run>/evals/<time>/` (or out=), then says whether they reproduce
the run's own metrics. out=: the model and data come from this command's config (the zero-shot baseline,
or an adapter trained elsewhere); the same files (and a config.yaml) go to `out`, so mode-compare reads
them like a run. Generation and scoring live in `mode.evaluation`.
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
from mode.run.fileio import atomic_write_text
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
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("run_dir=", "out="))]
    check_overrides(overrides)
    return OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(overrides))


# What mode-eval may change: how it evaluates and where things are. Everything else (model, adapter, data
# selection and split, training) is the run's own: another data.split_seed would evaluate training instances.
EVAL_OVERRIDABLE = ("eval.", "paths.", "data.sni_dir", "hydra.", "run_dir", "out")
# out= without run_dir: the model and data are this command's; an adapter comes from adapter_path only.
MODEL_REFUSED = ("adapter", "train.", "resume", "run_dir")


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if not key.startswith(EVAL_OVERRIDABLE):
            raise ModeError(f"mode-eval evaluates the run as it was trained: {key} cannot be overridden (only "
                            "eval.*, paths.* and data.sni_dir can); train a new run to change it")


def check_model_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.startswith(MODEL_REFUSED) and key != "adapter_path":
            raise ModeError(f"mode-eval out=...: {key} means nothing here (the adapter, if any, comes from "
                            "adapter_path=<folder>; nothing is trained)")


def evaluate_run(cfg: DictConfig, out_dir: str) -> dict:
    from mode.adapters import apply_adapters, load_adapters, read_adapter_config
    from mode.adapters.diagnostics import AdapterDiagnostics
    from mode.adapters.io import read_adapter_meta
    from mode.data.dataset import build_data
    from mode.models import is_seq2seq, load_model_and_tokenizer

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
                      cache_dir=OmegaConf.select(run_cfg, "paths.cache_dir", default=None), seq2seq=is_seq2seq(model))
    trained_on = read_adapter_meta(adapter_dir).get("tasks")
    if (saved.method == "more" or saved.router_input == "task") and trained_on is not None and trained_on != data.tasks:
        raise ModeError(f"{adapter_dir}: the MoRE adapter was trained on other tasks (or another order) than "
                        f"data.tasks gives now ({len(trained_on)} vs {len(data.tasks)}); task ids would not match")
    diagnostics = AdapterDiagnostics(model)
    names = data.task_names
    diagnostics.start(tasks=len(names))
    metrics, rows = evaluate(model, tokenizer, data.eval, run_cfg.eval)
    write_results(out_dir, metrics, rows, diagnostics.summary(tasks=names))
    print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
          f"({metrics['num_instances']} instances) -> {out_dir}", flush=True)
    original = run_dir / "metrics.json"
    if original.is_file():
        before = json.loads(original.read_text())
        def scored(m):  # every evaluation key of either file: a key missing on one side is a difference
            return {k for k in m if k.startswith(("rougeL", "exact_match")) or k == "num_instances"}
        differ = sorted(k for k in scored(metrics) | scored(before) if before.get(k, "<missing>") != metrics.get(k, "<missing>"))
        print("reproduces the run's metrics exactly" if not differ else
              f"differs from the run's metrics.json in {len(differ)} key(s), e.g. {differ[0]}: "
              f"{before.get(differ[0], '<missing>')} -> {metrics.get(differ[0], '<missing>')}", flush=True)
    return metrics


def attach_adapter(model, adapter_path, base_name: str | None, tasks: list[str]) -> dict:
    """Put the adapter of `adapter_path` into the base model: a PEFT LoRA folder (adapter_config.json with
    peft_type), or one of mode's own adapter folders (any method). Returns what config.yaml records."""
    from mode.adapters import apply_adapters, load_adapters, read_adapter_config
    from mode.adapters.io import is_peft_folder, load_peft_lora, read_adapter_meta

    path = Path(str(adapter_path))
    if not path.is_dir():
        raise ModeError(f"adapter_path={str(path)!r}: no such folder")
    if is_peft_folder(path):
        return load_peft_lora(model, path, base_name)
    saved = read_adapter_config(path)  # mode's own format (or a one-line error naming what the folder lacks)
    trained_on = read_adapter_meta(path).get("tasks")
    if (saved.method == "more" or saved.router_input == "task") and trained_on is not None and trained_on != tasks:
        raise ModeError(f"{path}: the MoRE adapter was trained on other tasks (or another order) than data.tasks "
                        f"gives ({len(trained_on)} vs {len(tasks)}); task ids would not match")
    apply_adapters(model, saved)
    load_adapters(model, path)
    return {"source": "mode", "path": str(path), **saved.to_dict()}


def evaluate_model(cfg: DictConfig, out_dir: str) -> dict:
    """out= mode: this command's model (and adapter_path, if given) on this command's data."""
    from mode.adapters import count_adapter_parameters
    from mode.adapters.diagnostics import AdapterDiagnostics
    from mode.data.dataset import build_data
    from mode.models import is_seq2seq, load_model_and_tokenizer, non_embedding_parameters

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = build_data(cfg.data, cfg.eval, tokenizer, need_train=False,
                      cache_dir=OmegaConf.select(cfg, "paths.cache_dir", default=None), seq2seq=is_seq2seq(model))
    adapter = None
    if cfg.get("adapter_path"):
        adapter = attach_adapter(model, cfg.adapter_path, cfg.model.get("name_or_path"), list(data.tasks))
    device = torch.device(cfg.eval.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    diagnostics = AdapterDiagnostics(model)
    names = data.task_names
    diagnostics.start(tasks=len(names))
    metrics, rows = evaluate(model, tokenizer, data.eval, cfg.eval)
    trainable = count_adapter_parameters(model)
    metrics.update({"trainable_parameters": trainable,
                    "base_parameters": sum(p.numel() for p in model.parameters()) - trainable,
                    "base_non_embedding_parameters": non_embedding_parameters(model)})
    record = OmegaConf.to_container(cfg, resolve=True)
    record = {k: v for k, v in record.items() if k not in ("train", "resume", "run_dir", "hydra")}
    record["adapter"] = adapter  # null: the base model alone
    atomic_write_text(Path(out_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record)))
    (Path(out_dir) / "routing.json").unlink(missing_ok=True)  # force=true: no stale file of an earlier adapter
    write_results(out_dir, metrics, rows, diagnostics.summary(tasks=names) if adapter else None)
    what = "base model alone" if adapter is None else f"base + {adapter['source']} adapter {adapter['path']}"
    print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
          f"({metrics['num_instances']} instances, {what}) -> {out_dir}", flush=True)
    return metrics


def _is_run_mode(cfg: DictConfig) -> bool:
    return not OmegaConf.is_missing(cfg, "run_dir") and cfg.get("run_dir") is not None


@hydra.main(config_path=str(mode_config.CONF_DIR), config_name="eval", version_base="1.3")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if _is_run_mode(cfg):
            return evaluate_run(cfg, str(out_dir))["rougeL"]
        return evaluate_model(cfg, str(out_dir))["rougeL"]
    except BaseException:
        if not (out_dir / "metrics.json").exists() and not _OUT_EXISTED:  # nothing half-written is left behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


_OUT_EXISTED = False  # out= named a folder that was there before this command: never removed on failure


def _value(argv: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")), None)


@exit_on_user_error
def precheck(argv: list[str]) -> None:
    if any(a in ("--help", "-h") for a in argv):
        print(mode_config.help_text("mode-eval", "eval"))
        print("\nwithout a run (out=<folder> instead of run_dir):\n"
              "  model=<m> [model.name_or_path=...] data... out=<folder>      the base model alone (zero-shot)\n"
              "  ... adapter_path=<folder> out=<folder>     with a PEFT LoRA folder (or one of mode's adapters)\n"
              "  force=true                                 replace the results already in out")
        raise SystemExit(0)
    mode_config.precheck_cli("eval", argv)
    overrides = [a for a in argv if not a.startswith("-")]
    if _value(argv, "run_dir") is not None:
        check_overrides(overrides)
        return
    check_model_overrides(overrides)
    out = Path(_value(argv, "out"))
    if (out / "metrics.json").exists() and _value(argv, "force") not in ("true", "True"):
        raise ModeError(f"out={str(out)!r} holds finished results (metrics.json); force=true replaces them")
    if out.exists() and not out.is_dir():
        raise ModeError(f"out={str(out)!r} is a file, not a folder")


def main() -> None:
    import sys

    global _OUT_EXISTED
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:]
    precheck(argv)
    out = _value(argv, "out")
    if out is not None and not any(a.startswith("hydra.run.dir=") for a in argv):
        _OUT_EXISTED = Path(out).exists()
        sys.argv.append(f"hydra.run.dir={out}")  # the results go to out, not <run>/evals/<time>
    _hydra_main()


if __name__ == "__main__":
    main()
