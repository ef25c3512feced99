"""Reading Super-NaturalInstructions in the upstream layout (allenai/natural-instructions).

    <sni_dir>/tasks/<task>.json          Definition, Positive/Negative Examples, Categories, ..., Instances
    <sni_dir>/splits/default/*.txt       one task name per line
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mode.errors import ModeError

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("Definition", "Instances")


@dataclass
class Task:
    name: str
    definition: str
    instances: list[dict]                      # {"id", "input", "output": [str, ...]}
    positive_examples: list[dict] = field(default_factory=list)
    negative_examples: list[dict] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    input_language: list[str] = field(default_factory=list)
    output_language: list[str] = field(default_factory=list)
    instruction_language: list[str] = field(default_factory=list)
    fingerprint: str = ""                      # SHA-256 of the file's bytes (keys the tokenised-data cache)

    def languages(self) -> dict[str, list[str]]:
        return {"Input_language": self.input_language, "Output_language": self.output_language,
                "Instruction_language": self.instruction_language}

    def is_english(self) -> bool:
        """English input, output and instruction (what SNI's default split calls English)."""
        return all(langs == ["English"] for langs in self.languages().values())


def task_path(sni_dir, name: str) -> Path:
    return Path(sni_dir) / "tasks" / f"{name}.json"


def check_sni_dir(sni_dir) -> Path:
    path = Path(str(sni_dir))
    if not (path / "tasks").is_dir():
        raise ModeError(f"data.sni_dir={str(sni_dir)!r} has no tasks/ folder (expected the natural-instructions layout)")
    return path


def read_task_list(path) -> list[str]:
    """Task names from a split file: one per line; blank lines and `#` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise ModeError(f"{path}: task list file not found")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


def load_task(sni_dir, name: str) -> Task:
    """Read and check one task file; a malformed file is an error naming the file and the problem."""
    path = task_path(sni_dir, name)
    try:
        data = path.read_bytes()
        raw = json.loads(data.decode("utf-8"))
    except FileNotFoundError as err:
        raise ModeError(f"{path}: task file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModeError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ModeError(f"{path}: expected a JSON object at the top level")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ModeError(f"{path}: missing key {key!r}")
    definition = raw["Definition"]
    definition = definition[0] if isinstance(definition, list) and definition else definition
    if not isinstance(definition, str) or not definition.strip():
        raise ModeError(f"{path}: 'Definition' is empty")
    instances = raw["Instances"]
    if not isinstance(instances, list) or not instances:
        raise ModeError(f"{path}: 'Instances' is empty")
    for i, inst in enumerate(instances):
        where = f"{path}: instance {inst.get('id', i) if isinstance(inst, dict) else i}"
        if not isinstance(inst, dict) or "input" not in inst or "output" not in inst:
            raise ModeError(f"{where} lacks 'input' or 'output'")
        outputs = inst["output"]
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise ModeError(f"{where} has no output strings")
        if not isinstance(inst["input"], str):
            raise ModeError(f"{where} has a non-string 'input'")
        inst.setdefault("id", f"{name}-{i}")
        inst["id"] = str(inst["id"])
        inst["output"] = outputs
    examples = {}
    for key in ("Positive Examples", "Negative Examples"):
        examples[key] = raw.get(key) or []
        for i, ex in enumerate(examples[key]):
            if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
                raise ModeError(f"{path}: {key}[{i}] needs string 'input' and 'output'")
    for key in ("Categories", "Input_language", "Output_language", "Instruction_language"):
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModeError(f"{path}: {key!r} must be a list of strings, got {value!r}")
    return Task(
        name=name,
        definition=definition,
        instances=instances,
        positive_examples=examples["Positive Examples"],
        negative_examples=examples["Negative Examples"],
        categories=raw.get("Categories", []) or [],
        input_language=raw.get("Input_language", []) or [],
        output_language=raw.get("Output_language", []) or [],
        instruction_language=raw.get("Instruction_language", []) or [],
        fingerprint=hashlib.sha256(data).hexdigest(),
    )


def select_tasks(sni_dir, names: list[str], allow_missing: bool, what: str = "data.tasks") -> tuple[list[str], list[str]]:
    """Split requested task names into (present, absent); absent tasks are an error unless allowed."""
    sni_dir = check_sni_dir(sni_dir)
    seen, unique = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            unique.append(n)
    present = [n for n in unique if task_path(sni_dir, n).is_file()]
    absent = [n for n in unique if n not in set(present)]
    known = known_task_names(sni_dir)
    unknown = [n for n in absent if known is not None and n not in known]
    if unknown:  # not a task of this SNI release at all: a typo, never silently skipped
        raise ModeError(
            f"{len(unknown)} task(s) of {what} are not SNI tasks (no file under {sni_dir}/tasks and in no "
            f"split file): {', '.join(unknown)}"
        )
    if absent and not allow_missing:
        raise ModeError(
            f"{len(absent)} task(s) of {what} have no file under {sni_dir}/tasks: {', '.join(absent)} "
            "(set data.allow_missing_tasks=true to train on the rest)"
        )
    if absent:
        log.warning("%d task(s) of %s are absent from %s and are skipped: %s", len(absent), what, sni_dir, ", ".join(absent))
    if not present:
        raise ModeError(f"{what} selects no task present under {sni_dir}/tasks")
    return present, absent


def known_task_names(sni_dir) -> set[str] | None:
    """Every task named by a split file (splits/*/*.txt), or None when the folder has no split files."""
    files = sorted(Path(sni_dir).glob("splits/*/*.txt"))
    return {name for f in files for name in read_task_list(f)} if files else None


def requested_tasks(data_cfg, prefix: str = "") -> tuple[list[str], str]:
    """The task names a data config asks for, and where they came from (for messages).

    `prefix=""` reads `data.tasks` / `data.task_list_file`; `prefix="eval_"` reads `data.eval_tasks` /
    `data.eval_task_list_file` (the held-out protocol's evaluation tasks). A list file is relative to sni_dir.
    """
    tasks, list_file = data_cfg.get(f"{prefix}tasks"), data_cfg.get(f"{prefix}task_list_file")
    if tasks:
        if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
            raise ModeError(f"data.{prefix}tasks must be a list of task names, got {tasks!r}")
        return list(tasks), f"data.{prefix}tasks"
    if list_file:
        path = Path(str(data_cfg.sni_dir)) / str(list_file)
        return read_task_list(path), str(path)
    raise ModeError(f"the data config selects no tasks: set data.{prefix}tasks or data.{prefix}task_list_file")


def category_key(name: str) -> str:
    """Category names become metric-key groups as upstream does: lowercase, spaces -> underscores."""
    return "_".join(name.lower().split())
