"""`jaxpost demo --tools`: the calculator task, its environment, and the demo end to end at --quick size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxpost.demo.arithmetic import SYSTEM, ArithmeticEnv, final_answer, tool_call_text, write_tool_data
from cli_env import subprocess_env


def _question_of(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def _operands(question):
    a, b = question.removeprefix("What is ").removesuffix("?").split(" * ")
    return int(a), int(b)


def test_tool_data_holds_out_the_eval_questions_and_mixes_calls_with_direct_answers(tmp_path):
    paths = write_tool_data(tmp_path, n_sft=600, n_prompts=200, n_eval=50, call_fraction=0.4, no_tool_fraction=0.2)
    sft = [json.loads(x)["messages"] for x in paths["sft"].read_text().splitlines()]
    prompts = [json.loads(x) for x in paths["prompts"].read_text().splitlines()]
    evals = [json.loads(x) for x in paths["eval_prompts"].read_text().splitlines()]
    held = {r["prompt"] for r in evals}
    assert len(held) == 50
    assert not held & ({_question_of(m) for m in sft} | {r["prompt"] for r in prompts})
    with_tool = [m for m in sft if m[0] == {"role": "system", "content": SYSTEM}]
    calls = [m for m in with_tool if any(x["role"] == "tool" for x in m)]
    assert 0.7 < len(with_tool) / len(sft) < 0.9 and 0.3 < len(calls) / len(with_tool) < 0.5
    a, b = _operands(_question_of(calls[0]))
    assert [x["content"] for x in calls[0][2:]] == [tool_call_text(a, b), str(a * b), final_answer(a, b)]
    assert all(m[-1]["content"] == final_answer(*_operands(_question_of(m))) for m in sft)  # always the right product


def test_arithmetic_env_with_and_without_the_calculator():
    row = {"prompt": "What is 37 * 48?", "answer": "1776"}
    env = ArithmeticEnv(tool=True).spawn()
    assert env.reset(row)[0] == {"role": "system", "content": SYSTEM}
    observation, reward, done = env.step({"role": "assistant", "content": tool_call_text(37, 48)})
    assert observation == [{"role": "tool", "name": "calculator", "content": "1776"}] and not done
    assert env.step({"role": "assistant", "content": final_answer(37, 48)}) == (None, 1.0, True)

    env = ArithmeticEnv(tool=False).spawn()
    assert env.reset(row) == [{"role": "user", "content": row["prompt"]}]  # no system message: no tool
    observation, reward, done = env.step({"role": "assistant", "content": tool_call_text(37, 48)})
    assert done and reward == 0.0 and "unknown tool" in observation[0]["content"]
    env.reset(row)
    assert env.step({"role": "assistant", "content": "37 * 48 = 1776"}) == (None, 1.0, True)


def test_tools_flag_conflicts_and_an_earlier_tool_demo_are_refused(tmp_path, capsys):
    from jaxpost.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--tools", "--feedback"])
    (tmp_path / "tools" / "sft").mkdir(parents=True)
    assert main(["demo", "--tools", "--quick", "--out", str(tmp_path)]) == 2
    assert "already holds a tool demo" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "tools").iterdir()) == ["sft"]  # nothing written


@pytest.mark.slow
def test_tools_demo_quick_end_to_end(tmp_path):
    """`jaxpost demo --tools --quick` through the CLI, on one CPU device as a user runs it (about 80 s).

    At --quick size the policies are barely trained: the test checks the
    mechanism (both stages, three evaluations on the held-out questions, the
    summary), not the numbers; the full run's numbers are in README.md.
    """
    env = subprocess_env({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # 8 devices split tiny batches
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "jaxpost", "demo", "--tools", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    root = out / "tools"
    table = json.loads((root / "results.json").read_text())
    assert [(r["policy"], r["tool"]) for r in table] == [("sft", False), ("sft", True), ("grpo", True)]
    for r in table:
        assert r["held_out"] == 64 and r["seconds"] > 0
        assert all(0.0 <= r[k] <= 1.0 for k in ("success", "success_t1"))
        assert r["tool_calls"] >= 0 and r["tool_calls_t1"] >= 0
    assert table[0]["tool_calls"] == 0  # without the calculator no call ever reached it
    assert "| grpo | yes |" in proc.stdout

    # Every evaluation ran one episode per held-out question, none of which training saw.
    held = [json.loads(x)["prompt"] for x in (root / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    trained = {json.loads(x)["prompt"] for x in (root / "data" / "prompts.jsonl").read_text().splitlines()}
    trained |= {_question_of(json.loads(x)["messages"]) for x in (root / "data" / "sft.jsonl").read_text().splitlines()}
    assert len(held) == 64 and not set(held) & trained
    files = sorted(p.name for p in (root / "eval").iterdir())
    assert files == sorted(f"{p}-t{t}.jsonl" for p in ("sft-no-tool", "sft-tool", "grpo-tool") for t in (0, 1))
    for name in files:
        rows = [json.loads(x) for x in (root / "eval" / name).read_text().splitlines()]
        assert [r["prompt"] for r in rows] == held

    # Both stages ran as gin experiments into their run directories; GRPO trained multi-turn episodes.
    assert (root / "sft" / "final" / "config.json").exists() and (root / "grpo" / "final" / "config.json").exists()
    steps = [json.loads(x) for x in (root / "grpo" / "metrics.jsonl").read_text().splitlines() if '"env/turns"' in x]
    assert len(steps) == 3 and all(s["env/turns"] >= 1 for s in steps)
