"""Atomic writes survive failing writers; stop signals are recorded, then the old handlers come back."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from mode.errors import TrainingInterrupted, exit_on_user_error
from mode.run.fileio import atomic_path, atomic_write_text
from mode.training.preemption import StopRequest


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, '{"rougeL": 1.0}\n')
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write('{"rougeL": 2')  # half the new contents, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == '{"rougeL": 1.0}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "seed: 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644


class _Accelerator:
    num_processes = 1


def test_stop_request_records_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        stop.listen()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(_Accelerator()) == signal.SIGTERM
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture
def interactive_sigint():
    """Ctrl-C as in an interactive shell, whatever started the tests (`nohup make test &` ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_second_ctrl_c_aborts_at_once(interactive_sigint):
    with StopRequest() as stop:
        stop.listen()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested(_Accelerator()) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            stop.listen()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupted_exits_with_the_signal_status(capsys):
    @exit_on_user_error
    def preempted():
        raise TrainingInterrupted("stopped after step 3", signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_:
        preempted()
    assert exit_.value.code == 143
    assert capsys.readouterr().err == "interrupted: stopped after step 3\n"
