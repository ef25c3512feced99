"""From a data config to encoded training and evaluation examples, with a record of what was used.

Instances are selected (task sets, protocol split, caps) one task file at a time and streamed into Arrow
files, then tokenised with `datasets.map` in parallel and cached (see `mode.data.cache`): a second run
with the same inputs loads Arrow files instead of tokenising again. Memory stays bounded by the largest
task, not the data (the full SNI: benchmarks/results/data_scale.md). Rows stay memory-mapped; `Rows` reads
them like a list of dicts.

Several processes (torchrun): the main one builds (`build_data`), the others load what it cached
(`SNIData.handle` -> `load_data`), so task files are read and hashed once per job, not once per process.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
        """One column as a list, without decoding the others (e.g. `length`, `prompt_length`, `task_index`):
        read as one Arrow slice (an indices mapping honoured); row by row is two orders of magnitude slower."""
        if not len(self):
            return []
        return self.dataset.select_columns([name]).with_format("arrow")[:].column(name).to_pylist()


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


def selection(sets: TaskSets, data_cfg, eval_cfg) -> dict:
    """The config values that decide which instances each part holds, checked; with the task sets and their
    files' SHA-256 they determine every record (`iter_records`), so they key the cache (`_cache_name`)."""
    chosen = {"protocol": sets.protocol, "split_seed": data_cfg.get("split_seed", 0),
              "train_cap": _int_or_none(data_cfg, "max_instances_per_task"),
              "eval_cap": _int_or_none(eval_cfg, "max_instances_per_task", "eval")}
    if sets.protocol == "held_in":
        fraction = data_cfg.get("eval_fraction", 0.1)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ModeError(f"data.eval_fraction={fraction!r} must be a number between 0 and 1")
        chosen["eval_fraction"] = fraction
    else:
        chosen["pool"] = _int_or_none(data_cfg, "held_out_eval_instances") or HELD_OUT_EVAL_POOL
    return chosen


# What each part's records depend on, besides the tasks (the rest of `selection` cannot change them).
PART_SELECTION = {"train": ("protocol", "split_seed", "train_cap", "eval_fraction"),
                  "eval": ("protocol", "split_seed", "eval_cap", "eval_fraction", "pool")}


def iter_records(sets: TaskSets, chosen: dict, part: str):
    """Unencoded records of one part ("train" or "eval") under a `selection`, in task order, reading one
    task file at a time (memory bounded by the largest task, not the data).

    held_in: each task's instances split (eval_fraction, split_seed); train_cap caps the training part,
    eval_cap the evaluation part (first N of a seeded shuffle). held_out: training tasks give a seeded
    shuffle capped at train_cap; evaluation tasks give Instances[:pool] (default 100), sampled down to
    eval_cap."""
    seed, held_in = chosen["split_seed"], chosen["protocol"] == "held_in"
    for name in sets.train if part == "train" else sets.eval:
        task = sets.load(name)
        index = sets.task_index(name)
        if part == "train":
            instances = (held_in_split(task, chosen["eval_fraction"], seed)[0][: chosen["train_cap"]] if held_in
                         else held_out_train(task, chosen["train_cap"], seed))
            for inst in instances:
                # Several references: train on one, chosen by a seeded draw per instance (as Tk-Instruct does).
                answer = random.Random(stable_seed(seed, inst["id"])).choice(inst["output"])
                yield {"id": inst["id"], "task": name, "task_index": index, "input": inst["input"], "answer": answer}
        else:
            instances = (held_in_split(task, chosen["eval_fraction"], seed)[1][: chosen["eval_cap"]] if held_in
                         else held_out_eval(task, chosen["pool"], chosen["eval_cap"], seed))
            for inst in instances:
                yield {"id": inst["id"], "task": name, "task_index": index, "input": inst["input"],
                       "references": inst["output"], "categories": task.categories}


def select_instances(sets: TaskSets, data_cfg, eval_cfg, need_train: bool = True) -> tuple[list[dict], list[dict]]:
    """Unencoded (train, eval) records under the config's protocol, in task order, as lists (`iter_records`)."""
    chosen = selection(sets, data_cfg, eval_cfg)
    return (list(iter_records(sets, chosen, "train")) if need_train else [], list(iter_records(sets, chosen, "eval")))


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
    out = {"id": batch["id"], "task": batch["task"], "task_index": batch["task_index"],
           "empty_input": [not x.strip() for x in batch["input"]]}
    if part == "eval":
        out.update(categories=batch["categories"], references=batch["references"],
                   prompt_ids=[p for p, _ in prompts], prompt_cut=[cut for _, cut in prompts],
                   empty_references=[sum(not ref.strip() for ref in refs) for refs in batch["references"]])
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


RAW_FEATURES = {"train": {"answer": "string"}, "eval": {"references": ["string"], "categories": ["string"]}}
# Per-row counts kept in the stats, then dropped from the rows: {column: stats key}.
COUNTED = {"train": {"dropped": "train_dropped_overlong", "answer_cut": "train_answers_truncated",
                     "empty_input": "train_empty_inputs"},
           "eval": {"prompt_cut": "eval_prompts_truncated", "empty_input": "eval_empty_inputs",
                    "empty_references": "eval_empty_references"}}
STATS_BATCH = 65536


def _records(sets: TaskSets, chosen: dict, part: str, workdir: Path | None):
    """The part's records as a `datasets.Dataset` written from `iter_records` into Arrow files under
    `workdir` (memory-mapped: any data size fits), or held in memory when there is no workdir (no cache)."""
    import tempfile

    from datasets import Dataset, Features, Sequence, Value

    columns = {"id": "string", "task": "string", "task_index": "int32", "input": "string", **RAW_FEATURES[part]}
    features = Features({k: Sequence(Value(v[0])) if isinstance(v, list) else Value(v) for k, v in columns.items()})
    if next(iter_records(sets, chosen, part), None) is None:  # datasets cannot generate a table without rows
        return Dataset.from_dict({k: [] for k in columns}, features=features)
    kwargs = {"features": features, "gen_kwargs": {"sets": sets, "chosen": chosen, "part": part}}
    if workdir is not None:
        return Dataset.from_generator(iter_records, cache_dir=str(workdir), **kwargs)
    with tempfile.TemporaryDirectory() as scratch:
        return Dataset.from_generator(iter_records, cache_dir=scratch, keep_in_memory=True, **kwargs)


def _encode(sets: TaskSets, chosen: dict, part: str, encoder: PromptEncoder, data_cfg, fingerprint: str,
            workdir: Path | None = None):
    """Encode a part's records with datasets.map; returns (dataset, per-task counts)."""
    from datasets import Features, Sequence, Value

    features = {"id": Value("string"), "task": Value("string"), "task_index": Value("int32"),
                "empty_input": Value("bool")}
    if part == "eval":
        features.update(categories=Sequence(Value("string")), references=Sequence(Value("string")),
                        prompt_ids=Sequence(Value("int32")), prompt_cut=Value("bool"),
                        empty_references=Value("int32"))
    else:
        features.update(input_ids=Sequence(Value("int32")), prompt_length=Value("int32"), length=Value("int32"),
                        dropped=Value("bool"), answer_cut=Value("bool"))
    raw = _records(sets, chosen, part, workdir)
    counted = COUNTED[part]
    if not len(raw):  # map() over nothing would not even produce the columns
        from datasets import Dataset

        kept = Features({k: v for k, v in features.items() if k not in counted})
        return Dataset.from_dict({k: [] for k in kept}, features=kept), {}
    num_proc = _num_proc(data_cfg, len(raw))
    names = sets.train if part == "train" else sets.eval
    encoded = raw.map(_encode_batch, batched=True, batch_size=256, remove_columns=raw.column_names,
                      features=Features(features), num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
                      new_fingerprint=fingerprint,  # ours; datasets need not hash the tokenizer itself
                      fn_kwargs={"encoder": encoder, "tasks": sets.tasks, "part": part},
                      desc=f"tokenising {part} ({len(raw)} instances, {len(names)} tasks)")
    stats: dict[str, dict] = {}
    keep = np.ones(len(encoded), dtype=bool)
    row = 0
    columns = encoded.select_columns(["task", *counted]).with_format("numpy")
    for batch in columns.iter(batch_size=STATS_BATCH):  # bounded memory; per-task sums with bincount
        present, which = np.unique(batch["task"], return_inverse=True)
        values = {key: np.asarray(batch[column], dtype=np.int64) for column, key in counted.items()}
        kept = np.ones(len(which), dtype=bool)
        if part == "train":
            kept = values["train_dropped_overlong"] == 0
            values["train_answers_truncated"] = values["train_answers_truncated"] * kept  # dropped, not cut
            keep[row:row + len(kept)] = kept
        sums = {key: np.bincount(which, weights=v, minlength=len(present)) for key, v in values.items()}
        kept_per_task = np.bincount(which, weights=kept, minlength=len(present))
        for j, name in enumerate(present.tolist()):
            task = stats.setdefault(name, {part: 0})
            task[part] += int(kept_per_task[j])
            for key, total in sums.items():
                task[key] = task.get(key, 0) + int(total[j])
        row += len(which)
    if not keep.all():
        encoded = encoded.select(np.flatnonzero(keep))
    return encoded.remove_columns(list(counted)), stats


def _cache_name(part: str, sets: TaskSets, chosen: dict, encoder: PromptEncoder) -> str:
    """The part's cache entry: the tokenizer, the encoding, the selection values its records depend on
    (`PART_SELECTION`) and, per task in order, its name, task index and file SHA-256. Records are a
    function of these and of the code (`code_digest`), so equal keys mean equal rows (tested) and the
    key costs one read of each file, not a pass over the instances."""
    key = Key(part, tokenizer_fingerprint(encoder.tok), sorted(encoder.cfg.as_dict().items()), encoder.seq2seq,
              sorted((k, chosen.get(k)) for k in PART_SELECTION[part]))
    for name in sets.train if part == "train" else sets.eval:
        key.update(name, sets.task_index(name), sets.tasks[name].fingerprint, "\x1e")
    return f"{part}-{key.hexdigest()}"


def _warn_empty(stats: dict[str, dict]) -> None:
    """Empty inputs and empty reference strings are kept, as SNI's own evaluation keeps them; they are
    counted per task so a user sees them in data_stats.json (and in one warning)."""
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
    chosen = selection(sets, data_cfg, eval_cfg)
    if not data_cfg.get("cache", True):
        cache_dir = None
    parts, sources = {}, {}
    for part in ("train", "eval") if need_train else ("eval",):
        name = _cache_name(part, sets, chosen, encoder)
        parts[part] = load_or_build(cache_dir, name, functools.partial(_encode, sets, chosen, part, encoder, data_cfg,
                                                                       name), digest=rows_digest if part == "train" else None)
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
    _warn_empty(stats)
    dropped = sum(s["train_dropped_overlong"] for s in stats.values())
    if dropped:
        log.warning("%d training instances dropped: their query alone exceeds max_source_length", dropped)
    from datasets import Dataset

    return SNIData(tasks=sets.train, absent_tasks=sets.absent,
                   train=Rows(parts["train"][0], parts["train"][2]) if "train" in parts else Rows(Dataset.from_dict({})),
                   eval=Rows(parts["eval"][0]), stats=stats, eval_tasks=sets.eval, protocol=sets.protocol,
                   sources=sources)
