"""Multi-task adapter training on SNI, then evaluation: `python -m mode.train [overrides]` (`mode-train`).

The loop is plain PyTorch on top of accelerate, which supplies device placement, mixed precision and
DDP under `torchrun` / `accelerate launch` without code changes (FSDP: see the README, untested here). We keep our own loop rather than
HF Trainer because three things are simpler to get exactly right here: adapter-only checkpoints,
bit-exact resume from (seed, step), and token-level loss normalisation over the *global* batch (so one
process and N processes with the same global batch take the same step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mode import config as mode_config
from mode.adapters import apply_adapters, checkpoint_context_fn, count_adapter_parameters, save_adapters
from mode.adapters.diagnostics import AdapterDiagnostics
from mode.checkpoint import Checkpointer, TrainingProgress, data_fingerprint
from mode.data.collate import collate_train
from mode.data.dataset import build_data
from mode.data.sampling import MixtureSampler
from mode.errors import ModeError, TrainingInterrupted, exit_on_user_error
from mode.eval import evaluate, score, write_results
from mode.fileio import atomic_write_text
from mode.loggers import make_logger
from mode.losses import AnswerLoss
from mode.models import load_model_and_tokenizer, non_embedding_parameters
from mode.optim import make_optimizer, make_scheduler
from mode.preemption import StopRequest
from mode.provenance import record_attempt
from mode.run_dir import FINISHED, NEW, UNFINISHED, clear_run, finished_metrics, plan_run
from mode.validation import PRECISIONS, check_resumable, validate_config

log = logging.getLogger(__name__)


def accumulation_steps(train_cfg, world_size: int) -> int:
    """Micro-batches per process per step, so that the global batch is train.batch_size everywhere."""
    per_step = train_cfg.micro_batch_size * world_size
    if train_cfg.batch_size % per_step:
        raise ModeError(
            f"train.batch_size={train_cfg.batch_size} is not a multiple of train.micro_batch_size="
            f"{train_cfg.micro_batch_size} x {world_size} process(es)"
        )
    return train_cfg.batch_size // per_step


def micro_batches(examples, indices: list[int], rank: int, world: int, accum: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of one global batch.

    The global batch is sorted by length (less padding: similar lengths share a micro-batch) and cut into
    world x accum micro-batches, dealt round-robin. Which micro-batches exist depends on
    train.micro_batch_size alone, so N processes compute exactly the micro-batches one process would
    (the same step, up to the order of one sum), and every process gets short and long ones alike.
    """
    ordered = sorted(indices, key=lambda i: len(examples[i]["input_ids"]))  # stable: ties keep sampling order
    groups = [ordered[k * micro : (k + 1) * micro] for k in range(world * accum)]
    return groups[rank::world]


def use_cpu(device: str) -> bool:
    """train.device=auto trains on the accelerator torch finds, else on the CPU, and must say so: under
    torchrun, accelerate's `cpu=False` on a machine without a GPU forms no process group at all (every
    process would train alone, as rank 0)."""
    if device == "cpu":
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def plan_on_main(accelerator, run_dir: Path, cfg, resolved: dict) -> tuple[Path, str]:
    """(run directory, NEW | UNFINISHED | FINISHED) as the main process sees them, for every process.

    Processes start seconds apart, so their own Hydra folders (`${now:...}`) and their views of the run
    directory (rank 0 may already have written config.yaml) can differ: rank 0 decides, the others follow,
    and a refusal is raised by every process alike."""
    plan = [None]
    if accelerator.is_main_process:
        try:
            state = plan_run(run_dir, cfg.resume, cfg.force)
            if state in (UNFINISHED, FINISHED):
                check_resumable(resolved, run_dir, finished=state == FINISHED)
            plan = [(str(run_dir), state, None)]
        except ModeError as err:
            plan = [(str(run_dir), None, str(err))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(plan)
    main_dir, state, error = plan[0]
    if error:
        raise ModeError(error)
    return Path(main_dir), state


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer; the context_fn gives recomputed adapters their
    batch's task ids. Non-reentrant checkpoints pass gradients to the adapters inside without any input
    requiring one, so the embeddings' output gets none (transformers asks for it: a wasted backward)."""
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (regional compilation: one compiled graph serves every
    layer, so compiling costs one layer's time; module names, and so adapter and checkpoint keys, stay)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ModeError(f"train.compile=true: {type(model).__name__} has no decoder `layers` to compile")
    for layer in layers:
        layer.compile()


def eager(compiled: bool):
    """Run compiled layers eagerly (for generation: every KV-cache shape would be one more recompile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if compiled and set_stance else contextlib.nullcontext()


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps evenly inside the run (the final evaluation closes the curve)."""
    return sorted({round(max_steps * (k + 1) / (points + 1)) for k in range(points)} - {0, max_steps})


def curve_subset(examples, per_task: int) -> list[dict]:
    """The first `per_task` evaluation instances of each task: a fixed subset, the same at every point."""
    taken: dict[str, int] = {}
    rows = []
    for e in examples:
        if taken.get(e["task"], 0) < per_task:
            taken[e["task"]] = taken.get(e["task"], 0) + 1
            rows.append(e)
    return rows


CURVE_KEYS = ("rougeL", "exact_match", "num_instances")


def curve_point(model, tokenizer, rows, eval_cfg, accelerator, diagnostics, compiled: bool) -> dict:
    """ROUGE-L of the curve subset now, without touching the training RNG streams or routing windows."""
    diagnostics.stop()
    devices = [] if accelerator.device.type == "cpu" else None
    with torch.random.fork_rng(devices=devices), eager(compiled):
        metrics, _ = evaluate(model, tokenizer, rows, eval_cfg, accelerator)
    diagnostics.start()
    return {k: metrics[k] for k in CURVE_KEYS}


def run_name(cfg) -> str:
    a = cfg.adapter
    shape = {"lora": f"r{a.rank}", "more": f"R{a.rank}"}.get(a.method, f"{a.experts}x{a.rank}x{a.block_rank}")
    return f"{cfg.model.id}-{a.method}-{shape}-s{cfg.seed}"


def train(cfg: DictConfig, run_dir: str) -> dict:
    """Train, save the adapter, evaluate; returns the metrics written to `<run_dir>/metrics.json`.

    Resumes from the run's last checkpoint with `resume=true`; SIGTERM/SIGINT during training saves a
    checkpoint after the current step and raises TrainingInterrupted.
    """
    with StopRequest() as stop:  # puts the previous signal handlers back however training ends
        return _train(cfg, run_dir, stop)


def _train(cfg: DictConfig, run_dir: str, stop: StopRequest) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Every check (config, model, target modules, data) passes before the run directory gets a file.
    validate_config(cfg)
    resolved = mode_config.to_container(cfg)
    accelerator = Accelerator(mixed_precision=PRECISIONS[cfg.train.precision], cpu=use_cpu(cfg.train.device))
    is_main = accelerator.is_main_process
    run_dir, state = plan_on_main(accelerator, Path(run_dir), cfg, resolved)
    if state == FINISHED:
        return report_finished(run_dir, is_main)
    if state == NEW and cfg.resume and is_main:
        log.warning("resume=true: %s holds no run yet; starting one", run_dir)

    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    data = build_data(cfg.data, cfg.eval, tokenizer, cache_dir=cfg.paths.get("cache_dir"))
    if cfg.adapter.method == "more" and set(data.eval_tasks) - set(data.tasks):
        raise ModeError("adapter.method='more' routes by training task, but data.protocol="
                        f"{cfg.data.protocol!r} evaluates tasks it never trained on (use held_in)")
    torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what loading consumed
    apply_adapters(model, cfg.adapter, num_tasks=len(data.tasks))
    if cfg.train.compile:
        compile_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = count_adapter_parameters(model)
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_base_non_embedding = non_embedding_parameters(model)
    diagnostics = AdapterDiagnostics(model)  # routing entropy / expert usage, logged with the loss
    diagnostics.start()

    log.info("%d tasks, %d training / %d evaluation instances; %s trainable adapter parameters",
             len(data.tasks), len(data.train), len(data.eval), f"{n_trainable:,}")
    curve_at = curve_steps(cfg.train.max_steps, cfg.eval.curve_points)
    curve_rows = curve_subset(data.eval, cfg.eval.curve_instances_per_task) if curve_at else []

    accum = accumulation_steps(cfg.train, accelerator.num_processes)
    sampler = MixtureSampler(data.train.column("task_index"), cfg.train.batch_size, cfg.seed, cfg.data.sampling,
                             cfg.data.get("sampling_temperature", 2.0))
    optimizer = make_optimizer(trainable, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    if is_main and state == NEW:
        if cfg.force:
            clear_run(run_dir)
        atomic_write_text(run_dir / "data_stats.json", json.dumps(data.record(), indent=2) + "\n")
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))  # last: started
    accelerator.wait_for_everyone()
    loss_module, optimizer = accelerator.prepare(AnswerLoss(model), optimizer)
    progress = TrainingProgress(data_fingerprint=data_fingerprint(data.train))
    checkpointer = Checkpointer(accelerator, run_dir, model, scheduler, progress,
                                cfg.train.save_every, cfg.train.keep_checkpoints)
    if state == UNFINISHED and checkpointer.resume():
        log.info("resuming from %s (step %d of %d)", checkpointer.last, progress.step, cfg.train.max_steps)
    if is_main:
        attempt = record_attempt(run_dir, from_step=progress.step, precision=cfg.train.precision,
                                 device=str(accelerator.device), processes=accelerator.num_processes)
        log.info("device %s x %d process(es), precision %s; %s (%s), commit %s%s", accelerator.device,
                 accelerator.num_processes, cfg.train.precision, attempt["cpu"],
                 ", ".join(attempt.get("cpu_features", [])) or "no AVX2", attempt.get("commit", "unknown")[:12],
                 " (uncommitted changes)" if attempt.get("dirty") else "")
    logger = make_logger(cfg, str(run_dir), resolved, run_name(cfg), is_main)
    logger.summary({"trainable_parameters": n_trainable, "base_parameters": n_base})

    answer_tokens = [n - p for n, p in zip(data.train.column("length"), data.train.column("prompt_length"))]

    def reduce(t):  # routing statistics: summed over processes
        return accelerator.reduce(t, reduction="sum")

    pad_id = tokenizer.pad_token_id
    loss_module.train()
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step, desc="training", unit="step", disable=not is_main)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    train_start = time.perf_counter() - progress.train_time_s  # earlier attempts of a resumed run count
    last_loss = progress.last_loss
    stop.listen()  # SIGTERM/SIGINT: checkpoint after the current step, then stop
    for step in range(progress.step, cfg.train.max_steps):
        indices = sampler.indices(step)
        n_tokens = sum(answer_tokens[i] for i in indices)  # global batch: known to every rank, no all-reduce
        step_loss = torch.zeros((), device=accelerator.device)
        groups = micro_batches(data.train, indices, accelerator.process_index, accelerator.num_processes,
                               accum, cfg.train.micro_batch_size)
        for k, group in enumerate(groups):
            batch = collate_train([data.train[i] for i in group], pad_id)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            sync = k == len(groups) - 1
            with accelerator.no_sync(loss_module) if not sync else contextlib.nullcontext():
                loss_sum = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"])
                # DDP averages gradients over processes, hence the world-size factor.
                accelerator.backward(loss_sum * accelerator.num_processes / n_tokens)
            step_loss += loss_sum.detach()
        if cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = accelerator.reduce(step_loss, reduction="sum").item() / n_tokens
        if not math.isfinite(step_loss):
            raise ModeError(f"training loss became {step_loss} at step {step + 1}; {checkpointer.describe_last()}; "
                            "lower train.lr or check the data, and start a new run")
        last_loss = step_loss
        window_loss += step_loss
        window_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_start
            scalars = {"train/loss": window_loss / window_steps, "train/lr": scheduler.get_last_lr()[0],
                       "train/step_time_s": elapsed / window_steps, **diagnostics.scalars(reduce)}
            logger.log(scalars, step=step + 1)
            progress.curves["train"].append({"step": step + 1, **{k: v for k, v in scalars.items() if k.count("/") == 1}})
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if step + 1 in curve_at:
            point = curve_point(model, tokenizer, curve_rows, cfg.eval, accelerator, diagnostics, cfg.train.compile)
            progress.curves["eval"].append({"step": step + 1, **point})
            logger.log({f"curve/{k}": v for k, v in point.items()}, step=step + 1)
            window_start = time.perf_counter()  # the window's step time counts training only
        progress.step, progress.last_loss, progress.train_time_s = step + 1, last_loss, time.perf_counter() - train_start
        signum = stop.requested(accelerator)
        if checkpointer.due(step + 1, cfg.train.max_steps) or signum:
            checkpointer.save(step + 1)
        if signum:
            bar.close()
            logger.finish()
            raise TrainingInterrupted(f"stopped after step {step + 1} of {cfg.train.max_steps}; checkpoint "
                                      f"{checkpointer.last}; continue with resume=true hydra.run.dir={run_dir}", signum)
    stop.restore()
    bar.close()
    train_time = progress.train_time_s

    accelerator.wait_for_everyone()
    if is_main:
        save_adapters(model, run_dir / "adapter", extra={"base_model": cfg.model.name_or_path, "model_id": cfg.model.id,
                                                         "tasks": data.tasks})
    diagnostics.reset()
    with eager(cfg.train.compile):
        metrics, predictions = evaluate(model, tokenizer, data.eval, cfg.eval, accelerator)
    routing = diagnostics.summary(reduce, tasks=data.tasks)
    if is_main:
        metrics.update({"trainable_parameters": n_trainable, "base_parameters": n_base,
                        "base_non_embedding_parameters": n_base_non_embedding,
                        "train_steps": cfg.train.max_steps,
                        "train_loss": last_loss if math.isfinite(last_loss) else None,  # null: no step taken
                        "train_time_s": round(train_time, 1)})
        curves = progress.curves
        if curve_at:  # the final evaluation's score on the same subset closes the curve
            ids = {e["id"] for e in curve_rows}
            final = score([r for r in predictions if r["id"] in ids])
            curves = {**curves, "eval": [*curves["eval"], {"step": cfg.train.max_steps,
                                                            **{k: final[k] for k in CURVE_KEYS}}]}
        write_results(run_dir, metrics, predictions, routing, curves=curves)
        checkpointer.remove_all()  # the run is finished: its adapter is in adapter/, it is never resumed
        logger.summary({f"eval/{k}": v for k, v in metrics.items() if not isinstance(v, (dict, list))})
        logger.table("eval/per_task", ["task", "rougeL", "exact_match"],
                     [[t, metrics[f"rougeL_for_{t}"], metrics[f"exact_match_for_{t}"]] for t in data.eval_tasks
                      if f"rougeL_for_{t}" in metrics])
        print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
              f"({metrics['num_instances']} instances, {len(data.eval_tasks)} tasks) -> {run_dir}", flush=True)
    logger.finish()
    return metrics


@hydra.main(config_path=str(mode_config.CONF_DIR), config_name="train", version_base="1.3")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("rougeL")


def report_finished(run_dir: Path, is_main: bool = True) -> dict:
    """`resume=true` on a finished run (e.g. rerunning an interrupted sweep): report it, train nothing."""
    metrics = finished_metrics(run_dir)
    if is_main:
        print(f"already finished: ROUGE-L {metrics.get('rougeL')}  exact match {metrics.get('exact_match')} -> "
              f"{run_dir}", flush=True)
    return metrics


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


def main() -> None:
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv += worker_overrides()
    _hydra_main()


if __name__ == "__main__":
    main()
