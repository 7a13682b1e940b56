"""Reward functions: hand-checked values and the registry/combination contract."""

import gin
import pytest

from jaxpost.generate.rewards import REWARDS, first_integer, get_reward, make_reward, register_reward


def test_first_integer():
    assert first_integer("The answer is 19.") == 19
    assert first_integer("x = -12, not 4") == -12
    assert first_integer("no digits") is None
    assert first_integer("007") == 7


def test_arithmetic_reward():
    prompts = ["12+7=", "3*4=", "5-9=", "1+1="]
    completions = ["19", " 12 because 3*4", "-4", "two"]
    assert get_reward("arithmetic")(prompts, completions, answer=[19, "12", -4, 2]) == [1.0, 1.0, 1.0, 0.0]
    assert get_reward("arithmetic")(prompts, ["20", "4 then 12", "4", "2"], answer=[19, 12, -4, 2]) == \
        [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="needs the row field 'answer'"):
        get_reward("arithmetic")(prompts, completions, other=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="field 'answer' has 2 values for 4 completions"):
        get_reward("arithmetic")(prompts, completions, answer=[1, 2])
    with pytest.raises(ValueError, match="answer 'abc' of completion 0 is not an integer"):
        get_reward("arithmetic")(["p"], ["1"], answer=["abc"])


def test_exact_match_format_length():
    assert REWARDS["exact_match"](["a", "b", "c"], ["Paris ", "paris\n", "Lyon"], answer=["Paris"] * 3) == \
        [1.0, 1.0, 0.0]
    assert REWARDS["format"](["p"] * 4, ["42", " -3\n", "42 apples", ""]) == [1.0, 1.0, 0.0, 0.0]
    assert REWARDS["length"](["p"] * 3, ["a" * 64, "a" * 32, "a" * 96]) == [0.0, -0.5, -0.5]


def test_make_reward_weighted_sum_and_gin():
    fn = make_reward(["arithmetic", "format"], weights=[1.0, 0.5])
    assert fn(["1+1="] * 3, ["2", "2 is it", "3"], answer=[2, 2, 2]) == [1.5, 1.0, 0.5]
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        make_reward("nope")
    with pytest.raises(ValueError, match="1 weights for 2 rewards"):
        make_reward(["arithmetic", "format"], weights=[1.0])
    with gin.unlock_config():
        gin.parse_config("make_reward.names = ['exact_match']")
    try:
        assert make_reward()(["q"], ["A"], answer=["a"]) == [1.0]
    finally:
        gin.clear_config()


def test_register_checks_outputs():
    @register_reward("_test_broken")
    def broken(prompts, completions, **_):
        return [float("nan")] * len(completions)

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_reward("_test_broken")(broken)
        with pytest.raises(ValueError, match="'_test_broken' returned non-finite values at \\[0, 1\\]"):
            make_reward("_test_broken")(["a", "b"], ["x", "y"])
    finally:
        REWARDS.pop("_test_broken")
