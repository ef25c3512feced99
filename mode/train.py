"""Multi-task adapter training on SNI, then evaluation: `python -m mode.train [overrides]` (`mode-train`).

    train(cfg) = validate -> setup -> fit -> finish (save the adapter, evaluate, write the run's files)

The loop is plain PyTorch on top of accelerate, which supplies device placement, mixed precision and
DDP under `torchrun` / `accelerate launch` without code changes (FSDP: see docs/training.md, untested
here). We keep our own loop rather than HF Trainer because three things are simpler to get exactly right
here: adapter-only checkpoints, bit-exact resume from (seed, step), and token-level loss normalisation
over the *global* batch (so one process and N processes with the same global batch take the same step).
"""

from __future__ import annotations

import logging
import math
import os

import hydra
import torch
from omegaconf import DictConfig

from mode.adapters import save_adapters
from mode.errors import exit_on_user_error
from mode.evaluation import evaluate, score
from mode.run import config as mode_config
from mode.run.results import write_results
from mode.run.run_dir import FINISHED, finished_metrics
from mode.training.checks import validate_config
from mode.training.curves import CURVE_KEYS, curve_steps, curve_subset
from mode.training.distributed import slurm_environment
from mode.training.loop import fit
from mode.training.preemption import StopRequest
from mode.training.session import Session, setup
from mode.training.throughput import eager

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: str) -> dict:
    """Train, save the adapter, evaluate; returns the metrics written to `<run_dir>/metrics.json`.

    Resumes from the run's last checkpoint with `resume=true` (a finished run with the same config is
    reported, not retrained); SIGTERM/SIGINT during training saves a checkpoint after the current step
    and raises TrainingInterrupted.
    """
    validate_config(cfg)  # every cheap check before any work
    with StopRequest() as stop:  # puts the previous signal handlers back however training ends
        session = setup(cfg, run_dir)
        if session.state == FINISHED:
            return report_finished(session)
        fit(session, stop, curve_point=curve_evaluator(session))
        return finish(session)


def curve_evaluator(s: Session):
    """`curve_point()` for the loop: subset ROUGE-L now, without touching RNG streams or routing windows."""
    if not curve_steps(s.cfg.train.max_steps, s.cfg.eval.curve_points):
        return None
    rows = curve_subset(s.data.eval, s.cfg.eval.curve_instances_per_task)
    devices = [] if s.accelerator.device.type == "cpu" else None

    def curve_point() -> dict:
        s.diagnostics.stop()
        with torch.random.fork_rng(devices=devices), eager(s.cfg.train.compile):
            metrics, _ = evaluate(s.model, s.tokenizer, rows, s.cfg.eval, s.accelerator)
        s.diagnostics.start()
        return {k: metrics[k] for k in CURVE_KEYS}

    return curve_point


def finish(s: Session) -> dict:
    """Save the adapter, evaluate every evaluation instance, write metrics/predictions/routing/curves."""
    cfg, acc = s.cfg, s.accelerator
    acc.wait_for_everyone()
    if s.is_main:
        save_adapters(s.model, s.run_dir / "adapter", extra={"base_model": cfg.model.name_or_path,
                                                             "model_id": cfg.model.id, "tasks": s.data.tasks})
    s.diagnostics.reset()
    names = s.data.task_names
    s.diagnostics.start(tasks=len(names))  # the evaluation's routing, per task too
    with eager(cfg.train.compile):
        metrics, predictions = evaluate(s.model, s.tokenizer, s.data.eval, cfg.eval, acc)
    routing = s.diagnostics.summary(s.reduce, tasks=names)
    if s.is_main:
        last = s.progress.last_loss
        metrics.update({**s.counts, "train_steps": cfg.train.max_steps,
                        "train_loss": last if math.isfinite(last) else None,  # null: no step was taken
                        "train_time_s": round(s.progress.train_time_s, 1)})
        write_results(s.run_dir, metrics, predictions, routing, curves=closed_curves(s, predictions))
        s.checkpointer.remove_all()  # the run is finished: its adapter is in adapter/, it is never resumed
        s.logger.summary({f"eval/{k}": v for k, v in metrics.items() if not isinstance(v, (dict, list))})
        s.logger.table("eval/per_task", ["task", "rougeL", "exact_match"],
                       [[t, metrics[f"rougeL_for_{t}"], metrics[f"exact_match_for_{t}"]] for t in s.data.eval_tasks
                        if f"rougeL_for_{t}" in metrics])
        print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
              f"({metrics['num_instances']} instances, {len(s.data.eval_tasks)} tasks) -> {s.run_dir}", flush=True)
    s.logger.finish()
    return metrics


def closed_curves(s: Session, predictions: list[dict]) -> dict:
    """The run's curves, the evaluation curve closed by the final evaluation scored on the same subset."""
    curves = s.progress.curves
    if not curve_steps(s.cfg.train.max_steps, s.cfg.eval.curve_points):
        return curves
    ids = {e["id"] for e in curve_subset(s.data.eval, s.cfg.eval.curve_instances_per_task)}
    final = score([r for r in predictions if r["id"] in ids])
    return {**curves, "eval": [*curves["eval"], {"step": s.cfg.train.max_steps, **{k: final[k] for k in CURVE_KEYS}}]}


def report_finished(s: Session) -> dict:
    """`resume=true` on a finished run with the same config (e.g. rerunning a sweep): report it, train nothing."""
    metrics = finished_metrics(s.run_dir)
    if s.is_main:
        print(f"already finished: ROUGE-L {metrics.get('rougeL')}  exact match {metrics.get('exact_match')} -> "
              f"{s.run_dir}", flush=True)
    return metrics


@hydra.main(config_path=str(mode_config.CONF_DIR), config_name="train", version_base="1.3")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("rougeL")


def worker_overrides() -> list[str]:
    """Hydra overrides for processes other than rank 0 of a torchrun / accelerate launch: their Hydra record
    goes to a scratch folder deleted at exit, and they log errors only, to stderr (conf/hydra/job_logging/
    worker.yaml). Rank 0 writes the run directory, and `plan_on_main` points every process at its folder."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        return []
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"mode-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, True)
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null",
            "hydra/job_logging=worker"]


@exit_on_user_error
def precheck(argv: list[str]) -> None:
    if any(a in ("--help", "-h") for a in argv):
        print(mode_config.help_text("mode-train", "train"))
        raise SystemExit(0)
    mode_config.precheck_cli("train", argv)


def main() -> None:
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    precheck(sys.argv[1:])
    os.environ.update(slurm_environment())  # srun with one task per GPU: the distributed variables
    sys.argv += worker_overrides()
    _hydra_main()


if __name__ == "__main__":
    main()
