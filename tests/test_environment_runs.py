"""Environments beyond GRPO: PPO and ``synthesize`` through ``jaxpost train`` (gin), and environment errors.

Tiny random-init model, byte tokenizer. The test environment calls its
``lookup`` tool on the first model turn whatever the model says (a random
model writes no tool calls), so every episode has a masked tool observation
between two model turns; a row's ``fail`` field makes the environment's own
``reset`` or ``step`` raise, or ``step`` return garbage.
"""

import json
from pathlib import Path
from typing import ClassVar

import gin
import jax
import numpy as np
import pytest
from online_helpers import CONFIG, model, tok  # noqa: F401 (fixtures)
from pipeline_utils import tiny_model_dir

from jaxpost import cli
from jaxpost.data import build_tokenizer, make_prompt_pipeline
from jaxpost.data.encode import encode_lm, encode_preference
from jaxpost.paths import jsonl_lines
from jaxpost.data.formats import normalize_row
from jaxpost.errors import UserError
from jaxpost.generate import multiturn
from jaxpost.generate.environments import ToolEnvironment
from jaxpost.generate.multiturn import MultiTurnConfig, MultiTurnRoller
from jaxpost.generate.sampler import left_pad
from jaxpost.generate.rollout import RolloutConfig
from jaxpost.generate.tools import ToolCall
from jaxpost.recipes.ppo import PPORollouts
from jaxpost.sharding import Partitioner

REPO = Path(__file__).resolve().parents[1]
STOPS = (4,) + tuple(range(140, 264))  # <|im_end|> and the high bytes: a random model's turns stop after a few tokens


def lookup(x: int) -> str:
    """Looks x up."""
    return f"ok {x}"


@gin.configurable("EnvRunsTestEnv")
class LookupEnv(ToolEnvironment):
    """Turn 1 calls ``lookup`` whatever the model says; turn 2 is the answer, reward ``len(answer) / 10``.

    The row's ``fail``: ``reset`` (reset raises), ``step`` (the second step
    raises, after one tool observation), ``garbage`` (step returns a string
    as its observation).
    """

    def __init__(self):
        super().__init__([lookup], system_prompt="")

    def reset(self, row):
        if row.get("fail") == "reset":
            raise RuntimeError("reset broke")
        if row.get("fail") == "config":
            raise UserError("a configuration mistake")
        self.turn = 0
        return super().reset(row)

    def calls(self, text):
        self.turn += 1
        return [ToolCall("lookup", {"x": self.turn})] if self.turn == 1 else []

    def step(self, message):
        if self.row.get("fail") == "step" and self.turn >= 1:
            raise RuntimeError("step broke")
        if self.row.get("fail") == "garbage":
            return "not messages", 1.0, False
        return super().step(message)

    def reward(self, row, answer):
        return len(answer) / 10


def write_prompts(path: Path, fails: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"task {i}", "fail": f}) + "\n" for i, f in enumerate(fails)))
    return path


class RecordingSampler(multiturn.Sampler):
    """The multi-turn roller's sampler, keeping every call's prompts and outputs (class-wide, in call order).

    A continuation call (``start``/``extend``) is recorded as the whole
    conversations it continued, so both sampling paths read the same.
    """

    calls: ClassVar[list] = []

    def __call__(self, params, tokens, mask, rng, max_new_tokens=None, row_ids=None):
        out = super().__call__(params, tokens, mask, rng, max_new_tokens, row_ids)
        RecordingSampler.calls.append((np.asarray(tokens), np.asarray(mask), jax.device_get(out)))
        return out

    def start(self, params, tokens, mask, *args):
        self.conversations = [[] for _ in range(len(tokens))]
        return self._record(super().start(params, tokens, mask, *args), tokens, mask)

    def extend(self, params, state, tokens, mask, *args):
        return self._record(super().extend(params, state, tokens, mask, *args), tokens, mask)

    def _record(self, result, tokens, mask):
        out = jax.device_get(result[0])
        convs = [c + list(t[m == 1]) for c, t, m in zip(self.conversations, np.asarray(tokens), np.asarray(mask))]
        RecordingSampler.calls.append((*left_pad(convs), out))
        self.conversations = [c + list(out.tokens[b, :out.lengths[b]]) for b, c in enumerate(convs)]
        return result


def sampled_positions(tokens: np.ndarray, segment_ids: np.ndarray, calls: list) -> np.ndarray:
    """``[L]`` 1.0 where ``targets[t] = tokens[t+1]`` is a token the sampler produced for this conversation.

    Each sampler call (one model turn of several conversations) is matched to
    this row by its prompt being a prefix of the conversation followed by
    the call's sampled tokens.
    """
    conv = tokens[segment_ids == 1]
    expected = np.zeros(len(tokens), np.float32)
    for prompt_tokens, prompt_mask, out in calls:
        for j in range(len(out.lengths)):
            p, n = prompt_tokens[j][prompt_mask[j] == 1], int(out.lengths[j])
            if (len(p) + n <= len(conv) and (conv[:len(p)] == p).all()
                    and (conv[len(p):len(p) + n] == out.tokens[j, :n]).all()):
                expected[len(p) - 1:len(p) - 1 + n] = 1
                break
    return expected


def test_environment_errors_end_their_episode_and_the_rollout_goes_on(tok, model, capsys):
    graphdef, params = model
    part = Partitioner()
    roller = MultiTurnRoller(graphdef, CONFIG, tok, part, LookupEnv(),
                             RolloutConfig(max_new_tokens=5, group_size=1, stop_token_ids=STOPS,
                                           missing_eos_penalty=0.5),
                             MultiTurnConfig(max_turns=3, max_length=128))
    fails = ["", "reset", "step", "garbage"] * 2  # 8 rows: one per batch shard of the 8-device mesh
    rows = [{"prompt": f"task {i}", "fail": f} for i, f in enumerate(fails)]
    batch = next(make_prompt_pipeline(rows, tok, 16, 8, 0, shuffle=False, num_epochs=None))
    with part.activate():
        r = roller(params, params, None, batch, jax.random.PRNGKey(0))
        again = roller(params, params, None, batch, jax.random.PRNGKey(1))  # the run goes on
    errored = np.array([f != "" for f in fails])
    for out in (r, again):
        assert out.metrics["env/errors"] == 6
        trained = out.host["loss_mask"].sum(-1)
        assert (trained[~errored] > 0).all() and (trained[errored] == 0).all()  # errored episodes train nothing
        assert (out.scores[errored] == 0).all() and out.finished[errored].all()  # 0, and no missing-EOS penalty
    assert "ok 1" in r.completions[2]  # the step error came after a tool observation, which stays in the row
    assert r.completions[1] == ""  # a failed reset: no conversation at all
    printed = capsys.readouterr().out
    assert printed.count("[jaxpost] environment") == 1, printed  # the first error only, once per run
    assert "environment reset raised RuntimeError: reset broke" in printed
    # A UserError from an environment is a configuration mistake: it stops the run.
    bad = next(make_prompt_pipeline([{"prompt": "x", "fail": "config"}] * 8, tok, 16, 8, 0, num_epochs=None))
    with part.activate(), pytest.raises(UserError, match="a configuration mistake"):
        roller(params, params, None, bad, jax.random.PRNGKey(0))


def test_ppo_with_an_environment_through_jaxpost_train(tmp_path, monkeypatch):
    """`jaxpost train` with ppo.environment: two rollouts and updates; the rows PPO trains on have
    ``loss_mask`` exactly on the model's sampled tokens, advantages/returns only there, and environment
    errors counted while the run goes on."""
    build_tokenizer(None).save_pretrained(tmp_path / "tok")
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["", "", "", "step"] * 4)
    monkeypatch.setattr(multiturn, "Sampler", RecordingSampler)
    RecordingSampler.calls = []
    seen = []
    rollout = PPORollouts.rollout

    def recording_rollout(self, params, prompt_batch, rng, index):
        start = len(RecordingSampler.calls)
        rows, metrics = rollout(self, params, prompt_batch, rng, index)
        seen.append((jax.device_get(rows), list(prompt_batch["row"]), RecordingSampler.calls[start:], metrics))
        return rows, metrics

    monkeypatch.setattr(PPORollouts, "rollout", recording_rollout)
    fields = {"vocab_size": 264, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2}
    argv = ["train", f"--gin_file={REPO}/configs/algorithms/ppo.gin", f"--gin.ppo.run_dir={tmp_path / 'run'}",
            f"--gin.ppo.train_data={prompts}", f"--gin.ppo.tokenizer={tmp_path / 'tok'}",
            "--gin.ppo.environment=@EnvRunsTestEnv()", "--gin.ppo.ppo_epochs=1",
            *[f"--gin.ModelConfig.{k}={v}" for k, v in fields.items()],
            "--gin.RolloutConfig.max_new_tokens=5", f"--gin.RolloutConfig.stop_token_ids={STOPS}",
            "--gin.MultiTurnConfig.max_turns=3", "--gin.MultiTurnConfig.max_length=96",
            "--gin.OnlineConfig.num_rollouts=2", "--gin.OnlineConfig.prompts_per_rollout=8",
            "--gin.OnlineConfig.max_prompt_len=32", "--gin.OnlineConfig.progress=False",
            "--gin.make_optimizer.warmup_steps=0", f"--gin.ppo.eval_data={prompts}"]
    assert cli.main(argv) == 0
    assert len(seen) == 2
    for rows, dataset_rows, calls, metrics in seen:
        errored = np.array([row["fail"] == "step" for row in dataset_rows])
        assert errored.any() and metrics["env/errors"] == errored.sum() and metrics["env/turns"] > 1
        for b in range(len(dataset_rows)):
            expected = sampled_positions(rows["tokens"][b], rows["segment_ids"][b], calls)
            assert expected.sum() > 0
            np.testing.assert_array_equal(rows["loss_mask"][b], 0 * expected if errored[b] else expected)
        off = rows["loss_mask"] == 0
        assert (rows["advantages"][off] == 0).all() and (rows["returns"][off] == 0).all()
        assert (rows["advantages"][~off] != 0).any() and np.isfinite(rows["old_values"]).all()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["env/errors"] > 0 and np.isfinite(row["loss/value"]) for row in log)
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "run" / "value").is_dir()
    # Held-out prompts at the end: one greedy episode each, scored by the environment (a quarter of them fail).
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["eval/score"]) and summary["eval/completion_length"] > 0


def test_synthesize_with_an_environment_writes_conversation_rows(tmp_path, capsys):
    """`jaxpost train` with synthesize.environment: episodes become SFT ``messages`` rows (the model's turns
    trained, tool turns not) and preference pairs with a shared first observation; errors are dropped, counted."""
    model_dir = tiny_model_dir(tmp_path / "m")
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["", "", "step", "", "", ""])  # one padded batch of 8
    out = tmp_path / "syn"
    argv = ["train", f"--gin_file={REPO}/configs/algorithms/synthetic.gin", f"--gin.synthesize.model_dir={model_dir}",
            f"--gin.synthesize.prompts={prompts}", f"--gin.synthesize.out_dir={out}",
            "--gin.synthesize.environment=@EnvRunsTestEnv()", "--gin.synthesize.n_samples=4",
            "--gin.SamplingConfig.max_new_tokens=6", f"--gin.SamplingConfig.stop_token_ids={STOPS}",
            "--gin.MultiTurnConfig.max_turns=3", "--gin.MultiTurnConfig.max_length=96"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"] == 6 and stats["samples"] == 24 and stats["env_error"] == 4
    samples = [json.loads(line) for line in jsonl_lines((out / "samples.jsonl").read_text(encoding="utf-8"))]
    assert sum(s["drop_reason"] == "env_error" and "step broke" in s["error"] for s in samples) == 4
    model_tok = build_tokenizer(str(model_dir))
    sft = [json.loads(line) for line in jsonl_lines((out / "sft.jsonl").read_text(encoding="utf-8"))]
    assert len(sft) == stats["sft_rows"] >= 4
    for i, row in enumerate(sft):
        ex = normalize_row({"messages": row["messages"]}, "messages", i)  # valid SFT data as jaxpost reads it
        roles = [m["role"] for m in ex["messages"]]
        assert roles[:2] == ["user", "assistant"] and "tool" in roles, roles
        ids, trained = encode_lm(model_tok, ex)
        text = model_tok.decode([int(t) for t, m in zip(ids, trained) if m])
        assert "ok 1" not in text and "task" not in text  # only the model's turns are trained
    pairs = [json.loads(line) for line in jsonl_lines((out / "preference.jsonl").read_text(encoding="utf-8"))]
    assert len(pairs) == stats["pairs"] >= 1
    for i, row in enumerate(pairs):
        ex = normalize_row({k: row[k] for k in ("prompt", "chosen", "rejected")}, "preference", i)
        assert ex["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert ex["chosen"][0]["role"] == "assistant" and row["chosen_score"] > row["rejected_score"]
        encode_preference(model_tok, ex)  # renders with the chat template
    # Exactly one of scorer and environment.
    assert cli.main([*argv, "--gin.synthesize.scorer='runs/rm'"]) == 2
    assert "exactly one of synthesize.scorer" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["ppo", "synthesize"])
def test_docs_gin_examples_parse(tmp_path, task):
    """docs/environments.md's gin examples read as `jaxpost train` reads them, with the environment bound."""
    import re

    from jaxpost import config
    from jaxpost.generate.environments import CalculatorEnv

    doc = (REPO / "docs" / "environments.md").read_text()
    block = next(b for b in re.findall(r"```gin\n(.*?)```", doc, re.DOTALL) if f"{task}.environment" in b)
    (tmp_path / "example.gin").write_text(block)
    config.parse([str(tmp_path / "example.gin")])  # types checked, every required key set
    assert gin.query_parameter("run.task").selector.endswith(task)
    assert isinstance(gin.query_parameter(f"{task}.environment").scoped_configurable_fn(), CalculatorEnv)
    assert MultiTurnConfig().max_turns == 3
