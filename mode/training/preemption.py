"""Cluster preemption: SIGTERM or SIGINT asks the training loop to checkpoint and stop after the current step.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM and wait a grace period before SIGKILL; one
training step is far shorter than any grace period, so finishing it and saving costs nothing and loses
nothing. A second Ctrl-C aborts at once without saving.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

# SIGUSR2: submitit's (SLURM) signal before the time limit; it then requeues the job, which resumes.
SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()))


class StopRequest:
    """Records a stop signal instead of dying from it, between `listen()` and `restore()`.

    Used as a context manager around a whole training call, so the previous handlers come back however
    it ends; the loop listens only while it runs (a signal during loading or evaluation acts as usual).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # e.g. SIGINT of a background job (`nohup ... &`): it stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back. After a checkpointed stop, a previous Python handler of that signal
        (submitit's: requeue the job) gets the signal too, so the scheduler's own logic still runs."""
        previous = dict(self._previous)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        handler = previous.get(self.signum)
        if self.signum is not None and callable(handler) and handler is not signal.default_int_handler:
            self.signum, signum = None, self.signum
            signal.raise_signal(signum)

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> int | None:
        """The stop signal if any process received one; every process gets the same answer, so all stop together."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        return int(accelerator.gather(flag).max()) or None
