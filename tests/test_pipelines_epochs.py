"""SFT by epochs with the best state exported: LoopConfig.num_epochs, best_metric, export_best, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpost.data import load_rows, load_tokenizer, make_lm_pipeline
from jaxpost.train import Checkpointer
from pipeline_utils import make_task, read_metrics, run_task


@pytest.mark.slow
def test_sft_by_epochs_keeps_and_exports_the_best(tmp_path, capsys):
    task = make_task(tmp_path / "task", n_sft=48, n_pref=4, n_prompts=4, n_eval=4)
    rows = [json.loads(line) for line in task["sft"].read_text().splitlines()]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    # One epoch: the packed batches of one pass, counted here independently of the run.
    per_epoch = sum(1 for _ in make_lm_pipeline(load_rows(str(task["sft"])), load_tokenizer(str(task["tokenizer"])),
                                                64, 8, 0, num_epochs=1))
    assert per_epoch >= 2

    run_dir = tmp_path / "sft"
    summary = run_task("sft", [
        f"sft.run_dir = '{run_dir}'", f"sft.train_data = '{task['sft']}'", f"sft.tokenizer = '{task['tokenizer']}'",
        f"sft.eval_data = '{eval_path}'", "sft.seq_len = 64", "sft.batch_size = 8",
        "LoopConfig.num_epochs = 2", "LoopConfig.log_every = 1", "LoopConfig.eval_every = 1",
        "LoopConfig.eval_batches = 2", "LoopConfig.best_metric = 'eval/loss'", "LoopConfig.export_best = True",
        # A learning rate so high that the held-out loss gets worse after the first steps: the best is early.
        "make_optimizer.learning_rate = 0.3", "make_optimizer.schedule = 'constant'"])
    out = capsys.readouterr().out
    assert f"num_epochs=2 x {per_epoch} batches per epoch -> num_steps={2 * per_epoch}" in out
    assert (summary["num_steps"], summary["steps_per_epoch"], summary["num_epochs"]) == (2 * per_epoch, per_epoch, 2)

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert [r["step"] for r in train_rows] == list(range(1, 2 * per_epoch + 1))
    assert train_rows[-1]["epoch"] == 2.0 and train_rows[per_epoch - 1]["epoch"] == 1.0
    best_step = min(evals, key=evals.get)
    assert best_step < 2 * per_epoch, evals           # else the test would not tell best from last
    assert (summary["best/step"], summary["best/value"], summary["stopped_early"]) == (best_step, evals[best_step],
                                                                                     False)
    # The last state stays for resuming; the best is in its own directory and is what was exported.
    assert Checkpointer(run_dir / "checkpoints").all_steps()[-1] == 2 * per_epoch
    assert Checkpointer(run_dir / "checkpoints_best").all_steps() == [best_step]
    assert summary["step"] == best_step
    np.testing.assert_allclose(summary["eval/loss"], evals[best_step], rtol=1e-5)  # final eval of the export
    assert (run_dir / "final" / "config.json").exists()
    assert f"export_best: the run ends with the best state, step {best_step}" in out
