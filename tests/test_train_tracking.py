"""Console lines, TensorBoard/W&B tracking, best checkpoint and early stopping, on the toy loop."""

import math
import os
import shutil
import struct
import sys

import jax
import numpy as np
import pytest

from jaxpost.errors import UserError
from jaxpost.train.fit import LoopConfig
from jaxpost.train import BestCheckpoint, Checkpointer, MetricsWriter, format_log_line, read_jsonl, train
from test_train_fixtures import Batches
from test_train_loop import STEP, fresh_state


def run(run_dir, num_steps, save_every=None, log_every=1, progress=False, **kw):
    """The toy loop of test_train_loop: (final state, metrics.jsonl rows)."""
    ck = Checkpointer(os.path.join(run_dir, "ckpt"), save_every=save_every, keep=3) if save_every else None
    with MetricsWriter(run_dir) as writer:
        state = train(state=fresh_state(), step_fn=STEP, batches=Batches(), num_steps=num_steps, checkpointer=ck,
                      log_every=log_every, writer=writer, progress=progress, **kw)
    if ck is not None:
        ck.close()
    return state, read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.parametrize("progress,terminal", [(False, True), (True, True), (True, False)])
def test_console_prints_one_line_per_log_step_and_a_summary(tmp_path, capsys, monkeypatch, progress, terminal):
    # The bar is drawn only where someone watches: stderr a terminal (or a notebook). In a log file or a
    # pipe each redraw would stay as text.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)

    def eval_fn(state):
        return {"loss": 1.0 / int(state.step)}

    _, log = run(tmp_path, 4, log_every=2, eval_every=3, eval_fn=eval_fn, progress=progress,
                 tokens_per_batch_fn=lambda b: int(b["loss_mask"].sum()))
    captured = capsys.readouterr()
    # With the bar on, tqdm.write clears it and prints each line whole on stdout (the bar is on stderr).
    out = captured.out.splitlines()
    rows = {r["step"]: r for r in log if "loss" in r}
    assert len(out) == 4, out
    two = out[0].split(" | ")
    assert two[:4] == ["step 2/4", f"loss {rows[2]['loss']:.4g}", f"grad_norm {rows[2]['grad_norm']:.4g}",
                       f"lr {rows[2]['learning_rate']:.3e}"]
    assert two[4].startswith("tok/s ") and len(two) == 5
    assert out[1] == "step 3/4 | eval/loss 0.3333"   # an evaluation at a step that is not logged has its line
    assert out[2].startswith(f"step 4/4 | loss {rows[4]['loss']:.4g} | ") and "eval/" not in out[2]
    assert out[3].startswith("[jaxpost] done at step 4/4 (4 steps in ")
    assert out[3].endswith(f"train loss {rows[4]['loss']:.4g} | eval loss 0.3333")
    assert ("it/s" in captured.err or "step/s" in captured.err) == (progress and terminal)


def test_format_log_line_keys_units_and_values():
    line = format_log_line(10, 100, {"loss": 2.3456789, "grad_norm": 1.5, "learning_rate": 3e-4, "epoch": 0.5,
                                     "tokens_per_s": 12345.6, "mfu": 0.123, "steps_per_s": 9.0,
                                     "eval/loss": 2.0, "eval/accuracy": 0.25, "data/examples": 7})
    assert line == ("step  10/100 | loss 2.346 | grad_norm 1.5 | lr 3.000e-04 | epoch 0.50 | tok/s 12346 | "
                    "mfu 12.3% | eval/accuracy 0.25 | eval/loss 2")
    online = format_log_line(3, 20, {"loss": float("nan"), "objective/kl": 0.5, "objective/scores": 1.0},
                             unit="rollout")
    assert online == "rollout  3/20 | loss nan | scores 1 | kl 0.5"


def _events(tb_dir):
    """Every Event proto of the TensorBoard files in ``tb_dir`` (TFRecord framing, CRCs not checked)."""
    from tensorboardX.proto.event_pb2 import Event
    out = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            out.append(Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return out


def test_tensorboard_groups_train_and_eval_and_records_the_config(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.log_config("LoopConfig.num_steps = 7\nmake_optimizer.learning_rate = 0.001",
                     {"loop/num_steps": 7, "loop/progress": False, "loop/best_metric": None})
        w.write(1, {"loss": 2.0, "data/examples": 3})
        w.write(1, {"eval/loss": 1.5})
    scalars = {(v.tag, e.step): v.simple_value for e in _events(tmp_path / "tb") for v in e.summary.value
               if v.HasField("simple_value")}
    assert scalars == {("train/loss", 1): 2.0, ("train/data/examples", 1): 3.0, ("eval/loss", 1): 1.5}
    tags = {v.tag: v for e in _events(tmp_path / "tb") for v in e.summary.value}
    text = tags["config/gin/text_summary"].tensor.string_val[0].decode()
    assert "    make_optimizer.learning_rate = 0.001" in text.splitlines()
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    start = HParamsPluginData.FromString(tags["_hparams_/session_start_info"].metadata.plugin_data.content)
    assert dict(start.session_start_info.hparams).keys() == {"loop/num_steps", "loop/progress"}
    assert start.session_start_info.hparams["loop/num_steps"].number_value == 7
    # metrics.jsonl keeps the loop's own keys, for jaxpost plot and other readers.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0, "data/examples": 3},
                                                      {"step": 1, "eval/loss": 1.5}]


def test_wandb_asked_for_but_missing_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even where it is installed
    with pytest.raises(UserError, match=r"wandb_project = 'proj'.*pip install wandb"):
        MetricsWriter(tmp_path / "run", wandb_project="proj")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _eval_by_step(values):
    """An eval_fn whose ``loss`` at step s is ``values[s]``: a scripted learning curve."""
    return lambda state: {"loss": values[int(state.step)]}


def test_best_checkpoint_and_early_stopping_then_resume_stops_again(tmp_path, capsys):
    curve = {1: 3.0, 2: 2.0, 3: 2.5, 4: 1.95, 5: 0.1}
    best = BestCheckpoint(tmp_path / "best", metric="eval/loss", min_delta=0.1, patience=2)
    state, log = run(tmp_path, 10, save_every=3, log_every=100, eval_every=1, eval_fn=_eval_by_step(curve),
                     best=best)
    # Step 3 does not improve; step 4 beats 2.0 but not by min_delta, so makes two: stop there.
    assert int(state.step) == 4
    assert (best.best_step, best.best_value, best.should_stop) == (2, 2.0, True)
    assert "has not improved by more than 0.1 for 2 evaluations" in best.stop_reason
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [3, 4]     # the stop saved step 4
    assert Checkpointer(tmp_path / "best").all_steps() == [2]
    assert [r["step"] for r in log if "loss" in r] == [4]            # the last step is logged
    out = capsys.readouterr().out
    assert "[jaxpost] stopped at step 4/10" in out and "best eval/loss 2 at step 2" in out
    assert best.summary() == {"stopped_early": True, "stop_reason": best.stop_reason, "best/metric": "eval/loss",
                              "best/value": 2.0, "best/step": 2}

    # The saved best is the state after step 2: the same as a plain 2-step run's.
    ref, _ = run(tmp_path / "ref", 2)
    restored = best.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                         fresh_state()))
    for a, b in zip(jax.tree.leaves(jax.device_get(ref)), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    best.close()

    # Rerunning the same command resumes at step 4 and stops at once: patience counts from the best on disk.
    again = BestCheckpoint(tmp_path / "best", metric="eval/loss", min_delta=0.1, patience=2)
    state, log = run(tmp_path, 10, save_every=3, log_every=100, eval_every=1, eval_fn=_eval_by_step(curve),
                     best=again)
    assert int(state.step) == 4 and again.should_stop and again.best_step == 2
    assert [r["step"] for r in log if "loss" in r] == [4]
    again.close()


def test_patience_counts_on_across_a_resume(tmp_path):
    curve = {1: 1.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: 2.0, 6: 2.0}
    run(tmp_path, 2, save_every=2, eval_every=1, eval_fn=_eval_by_step(curve),
        best=BestCheckpoint(tmp_path / "best", patience=3))           # one evaluation without improvement
    best = BestCheckpoint(tmp_path / "best", patience=3)
    state, _ = run(tmp_path, 6, save_every=2, eval_every=1, eval_fn=_eval_by_step(curve), best=best)
    assert int(state.step) == 4 and best.should_stop                   # 2 more, not 3 more
    best.close()


def test_a_best_saved_after_the_resumed_step_is_found_again(tmp_path):
    # The run saved a best at step 3 and died before its step-4 checkpoint: resuming from step 2 replays
    # steps 3 and 4, and the best is what the replay finds, not the lost timeline's.
    run(tmp_path, 4, save_every=2, eval_every=1, eval_fn=_eval_by_step({1: 3.0, 2: 2.0, 3: 1.0, 4: 5.0}),
        best=BestCheckpoint(tmp_path / "best"))
    shutil.rmtree(tmp_path / "ckpt" / "4")
    best = BestCheckpoint(tmp_path / "best")
    run(tmp_path, 4, save_every=2, eval_every=1, eval_fn=_eval_by_step({1: 3.0, 2: 2.0, 3: 1.5, 4: 5.0}), best=best)
    assert (best.best_step, best.best_value) == (3, 1.5)
    assert best.checkpointer.data_states(3)[0] == {"metric": "eval/loss", "value": 1.5, "mode": "min"}
    best.close()


def test_best_needs_evaluations_and_a_known_metric(tmp_path):
    with pytest.raises(UserError, match="needs evaluations"):
        run(tmp_path, 2, best=BestCheckpoint(None))
    with pytest.raises(UserError, match=r"best_metric='eval/accuracy' is not among .*\['eval/loss'\]"):
        run(tmp_path, 2, eval_every=1, eval_fn=_eval_by_step({1: 1.0}), best=BestCheckpoint(None, "eval/accuracy"))
    with pytest.raises(UserError, match="an evaluation metric"):
        BestCheckpoint(None, "loss")


def test_max_mode_keeps_the_highest_in_memory(tmp_path):
    best = BestCheckpoint(None, metric="eval/loss", mode="max")
    run(tmp_path, 3, eval_every=1, eval_fn=_eval_by_step({1: 1.0, 2: 3.0, 3: math.nan}), best=best)
    assert (best.best_step, best.best_value, best.rounds_without_improvement) == (2, 3.0, 1)


@pytest.mark.parametrize("kw, match", [
    ({"num_steps": 5, "num_epochs": 1}, "both set"),
    ({"num_epochs": 0}, "num_epochs must be >= 1"),
    ({"patience": 2}, "set LoopConfig.best_metric"),
    ({"export_best": True}, "set LoopConfig.best_metric"),
    ({"best_metric": "eval/loss"}, "needs evaluations"),
    ({"best_metric": "eval/loss", "eval_every": 5, "best_mode": "lowest"}, "best_mode='lowest'"),
])
def test_loop_config_contract(kw, match):
    with pytest.raises(UserError, match=match):
        LoopConfig(**kw)


def test_loop_config_length_defaults():
    assert LoopConfig().num_steps == 100
    assert (LoopConfig(num_epochs=3).num_steps, LoopConfig(num_epochs=3).num_epochs) == (None, 3)
    assert LoopConfig(num_steps=None, num_epochs=None).num_steps == 100
