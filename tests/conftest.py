"""Shared fixtures. Tests that need ../shared (real SNI files, stories260K) find it through the
MODE_SHARED_DIR environment variable (default: the folder beside the checkout) and skip with a reason
when it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MODE_SHARED_DIR", REPO.parent / "shared"))
SHARED_SNI = Path(os.environ.get("MODE_SNI_DIR", SHARED / "sni"))
STORIES = SHARED / "models" / "stories260K"

needs_shared_sni = pytest.mark.skipif(
    not (SHARED_SNI / "tasks").is_dir(), reason=f"real SNI files not found at {SHARED_SNI} (set MODE_SNI_DIR)"
)
needs_stories = pytest.mark.skipif(
    not (STORIES / "config.json").is_file(), reason=f"stories260K not found at {STORIES} (set MODE_SHARED_DIR)"
)
# The trimmed copy in ../shared/sni lists the tasks it lacks in absent_tasks.txt; an upstream clone has no such file.
IS_BUNDLED_SNI = (SHARED_SNI / "absent_tasks.txt").is_file()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.bundled_sni` tests assert facts of the bundled SNI copy: skipped against another copy."""
    if IS_BUNDLED_SNI:
        return
    skip = pytest.mark.skip(reason=f"bundled_sni: {SHARED_SNI} is not the bundled SNI copy (no absent_tasks.txt)")
    for item in items:
        if "bundled_sni" in item.keywords:
            item.add_marker(skip)


def _task(name: str, n: int, definition: str, category: str, outputs=lambda i: [f"answer {i}"]) -> dict:
    return {
        "Contributors": ["mode tests"],
        "Source": ["synthetic"],
        "Categories": [category],
        "Definition": [definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Tests"],
        "Positive Examples": [
            {"input": "2 + 2", "output": "4", "explanation": "Two plus two is four"},
            {"input": "3 + 4", "output": "7.", "explanation": "Sum."},
        ],
        "Negative Examples": [{"input": "1 + 1", "output": "3", "explanation": "Wrong sum"}],
        "Instance License": ["Unknown"],
        "Instances": [{"id": f"{name}-{i}", "input": f"question number {i}?", "output": outputs(i)} for i in range(n)],
    }


def write_sni_fixture(root: Path) -> Path:
    """A tiny SNI tree in the upstream layout: 3 train tasks, 1 test task, one train task absent."""
    tasks = {
        "task001_add_numbers": _task("task001_add_numbers", 40, "Add the two numbers", "Arithmetic"),
        "task002_echo_word": _task("task002_echo_word", 25, "Repeat the word.", "Text Matching",
                                   outputs=lambda i: [f"word {i}", f"Word {i}!"]),
        "task003_yes_no": _task("task003_yes_no", 11, "Answer yes or no?", "Question Answering",
                                outputs=lambda i: ["Yes" if i % 2 else "No"]),
        "task900_test_only": _task("task900_test_only", 150, "A test task", "Question Answering"),
    }
    (root / "tasks").mkdir(parents=True)
    for name, body in tasks.items():
        (root / "tasks" / f"{name}.json").write_text(json.dumps(body))
    splits = root / "splits" / "default"
    splits.mkdir(parents=True)
    (splits / "train_tasks.txt").write_text("task001_add_numbers\ntask002_echo_word\ntask003_yes_no\ntask004_absent\n")
    (splits / "test_tasks.txt").write_text("task900_test_only\n")
    (splits / "excluded_tasks.txt").write_text("")
    return root


@pytest.fixture
def sni_fixture(tmp_path) -> Path:
    return write_sni_fixture(tmp_path / "sni")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    """Tokenised-data caches of tests go to a per-session folder, never the user's ~/.cache/mode."""
    monkeypatch.setenv("MODE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mode-cache"))


@pytest.fixture(scope="session")
def stories_batch():
    """Four stories260K training examples of three tasks (helpers.stories_batch_of_four), built once."""
    from helpers import stories_batch_of_four

    return stories_batch_of_four()
