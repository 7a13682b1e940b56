"""The tool demo's task: multiply two 2-digit numbers, with or without a calculator tool.

``"What is 37 * 48?"`` -> ``"1776"``. A tiny model cannot multiply in its
head, but it can learn to copy the operands into a tool call and the tool's
result into its answer::

    system:    calculator available                        (only when the tool is)
    user:      What is 37 * 48?
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>
    tool:      1776
    assistant: 1776

The supervised data is *imperfect*: where the tool is available, only a
``call_fraction`` of the demonstrations use it; the rest answer in their
head (the right number, which a tiny model cannot learn to produce). Where
it is not available (no system message), every demonstration answers
directly. So the SFT policy sometimes calls the tool and sometimes
guesses, and RL has something to learn: that calling the tool pays.
Held-out questions use operand pairs never seen in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin

from jaxpost.generate.environments import CalculatorEnv

SYSTEM = "calculator available"
"""The system message that says the tool is there (the environment's and the demonstrations' alike)."""

LOW, HIGH = 10, 99  # operand range: two digits


def question(a: int, b: int) -> str:
    """The user's question about ``a * b``."""
    return f"What is {a} * {b}?"


def tool_call_text(a: int, b: int) -> str:
    """The model message that asks the calculator for ``a * b`` (the format the environment parses)."""
    return '<tool_call>' + json.dumps({"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}) + \
        '</tool_call>'


def final_answer(a: int, b: int) -> str:
    """The answer as the demonstrations write it, with or without the tool: ``"37 * 48 = 1776"``."""
    return f"{a} * {b} = {a * b}"


@gin.configurable
class ArithmeticEnv(CalculatorEnv):
    """:class:`CalculatorEnv` for the demo task, with the tool (``tool=True``) or without it.

    With the tool the first observation starts with the system message
    :data:`SYSTEM`; without it there is no system message and no tool, so a
    tool call is an error (reward 0) and only a direct answer can score:
    the no-tool baseline. Reward: 1.0 when the final answer's last number
    is the product, else 0.0.
    """

    def __init__(self, tool: bool = True, timeout_s: float = 2.0):
        super().__init__(timeout_s=timeout_s, end_on_error=True, system_prompt=SYSTEM if tool else "")
        if not tool:
            self.tools = {}  # a call names no known tool: an error observation ends the episode


def _chat(a: int, b: int, tool: bool, reply: list[Mapping[str, Any]]) -> list[dict]:
    head = [{"role": "system", "content": SYSTEM}] if tool else []
    return [*head, {"role": "user", "content": question(a, b)}, *map(dict, reply)]


def write_tool_data(out_dir: str | Path, *, n_sft: int = 3000, n_prompts: int = 1000, n_eval: int = 128,
                    call_fraction: float = 0.4, no_tool_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Writes the task's datasets as jsonl and returns their paths.

    * ``sft.jsonl``: ``messages``; a ``no_tool_fraction`` of the
      conversations have no tool (direct answer); of the others a
      ``call_fraction`` call the calculator and answer with its result, the
      rest answer directly.
    * ``prompts.jsonl``: ``prompt`` (the question) and ``answer`` for GRPO.
    * ``eval_prompts.jsonl``: held-out questions (operand pairs in neither file above).
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    rng.shuffle(pairs)
    held = pairs[:n_eval]
    train = pairs[n_eval:]  # 8100 pairs in all: training draws from the rest, with repeats if it must

    def pick() -> tuple[int, int]:
        return rng.choice(train)

    sft = []
    for _ in range(n_sft):
        a, b = pick()
        tool = rng.random() >= no_tool_fraction
        if tool and rng.random() < call_fraction:
            reply = [{"role": "assistant", "content": tool_call_text(a, b)},
                     {"role": "tool", "name": "calculator", "content": str(a * b)},
                     {"role": "assistant", "content": final_answer(a, b)}]
        else:
            reply = [{"role": "assistant", "content": final_answer(a, b)}]
        sft.append({"messages": _chat(a, b, tool, reply)})

    def write(name: str, rows: list[dict]) -> Path:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    prompts = [{"prompt": question(a, b), "answer": str(a * b)} for a, b in (pick() for _ in range(n_prompts))]
    evals = [{"prompt": question(a, b), "answer": str(a * b)} for a, b in held]
    return {"sft": write("sft.jsonl", sft), "prompts": write("prompts.jsonl", prompts),
            "eval_prompts": write("eval_prompts.jsonl", evals)}
