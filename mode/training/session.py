"""Everything one training run holds, built in a fixed order from its config: `setup(cfg, run_dir)`.

Order matters for exactness and safety: every check (config, model, target modules, data) passes before
the run directory gets a file; the adapters are initialised from the seed alone; the checkpoint (if
resuming) is restored last, over freshly built objects.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mode.adapters import apply_adapters, count_adapter_parameters
from mode.adapters.diagnostics import AdapterDiagnostics
from mode.data.collate import collate_seq2seq, collate_train
from mode.data.dataset import SNIData, build_data, load_data
from mode.data.sampling import MixtureSampler
from mode.errors import ModeError
from mode.models import is_seq2seq, load_model_and_tokenizer, non_embedding_parameters
from mode.run.config import to_container
from mode.run.fileio import atomic_write_text
from mode.run.loggers import make_logger
from mode.run.provenance import record_attempt
from mode.run.run_dir import FINISHED, NEW, UNFINISHED, clear_run
from mode.training.checkpoint import Checkpointer, TrainingProgress, data_fingerprint
from mode.training.checks import PRECISIONS, check_context
from mode.training.distributed import accumulation_steps, data_on_main, micro_batch_size, plan_on_main, use_cpu
from mode.training.losses import answer_loss
from mode.training.optim import make_optimizer, make_scheduler
from mode.training.throughput import compile_layers, enable_checkpointing

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: object
    run_dir: Path
    state: str                      # NEW | UNFINISHED | FINISHED (then nothing else is built)
    accelerator: object
    model: torch.nn.Module = None
    tokenizer: object = None
    data: SNIData = None
    loss_module: torch.nn.Module = None   # AnswerLoss / Seq2SeqAnswerLoss(model), wrapped by accelerate (DDP)
    collate: object = collate_train       # rows -> batch: causal (collate_train) or encoder-decoder (collate_seq2seq)
    trainable: list = field(default_factory=list)
    optimizer: object = None
    scheduler: object = None
    sampler: MixtureSampler = None
    accum: int = 1                  # micro-batches per process per step
    micro: int = 1                  # examples per micro-batch
    progress: TrainingProgress = None
    checkpointer: Checkpointer = None
    diagnostics: AdapterDiagnostics = None
    logger: object = None
    counts: dict = field(default_factory=dict)  # trainable / base / base non-embedding parameters

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (routing statistics); every process must call it."""
        return self.accelerator.reduce(t, reduction="sum")


def run_name(cfg) -> str:
    a = cfg.adapter
    shape = {"lora": f"r{a.rank}", "more": f"R{a.rank}"}.get(a.method, f"{a.experts}x{a.rank}x{a.block_rank}")
    return f"{cfg.model.id}-{a.method}-{shape}-s{cfg.seed}"


def setup(cfg, run_dir) -> Session:
    """Accelerator, run-directory plan, model + adapters, data, optimizer, checkpoint, logger."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    resolved = to_container(cfg)
    accelerator = Accelerator(mixed_precision=PRECISIONS[cfg.train.precision], cpu=use_cpu(cfg.train.device))
    run_dir, state = plan_on_main(accelerator, Path(run_dir), cfg, resolved)
    s = Session(cfg, run_dir, state, accelerator)
    if state == FINISHED:
        return s
    if state == NEW and cfg.resume and s.is_main:
        log.warning("resume=true: %s holds no run yet; starting one", run_dir)

    set_seed(cfg.seed)
    s.model, s.tokenizer = load_model_and_tokenizer(cfg.model)
    if cfg.model.get("max_length") is None:  # the loaded model's own context window
        check_context(cfg, getattr(s.model.config, "max_position_embeddings", None))
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(s.model)
    seq2seq = is_seq2seq(s.model)  # T5: source to the encoder, answer to the decoder (Tk-Instruct encoding)
    s.collate = collate_seq2seq if seq2seq else collate_train
    s.data = data_on_main(accelerator, functools.partial(build_data, cfg.data, cfg.eval, s.tokenizer, seq2seq=seq2seq,
                                                         cache_dir=cfg.paths.get("cache_dir")), load_data)
    routes_by_task = ("adapter.method='more'" if cfg.adapter.method == "more" else
                      "adapter.router_input='task'" if cfg.adapter.get("router_input", "token") == "task" else None)
    if routes_by_task and set(s.data.eval_tasks) - set(s.data.tasks):
        raise ModeError(f"{routes_by_task} routes by training task, but data.protocol={cfg.data.protocol!r} "
                        "evaluates tasks it never trained on (use held_in)")
    torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what loading consumed
    apply_adapters(s.model, cfg.adapter, num_tasks=len(s.data.tasks))
    if cfg.train.compile:
        compile_layers(s.model)
    s.trainable = [p for p in s.model.parameters() if p.requires_grad]
    s.counts = {"trainable_parameters": count_adapter_parameters(s.model),
                "base_parameters": sum(p.numel() for p in s.model.parameters() if not p.requires_grad),
                "base_non_embedding_parameters": non_embedding_parameters(s.model)}
    s.diagnostics = AdapterDiagnostics(s.model)  # routing entropy / expert usage, logged with the loss
    s.diagnostics.start()
    log.info("%d tasks, %d training / %d evaluation instances; %s trainable adapter parameters",
             len(s.data.tasks), len(s.data.train), len(s.data.eval), f"{s.counts['trainable_parameters']:,}")

    s.accum = accumulation_steps(cfg.train, accelerator.num_processes)
    s.micro = micro_batch_size(cfg.train, accelerator.num_processes)
    s.sampler = MixtureSampler(s.data.train.column("task_index"), cfg.train.batch_size, cfg.seed, cfg.data.sampling,
                               cfg.data.get("sampling_temperature", 2.0))
    optimizer = make_optimizer(s.trainable, cfg.train)
    s.scheduler = make_scheduler(optimizer, cfg.train)
    if s.is_main and state == NEW:
        start_run_dir(run_dir, cfg, resolved, s.data)
    accelerator.wait_for_everyone()
    s.loss_module, s.optimizer = accelerator.prepare(answer_loss(s.model), optimizer)
    s.progress = TrainingProgress(data_fingerprint=data_fingerprint(s.data.train))
    s.checkpointer = Checkpointer(accelerator, run_dir, s.model, s.scheduler, s.progress,
                                  cfg.train.save_every, cfg.train.keep_checkpoints)
    if state == UNFINISHED and s.checkpointer.resume():
        log.info("resuming from %s (step %d of %d)", s.checkpointer.last, s.progress.step, cfg.train.max_steps)
    if s.is_main:
        log_attempt(s)
    s.logger = make_logger(cfg, str(run_dir), resolved, run_name(cfg), s.is_main)
    s.logger.summary({k: s.counts[k] for k in ("trainable_parameters", "base_parameters")})
    return s


def start_run_dir(run_dir: Path, cfg, resolved: dict, data: SNIData) -> None:
    """A new run's first files; config.yaml last, since its presence marks a started run."""
    if cfg.force:
        clear_run(run_dir)
    atomic_write_text(run_dir / "data_stats.json", json.dumps(data.record(), indent=2) + "\n")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))


def log_attempt(s: Session) -> None:
    """provenance.json gets this attempt; the log says on what it runs (device, precision, CPU, commit)."""
    acc, cfg = s.accelerator, s.cfg
    attempt = record_attempt(s.run_dir, from_step=s.progress.step, precision=cfg.train.precision,
                             device=str(acc.device), processes=acc.num_processes)
    log.info("device %s x %d process(es), precision %s; %s (%s), commit %s%s", acc.device, acc.num_processes,
             cfg.train.precision, attempt["cpu"], ", ".join(attempt.get("cpu_features", [])) or "no AVX2",
             attempt.get("commit", "unknown")[:12], " (uncommitted changes)" if attempt.get("dirty") else "")
