"""Multi-turn GRPO raises a reward that spans two model turns with a tool observation between them.

Tiny random-init policy, byte tokenizer. Episode: the model's first turn is
taken as a tool call (whatever it says), the tool's result comes back as a
masked ``tool`` message, the second turn is the final answer; reward = the
fraction of lowercase letters over both model turns (about 0.06 at the
start). About 20 s on 2 CPU cores.
"""

import numpy as np
import pytest

from jaxpost.generate.environments import ToolEnvironment
from jaxpost.generate.rollout import RolloutConfig
from jaxpost.generate.tools import ToolCall
from jaxpost.recipes.grpo import grpo
from jaxpost.train.online import OnlineConfig
from online_helpers import CONFIG, data, gin_scope, scores_and_kl  # noqa: F401


def echo(x: int) -> str:
    """Answers ok."""
    return f"ok {x}"


class LowercaseEnv(ToolEnvironment):
    """Turn 1 calls ``echo`` whatever the model says; turn 2 is final; reward: lowercase fraction of both turns."""

    def __init__(self):
        super().__init__([echo], system_prompt="")

    def reset(self, row):
        self.texts = []
        return super().reset(row)

    def calls(self, text):
        self.texts.append(text)
        return [ToolCall("echo", {"x": 1})] if len(self.texts) == 1 else []

    def reward(self, row, answer):
        s = "".join(self.texts)
        return sum(c.islower() for c in s) / max(len(s), 1)


@pytest.mark.slow
def test_multiturn_grpo_raises_reward(gin_scope, data):
    gin_scope.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin_scope.bind_parameter("make_optimizer.schedule", "constant")
    gin_scope.bind_parameter("MultiTurnConfig.max_turns", 2)
    gin_scope.bind_parameter("MultiTurnConfig.max_length", 96)
    stops = (4,) + tuple(range(140, 264))  # <|im_end|> and the high bytes: random turns stop after a few tokens
    grpo(run_dir=str(data / "mt"), train_data=str(data / "prompts.jsonl"), tokenizer=str(data / "tok"),
         model=CONFIG, environment=LowercaseEnv(),
         rollout=RolloutConfig(max_new_tokens=8, group_size=4, stop_token_ids=stops),
         online=OnlineConfig(num_rollouts=24, prompts_per_rollout=8, max_prompt_len=16, progress=False))
    scores, kl, rows = scores_and_kl(data / "mt")
    start, end = np.mean(scores[:3]), np.mean(scores[-3:])
    assert start < 0.15 and end > start + 0.15, scores
    assert rows[0]["env/turns"] > 1.9 and max(kl) < 20.0, (rows[0], kl)
