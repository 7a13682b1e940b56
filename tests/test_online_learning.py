"""PPO, GRPO and online DPO raise a programmatic reward on a toy task, with bounded KL to the reference.

Task: tiny random-init policy, byte tokenizer, 8 new tokens; reward = fraction of lowercase
letters in the completion (about 26/264 at the start). Each run is ~1-2 minutes on 2 CPU cores.
"""

import dataclasses
import json

import numpy as np
import pytest

from jaxpost.recipes.grpo import grpo
from jaxpost.train.online import OnlineConfig
from jaxpost.recipes.online_dpo import online_dpo
from jaxpost.recipes.ppo import ppo
from jaxpost.generate.rollout import RolloutConfig
from online_helpers import CONFIG, data, gin_scope, lowercase_fraction, scores_and_kl  # noqa: F401

ROLLOUTS = 24
KL_BOUND = 20.0  # nats summed over 8 tokens; a collapse onto one token would be ~8 log 264 = 45


def _common(gin_scope, data, name):
    gin_scope.bind_parameter("make_scorer.reward_functions", [lowercase_fraction])
    gin_scope.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin_scope.bind_parameter("make_optimizer.schedule", "constant")
    return dict(run_dir=str(data / name), train_data=str(data / "prompts.jsonl"), tokenizer=str(data / "tok"),
                model=CONFIG, online=OnlineConfig(num_rollouts=ROLLOUTS, prompts_per_rollout=8, max_prompt_len=16))


def _check_learned(run_dir, margin):
    scores, kl, _ = scores_and_kl(run_dir)
    start, end = np.mean(scores[:3]), np.mean(scores[-3:])
    assert start < 0.2, scores
    assert end > start + margin, scores
    assert max(kl) < KL_BOUND, kl


def _samples(run_dir, group):
    """The samples log of rollouts 1, 11 and 21 (OnlineConfig.samples_every = 10): every completion, by group."""
    files = sorted((run_dir / "samples").iterdir())
    assert [f.name for f in files] == ["rollout_000001.jsonl", "rollout_000011.jsonl", "rollout_000021.jsonl"]
    logs = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    for log, number in zip(logs, (1, 11, 21)):
        assert len(log) == 8 * group and {r["rollout"] for r in log} == {number}
        for r in log:  # the score is the one reward, less nothing (no missing-EOS penalty)
            assert r["score"] == pytest.approx(r["rewards"]["lowercase_fraction"], abs=1e-6)
            assert r["score"] == pytest.approx(lowercase_fraction(None, [r["completion"]])[0], abs=1e-6)
    return [[log[g * group:(g + 1) * group] for g in range(8)] for log in logs]


@pytest.mark.slow
def test_ppo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "ppo")
    ppo(**kw, rollout=RolloutConfig(max_new_tokens=8), ppo_epochs=2, minibatch_size=8, kl_coef=0.05)
    _check_learned(data / "ppo", 0.12)
    _samples(data / "ppo", 1)


@pytest.mark.slow
def test_grpo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "grpo")
    kw["online"] = dataclasses.replace(kw["online"], eval_every=12)
    summary = grpo(**kw, rollout=RolloutConfig(max_new_tokens=8, group_size=4), advantage="grpo",
                   eval_data=str(data / "prompts.jsonl"))
    _check_learned(data / "grpo", 0.12)
    # Held-out evaluations at rollouts 12 and 24 (one update each) and at the end: the same state, the same score.
    records = [json.loads(line) for line in (data / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/score" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert summary["eval/score"] == evals[-1]["eval/score"]
    assert summary["eval/rewards/lowercase_fraction/mean"] == pytest.approx(summary["eval/score"])
    assert 0 < summary["eval/completion_length"] <= 8
    for groups in _samples(data / "grpo", 4):  # advantages: (r - mean_g) / (std_g + 1e-4), std with ddof 1
        for g in groups:
            r = np.array([x["score"] for x in g])
            expected = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
            np.testing.assert_allclose([x["advantage"] for x in g], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_online_dpo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "odpo")
    gin_scope.bind_parameter("make_dpo_loss.beta", 0.1)
    online_dpo(**kw, rollout=RolloutConfig(max_new_tokens=8, group_size=4))
    _check_learned(data / "odpo", 0.12)
    # Each group's pair in the samples log: its best and worst completion, or none when all scored alike.
    for groups in _samples(data / "odpo", 4):
        for g in groups:
            scores, roles = [r["score"] for r in g], [r["pair"] for r in g]
            if max(scores) == min(scores):
                assert roles == [""] * 4
            else:
                assert sorted(roles) == ["", "", "chosen", "rejected"]
                assert scores[roles.index("chosen")] == max(scores) and scores[roles.index("rejected")] == min(scores)
