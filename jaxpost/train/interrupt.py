"""Stopping a run on a signal: finish the step, save a checkpoint, exit.

SIGTERM is how a run is told it is about to lose its machine: a preempted
(spot) TPU or GCE VM gets it about 30 s before it goes, Kubernetes and
Slurm send it before a kill. SIGINT is Ctrl-C. Without this, a run stopped
either way loses everything since its last periodic checkpoint (up to
``save_every`` steps, or a whole online run when ``save_every = 0``).

With :class:`StopRequests` around the loop, the first such signal only asks
the run to stop: the loop finishes the step it is in, saves a checkpoint at
the next point where one can be taken (every step offline, the end of the
rollout online), and raises :class:`RunInterrupted`; the same command then
resumes exactly there. A second signal acts at once (the handlers in force
before are back): Ctrl-C twice stops without saving.

Several processes must stop at the same step, so there the decision is
JAX's: ``jax.distributed`` runs a preemption service that owns SIGTERM on
every process and, when any of them receives it, agrees on a step for all
(``multihost_utils.reached_preemption_sync_point``). Only the loop asks the
service (the checkpointer keeps Orbax from asking it too, with ids of its
own that would move the agreed step). Ctrl-C on one process
is turned into that same notice (the process sends itself SIGTERM), so one
Ctrl-C in any host's terminal stops the whole run at one saved step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from jaxpost.errors import RunInterrupted

__all__ = ["RunInterrupted", "StopRequests"]


class StopRequests:
    """Signals that ask the enclosing loop to stop, as a context manager.

    ``with StopRequests() as stops:`` then, after every call of the train
    step, ``stops.after_steps(n, checkpointable)``: the name of the
    signal once the run should stop there, else ``None``. Handlers are
    installed only on the main thread (a loop run from another thread keeps
    the process's handlers) and put back on exit.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._agreed: str | None = None  # several processes: the service's sync point is passed
        self._steps = 0  # steps run since the loop began: the ids given to the service
        self._multi = False
        self._off = False  # several processes without JAX's preemption service: no stop can be agreed

    def __enter__(self) -> "StopRequests":
        import jax  # here, not at the top: the command line imports this module before it needs jax

        self._multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self
        # Several processes: SIGTERM belongs to JAX's preemption service, which needs its own handler.
        signals = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._previous:
            s, handler = self._previous.popitem()
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received = signal.Signals(signum).name
        self._restore()  # a second signal acts at once
        again = "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else ""
        # os.write, not print: the handler may run while the main thread is inside a print.
        os.write(2, f"\n[jaxpost] {self.received}: stopping after this step (online runs: this rollout) with a "
                    f"checkpoint{again}\n".encode())
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption service tells every process

    def after_steps(self, steps: int, checkpointable: bool = True) -> str | None:
        """Whether the run stops now: the signal's name, or ``None``.

        Call it on every process after every call of the train step, with
        the number of steps that call ran and whether a checkpoint can be
        taken now. One process: a signal received stops the run at the
        next such call. Several: JAX's service picks an id every process
        has still to reach (one past the furthest), and the run stops at the
        first checkpoint point at or after it. The ids are the steps run
        since the loop began (the same count on every process), so a notice
        that arrived before the first step (the service then picks id 1)
        stops the run after it. With JAX's preemption service off
        (``jax_enable_preemption_service``) the processes cannot agree on a
        step: nothing is requested then, and signals act as they did before.
        """
        first, self._steps = self._steps + 1, self._steps + steps
        if self._off:
            return None
        if self._multi and self._agreed is None:
            from jax.experimental import multihost_utils

            try:
                for i in range(first, self._steps + 1):  # each id in turn: the service answers True for one only
                    if multihost_utils.reached_preemption_sync_point(i):
                        self._agreed = self.received or "SIGTERM"
            except RuntimeError:
                self._off = True
                self._restore()
                return None
        stop = self._agreed if self._multi else self.received
        return stop if checkpointable else None

    def all_saved(self) -> None:
        """Returns once every process is here (several processes): call it after the stop's checkpoint is written.

        A process that exits first must not take the others down with it
        before the checkpoint is whole (``srun --kill-on-bad-exit`` ends
        every task when one exits non-zero, as a stopped run does).
        """
        if self._multi and not self._off:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxpost: stopped at a saved step")
