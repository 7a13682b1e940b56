"""Multi-turn rollouts with environments and tools: parsing, safe tool runs, masks, log-probs, one GRPO update."""

import json
import time

import gin
import jax
import numpy as np
import pytest

from jaxpost.data import make_prompt_pipeline
from jaxpost.generate.environments import CalculatorEnv, ToolEnvironment, calculator, make_arithmetic_data
from jaxpost.generate.multiturn import MultiTurnConfig, MultiTurnRoller
from jaxpost.generate.rollout import RolloutConfig
from jaxpost.generate.tools import ToolCall, ToolError, parse_tool_calls, run_tool
from jaxpost.models import forward
from jaxpost.models.heads import logits as lm_logits
from jaxpost.sharding import Partitioner
from jaxpost.train.online import OnlineConfig

from online_helpers import CONFIG, model, tok  # noqa: F401 (fixtures)




# --- tools ------------------------------------------------------------------------------------------------

def test_parse_tool_calls():
    tools = {"calculator": calculator}
    good = 'let me see <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
    assert parse_tool_calls(good, tools) == [ToolCall("calculator", {"expression": "2*3"})]
    assert parse_tool_calls("the answer is 6", tools) == []
    with pytest.raises(ToolError, match="not valid JSON"):
        parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {</tool_call>', tools)
    with pytest.raises(ToolError, match="unknown tool 'search'"):
        parse_tool_calls('<tool_call>{"name": "search", "arguments": {}}</tool_call>', tools)
    with pytest.raises(ToolError, match="never closed"):
        parse_tool_calls('<tool_call>{"name": "calculator"', tools)
    with pytest.raises(ToolError, match="must be a JSON object"):
        parse_tool_calls("<tool_call>[1, 2]</tool_call>", tools)


def good(x: int) -> str:
    """Answers ok."""
    return f"ok {x}"


def raises(x: int):
    raise RuntimeError("boom")


def hangs(x: int):
    time.sleep(5)
    return "late"


def garbage(x: int):
    return object()


def test_run_tool_turns_failures_into_errors():
    assert run_tool(good, {"x": 2}) == ("ok 2", None)
    assert run_tool(calculator, {"expression": "37 * 48"}) == ("1776", None)
    assert "raised RuntimeError: boom" in run_tool(raises, {"x": 1})[1]
    start = time.perf_counter()
    assert "timed out" in run_tool(hangs, {"x": 1}, timeout_s=0.2)[1]
    assert time.perf_counter() - start < 2
    assert "unusable object" in run_tool(garbage, {"x": 1})[1]
    assert "more than 5" in run_tool(good, {"x": 123456}, max_chars=5)[1]
    assert "raised TypeError" in run_tool(good, {"y": 1})[1]  # wrong arguments
    assert "raised" in run_tool(calculator, {"expression": "__import__('os')"})[1]


def test_calculator_env_steps():
    env = CalculatorEnv().spawn()
    msgs = env.reset({"prompt": "What is 37 * 48?", "answer": "1776"})
    assert [m["role"] for m in msgs] == ["system", "user"]
    obs, r, done = env.step({"role": "assistant", "content":
                             '<tool_call>{"name": "calculator", "arguments": {"expression": "37*48"}}</tool_call>'})
    assert obs == [{"role": "tool", "name": "calculator", "content": "1776"}] and r == 0 and not done
    assert env.step({"role": "assistant", "content": "It is 1776."})[1:] == (1.0, True)
    obs, r, done = env.step({"role": "assistant", "content": '<tool_call>{"name": "calc"}</tool_call>'})
    assert done and r == 0 and "unknown tool" in obs[0]["content"]
    assert env.info == {"tool_calls": 1.0, "tool_errors": 1.0}


# --- rollouts ---------------------------------------------------------------------------------------------

class ScriptedEnv(ToolEnvironment):
    """Calls the row's tool on the first ``calls`` turns whatever the model says, then takes its answer (reward 1)."""

    def __init__(self, calls=2):
        super().__init__([good, raises, hangs, garbage], timeout_s=0.3, system_prompt="")
        self.n_calls = calls

    def reset(self, row):
        self.turn = 0
        return super().reset(row)

    def calls(self, text):
        self.turn += 1
        return [ToolCall(self.row["tool"], {"x": self.turn})] if self.turn <= self.n_calls else []

    def reward(self, row, answer):
        return 1.0


class Recorder:
    """Wraps the roller's sampler and keeps every turn's prompts and outputs (the re-prefill path)."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def __call__(self, params, tokens, mask, rng, budget=None, row_ids=None):
        out = self.sampler(params, tokens, mask, rng, budget, row_ids=row_ids)
        self.calls.append((np.asarray(tokens), np.asarray(mask), jax.device_get(out)))
        return out

    def start(self, *args):
        raise AssertionError("the re-prefill path must not continue from a cache")

    extend = start


class Counter:
    """Wraps the roller's sampler and counts prefilled token slots; only the continuation entry points may run."""

    def __init__(self, sampler):
        self.sampler, self.calls, self.prefilled = sampler, 0, 0

    def __call__(self, *args, **kwargs):
        raise AssertionError("the continuation path must not re-prefill whole conversations")

    def start(self, params, tokens, mask, *args):
        self.calls += 1
        self.prefilled += int(np.asarray(mask).sum())
        return self.sampler.start(params, tokens, mask, *args)

    def extend(self, params, state, tokens, mask, *args):
        self.calls += 1
        self.prefilled += int(np.asarray(mask).sum())
        return self.sampler.extend(params, state, tokens, mask, *args)


def _prompts(tok, tools, group):
    rows = [{"prompt": f"task {i} " * (1 + i % 2), "tool": t} for i, t in enumerate(tools)]
    return next(make_prompt_pipeline(rows, tok, 16, len(rows), 0, shuffle=False, num_epochs=None))


def _roll(tok, model, continuation, wrap):
    graphdef, params = model
    part = Partitioner()
    stops = (4,) + tuple(range(140, 264))  # <|im_end|> and half the vocabulary: turns of a few tokens
    roller = MultiTurnRoller(graphdef, CONFIG, tok, part, ScriptedEnv(),
                             RolloutConfig(max_new_tokens=5, group_size=2, stop_token_ids=stops),
                             MultiTurnConfig(max_turns=3, max_episode_tokens=12, max_length=128,
                                             continuation=continuation))
    roller.sampler = rec = wrap(roller.sampler)
    with part.activate():
        r = roller(params, params, None, _prompts(tok, ["good"] * 4, 2), jax.random.PRNGKey(1))
    return r, rec


@pytest.fixture(scope="module")
def reprefilled(tok, model):
    """The rollout of the re-prefill path, with every sampler call recorded."""
    return _roll(tok, model, False, Recorder)


def test_rollout_mask_and_logprobs_cover_exactly_the_model_tokens(tok, model, reprefilled):
    graphdef, params = model
    r, rec = reprefilled
    host, B = r.host, 8
    old = np.asarray(jax.device_get(r.batch["old_logp"]))
    assert max(len(c[0]) for c in rec.calls) >= 1 and len(rec.calls) >= 2  # several turns were sampled
    for b in range(B):
        conv = host["tokens"][b][host["segment_ids"][b] == 1]
        expected, sampler_lp = np.zeros(len(host["tokens"][b]), np.float32), np.zeros(len(host["tokens"][b]))
        turns = 0
        for tokens, mask, out in rec.calls:
            for j in range(len(out.lengths)):
                p = tokens[j][mask[j] == 1]
                n = int(out.lengths[j])
                if len(p) + n <= len(conv) and (conv[:len(p)] == p).all() and (conv[len(p):len(p) + n]
                                                                               == out.tokens[j, :n]).all():
                    expected[len(p) - 1:len(p) - 1 + n] = 1  # targets[t] = conv[t+1]
                    sampler_lp[len(p) - 1:len(p) - 1 + n] = out.logprobs[j, :n]
                    turns += 1
                    break
        np.testing.assert_array_equal(host["loss_mask"][b], expected)
        np.testing.assert_allclose(old[b], sampler_lp, atol=1e-4)
        np.testing.assert_allclose(host["sampler_logp"][b], sampler_lp, atol=0)
        # The observation between turns is masked and present: the tool's text sits in the conversation.
        assert turns >= 1 and (turns == 1 or "ok 1" in r.completions[b])
    # One training forward over the whole conversation gives the same log-probs.
    hidden, _ = forward(graphdef, params, host["tokens"], host["positions"], host["segment_ids"])
    z = jax.nn.log_softmax(lm_logits(params, CONFIG, hidden).astype(np.float32), -1)
    direct = np.take_along_axis(np.asarray(z), host["targets"][..., None], -1)[..., 0] * host["loss_mask"]
    np.testing.assert_allclose(old, direct, atol=1e-4)
    assert r.metrics["env/turns"] > 1 and r.metrics["env/tool_calls"] > 0


def test_continuation_rollout_equals_the_reprefill_rollout(tok, model, reprefilled):
    """Continuing from the cache samples the same conversations (keys per episode row and step) and prefills
    only the new tokens; its rows' masks and log-probs so hold the contract checked above."""
    graphdef, params = model
    ref, rec = reprefilled
    r, counter = _roll(tok, model, True, Counter)
    for key in ("tokens", "segment_ids", "positions", "targets", "loss_mask"):
        np.testing.assert_array_equal(r.host[key], ref.host[key], err_msg=key)
    np.testing.assert_allclose(r.host["sampler_logp"], ref.host["sampler_logp"], atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.device_get(r.batch["old_logp"])),
                               np.asarray(jax.device_get(ref.batch["old_logp"])), atol=0)
    np.testing.assert_array_equal(r.scores, ref.scores)
    lengths = r.host["loss_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1 and r.metrics["env/turns"] > 1  # episodes of different lengths
    # The first turn prefills the prompts; later turns only the observations (plus each row's last sampled
    # token, which the cache does not hold yet): far fewer than the whole conversations re-prefilled.
    assert counter.calls == len(rec.calls)
    reprefilled_tokens = sum(int(mask.sum()) for _, mask, _ in rec.calls)
    assert counter.prefilled < reprefilled_tokens
    hidden, _ = forward(graphdef, params, r.host["tokens"], r.host["positions"], r.host["segment_ids"])
    z = jax.nn.log_softmax(lm_logits(params, CONFIG, hidden).astype(np.float32), -1)
    direct = np.take_along_axis(np.asarray(z), r.host["targets"][..., None], -1)[..., 0] * r.host["loss_mask"]
    np.testing.assert_allclose(r.host["sampler_logp"], direct, atol=1e-4)


def test_failing_tools_end_their_episode_with_an_error_and_the_rollout_goes_on(tok, model):
    graphdef, params = model
    part = Partitioner()
    every = tuple(range(CONFIG.vocab_size))  # every token stops: each turn is one token and always ends
    roller = MultiTurnRoller(graphdef, CONFIG, tok, part, ScriptedEnv(),
                             RolloutConfig(max_new_tokens=4, group_size=1, stop_token_ids=every),
                             MultiTurnConfig(max_turns=4, max_episode_tokens=16, max_length=256))
    tools = ["good", "raises", "hangs", "garbage"] * 2  # 8 rows: one per batch shard of the 8-device mesh
    start = time.perf_counter()
    with part.activate():
        r = roller(params, params, None, _prompts(tok, tools, 1), jax.random.PRNGKey(0))
    assert time.perf_counter() - start < 30
    turns = r.host["loss_mask"].sum(-1)
    np.testing.assert_array_equal(turns, [3, 1, 1, 1] * 2)  # two tool calls + the answer; failures end after one
    np.testing.assert_array_equal(r.scores, [1, 0, 0, 0] * 2)
    assert r.finished.all()  # ended by the environment, not by a budget
    assert "ok 1" in r.completions[0] and "ok 2" in r.completions[0]
    assert "raised RuntimeError: boom" in r.completions[1]
    assert "timed out after 0.3 s" in r.completions[2]
    assert "returned an unusable object" in r.completions[3]
    assert r.metrics["env/tool_errors"] == pytest.approx(0.75)


def test_turn_budget_truncates(tok, model):
    graphdef, params = model
    part = Partitioner()
    roller = MultiTurnRoller(graphdef, CONFIG, tok, part, ScriptedEnv(calls=10),
                             RolloutConfig(max_new_tokens=4, group_size=1, stop_token_ids=tuple(range(264)),
                                           missing_eos_penalty=0.5),
                             MultiTurnConfig(max_turns=2, max_episode_tokens=16, max_length=128))
    with part.activate():
        r = roller(params, params, None, _prompts(tok, ["good"] * 8, 1), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(r.host["loss_mask"].sum(-1), [2] * 8)
    assert not r.finished.any() and (r.scores == -0.5).all() and r.metrics["env/truncated_fraction"] == 1.0


# --- training ---------------------------------------------------------------------------------------------

class LengthRewardEnv(ScriptedEnv):
    """One tool call, then the answer's length as its reward: rewards differ within a group."""

    def reward(self, row, answer):
        return float(len(answer))


def test_one_grpo_update_on_multiturn_rows(tok, tmp_path):
    from jaxpost.recipes.grpo import grpo

    tok.save_pretrained(tmp_path / "tok")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"task {i}", "tool": "good"}) + "\n" for i in range(8))
    gin.clear_config()
    try:
        gin.bind_parameter("MultiTurnConfig.max_length", 192)
        gin.bind_parameter("MultiTurnConfig.max_turns", 2)
        gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
        summary = grpo(run_dir=str(tmp_path / "run"), train_data=str(tmp_path / "prompts.jsonl"),
                       tokenizer=str(tmp_path / "tok"), model=CONFIG, environment=LengthRewardEnv(calls=1),
                       rollout=RolloutConfig(max_new_tokens=6, group_size=2,
                                             stop_token_ids=(4,) + tuple(range(140, 264))),
                       online=OnlineConfig(num_rollouts=1, prompts_per_rollout=4, max_prompt_len=32, progress=False))
    finally:
        gin.clear_config()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 1 and len(rows) == 1
    assert rows[0]["env/turns"] > 1 and rows[0]["env/tool_calls"] > 0 and rows[0]["grad_norm"] > 0
    assert np.isfinite(rows[0]["loss"])


def test_arithmetic_data_and_gin_binding_of_the_environment(tmp_path):
    rows = [json.loads(line) for line in make_arithmetic_data(tmp_path / "a.jsonl", 5).read_text().splitlines()]
    assert len(rows) == 5 and all(calculator(r["prompt"][8:-1]) == r["answer"] for r in rows)
    import jaxpost.recipes.grpo  # noqa: F401  (registers grpo, CalculatorEnv, MultiTurnConfig)
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(repo))
        gin.parse_config_file(str(repo / "configs/experiments/calculator_grpo.gin"))
        env = gin.query_parameter("grpo.environment").scoped_configurable_fn()
        assert isinstance(env, CalculatorEnv) and env.timeout_s == 2.0
        assert MultiTurnConfig().max_turns == 3
    finally:
        gin.clear_config()


def test_docs_example_environment(tok, model):
    """docs/environments.md's example environment runs as shown (with the roller: retries until the answer)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    scope = {}
    exec(re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1), scope)  # noqa: S102
    env = scope["MyEnv"]().spawn()
    assert env.reset({"prompt": "2+2?", "answer": "4"}) == [{"role": "user", "content": "2+2?"}]
    assert env.step({"role": "assistant", "content": "5"})[1:] == (0.0, False)
    assert env.step({"role": "assistant", "content": " 4 "}) == (None, 1.0, True) and env.info == {"hints": 1}
    graphdef, params = model
    part = Partitioner()
    roller = MultiTurnRoller(graphdef, CONFIG, tok, part, scope["MyEnv"](),
                             RolloutConfig(max_new_tokens=3, group_size=1, stop_token_ids=tuple(range(264))),
                             MultiTurnConfig(max_turns=2, max_length=96))
    rows = [{"prompt": f"q{i}", "answer": "never"} for i in range(8)]
    with part.activate():
        r = roller(params, params, None, next(make_prompt_pipeline(rows, tok, 16, 8, 0, num_epochs=None)),
                   jax.random.PRNGKey(0))
    assert r.metrics["env/hints"] == 2 and "try again" in r.completions[0]


def test_multiturn_benchmark_runs_tiny():
    """benchmarks/multiturn_rollout.py end to end on a tiny model (its harness, not its speed)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import multiturn_rollout

    report = multiturn_rollout.main(["--rows", "8", "--turns", "3", "--new", "6", "--rollouts", "2", "--hidden", "32",
                                     "--layers", "1", "--stops", "60"])
    modes = report["modes"]
    assert report["same_conversations"] and report["ratio_reprefill_over_continuation"] > 0
    assert modes["continuation"]["mean_turns"] > 1.5  # the scripted tool calls made episodes of several turns
    assert modes["continuation"]["prefilled_tokens_per_rollout"] < modes["reprefill"]["prefilled_tokens_per_rollout"]
