"""One process or N: the global batch, its micro-batches per process, the device, and who decides.

Which micro-batches exist depends on train.micro_batch_size alone, so N processes compute exactly the
micro-batches one process would (the same step, up to the order of one sum).
"""

from __future__ import annotations

import os
import re
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
    world x accum micro-batches, dealt in serpentine order (0 1 .. w-1, w-1 .. 1 0, ...), so every
    process gets short and long ones alike and no process always holds the longest. Which micro-batches
    exist depends on train.micro_batch_size alone, so N processes compute exactly the micro-batches one
    process would (the same step, up to the order of one sum).
    """
    ordered = sorted(indices, key=lambda i: len(examples[i]["input_ids"]))  # stable: ties keep sampling order
    groups = [ordered[k * micro : (k + 1) * micro] for k in range(world * accum)]
    return [g for k, g in enumerate(groups) if serpentine_owner(k, world) == rank]


def serpentine_owner(k: int, world: int) -> int:
    """The process that computes micro-batch k (in ascending length) of a global batch."""
    position, lap = k % world, k // world
    return position if lap % 2 == 0 else world - 1 - position


def gpu_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def use_cpu(device: str) -> bool:
    """Whether to train on the CPU for train.device = auto | cpu | cuda | cuda:N. `cuda` without a GPU is
    an error (a GPU profile must never fall back to the CPU in silence); `auto` falls back, and the session
    logs the device it got. Under torchrun, accelerate's `cpu=False` on a machine without a GPU would form
    no process group at all (every process would train alone, as rank 0): hence `cpu=True` there."""
    if device == "cpu":
        return True
    if str(device).startswith("cuda"):
        from mode.errors import ModeError

        if not gpu_available():
            raise ModeError(f"train.device={device}: no GPU is visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use train.device=auto or cpu to "
                            "train on the CPU")
        if ":" in str(device) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(int(str(device).split(":")[1]))  # one process: this GPU
        return False
    return not gpu_available()


def slurm_environment(env=os.environ) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from SLURM's variables, for `srun` with one
    task per GPU (torchrun sets them itself; nothing is changed when they are set or SLURM ran one task)."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": env["SLURM_NTASKS"], "MASTER_ADDR": first_host(nodes),
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[012-015,020],cpu1' -> 'gpu012' (no scontrol needed)."""
    prefix, ranges = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist).groups()
    return prefix + re.split("[,-]", ranges)[0] if ranges else prefix


DATA_WAIT_S = 60  # the others poll for the main process's data this often (and log every 10 polls)
_data_calls = [0]


def data_on_main(accelerator, build, load):
    """The training data, read, hashed and tokenised by the main process alone; the others wait, then
    memory-map the cache entries it wrote (`load(handle)`; `SNIData.handle`). A refusal (bad config or
    task file) is raised by every process alike. Without the cache (`data.cache=false`) there is nothing
    to share: every process builds its own copy, as a single process would.

    The others wait on the process group's key-value store in slices of DATA_WAIT_S, not in a collective:
    a first build at full size takes longer than a collective's timeout (NCCL's default is 10 minutes)."""
    if accelerator.num_processes == 1:
        return build()
    import datetime
    import logging
    import pickle

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    _data_calls[0] += 1
    key = f"mode-data-{_data_calls[0]}"
    if accelerator.is_main_process:
        try:
            data = build()
        except Exception as err:  # the others must not wait forever: they fail too, with the reason
            reason = str(err) if isinstance(err, ModeError) else f"the main process failed to build the data ({err!r})"
            store.set(key, pickle.dumps((None, reason)))
            raise
        store.set(key, pickle.dumps((data.handle(), None)))
        return data
    polls = 0
    while True:
        try:
            store.wait([key], datetime.timedelta(seconds=DATA_WAIT_S))
            break
        except dist.DistStoreError:  # a timeout: the main process is still building
            polls += 1
            if polls % 10 == 0:
                logging.getLogger(__name__).info("process %d: waiting for the main process to build the data "
                                                 "(%d s so far)", accelerator.process_index, polls * DATA_WAIT_S)
    handle, error = pickle.loads(store.get(key))
    if error:
        raise ModeError(error)
    return build() if handle is None else load(handle)


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
