"""From a data config to encoded training and evaluation examples, with a record of what was used.

Instances are selected (task sets, protocol split, caps), then tokenised with `datasets.map` in
parallel and cached (see `mode.data.cache`): a second run with the same inputs loads Arrow files
instead of tokenising again. Rows stay memory-mapped; `Rows` reads them like a list of dicts.

Several processes (torchrun): the main one builds (`build_data`), the others load what it cached
(`SNIData.handle` -> `load_data`), so task files are read and hashed once per job, not once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mode.data.cache import Key, entry_path, load_entry, load_or_build, rows_digest, tokenizer_fingerprint
from mode.data.encoding import EncodingConfig, PromptEncoder
from mode.data.sni import Task
from mode.data.splits import held_in_split, held_out_eval, held_out_train, stable_seed
from mode.data.tasksets import TaskSets, resolve_task_sets
from mode.errors import ModeError

log = logging.getLogger(__name__)

HELD_OUT_EVAL_POOL = 100  # Tk-Instruct evaluates on Instances[:100] of each test task


class Rows(Sequence):
    """Encoded rows (a `datasets.Dataset`, memory-mapped when cached) read like a list of dicts.

    `digest`: the rows' `rows_digest` when the cache stored it (the data fingerprint, without reading
    every token again), else None."""

    def __init__(self, dataset, digest: str | None = None):
        self.dataset = dataset
        self.digest = digest

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.dataset[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[int(index)]

    def __iter__(self):
        return iter(self.dataset)

    def column(self, name: str) -> list:
        """One column as a list, without decoding the others (e.g. `length`, `prompt_length`, `task_index`)."""
        return list(self.dataset[name]) if len(self) else []


@dataclass
class SNIData:
    tasks: list[str]                 # training tasks, in a fixed order (task index = position)
    absent_tasks: list[str]          # requested but not present (only with data.allow_missing_tasks)
    train: Rows                      # {id, task, task_index, input_ids, prompt_length, length}
    eval: Rows                       # {id, task, task_index, categories, prompt_ids, references}
    stats: dict = field(default_factory=dict)
    eval_tasks: list[str] = field(default_factory=list)  # evaluated tasks (== tasks under held_in)
    protocol: str = "held_in"
    sources: dict = field(default_factory=dict)  # part -> its cache entry folder (when it came from the cache)

    @property
    def task_names(self) -> list[str]:
        """Task names by task index: training tasks, then evaluation-only (held-out) ones (`TaskSets.task_index`)."""
        return [*self.tasks, *[t for t in self.eval_tasks if t not in self.tasks]]

    def record(self) -> dict:
        """What data_stats.json records: the protocol, the tasks, absent ones and per-task counts."""
        return {"protocol": self.protocol, "tasks": self.tasks, "eval_tasks": self.eval_tasks,
                "absent_tasks": self.absent_tasks, "per_task": self.stats}

    def handle(self) -> dict | None:
        """What another process needs to load these data from the cache (`load_data`): a small picklable
        dict; None when a part is not in the cache (`data.cache=false`, or a part without rows)."""
        if set(self.sources) != {"train", "eval"}:
            return None
        return {**self.record(), "sources": dict(self.sources)}


def load_data(handle: dict) -> SNIData:
    """The data another process built (`SNIData.handle`), memory-mapped from its cache entries."""
    parts = {part: load_entry(Path(folder)) for part, folder in handle["sources"].items()}
    return SNIData(tasks=handle["tasks"], absent_tasks=handle["absent_tasks"],
                   train=Rows(parts["train"][0], parts["train"][2]), eval=Rows(parts["eval"][0]),
                   stats=handle["per_task"], eval_tasks=handle["eval_tasks"], protocol=handle["protocol"],
                   sources=dict(handle["sources"]))


def _int_or_none(data_cfg, key: str, where: str = "data"):
    value = data_cfg.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ModeError(f"{where}.{key}={value!r} must be a positive integer or null")
    return value


def select_instances(sets: TaskSets, data_cfg, eval_cfg, need_train: bool = True) -> tuple[list[dict], list[dict]]:
    """Unencoded (train, eval) records under the config's protocol, in task order.

    held_in: each task's instances split (data.eval_fraction, data.split_seed); data.max_instances_per_task
    caps the training part, eval.max_instances_per_task the evaluation part (first N of a seeded shuffle).
    held_out: training tasks give a seeded shuffle capped at data.max_instances_per_task; evaluation tasks
    give Instances[:data.held_out_eval_instances] (default 100), sampled down to eval.max_instances_per_task.
    """
    train_cap = _int_or_none(data_cfg, "max_instances_per_task")
    eval_cap = _int_or_none(eval_cfg, "max_instances_per_task", "eval")
    seed = data_cfg.get("split_seed", 0)
    train: list[dict] = []
    evaluation: list[dict] = []

    def add_train(task: Task, instances: list[dict]) -> None:
        index = sets.task_index(task.name)
        for inst in instances:
            # Several references: train on one, chosen by a seeded draw per instance (as Tk-Instruct does).
            answer = random.Random(stable_seed(seed, inst["id"])).choice(inst["output"])
            train.append({"id": inst["id"], "task": task.name, "task_index": index, "input": inst["input"],
                          "answer": answer})

    def add_eval(task: Task, instances: list[dict]) -> None:
        index = sets.task_index(task.name)
        for inst in instances:
            evaluation.append({"id": inst["id"], "task": task.name, "task_index": index, "input": inst["input"],
                               "references": inst["output"], "categories": task.categories})

    if sets.protocol == "held_in":
        fraction = data_cfg.get("eval_fraction", 0.1)
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ModeError(f"data.eval_fraction={fraction!r} must be a number between 0 and 1")
        for name in sets.train:
            task = sets.tasks[name]
            train_part, eval_part = held_in_split(task, fraction, seed)
            if need_train:
                add_train(task, train_part[:train_cap] if train_cap else train_part)
            add_eval(task, eval_part[:eval_cap] if eval_cap else eval_part)
    else:
        pool = _int_or_none(data_cfg, "held_out_eval_instances") or HELD_OUT_EVAL_POOL
        if need_train:
            for name in sets.train:
                add_train(sets.tasks[name], held_out_train(sets.tasks[name], train_cap, seed))
        for name in sets.eval:
            add_eval(sets.tasks[name], held_out_eval(sets.tasks[name], pool, eval_cap, seed))
    return train, evaluation


def _encode_batch(batch: dict, encoder: PromptEncoder, tasks: dict[str, Task], part: str) -> dict:
    """`datasets.map` function: encode a batch of records, one tokenizer call per task and step."""
    n = len(batch["id"])
    by_task: dict[str, list[int]] = {}
    for i, name in enumerate(batch["task"]):
        by_task.setdefault(name, []).append(i)
    prompts: list = [None] * n
    for name, rows in by_task.items():
        for i, encoded in zip(rows, encoder.prompts(tasks[name], [batch["input"][i] for i in rows])):
            prompts[i] = encoded
    out = {"id": batch["id"], "task": batch["task"], "task_index": batch["task_index"]}
    if part == "eval":
        out.update(categories=batch["categories"], references=batch["references"],
                   prompt_ids=[p for p, _ in prompts], prompt_cut=[cut for _, cut in prompts])
        return out
    answers = encoder.answers(batch["answer"])
    out.update(input_ids=[p + a for (p, _), (a, _) in zip(prompts, answers)],
               prompt_length=[len(p) for p, _ in prompts],
               length=[len(p) + len(a) for (p, _), (a, _) in zip(prompts, answers)],
               dropped=[overflow for _, overflow in prompts], answer_cut=[cut for _, cut in answers])
    return out


def _num_proc(data_cfg, n_records: int) -> int:
    value = data_cfg.get("num_proc")
    if value is not None:
        if not isinstance(value, int) or value < 1:
            raise ModeError(f"data.num_proc={value!r} must be a positive integer or null (automatic)")
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8)) if n_records >= 4000 else 1  # worker start-up costs more for small sets


def _encode(records: list[dict], part: str, encoder: PromptEncoder, tasks: dict[str, Task], num_proc: int,
            fingerprint: str):
    """Encode records with datasets.map; returns (dataset, per-task counts)."""
    from datasets import Dataset, Features, Sequence, Value

    features = {"id": Value("string"), "task": Value("string"), "task_index": Value("int32")}
    if part == "eval":
        features.update(categories=Sequence(Value("string")), references=Sequence(Value("string")),
                        prompt_ids=Sequence(Value("int32")), prompt_cut=Value("bool"))
    else:
        features.update(input_ids=Sequence(Value("int32")), prompt_length=Value("int32"), length=Value("int32"),
                        dropped=Value("bool"), answer_cut=Value("bool"))
    flags = ["prompt_cut"] if part == "eval" else ["dropped", "answer_cut"]
    if not records:  # map() over nothing would not even produce the columns
        kept = Features({k: v for k, v in features.items() if k not in flags})
        return Dataset.from_dict({k: [] for k in kept}, features=kept), {}
    headers = {name: dataclasses.replace(task, instances=[]) for name, task in tasks.items()}  # small to ship
    raw = Dataset.from_list(records)
    n_tasks = len({r["task"] for r in records})
    encoded = raw.map(_encode_batch, batched=True, batch_size=256, remove_columns=raw.column_names,
                      features=Features(features), num_proc=num_proc if num_proc > 1 and len(records) > 1 else None,
                      new_fingerprint=fingerprint,  # ours; datasets need not hash the tokenizer itself
                      fn_kwargs={"encoder": encoder, "tasks": headers, "part": part},
                      desc=f"tokenising {part} ({len(records)} instances, {n_tasks} tasks)")
    stats: dict[str, dict] = {}
    if part == "eval":
        for name, cut in zip(encoded["task"], encoded["prompt_cut"]):
            s = stats.setdefault(name, {"eval": 0, "eval_prompts_truncated": 0})
            s["eval"] += 1
            s["eval_prompts_truncated"] += int(cut)
        return encoded.remove_columns(flags), stats
    dropped = encoded["dropped"]
    for name, drop, cut in zip(encoded["task"], dropped, encoded["answer_cut"]):
        s = stats.setdefault(name, {"train": 0, "train_dropped_overlong": 0, "train_answers_truncated": 0})
        s["train"] += int(not drop)
        s["train_dropped_overlong"] += int(drop)
        s["train_answers_truncated"] += int(cut and not drop)
    if any(dropped):
        encoded = encoded.select([i for i, d in enumerate(dropped) if not d])
    return encoded.remove_columns(flags), stats


def _cache_name(part: str, records: list[dict], encoder: PromptEncoder, tasks: dict[str, Task]) -> str:
    key = Key(part, tokenizer_fingerprint(encoder.tok), sorted(encoder.cfg.as_dict().items()), encoder.seq2seq)
    for name in sorted({r["task"] for r in records}):
        key.update(name, tasks[name].fingerprint)
    for r in records:
        key.update(r["id"], r["task"], r["task_index"], r["input"], r.get("answer", ""),
                   *r.get("references", ()), "\x1e")
    return f"{part}-{key.hexdigest()}"


def _count_empty(stats: dict[str, dict], train_records: list[dict], eval_records: list[dict]) -> None:
    """Empty inputs and empty reference strings are kept, as SNI's own evaluation keeps them; they are
    counted per task so a user sees them in data_stats.json (and in one warning)."""
    for part, records in (("train", train_records), ("eval", eval_records)):
        for r in records:
            if not r["input"].strip():
                stats[r["task"]][f"{part}_empty_inputs"] += 1
    for r in eval_records:
        stats[r["task"]]["eval_empty_references"] += sum(not ref.strip() for ref in r["references"])
    totals = {key: sum(s[key] for s in stats.values())
              for key in ("train_empty_inputs", "eval_empty_inputs", "eval_empty_references")}
    if any(totals.values()):
        log.warning("kept as in SNI's evaluation: %s (per task in data_stats.json)",
                    ", ".join(f"{n} {key.replace('_', ' ')}" for key, n in totals.items() if n))


def build_data(data_cfg, eval_cfg, tokenizer, *, need_train: bool = True, cache_dir=None,
               seq2seq: bool = False) -> SNIData:
    """Select, encode (cached under `<cache_dir>/sni/` unless `data.cache=false` or `cache_dir=None`) and
    describe the training and evaluation examples of a data config."""
    sets = resolve_task_sets(data_cfg)
    encoder = PromptEncoder(tokenizer, EncodingConfig.from_mapping(data_cfg.encoding), seq2seq=seq2seq)
    train_records, eval_records = select_instances(sets, data_cfg, eval_cfg, need_train)
    for name, task in sets.tasks.items():  # the records hold what encoding needs: free the parsed instances
        sets.tasks[name] = dataclasses.replace(task, instances=[])
    if not data_cfg.get("cache", True):
        cache_dir = None
    parts, sources = {}, {}
    for part, records in (("train", train_records), ("eval", eval_records)):
        if part == "train" and not need_train:
            continue
        num_proc = _num_proc(data_cfg, len(records))
        name = _cache_name(part, records, encoder, sets.tasks)
        parts[part] = load_or_build(cache_dir, name, functools.partial(
            _encode, records, part, encoder, sets.tasks, num_proc, name),
            digest=rows_digest if part == "train" else None)
        if cache_dir is not None and len(parts[part][0]):
            sources[part] = str(entry_path(cache_dir, name))
    if need_train and not len(parts["train"][0]):
        raise ModeError("no training instance fits data.encoding.max_source_length; raise it or pick other tasks")
    stats: dict[str, dict] = {}
    for name in dict.fromkeys(sets.train + sets.eval):
        stats[name] = {"train": 0, "eval": 0, "train_dropped_overlong": 0, "train_answers_truncated": 0,
                       "eval_prompts_truncated": 0, "train_empty_inputs": 0, "eval_empty_inputs": 0,
                       "eval_empty_references": 0}
        for _, part_stats, _ in parts.values():
            stats[name].update(part_stats.get(name, {}))
    _count_empty(stats, train_records if need_train else [], eval_records)
    dropped = sum(s["train_dropped_overlong"] for s in stats.values())
    if dropped:
        log.warning("%d training instances dropped: their query alone exceeds max_source_length", dropped)
    from datasets import Dataset

    return SNIData(tasks=sets.train, absent_tasks=sets.absent,
                   train=Rows(parts["train"][0], parts["train"][2]) if "train" in parts else Rows(Dataset.from_dict({})),
                   eval=Rows(parts["eval"][0]), stats=stats, eval_tasks=sets.eval, protocol=sets.protocol,
                   sources=sources)

