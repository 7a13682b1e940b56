"""A signal stops a run at a saved step: SIGTERM (a preempted VM) and Ctrl-C, offline and online.

The signals are raised by the batch source itself, while the loop fetches a
given batch, so the step they land in is exact; the command-line path (a
real ``kill`` of a ``jaxpost train`` process, then the same command again)
is in ``test_interrupt_cli.py``.
"""

import os
import signal

import jax
import numpy as np
import pytest

from jaxpost.errors import RunInterrupted
from jaxpost.train import Checkpointer, MetricsWriter, read_jsonl, train
from jaxpost.train.interrupt import StopRequests
from test_train_fixtures import Batches
from test_train_loop import STEP, STEPS, fresh_state


@pytest.fixture(autouse=True)
def terminal_signal_handlers():
    """Each test starts with the handlers of a process started from a terminal, and the process's come back after.

    A test run started in the background of a non-interactive shell (``cmd &`` in a script) inherits SIGINT
    ignored (POSIX), and Python keeps it so: a second Ctrl-C would then fall back to "ignore", not to
    KeyboardInterrupt, and these tests would test the launcher.
    """
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


class SignallingBatches(Batches):
    """:class:`Batches` that sends this process ``signals[i]`` while producing batch ``i``."""

    def __init__(self, signals: dict[int, list[int]]):
        super().__init__()
        self.signals = signals

    def __next__(self):
        for s in self.signals.get(self.index, ()):
            signal.raise_signal(s)
        return super().__next__()


def run(run_dir, num_steps, batches, save_every=100, steps_per_call=1):
    ck = Checkpointer(os.path.join(run_dir, "ckpt"), save_every=save_every, keep=5)
    with MetricsWriter(run_dir) as writer:
        state = train(state=fresh_state(), step_fn=STEP if steps_per_call == 1 else STEPS[steps_per_call],
                      batches=batches, num_steps=num_steps, checkpointer=ck, log_every=100, writer=writer,
                      progress=False, steps_per_call=steps_per_call)
    return state, read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_it_lands_in_and_the_rerun_equals_an_unbroken_run(tmp_path, sig, status):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Batch 2 is fetched for the update that makes step 3: the loop finishes that step, saves it, stops.
    with pytest.raises(RunInterrupted) as stop:
        run(tmp_path / "run", 8, SignallingBatches({2: [sig]}))
    e = stop.value
    assert (e.signal_name, e.step, e.num_steps, e.exit_status) == (signal.Signals(sig).name, 3, 8, status)
    assert f"at step 3 of 8: a checkpoint of step 3 is saved in {tmp_path / 'run' / 'ckpt'}" in str(e)
    assert {s: signal.getsignal(s) for s in before} == before  # the process's handlers are back
    ck = Checkpointer(tmp_path / "run" / "ckpt")
    assert ck.all_steps() == [3]  # not a save step (save_every=100): saved because of the signal
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [3]  # its metrics are logged

    state, log = run(tmp_path / "run", 8, Batches())
    ref, ref_log = run(tmp_path / "ref", 8, Batches())
    same(state, ref)
    assert [r["step"] for r in log] == [3, 8] and log[-1]["loss"] == ref_log[-1]["loss"]


def test_with_several_steps_per_call_the_stop_is_at_the_end_of_the_call(tmp_path):
    # Steps 3 and 4 run as one call (batches 2 and 3): a signal while batch 3 is fetched stops after step 4.
    with pytest.raises(RunInterrupted) as stop:
        run(tmp_path / "run", 8, SignallingBatches({3: [signal.SIGTERM]}), steps_per_call=2)
    assert stop.value.step == 4
    assert Checkpointer(tmp_path / "run" / "ckpt").all_steps() == [4]
    state, _ = run(tmp_path / "run", 8, Batches(), steps_per_call=2)
    ref, _ = run(tmp_path / "ref", 8, Batches(), steps_per_call=2)
    same(state, ref)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 8, SignallingBatches({2: [signal.SIGINT, signal.SIGINT]}), save_every=2)
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [2]  # the periodic save before; step 3 is not saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_at_the_last_step_ends_the_run_normally(tmp_path):
    state, log = run(tmp_path, 4, SignallingBatches({3: [signal.SIGTERM]}))
    assert int(state.step) == 4 and [r["step"] for r in log] == [4]
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [4]


class Rollouts(Batches):
    """A stand-in for :class:`jaxpost.train.online.RolloutBatches`: 3 updates per rollout, checkpointable between."""

    per_rollout = 3

    def __init__(self, signal_at: int | None = None):
        super().__init__()
        self.signal_at = signal_at

    def __next__(self):
        if self.index == self.signal_at:
            signal.raise_signal(signal.SIGTERM)
        return super().__next__()

    def checkpointable(self) -> bool:
        return self.index % self.per_rollout == 0

    def get_state(self) -> dict:
        assert self.checkpointable(), "saved in the middle of a rollout"
        return super().get_state()


def test_online_a_signal_inside_a_rollout_stops_at_its_end(tmp_path):
    # The signal comes while the first update of rollout 2 (steps 4-6) is fetched: the run finishes the rollout.
    with pytest.raises(RunInterrupted) as stop:
        run(tmp_path / "run", 9, Rollouts(signal_at=3))
    assert stop.value.step == 6
    assert Checkpointer(tmp_path / "run" / "ckpt").all_steps() == [6]
    state, _ = run(tmp_path / "run", 9, Rollouts())
    ref, _ = run(tmp_path / "ref", 9, Rollouts())
    same(state, ref)


def test_stop_requests_outside_the_main_thread_leave_the_handlers_alone():
    import threading

    seen, before = {}, signal.getsignal(signal.SIGTERM)

    def body():
        with StopRequests() as stops:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stops.after_steps(1)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": before, "requested": None}
