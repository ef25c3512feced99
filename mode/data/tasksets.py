"""Which tasks a run trains on and which it evaluates on.

A data config names its tasks by an explicit list (`data.tasks`) or a split file (`data.task_list_file`,
e.g. the 756 `train_tasks.txt` or the 119 `test_tasks.txt`), optionally narrowed by category
(`data.categories`, `data.exclude_categories`). Under the held-in protocol the evaluation tasks are the
training tasks; under held-out they are a second set (`data.eval_tasks` / `data.eval_task_list_file`)
that must not share a task with the first. Tasks whose languages are not all English are refused unless
`data.allow_non_english=true`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mode.data.sni import Task, category_key, check_sni_dir, load_task, requested_tasks, select_tasks, task_path
from mode.errors import ModeError

PROTOCOLS = ("held_in", "held_out")


@dataclass
class TaskSets:
    protocol: str
    train: list[str]            # training tasks in order: task index = position
    eval: list[str]             # evaluated tasks in order (the training tasks under held_in)
    absent: list[str]           # requested but without a file (only with data.allow_missing_tasks)
    tasks: dict[str, Task]      # every selected task, checked; headers only (instances: `load`)
    sni_dir: Path | None = None

    def load(self, name: str) -> Task:
        """One task with its instances, read again from its file: the full data never sit in memory at
        once. A file that changed since the task sets were resolved is an error, not a silent mix."""
        task = load_task(self.sni_dir, name)
        if task.fingerprint != self.tasks[name].fingerprint:
            raise ModeError(f"{task_path(self.sni_dir, name)}: changed while the data were being read; rerun")
        return task

    def task_index(self, name: str) -> int:
        """Training tasks: their position. Held-out evaluation tasks, never trained on, continue the
        numbering after the last training task (len(train) + position in `eval`), so an index never
        names two tasks and a per-task table sized for the training tasks cannot be indexed silently."""
        if name in self._train_positions:
            return self._train_positions[name]
        return len(self.train) + self.eval.index(name)

    def __post_init__(self):
        self._train_positions = {name: i for i, name in enumerate(self.train)}


def _list(data_cfg, key: str) -> list[str]:
    value = data_cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ModeError(f"data.{key} must be a list of names, got {value!r}")
    return list(value)


def _category_filter(tasks: dict[str, Task], data_cfg):
    """A predicate on task names from data.categories / data.exclude_categories (None: keep all).

    Names compare as metric keys do ("Question Answering" == "question_answering"); a name that is the
    category of no selected task is an error (a typo would otherwise select nothing, or everything)."""
    include = {category_key(c): c for c in _list(data_cfg, "categories")}
    exclude = {category_key(c): c for c in _list(data_cfg, "exclude_categories")}
    if not include and not exclude:
        return None
    seen = {category_key(c) for task in tasks.values() for c in task.categories}
    for key, wanted in (("categories", include), ("exclude_categories", exclude)):
        unknown = [name for k, name in wanted.items() if k not in seen]
        if unknown:
            raise ModeError(f"data.{key}: {', '.join(map(repr, unknown))} is the category of no selected task "
                            f"(their categories: {', '.join(sorted(seen))})")

    def keep(name: str) -> bool:
        cats = {category_key(c) for c in tasks[name].categories}
        return (not include or bool(cats & include.keys())) and not cats & exclude.keys()

    return keep


def _check_english(tasks: list[Task], allow: bool) -> None:
    foreign = [t for t in tasks if not t.is_english()]
    if foreign and not allow:
        shown = "; ".join(
            f"{t.name} ({', '.join(f'{k}={v}' for k, v in t.languages().items() if v != ['English'])})"
            for t in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ModeError(f"{len(foreign)} selected task(s) are not English: {shown}{more} "
                        "(set data.allow_non_english=true to use them)")


def resolve_task_sets(data_cfg) -> TaskSets:
    """Select, load and check the training and evaluation tasks of a data config."""
    protocol = data_cfg.get("protocol", "held_in")
    if protocol not in PROTOCOLS:
        raise ModeError(f"data.protocol={protocol!r} is not one of {list(PROTOCOLS)}")
    sni_dir = check_sni_dir(data_cfg.sni_dir)
    allow_missing = bool(data_cfg.get("allow_missing_tasks", False))
    train_names, train_source = requested_tasks(data_cfg)
    train, absent = select_tasks(sni_dir, train_names, allow_missing, train_source)
    if protocol == "held_out":
        eval_names, eval_source = requested_tasks(data_cfg, prefix="eval_")
        both = sorted(set(train_names) & set(eval_names))
        if both:
            raise ModeError(f"data.protocol=held_out but {len(both)} task(s) are both training and evaluation "
                            f"tasks ({train_source} and {eval_source}): {', '.join(both[:5])}"
                            + (f" and {len(both) - 5} more" if len(both) > 5 else ""))
        evaluation, eval_absent = select_tasks(sni_dir, eval_names, allow_missing, eval_source)
        absent = absent + eval_absent
    else:
        for key in ("eval_tasks", "eval_task_list_file"):
            if data_cfg.get(key):
                raise ModeError(f"data.{key} is set but data.protocol=held_in evaluates the training tasks "
                                "(use data.protocol=held_out)")
        evaluation = train
    # Headers only: a task's instances are read when its records are made (TaskSets.load), one at a time.
    tasks = {name: dataclasses.replace(load_task(sni_dir, name), instances=[]) for name in dict.fromkeys(train + evaluation)}
    keep = _category_filter(tasks, data_cfg)
    if keep is not None:
        train = [n for n in train if keep(n)]
        evaluation = train if protocol == "held_in" else [n for n in evaluation if keep(n)]
    if not train or not evaluation:
        raise ModeError("data.categories / data.exclude_categories leave no "
                        + ("training" if not train else "evaluation") + " task")
    tasks = {name: tasks[name] for name in dict.fromkeys(train + evaluation)}
    _check_english(list(tasks.values()), bool(data_cfg.get("allow_non_english", False)))
    return TaskSets(protocol=protocol, train=train, eval=evaluation, absent=absent, tasks=tasks, sni_dir=sni_dir)
