"""Training loop: exact resume, NaN guard, half-written checkpoints, logging, eval, several steps per call."""

import json
import os

import jax
import numpy as np
import pytest

from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train import (Checkpointer, MetricsWriter, NonFiniteLossError, abstract_state, abstract_with_shardings,
                           batch_shardings, compile_train_step, init_sharded_state, make_eval_step, make_optimizer,
                           make_train_step, read_jsonl, state_shardings, train)
from test_train_fixtures import LOGICAL_AXES, Batches, init_params, lm_loss, make_batch

N = 4
OPT = make_optimizer("adamw", learning_rate=1e-2, warmup_steps=2, total_steps=2 * N, weight_decay=0.1)
PART = Partitioner(make_mesh(fsdp=-1), "fsdp")
PARAMS = init_params()
SHARDINGS = state_shardings(abstract_state(PARAMS, OPT), PART.shardings(LOGICAL_AXES, PARAMS), PART, OPT)
STEP = compile_train_step(make_train_step(lm_loss, OPT, grad_accum_steps=2), SHARDINGS,
                          batch_shardings(next(Batches()), PART), None)

# Two optimizer steps per compiled call (a lax.scan of STEP's function).
STEPS = {2: compile_train_step(make_train_step(lm_loss, OPT, grad_accum_steps=2), SHARDINGS,
                               batch_shardings(next(Batches()), PART), None, steps_per_call=2)}


def fresh_state():
    return init_sharded_state(PARAMS, OPT, SHARDINGS)


def run(run_dir, num_steps, batches=None, save_every=None, log_every=1, steps_per_call=1, **kw):
    ck = Checkpointer(os.path.join(run_dir, "ckpt"), save_every=save_every, keep=3) if save_every else None
    step_fn = STEP if steps_per_call == 1 else STEPS[steps_per_call]
    with MetricsWriter(run_dir) as writer:
        state = train(state=fresh_state(), step_fn=step_fn, batches=batches or Batches(), num_steps=num_steps,
                      checkpointer=ck, log_every=log_every, writer=writer, progress=False,
                      steps_per_call=steps_per_call, **kw)
    return state, read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def test_exact_resume_after_kill(tmp_path):
    ref_state, ref_log = run(tmp_path / "ref", 2 * N)
    _, first_log = run(tmp_path / "resumed", N, save_every=N)  # then everything is dropped, as if killed
    state, log = run(tmp_path / "resumed", 2 * N, save_every=N)

    assert [r["step"] for r in log] == list(range(1, 2 * N + 1))  # one jsonl across both runs
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]  # bit-identical per-step losses
    assert [r["learning_rate"] for r in log] == [r["learning_rate"] for r in ref_log]
    for a, b in zip(jax.tree.leaves(jax.device_get(ref_state)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2 * N
    assert Checkpointer(tmp_path / "resumed" / "ckpt").all_steps() == [N, 2 * N]


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    # Batch index 4 is poisoned, so the update producing step 5 is NaN. Step 5 is neither a log
    # step (log_every=100) nor a save step: the guard must still stop before saving step 6.
    with pytest.raises(NonFiniteLossError, match=r"at step 5 .*latest checkpoint \(step 4\) is intact") as err:
        run(tmp_path, 10, batches=Batches(poison={4: float("nan")}), save_every=2, log_every=100)
    assert err.value.step == 5
    ck = Checkpointer(tmp_path / "ckpt")
    assert ck.all_steps() == [2, 4]
    restored = ck.restore_latest(abstract_with_shardings(fresh_state()))
    assert restored.data_state == {"index": 4}
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(restored.state)))


def test_half_written_checkpoint_ignored_on_resume(tmp_path):
    run(tmp_path, 4, save_every=2)
    # What a crash during the save of step 6 leaves behind: an unrenamed temporary step directory.
    partial = tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    state, log = run(tmp_path, 6, save_every=2)
    assert [r["step"] for r in log] == list(range(1, 7))  # resumed from 4, not 6
    assert int(state.step) == 6
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [2, 4, 6]
    assert not partial.exists()


def test_logging_throughput_eval_and_extra_metrics(tmp_path):
    ev = jax.jit(make_eval_step(lm_loss))
    eval_batch = make_batch(100)
    _, log = run(tmp_path, 6, log_every=3, eval_every=2,
                 eval_fn=lambda s: ev(s.params, eval_batch, None),
                 tokens_per_batch_fn=lambda b: int(b["loss_mask"].sum()), flops_per_step=1e6,
                 extra_metrics_fn=lambda s: {"param_sum": sum(x.sum() for x in jax.tree.leaves(s.params))})
    train_rows = [r for r in log if "loss" in r]
    eval_rows = [r for r in log if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6]
    assert [r["step"] for r in eval_rows] == [2, 4, 6]
    row = train_rows[-1]
    assert row["tokens_per_s"] > 0 and row["steps_per_s"] > 0 and "param_sum" in row
    assert "mfu" not in row  # CPU has no known peak
    assert "is_finite" not in row
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    with open(tmp_path / "metrics.jsonl") as f:
        assert all(json.loads(line)["step"] > 0 for line in f)


def test_token_counts_are_read_at_log_steps_only(tmp_path):
    """A count may be a device scalar (``count_loss_tokens`` of a global batch): reading it makes the host wait
    for the device, so the loop keeps the counts and reads them when it logs."""
    counted, reads = [], []

    class Count:
        def __init__(self, n):
            self.n = n

        def __int__(self):
            reads.append(len(counted))  # how many batches had been counted when this one was read
            return self.n

    def count(batch):
        counted.append(int(batch["loss_mask"].sum()))
        return Count(10 * len(counted))  # 10, 20, 30, ...

    _, log = run(tmp_path, 6, log_every=3, tokens_per_batch_fn=count)
    assert reads == [3, 3, 3, 6, 6, 6]
    # tokens_per_s / steps_per_s = tokens per step of the interval: (10+20+30)/3, then (40+50+60)/3.
    assert [r["tokens_per_s"] / r["steps_per_s"] for r in log] == pytest.approx([20.0, 50.0])


def test_loss_token_count_of_a_global_batch_stays_on_the_devices():
    from jaxpost.train.batches import count_loss_tokens

    seg = np.array([[1, 1, 0, 0], [2, 2, 2, 0]] * 4, np.int32)   # 5 real tokens in every 2 rows
    host = {"chosen_segment_ids": seg, "rejected_segment_ids": seg[:, :2], "tokens": seg}
    assert count_loss_tokens(host) == 20 + 16
    on_mesh = jax.device_put(host, PART.batch_sharding(2))
    got = count_loss_tokens(on_mesh)
    assert isinstance(got, jax.Array) and int(got) == 36


def test_two_steps_per_call_match_one_and_resume_exactly(tmp_path):
    # Reference: one step per call, metrics at every other step. Then two steps per call, killed after
    # step 4 and resumed from its checkpoint: same states, logged metrics and checkpoints.
    ref_state, ref_log = run(tmp_path / "ref", 2 * N, log_every=2)
    run(tmp_path / "scan", N, save_every=N, log_every=2, steps_per_call=2,
        tokens_per_batch_fn=lambda b: int(b["loss_mask"].sum()))
    state, log = run(tmp_path / "scan", 2 * N, save_every=N, log_every=2, steps_per_call=2,
                     tokens_per_batch_fn=lambda b: int(b["loss_mask"].sum()))

    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == [2, 4, 6, 8]
    for key in ("loss", "grad_norm", "learning_rate", "loss_tokens"):
        np.testing.assert_allclose([r[key] for r in log], [r[key] for r in ref_log], rtol=1e-6, err_msg=key)
    assert all(r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 for r in log)
    for a, b in zip(jax.tree.leaves(jax.device_get(ref_state)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(state.step) == 2 * N
    ck = Checkpointer(tmp_path / "scan" / "ckpt")
    assert ck.all_steps() == [N, 2 * N]
    assert ck.restore_latest(abstract_with_shardings(fresh_state())).data_state == {"index": 2 * N}


def test_nan_guard_names_the_step_inside_a_call(tmp_path):
    # Batch 5 is poisoned: the second step of the call running steps 5 and 6. The guard names step 6, and
    # checkpoint 4 (the call before) is the newest: step 6, a save step, is not saved.
    with pytest.raises(NonFiniteLossError, match=r"at step 6 .*latest checkpoint \(step 4\) is intact"):
        run(tmp_path, 10, batches=Batches(poison={5: float("nan")}), save_every=2, log_every=100,
            steps_per_call=2)
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [2, 4]


@pytest.mark.parametrize("kw, name", [({"log_every": 3}, "log_every"), ({"eval_every": 3, "eval_fn": dict}, "eval_every"),
                                      ({"save_every": 3}, "save_every"), ({"num_steps": 5}, "num_steps")])
def test_steps_per_call_must_divide_every_interval(tmp_path, kw, name):
    args = {"num_steps": 4, "log_every": 2, **kw}
    args.setdefault("save_every", None)
    with pytest.raises(ValueError, match=f"{name} must be a multiple of it; got {name}={args[name]}"):
        run(tmp_path, steps_per_call=2, **args)


def test_resume_at_a_step_that_steps_per_call_does_not_divide(tmp_path):
    run(tmp_path, 3, save_every=3)
    with pytest.raises(ValueError, match="resumes at step 3, which is not a multiple"):
        run(tmp_path, 6, save_every=2, log_every=2, steps_per_call=2)


def _damage(step_dir):
    """What a disk error or a torn copy leaves: the step is listed, but its array files are garbage."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    ref_state, ref_log = run(tmp_path / "ref", 6)
    run(tmp_path / "run", 6, save_every=2)
    _damage(tmp_path / "run" / "ckpt" / "6")
    state, log = run(tmp_path / "run", 6, save_every=2)  # resumes from 4 with a warning, not a traceback

    assert "resuming from step 4" in capsys.readouterr().out
    assert [r["step"] for r in log] == list(range(1, 7))  # rows 5 and 6 of the first run dropped, not doubled
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    for a, b in zip(jax.tree.leaves(jax.device_get(ref_state)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "run" / "abandoned_checkpoints" / "6" / "state").exists()  # kept aside, not deleted
    assert Checkpointer(tmp_path / "run" / "ckpt").all_steps() == [2, 4, 6]


def test_no_restorable_checkpoint_is_a_user_error_that_moves_nothing(tmp_path):
    from jaxpost.errors import UserError
    run(tmp_path, 2, save_every=2)
    _damage(tmp_path / "ckpt" / "2")
    with pytest.raises(UserError, match=r"no checkpoint in .* can be restored .*step 2"):
        run(tmp_path, 4, save_every=2)
    assert (tmp_path / "ckpt" / "2").exists()


def test_after_a_nan_halt_resume_from_an_earlier_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"--resume_from_step=2") as err:
        run(tmp_path, 10, batches=Batches(poison={4: float("nan")}), save_every=2, log_every=1)
    assert err.value.saved_steps == [2, 4]
    # The way out the message names: resume from step 2 (here with clean data) and train on.
    ck = Checkpointer(tmp_path / "ckpt", save_every=2, keep=3, resume_from=2)
    with MetricsWriter(tmp_path) as writer:
        state = train(state=fresh_state(), step_fn=STEP, batches=Batches(), num_steps=6, checkpointer=ck,
                      log_every=1, writer=writer, progress=False)
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))  # the halted run's rows 3-4 were dropped
    assert int(state.step) == 6
    assert (tmp_path / "abandoned_checkpoints" / "4").exists()
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [2, 4, 6]
    with pytest.raises(Exception, match=r"resume_from_step=3: no complete checkpoint .* saved steps: \[2, 4, 6\]"):
        Checkpointer(tmp_path / "ckpt", resume_from=3).restore_latest(abstract_with_shardings(fresh_state()))
