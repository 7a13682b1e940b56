"""Reward model and DPO runs end to end on a synthetic preference set."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import transformers

from jaxpost.errors import UserError
from pipeline_utils import losses, make_task, run_task


def _letters_preference(path, n, seed=0):
    """A synthetic preference: replies drawn from 'abcd' are preferred to replies from 'efgh'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(4))
        good = "".join(rng.choice("abcd") for _ in range(rng.randint(2, 5)))
        bad = "".join(rng.choice("efgh") for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": f"say: {word} ", "chosen": good, "rejected": bad, "margin": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    paths = make_task(root, n_sft=50, n_pref=50, n_prompts=20, n_eval=16)
    paths["letters"] = _letters_preference(root / "letters.jsonl", 300)
    return paths


def _bindings(kind, task, run_dir, steps, extra=()):
    return [f"{kind}.run_dir = '{run_dir}'", f"{kind}.train_data = '{task['letters']}'",
            f"{kind}.tokenizer = '{task['tokenizer']}'", f"{kind}.seq_len = 64", f"{kind}.max_prompt_len = 48", f"{kind}.batch_size = 8",
            f"{kind}.eval_fraction = 0.1", f"LoopConfig.num_steps = {steps}", "LoopConfig.log_every = 1",
            "LoopConfig.eval_batches = 8", *extra]


@pytest.mark.slow
def test_reward_model_reaches_high_held_out_accuracy(task, tmp_path):
    run_dir = tmp_path / "rm"
    summary = run_task("reward_model", _bindings("reward_model", task, run_dir, 40,
                                                 ["make_optimizer.learning_rate = 2e-3",
                                                  "make_optimizer.warmup_steps = 5"]))
    assert summary["eval/accuracy"] >= 0.9, summary
    assert summary["eval/margin"] > 0.5
    # Exported in the Hugging Face sequence-classification layout.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    assert hf.config.num_labels == 1


@pytest.mark.slow
def test_dpo_raises_held_out_reward_accuracy(task, tmp_path):
    run_dir = tmp_path / "dpo"
    summary = run_task("dpo", _bindings("dpo", task, run_dir, 30, ["make_optimizer.learning_rate = 1e-3",
                                                                   "make_dpo_loss.beta = 0.1"]))
    assert summary["eval/rewards/accuracies"] >= 0.9, summary  # chance is 0.5
    assert summary["eval/rewards/margins"] > 0.5
    curve = losses(run_dir)
    assert curve[1] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the first step
    assert np.mean([curve[s] for s in (28, 29, 30)]) < 0.3


@pytest.mark.slow
def test_precomputed_reference_and_shared_prompt_give_the_same_curve(task, tmp_path):
    """Three runs train the same pairs: reference run online, precomputed, and the prompt shared by both replies."""
    common = ["make_optimizer.learning_rate = 1e-3", "LoopConfig.eval_every = 0"]
    run_task("dpo", _bindings("dpo", task, tmp_path / "online", 8, common))
    run_task("dpo", _bindings("dpo", task, tmp_path / "cached", 8, common + ["dpo.precompute_reference = True"]))
    run_task("dpo", _bindings("dpo", task, tmp_path / "shared", 8, common + ["dpo.shared_prompt = True"]))
    a, b, c = losses(tmp_path / "online"), losses(tmp_path / "cached"), losses(tmp_path / "shared")
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], atol=2e-5)
    np.testing.assert_allclose([a[s] for s in a], [c[s] for s in a], atol=1e-4)
    assert a[8] < a[1] - 0.01  # the curve moves, so equal curves are not equal constants
    assert (tmp_path / "cached" / "reference" / "ref_logps.npz").exists()


@pytest.mark.slow
def test_ld_dpo_precomputed_reference_gives_the_online_curve(task, tmp_path):
    """LD-DPO (make_dpo_loss.ld_alpha): the cached reference is summed with the same weights as the online one."""
    common = ["make_optimizer.learning_rate = 1e-3", "LoopConfig.eval_every = 0", "make_dpo_loss.ld_alpha = 0.3"]
    run_task("dpo", _bindings("dpo", task, tmp_path / "online", 6, common))
    run_task("dpo", _bindings("dpo", task, tmp_path / "cached", 6, common + ["dpo.precompute_reference = True"]))
    a, b = losses(tmp_path / "online"), losses(tmp_path / "cached")
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], atol=2e-5)
    assert float(np.load(tmp_path / "cached" / "reference" / "ref_logps.npz")["ld_alpha"]) == pytest.approx(0.3)
    # Resuming without ld_alpha is refused as a changed config; allowed, the cache summed with 0.3 is still refused.
    plain = ["make_optimizer.learning_rate = 1e-3", "LoopConfig.eval_every = 0", "dpo.precompute_reference = True"]
    with pytest.raises(UserError, match=r"another config.*make_dpo_loss.ld_alpha: 0.3 -> \(unset\)"):
        run_task("dpo", _bindings("dpo", task, tmp_path / "cached", 8, plain))
    with pytest.raises(ValueError, match=r"ld_alpha=0.3, this run uses make_dpo_loss.ld_alpha=None; delete it"):
        run_task("dpo", _bindings("dpo", task, tmp_path / "cached", 8,
                                  plain + ["ResumeConfig.on_config_change = 'allow'"]))
