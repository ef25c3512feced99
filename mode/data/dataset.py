"""From a data config to encoded training and evaluation examples, with a record of what was used."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from mode.data.encoding import EncodingConfig, PromptEncoder
from mode.data.sni import load_task, requested_tasks, select_tasks
from mode.data.splits import held_in_split, stable_seed
from mode.errors import ModeError

log = logging.getLogger(__name__)


@dataclass
class SNIData:
    tasks: list[str]                 # tasks used, in a fixed order (task index = position)
    absent_tasks: list[str]          # requested but not present (only with data.allow_missing_tasks)
    train: list[dict]                # {id, task, task_index, input_ids, prompt_length}
    eval: list[dict]                 # {id, task, task_index, categories, prompt_ids, references}
    stats: dict = field(default_factory=dict)


def build_data(data_cfg, eval_cfg, tokenizer, *, need_train: bool = True) -> SNIData:
    names, source = requested_tasks(data_cfg)
    present, absent = select_tasks(data_cfg.sni_dir, names, bool(data_cfg.get("allow_missing_tasks", False)), source)
    if data_cfg.protocol != "held_in":
        raise ModeError(f"data.protocol={data_cfg.protocol!r} is not supported (held_in)")
    encoder = PromptEncoder(tokenizer, EncodingConfig.from_mapping(data_cfg.encoding))
    train_cap = data_cfg.get("max_instances_per_task")
    eval_cap = eval_cfg.get("max_instances_per_task")
    train, evaluation, stats = [], [], {}
    for index, name in enumerate(tqdm(present, desc="encoding tasks", unit="task", leave=False)):
        task = load_task(data_cfg.sni_dir, name)
        train_part, eval_part = held_in_split(task, data_cfg.eval_fraction, data_cfg.split_seed)
        train_part = train_part[:train_cap] if train_cap else train_part
        eval_part = eval_part[:eval_cap] if eval_cap else eval_part
        s = stats[name] = {"train": 0, "eval": 0, "train_dropped_overlong": 0, "train_answers_truncated": 0,
                           "eval_prompts_truncated": 0}
        for inst in train_part if need_train else []:
            prompt, overflow = encoder.prompt_ids(task, inst["input"])
            if overflow:
                s["train_dropped_overlong"] += 1
                continue
            # Several references: train on one, chosen by a seeded draw per instance (as Tk-Instruct does).
            answer = random.Random(stable_seed(data_cfg.split_seed, inst["id"])).choice(inst["output"])
            answer_ids, cut = encoder.answer_ids(answer)
            s["train_answers_truncated"] += cut
            train.append({"id": inst["id"], "task": name, "task_index": index,
                          "input_ids": prompt + answer_ids, "prompt_length": len(prompt)})
            s["train"] += 1
        for inst in eval_part:
            prompt, overflow = encoder.prompt_ids(task, inst["input"])
            s["eval_prompts_truncated"] += overflow
            evaluation.append({"id": inst["id"], "task": name, "task_index": index, "categories": task.categories,
                               "prompt_ids": prompt, "references": inst["output"]})
            s["eval"] += 1
    if need_train and not train:
        raise ModeError("no training instance fits data.encoding.max_source_length; raise it or pick other tasks")
    dropped = sum(s["train_dropped_overlong"] for s in stats.values())
    if dropped:
        log.warning("%d training instances dropped: their query alone exceeds max_source_length", dropped)
    return SNIData(tasks=present, absent_tasks=absent, train=train, eval=evaluation, stats=stats)
