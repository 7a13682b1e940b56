"""PPO, GRPO and online DPO raise a programmatic reward on a toy task, with bounded KL to the reference.

Task: tiny random-init policy, byte tokenizer, 8 new tokens; reward = fraction of lowercase
letters in the completion (about 26/264 at the start). Each run is ~1-2 minutes on 2 CPU cores.
"""

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


@pytest.mark.slow
def test_ppo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "ppo")
    ppo(**kw, rollout=RolloutConfig(max_new_tokens=8), ppo_epochs=2, minibatch_size=8, kl_coef=0.05)
    _check_learned(data / "ppo", 0.12)


@pytest.mark.slow
def test_grpo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "grpo")
    grpo(**kw, rollout=RolloutConfig(max_new_tokens=8, group_size=4), advantage="grpo")
    _check_learned(data / "grpo", 0.12)


@pytest.mark.slow
def test_online_dpo_raises_reward(gin_scope, data):
    kw = _common(gin_scope, data, "odpo")
    gin_scope.bind_parameter("make_dpo_loss.beta", 0.1)
    online_dpo(**kw, rollout=RolloutConfig(max_new_tokens=8, group_size=4))
    _check_learned(data / "odpo", 0.12)
