"""Training checkpoints: adapter-only, atomic, verified, and exact to resume from.

What is saved is accelerate's `save_state` — the optimizer, the objects registered for checkpointing
(learning-rate scheduler, `TrainingProgress`) and every process's RNG states — except that a save hook
swaps the model weights for the adapter tensors: the frozen base model is never written (SmolLM2 is
540 MB, Gemma 2B 10 GB; an adapter is a few MB). The batch of step k is a pure function of (seed, k),
so the step number is the whole data position. Restoring all of this makes a resumed run take exactly
the steps an uninterrupted run would have taken (bit for bit on CPU).

Atomic: a checkpoint is written into `checkpoints/.step-N.partial/`, every file is fsynced, a manifest
of SHA-256 digests is added, and only then is the folder renamed to `checkpoints/step-N/`. A crash at
any moment leaves the complete checkpoint or no checkpoint, never half of one. Verified: resuming
checks every digest and falls back to the previous checkpoint when a file was damaged afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from mode.adapters import adapter_state_dict, load_adapters, save_adapters
from mode.data.cache import rows_digest
from mode.errors import ModeError
from mode.run.fileio import atomic_write_text, fsync_dir, fsync_file, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class TrainingProgress:
    """Loop state besides model, optimizer, scheduler and RNG (registered with accelerate for checkpointing)."""

    step: int = 0                        # optimizer steps taken = index of the next batch
    last_loss: float = float("nan")      # reported in metrics.json even when resuming after the last step
    train_time_s: float = 0.0            # summed over every attempt of the run
    data_fingerprint: str = ""           # the training examples a checkpoint was trained on
    curves: dict = dataclasses.field(default_factory=lambda: {"train": [], "eval": []})  # curves.json

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def data_fingerprint(examples) -> str:
    """A digest of the encoded training examples: resuming on changed data (edited task files, another
    tokenizer version) would silently train a different run, so it is refused instead.

    Arrow-backed rows (`mode.data.dataset.Rows`) give the digest their cache entry stored when it was
    written, or stream it (`mode.data.cache.rows_digest`: column-wise, independent of chunk layout, a slice
    at a time, never every token in one array); plain lists of dicts are hashed row by row.
    """
    if getattr(examples, "digest", None):
        return examples.digest
    if getattr(examples, "dataset", None) is not None and hasattr(examples.dataset, "with_format"):
        return rows_digest(examples.dataset)
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e['id']}\x1f{e['prompt_length']}\x1f".encode())
        digest.update(array("q", e["input_ids"]).tobytes())
    return digest.hexdigest()


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (partial and damaged folders have other names)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def seal(directory: Path, step: int, num_processes: int) -> None:
    """Fsync every file of a written checkpoint and add the manifest of their digests (written last)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {"step": step, "num_processes": num_processes, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def verify(directory: Path, num_processes: int) -> str | None:
    """None when the checkpoint is complete and intact; otherwise what is wrong, naming the file."""
    manifest = directory / MANIFEST
    try:
        meta = json.loads(manifest.read_text())
        files, step, saved_processes = meta["files"], meta["step"], meta["num_processes"]
    except FileNotFoundError:
        return f"{manifest}: missing"
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest}: unreadable ({err})"
    if checkpoint_name(step) != directory.name:
        return f"{manifest}: says step {step}, not {directory.name}"
    if saved_processes != num_processes:
        # Every process restores its own RNG state: another process count cannot continue it exactly.
        raise ModeError(f"{directory} was written by {saved_processes} process(es); resume it with the same "
                        f"number, not {num_processes}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        if sha256_file(path) != expected:
            return f"{path}: contents differ from the manifest (corrupt)"
    return None


class Checkpointer:
    """Saves and restores the run's training state under `<run_dir>/checkpoints/` (see module docstring).

    Registers `scheduler` and `progress` with the accelerator; under several processes only the main
    one writes shared files, and each writes its own RNG state.
    """

    def __init__(self, accelerator, run_dir, model, scheduler, progress: TrainingProgress,
                 save_every: int, keep: int):
        self.accelerator = accelerator
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.model, self.progress = model, progress
        self.save_every, self.keep = save_every, keep
        self.last: Path | None = None  # the newest complete checkpoint of this run
        # accelerate logs one INFO line per file of every checkpoint; ours says the one thing that matters.
        logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
        logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)  # "[RANK 0] Saving current state"
        accelerator.register_for_checkpointing(scheduler, progress)
        accelerator.register_save_state_pre_hook(self._save_adapter_not_model)
        accelerator.register_load_state_pre_hook(self._load_adapter_not_model)

    # -- accelerate hooks: adapter tensors instead of the whole model ------------------------------
    def _save_adapter_not_model(self, models, weights, output_dir) -> None:
        weights.clear()  # accelerate would write every weight of the base model
        if self.accelerator.is_main_process:
            save_adapters(self.model, output_dir)

    def _load_adapter_not_model(self, models, input_dir) -> None:
        models.clear()
        load_adapters(self.model, input_dir)

    # -- saving ---------------------------------------------------------------------------------
    def due(self, step: int, max_steps: int) -> bool:
        """Every `train.save_every` steps and after the last one (0 disables periodic checkpoints)."""
        return self.save_every > 0 and (step % self.save_every == 0 or step == max_steps)

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` atomically, then keep only the newest `keep` checkpoints.

        Refuses non-finite adapter weights (a finite loss can still come with an inf gradient that
        turns the weights into NaN): a checkpoint called good must be one to resume from.
        """
        acc = self.accelerator
        bad = [name for name, t in adapter_state_dict(self.model).items() if not torch.isfinite(t).all()]
        if bad:
            raise ModeError(f"adapter weights are not finite after step {step} ({bad[0]} and {len(bad) - 1} more); "
                            f"{self.describe_last()}; lower train.lr or check the data, and start a new run")
        final = self.root / checkpoint_name(step)
        partial = self.root / f".{final.name}.partial"
        try:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(partial))
            acc.wait_for_everyone()
            if acc.is_main_process:
                seal(partial, step, acc.num_processes)
                if final.exists():  # an earlier attempt's copy of this step: this one replaces it
                    shutil.rmtree(final)
                os.replace(partial, final)
                fsync_dir(self.root)
        except OSError as err:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            reason = err.strerror or str(err)
            raise ModeError(f"could not write checkpoint {final}: {reason}; {self.describe_last()}") from err
        acc.wait_for_everyone()
        self.last = final
        if acc.is_main_process:
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
        return final

    def describe_last(self) -> str:
        """Where a user stands after a failure: the last good checkpoint, or that there is none."""
        if self.last is None:
            return "no checkpoint of this run was written"
        return f"the last good checkpoint is {self.last}"

    # -- resuming -------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Restore the newest intact checkpoint; None (nothing restored) when the run has none yet.

        A damaged checkpoint is reported, renamed `<name>.corrupt` and skipped for the one before it;
        when every checkpoint is damaged this is an error naming the first damaged file.
        """
        acc = self.accelerator
        if acc.is_main_process:
            for stale in self.root.glob(".step-*.partial"):  # a save that a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
        chosen, damaged = self._choose()
        if damaged and chosen is None:
            raise ModeError(f"no intact checkpoint to resume from: {damaged[0][1]}; delete {self.root} to "
                            "start the run over")
        for path, problem in damaged:
            log.warning("checkpoint unusable, falling back to an earlier one: %s", problem)
            if acc.is_main_process:
                aside = path.with_name(path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)  # the same step damaged in an earlier attempt
                os.replace(path, aside)
        acc.wait_for_everyone()
        if chosen is None:
            return None
        expected = self.progress.data_fingerprint
        acc.load_state(str(chosen))
        self._check_rng_restored(chosen)
        if self.progress.data_fingerprint != expected:
            raise ModeError(f"the training data differ from those {chosen} was trained on (changed task files, "
                            "data.sni_dir or tokenizer); resume with the same data or start a new run")
        self.last = chosen
        return chosen

    def _choose(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest intact checkpoint and the damaged ones newer than it (decided by the main process)."""
        chosen, damaged, error = None, [], None
        if self.accelerator.is_main_process:
            try:
                for path in reversed(list_checkpoints(self.root)):
                    problem = verify(path, self.accelerator.num_processes)
                    if problem is None:
                        chosen = path
                        break
                    damaged.append((path, problem))
            except ModeError as err:
                error = str(err)
        if self.accelerator.num_processes > 1:  # every process must load the same checkpoint, or fail alike
            from accelerate.utils import broadcast_object_list

            chosen, damaged, error = broadcast_object_list([chosen, damaged, error])
        if error:
            raise ModeError(error)
        return chosen, damaged

    def _check_rng_restored(self, path: Path) -> None:
        # accelerate logs and carries on when it cannot restore RNG states; an exact resume needs them.
        from accelerate.utils import load

        rng_file = path / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            saved = load(rng_file)["torch_manual_seed"]
        except Exception as err:
            raise ModeError(f"{rng_file}: unreadable ({err}); cannot resume exactly") from err
        if not torch.equal(saved, torch.get_rng_state()):
            raise ModeError(f"{rng_file}: accelerate could not restore the random states; cannot resume exactly")

    def remove_all(self) -> None:
        """Delete every checkpoint (main process): a finished run keeps its adapter in `<run>/adapter/`."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
