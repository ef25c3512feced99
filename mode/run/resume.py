"""Is this command's config the run's own? Resuming with other settings would give a run that matches
neither its config.yaml nor the new command; reporting a finished run made with other settings would
pass off its old result as this command's. Both are refused, naming the keys that differ.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mode.errors import ModeError

# Keys that may differ when resuming: where things are, how often to checkpoint or log, not what is trained.
# (data.sni_dir may move; the checkpoint's fingerprint of the encoded training data guards its content.)
RESUMABLE_CHANGES = ("resume", "force", "logger", "paths", "data.sni_dir", "train.save_every",
                     "train.keep_checkpoints", "train.log_every")
# Keys added after runs may have started: a run's config.yaml without one ran with this value.
ADDED_KEYS = {"train.compile": False, "eval.curve_points": 0, "eval.curve_instances_per_task": 5,
              "adapter.top_k": None, "adapter.router_temperature": 1.0, "adapter.balance_loss_weight": 0.0,
              "adapter.z_loss_weight": 0.0, "adapter.router_input": "token", "adapter.task_embedding": "per_module",
              "model.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # every base was a Llama-style one



def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(resolved: dict, saved: dict) -> list[tuple[str, object, object]]:
    """(key, now, then) for every key that changes what is trained or evaluated, sorted by key."""
    old, new = {**ADDED_KEYS, **_flatten(saved)}, {**ADDED_KEYS, **_flatten(resolved)}
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            out.append((key, new.get(key, "<absent>"), old.get(key, "<absent>")))
    return out


_MISSING = object()


def also_differ(differ: list[tuple[str, object, object]]) -> str:
    """' (also k2, k3)' for the keys after the first one a message names, or ''."""
    return f" (also {', '.join(k for k, _, _ in differ[1:])})" if len(differ) > 1 else ""


def check_resumable(resolved: dict, run_dir, finished: bool = False) -> None:
    """Refuse `resume=true` when this command's config differs from the run's config.yaml in a key
    that changes what is trained or evaluated: continuing it would give a run that matches neither, and
    reporting a finished one would pass off its old result as this command's. The message names the first
    such key with both values, and every other differing key."""
    path = Path(run_dir) / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ModeError(f"{path}: unreadable ({err}); cannot check that resuming keeps the run's settings") from err
    differ = config_differences(resolved, saved)
    if not differ:
        return
    key, now, then = differ[0]
    others = also_differ(differ)
    advice = ("that run is finished with other settings: choose another hydra.run.dir (or paths.runs_dir for "
              "a sweep), or force=true to replace it" if finished else
              "resume with the run's own settings, or start a new run")
    raise ModeError(f"resume=true but {key}={now!r} differs from the run's {path} ({then!r}){others}; {advice}")
