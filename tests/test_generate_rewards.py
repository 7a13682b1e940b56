"""Reward functions: hand-checked values and the registry/combination contract."""

import gin
import numpy as np
import pytest

from jaxpost.errors import UserError
from jaxpost.generate.rewards import REWARDS, call_reward, first_integer, get_reward, make_reward, register_reward
from jaxpost.generate.scorers import FunctionScorer


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
    with pytest.raises(KeyError, match="^make_reward.names: unknown reward 'nope'"):
        make_reward("nope")
    with pytest.raises(UserError, match=r"^make_reward.weights has 1 values for the 2 rewards of make_reward.names "
                                        r"\['arithmetic', 'format'\]; give one weight per name, or None for all 1"):
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
        with pytest.raises(UserError, match=r"^reward '_test_broken' returned nan for completion 0 \('x'\); rewards "
                                            r"must be finite$"):
            make_reward("_test_broken")(["a", "b"], ["x", "y"])
    finally:
        REWARDS.pop("_test_broken")


@pytest.mark.parametrize("returned,message", [
    ([1.0], "reward 'r' returned 1 values for 2 completions; a reward returns one float per completion"),
    (1.0, "reward 'r' returned float 1.0; a reward returns a list of one float per completion"),
    ("10", "reward 'r' returned str '10'; a reward returns a list of one float per completion"),
    ([1.0, "1"], "reward 'r' returned '1' (str) for completion 1; a reward is a float"),
    ([None, 1.0], "reward 'r' returned None (NoneType) for completion 0; a reward is a float"),
    ([1.0, float("inf")], "reward 'r' returned inf for completion 1 ('y'); rewards must be finite"),
])
def test_a_reward_breaking_its_contract_is_one_line_naming_it(returned, message):
    with pytest.raises(UserError) as raised:
        call_reward("r", lambda prompts, completions, **_: returned, ["a", "b"], ["x", "y"], {})
    assert str(raised.value) == message


def test_rewards_are_called_by_keyword_and_numbers_of_any_kind_pass():
    # TRL calls reward functions by keyword: the parameter order of the user's function does not matter.
    def reversed_params(completions, prompts, **_):
        return np.array([len(c) - len(p) for p, c in zip(prompts, completions)], np.int64)

    out = call_reward("r", reversed_params, ["a", "bb"], ["xyz", "y"], {})
    assert out.dtype == np.float32 and out.tolist() == [2.0, -1.0]
    assert call_reward("r", lambda **_: [True, np.float64(0.5)], ["a", "b"], ["x", "y"], {}).tolist() == [1.0, 0.5]


def test_an_exception_in_a_reward_names_it_once_through_every_wrapper():
    @register_reward("_test_raises")
    def raises(prompts, completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer)]

    try:
        scorer = FunctionScorer([make_reward("_test_raises")])  # two layers of call_reward, as a run has
        rollout = type("R", (), dict(prompts=["p"], completions=["c"], rows=[{"question": 1}]))()
        with pytest.raises(TypeError) as raised:
            scorer(rollout)
        assert raised.value.__notes__ == ["(raised by reward '_test_raises', called on 1 completions with the fields "
                                          "['prompts', 'completions', 'question'])"]
    finally:
        REWARDS.pop("_test_raises")
