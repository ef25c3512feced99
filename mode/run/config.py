"""Hydra/OmegaConf glue: where the configs live, custom resolvers, composing configs outside Hydra's CLI."""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_DIR / "conf"


def _register_resolvers() -> None:
    # `${mode.repo:}` lets configs name files beside the checkout (../shared) without absolute paths.
    if not OmegaConf.has_resolver("mode.repo"):
        OmegaConf.register_new_resolver("mode.repo", lambda: str(REPO_DIR))
    # `${mode.beside_repo:shared}`: a folder next to the checkout, as a clean path (no `main/../shared`).
    if not OmegaConf.has_resolver("mode.beside_repo"):
        OmegaConf.register_new_resolver("mode.beside_repo", lambda name: str(REPO_DIR.parent / name))
    # `${mode.table:cpu/table6,presets}`: a table experiment's presets, seeds or other declared keys, from the
    # one declaration of the paper's tables (experiments/paper_tables.yaml, read by mode.run.tables).
    if not OmegaConf.has_resolver("mode.table"):
        OmegaConf.register_new_resolver("mode.table", _table_value)


def _table_value(experiment: str, key: str):
    from mode.run.tables import sweep_value

    return sweep_value(experiment, key)


_register_resolvers()


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config exactly as the CLI would (used by tests, the params table and sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


def to_container(cfg) -> dict:
    """A plain, fully resolved dict of a config node (what run dirs and W&B record)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


# -- the command line, checked before Hydra starts (and before it creates any folder) ------------------------
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
                    "--shell-completion", "-sc", "--version")


def flat_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in flat_keys(value, f"{prefix}{key}.")] or [prefix[:-1]]
    return [prefix[:-1]]


def precheck_cli(config_name: str, argv: list[str]) -> None:
    """One-line errors for what Hydra would report as a multi-line traceback, before anything is written:
    an override that does not parse or compose (unknown group option), an unknown key (also one added with
    `+`: every key exists in the defaults, so `+train.max_step=3` is a typo), mode-eval without a run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mode.errors import ModeError

    if any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as err:
            raise ModeError(f"cannot parse the override {override!r}: {one_line(err)}") from err
    groups = [o for o in overrides if "." not in o.lstrip("+~").split("=", 1)[0] and not o.startswith("run_dir=")]
    try:
        known = flat_keys(to_container(compose(config_name, [] if _is_sweep(argv) else groups)))
    except Exception as err:  # an unknown group option, e.g. adapter=moe
        raise ModeError(one_line(err)) from err
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in known or "." not in key and (CONF_DIR / key).is_dir():  # a key, or a config group
            continue
        close = difflib.get_close_matches(key, known, n=1)
        raise ModeError(f"{override!r}: {key} is not a config key" + (f" (did you mean {close[0]}?)" if close else
                        "; see --help for the groups and keys"))
    if config_name == "eval":  # a run again (run_dir=), or any model alone / with adapter_path= (out=)
        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
        out = next((o.split("=", 1)[1] for o in overrides if o.startswith("out=")), None)
        adapter_path = next((o.split("=", 1)[1] for o in overrides if o.startswith("adapter_path=")), None)
        if run_dir is None and out is None:
            raise ModeError("mode-eval needs run_dir=<a run directory of mode-train>, or out=<folder> to evaluate "
                            "model=... alone or with adapter_path=<PEFT LoRA folder> (see mode-eval --help)")
        if run_dir is not None and adapter_path is not None:
            raise ModeError("mode-eval run_dir=... evaluates the run's own adapter: drop adapter_path= (or run_dir=)")
        if run_dir is not None and not (Path(run_dir) / "config.yaml").is_file():
            raise ModeError(f"run_dir={run_dir!r} has no config.yaml (is it a mode run directory?)")
        if adapter_path is not None and not Path(adapter_path).is_dir():
            raise ModeError(f"adapter_path={adapter_path!r}: no such folder")
    if _is_sweep(argv):
        return  # sweep values (a,b,c) are checked job by job
    try:
        compose(config_name, overrides)
    except Exception as err:  # Hydra's composition errors, e.g. an unknown group option
        raise ModeError(one_line(err)) from err


def _is_sweep(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def one_line(err: Exception) -> str:
    """Hydra's multi-line error as one line: the first line, plus the options it lists."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if any("Available options" in line for line in lines):
        start = next(k for k, line in enumerate(lines) if "Available options" in line) + 1
        end = next((k for k, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        text += f" (options: {', '.join(lines[start:end])})"
    return text


MAIN_KEYS = {  # the keys a user reaches for first, one line each (every key: `--cfg job`)
    "adapter.method": "lora | molora | molora_sd | mode | more",
    "adapter.rank / .experts / .block_rank": "r, m, p (MoDE: p divides r)",
    "adapter.alpha": "scale s = alpha / rank",
    "adapter.target_modules": "module-name suffixes to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]",
    "model.name_or_path": "hub id or local folder (the model group sets it)",
    "data.tasks / data.task_list_file": "training tasks (held_in: also the evaluated ones)",
    "data.protocol": "held_in (MoDE: 90/10 split per task) | held_out (Tk-Instruct)",
    "train.max_steps / .batch_size / .lr": "steps, global batch, learning rate",
    "train.precision": "fp32 | bf16 | fp16 (autocast; adapters stay float32)",
    "train.save_every": "checkpoint period in steps",
    "eval.max_instances_per_task": "evaluation instances per task (null: all)",
    "seed, resume, force": "seed; continue the run in hydra.run.dir; replace it",
    "logger": "none | wandb",
}


def help_text(command: str, config_name: str) -> str:
    """--help: the config groups with their options and the main keys (Hydra's own says nothing useful)."""
    lines = [f"usage: {command} [group=option ...] [key=value ...]" + ("" if config_name == "eval" else "  (-m: a sweep)"),
             ""]
    if config_name == "eval":
        lines += ["  run_dir=<run>        the run to evaluate again (its own config; eval.* may be overridden)", ""]
    lines.append("config groups (group=option):")
    for group in ("model", "adapter", "data", "experiment", "logger", "train", "eval"):
        folder = CONF_DIR / group
        options = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
        top = [o for o in options if "/" not in o]
        nested = sorted({o.split("/")[0] for o in options if "/" in o})
        text = ", ".join(top + [f"{n}/... ({sum(o.startswith(n + '/') for o in options)})" for n in nested])
        lines.append(f"  {group:<11}{text}")
    lines += ["", "main keys:"] + [f"  {k:<38}{v}" for k, v in MAIN_KEYS.items()]
    lines += ["", "every key with its value: --cfg job; the docs: docs/ in the repository"]
    return "\n".join(lines)
