"""One process or N: the global batch, its micro-batches per process, the device, and who decides.

Which micro-batches exist depends on train.micro_batch_size alone, so N processes compute exactly the
micro-batches one process would (the same step, up to the order of one sum).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mode.errors import ModeError
from mode.run.resume import check_resumable
from mode.run.run_dir import FINISHED, UNFINISHED, plan_run


def micro_batch_size(train_cfg, world_size: int) -> int:
    """train.micro_batch_size, or (null) the whole global batch of each process."""
    micro = train_cfg.micro_batch_size
    if micro is None:
        if train_cfg.batch_size % world_size:
            raise ModeError(f"train.batch_size={train_cfg.batch_size} cannot be split evenly over {world_size} "
                            "processes; choose a multiple of the process count")
        return train_cfg.batch_size // world_size
    return micro


def accumulation_steps(train_cfg, world_size: int) -> int:
    """Micro-batches per process per step, so that the global batch is train.batch_size everywhere."""
    micro = micro_batch_size(train_cfg, world_size)
    if train_cfg.batch_size % (micro * world_size):
        raise ModeError(
            f"train.batch_size={train_cfg.batch_size} is not a multiple of train.micro_batch_size="
            f"{micro} x {world_size} process(es); set train.micro_batch_size=null to use whole batches"
        )
    return train_cfg.batch_size // (micro * world_size)


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
