"""Checkpoint folders: which count, and what `verify` says about damaged ones (no training needed)."""

from __future__ import annotations

import pytest

from mode.errors import ModeError
from mode.training.checkpoint import MANIFEST, checkpoint_name, list_checkpoints, seal, verify


def make_checkpoint(root, step: int, processes: int = 1):
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "optimizer.bin").write_bytes(b"state" * 100)
    (path / "random_states_0.pkl").write_bytes(b"rng")
    seal(path, step, processes)
    return path


def test_only_complete_checkpoints_count_newest_last(tmp_path):
    for step in (10, 2, 100):
        make_checkpoint(tmp_path, step)
    (tmp_path / ".step-00000200.partial").mkdir()
    (tmp_path / "step-00000150.corrupt").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000010", "step-00000100"]
    assert list_checkpoints(tmp_path / "absent") == []


def test_verify_accepts_an_intact_checkpoint(tmp_path):
    assert verify(make_checkpoint(tmp_path, 4), 1) is None


@pytest.mark.parametrize("damage,problem", [
    (lambda p: (p / MANIFEST).unlink(), "manifest.json: missing"),
    (lambda p: (p / MANIFEST).write_text("{"), "manifest.json: unreadable"),
    (lambda p: (p / "optimizer.bin").unlink(), "optimizer.bin: missing"),
    (lambda p: (p / "optimizer.bin").write_bytes(b"state" * 99), "optimizer.bin: contents differ from the manifest"),
    (lambda p: p.rename(p.with_name(checkpoint_name(5))), "says step 4, not step-00000005"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, problem):
    path = make_checkpoint(tmp_path, 4)
    damage(path)
    path = list_checkpoints(tmp_path)[0]
    assert problem in verify(path, 1)


def test_resuming_with_another_process_count_is_refused(tmp_path):
    path = make_checkpoint(tmp_path, 4, processes=2)
    with pytest.raises(ModeError, match="written by 2 process.*resume it with the same number, not 1"):
        verify(path, 1)
