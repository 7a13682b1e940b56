"""Environments for multi-turn rollouts: what answers the model between its turns.

An environment runs one episode at a time::

    messages = env.reset(row)                   # the first observation: chat messages
    observation, reward, done = env.step(model_message)   # after every model turn

``row`` is the prompt dataset row (its ``prompt``, and any fields a reward
needs, e.g. ``answer``); ``model_message`` is ``{"role": "assistant",
"content": text}`` with the text the model sampled (special tokens dropped);
``observation`` is a list of messages appended to the conversation (``tool``
messages, a ``user`` reply) or None; ``reward`` adds to the episode's
score; ``done`` ends it. :class:`jaxpost.generate.multiturn.MultiTurnRoller`
runs episodes for GRPO/RLOO, PPO (``grpo.environment``,
``ppo.environment``) and ``synthesize`` (``synthesize.environment``): each
episode gets its own copy of the configured environment
(:meth:`Environment.spawn`, a deep copy), so an environment keeps its
episode's state in plain attributes set by ``reset``. The numbers of its
``info`` dict named in ``info_keys`` (e.g. ``tool_calls``) are averaged into
the rollout's metrics. An exception from ``reset`` or ``step`` (other than
:class:`~jaxpost.errors.UserError`, which stops the run) ends only that
episode: it scores 0, is not trained, and counts in ``env/errors``.

:class:`ToolEnvironment` is an environment whose model calls Python
functions (:mod:`jaxpost.generate.tools`); :class:`CalculatorEnv` is the
built-in example: arithmetic questions, a calculator tool, reward 1 for the
right final number.
"""

from __future__ import annotations

import ast
import abc
import copy
import json
import operator
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from jaxpost.generate.tools import ToolCall, ToolError, parse_tool_calls, run_tool

__all__ = ["CalculatorEnv", "Environment", "ToolEnvironment", "calculator", "make_arithmetic_data"]

Message = dict


class Environment(abc.ABC):
    """Base of an environment: ``reset(row) -> messages``, ``step(message) -> (observation, reward, done)``."""

    info: dict  # per-episode numbers, set by reset (e.g. ToolEnvironment's tool_calls)
    info_keys: tuple[str, ...] = ()  # numbers of ``info`` averaged into the rollout metrics as ``env/<key>``

    @abc.abstractmethod
    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        """Starts an episode for the prompt dataset ``row``; returns the first observation (messages)."""

    @abc.abstractmethod
    def step(self, message: Message) -> tuple[list[Message] | None, float, bool]:
        """Takes the model's turn ``{"role": "assistant", "content": ...}``; returns ``(observation messages or
        None, reward of this turn, done)``. Rewards add up over the episode."""

    def spawn(self) -> Environment:
        """A fresh copy for one episode (default: a deep copy of this configured environment)."""
        return copy.deepcopy(self)


def prompt_messages(prompt: Any, system: str | None = None) -> list[Message]:
    """A prompt (a string or messages) as messages, ``system`` first unless the prompt has a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


class ToolEnvironment(Environment):
    """The model answers, or calls tools (``<tool_call>{"name":..., "arguments":...}</tool_call>``) first.

    ``step``: a message without a tool call is the final answer: ``done``,
    with ``reward(row, text)``. Each tool call runs (:func:`run_tool`, with
    ``timeout_s`` and ``max_result_chars``) and its result becomes a
    ``{"role": "tool", "name": ..., "content": result}`` message: the
    observation; reward 0, the episode goes on. A malformed call, an
    unknown tool, or a tool that raises, times out or returns garbage gives
    a ``tool`` message with the error; with ``end_on_error`` (default) the
    episode ends there with ``error_reward``, otherwise the model reads the
    error and may try again. ``system_prompt`` (default: one listing the
    tools and the call format) is put before the row's prompt.
    ``info``: ``tool_calls``, ``tool_errors`` of the episode.
    """

    info_keys = ("tool_calls", "tool_errors")

    def __init__(self, tools: Sequence[Callable] | Mapping[str, Callable] = (), timeout_s: float = 5.0,
                 max_result_chars: int = 2000, end_on_error: bool = True, error_reward: float = 0.0,
                 system_prompt: str | None = None):
        self.tools = dict(tools) if isinstance(tools, Mapping) else {t.__name__: t for t in tools}
        self.timeout_s, self.max_result_chars = timeout_s, max_result_chars
        self.end_on_error, self.error_reward = end_on_error, error_reward
        self.system_prompt = system_prompt if system_prompt is not None else self.default_system_prompt()
        self.row: Mapping[str, Any] = {}
        self.info = {}

    def default_system_prompt(self) -> str:
        if not self.tools:
            return ""
        lines = [f"- {name}: {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}"
                 for name, fn in self.tools.items()]
        example = json.dumps({"name": next(iter(self.tools)), "arguments": {}})
        return ("You may call these tools:\n" + "\n".join(lines) +
                f"\nTo call one, write <tool_call>{example}</tool_call> with its arguments. "
                "Answer without a tool call when you are done.")

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        self.row = row
        self.info = {"tool_calls": 0.0, "tool_errors": 0.0}
        return prompt_messages(row["prompt"], self.system_prompt or None)

    def calls(self, text: str) -> list[ToolCall]:
        """The tool calls of a model message (raises :class:`ToolError`); override for another format."""
        return parse_tool_calls(text, self.tools)

    def reward(self, row: Mapping[str, Any], answer: str) -> float:
        """Reward of the final answer ``answer`` to ``row``; override it (the base gives 0)."""
        return 0.0

    def _error(self, done_so_far: list[Message], text: str):
        self.info["tool_errors"] += 1
        observation = done_so_far + [{"role": "tool", "name": "error", "content": text}]
        if self.end_on_error:
            return observation, float(self.error_reward), True
        return observation, 0.0, False

    def step(self, message: Message) -> tuple[list[Message] | None, float, bool]:
        text = message.get("content") or ""
        try:
            calls = self.calls(text)
        except ToolError as e:
            return self._error([], f"error: {e}")
        if not calls:
            return None, float(self.reward(self.row, text)), True
        observation = []
        for call in calls:
            self.info["tool_calls"] += 1
            result, error = run_tool(self.tools[call.name], call.arguments, self.timeout_s, self.max_result_chars)
            if error is not None:
                return self._error(observation, error)
            observation.append({"role": "tool", "name": call.name, "content": result})
        return observation, 0.0, False


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression (+ - * / // % ** and parentheses) and returns the number."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                      bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    value = ev(ast.parse(str(expression), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@gin.configurable
class CalculatorEnv(ToolEnvironment):
    """Arithmetic word problems with a ``calculator`` tool; reward 1 when the final answer's last number is right.

    Rows: ``{"prompt": "What is 37 * 48?", "answer": "1776"}``
    (:func:`make_arithmetic_data`). The final message (one without a tool
    call) is graded: its last number equals ``answer`` -> 1.0, else 0.0.
    """

    def __init__(self, timeout_s: float = 5.0, end_on_error: bool = True, system_prompt: str | None = None):
        super().__init__([calculator], timeout_s=timeout_s, end_on_error=end_on_error, system_prompt=system_prompt)

    def default_system_prompt(self) -> str:
        return ('Use the calculator: <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}'
                "</tool_call>. Then answer with the number.")

    def reward(self, row: Mapping[str, Any], answer: str) -> float:
        numbers = _NUMBER.findall(answer)
        if not numbers:
            return 0.0
        try:
            return float(abs(float(numbers[-1]) - float(row["answer"])) < 1e-6)
        except (TypeError, ValueError):
            return 0.0


def make_arithmetic_data(path: str | Path, n: int, seed: int = 0, digits: int = 2) -> Path:
    """Writes ``n`` rows ``{"prompt": "What is a * b?", "answer": "..."}`` (``digits``-digit operands) as jsonl."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    path = Path(path)
    with open(path, "w") as f:
        for _ in range(n):
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-*")
            f.write(json.dumps({"prompt": f"What is {a} {op} {b}?", "answer": calculator(f"{a} {op} {b}")}) + "\n")
    return path
