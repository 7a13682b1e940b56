"""Reward model and DPO runs end to end on the demo task's preference pairs."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from pipeline_utils import losses, make_task, run_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"), n_sft=50, n_pref=400, n_prompts=20, n_eval=16)


def _bindings(kind, task, run_dir, steps, extra=()):
    return [f"{kind}.run_dir = '{run_dir}'", f"{kind}.train_data = '{task['preference']}'",
            f"{kind}.tokenizer = '{task['tokenizer']}'", f"{kind}.seq_len = 48", f"{kind}.batch_size = 8",
            f"{kind}.eval_fraction = 0.1", f"LoopConfig.num_steps = {steps}", "LoopConfig.log_every = 1",
            "LoopConfig.eval_batches = 8", *extra]


@pytest.mark.slow
def test_reward_model_reaches_high_held_out_accuracy(task, tmp_path):
    run_dir = tmp_path / "rm"
    summary = run_task("reward_model", _bindings("reward_model", task, run_dir, 60,
                                                 ["make_optimizer.learning_rate = 2e-3",
                                                  "make_optimizer.warmup_steps = 5"]))
    assert summary["eval/accuracy"] >= 0.85, summary
    # Exported in the Hugging Face sequence-classification layout.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    assert hf.config.num_labels == 1


@pytest.mark.slow
def test_dpo_raises_held_out_reward_accuracy(task, tmp_path):
    run_dir = tmp_path / "dpo"
    summary = run_task("dpo", _bindings("dpo", task, run_dir, 40, ["make_optimizer.learning_rate = 2e-3",
                                                                   "make_dpo_loss.beta = 0.1"]))
    assert summary["eval/rewards/accuracies"] >= 0.8, summary
    curve = losses(run_dir)
    assert curve[1] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the first step
    assert np.mean([curve[s] for s in (38, 39, 40)]) < 0.5


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_curve(task, tmp_path):
    common = ["make_optimizer.learning_rate = 1e-3", "LoopConfig.eval_every = 0"]
    run_task("dpo", _bindings("dpo", task, tmp_path / "online", 8, common))
    run_task("dpo", _bindings("dpo", task, tmp_path / "cached", 8, common + ["dpo.precompute_reference = True"]))
    a, b = losses(tmp_path / "online"), losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], atol=2e-5)
    assert (tmp_path / "cached" / "reference" / "ref_logps.npz").exists()
