"""Tool calls for multi-turn rollouts: parse them from a model message, run them safely.

A model calls a tool the way Qwen and Llama chat templates (and TRL) write
it: a JSON object between tags inside its message::

    <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>

:func:`parse_tool_calls` finds every such call; :func:`run_tool` runs one
Python function with a timeout and turns every failure (the tool raises,
hangs past its timeout, returns something that is not JSON or is too long)
into an error string, never an exception: one bad tool call ends (or
continues, see :class:`jaxpost.generate.environments.ToolEnvironment`) its
own episode, the run goes on.

A tool that hangs is abandoned, not killed: it keeps running in a daemon
thread (Python cannot stop a thread). A tool that may hang forever, or
that must be isolated, should run its work in a subprocess itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["TOOL_CALL_RE", "ToolCall", "ToolError", "parse_tool_calls", "run_tool", "tool_schema"]

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
"""A ``<tool_call>...</tool_call>`` span (Qwen 2.5/3, Hermes, Llama 3 tool templates)."""


class ToolError(Exception):
    """A tool call that cannot run (malformed, unknown tool); its message is the error observation."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's ``name`` and its keyword ``arguments``."""

    name: str
    arguments: dict

    def message(self) -> dict:
        """The call as a chat message's ``tool_calls`` entry (OpenAI/transformers format)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str, tools: Mapping[str, Callable] | None = None) -> list[ToolCall]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` of ``text``, in order.

    ``[]`` when the message has no call (a final answer). Raises
    :class:`ToolError` (message fit for the model to read) when a call is
    not a JSON object with a string ``name`` and an object ``arguments``
    (missing ``arguments``: ``{}``; a JSON string holding an object is
    accepted, as some models write it), when a ``<tool_call>`` is never
    closed, or, given ``tools``, when it names none of them.
    """
    calls = []
    for body in TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as e:
            raise ToolError(f"tool call is not valid JSON ({e.msg} at char {e.pos}): {body.strip()[:200]!r}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolError('tool call must be a JSON object {"name": ..., "arguments": {...}}; '
                            f"got {body[:200]!r}")
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            raise ToolError(f"tool call arguments of {obj['name']!r} must be a JSON object; got {args!r:.200}")
        if tools is not None and obj["name"] not in tools:
            raise ToolError(f"unknown tool {obj['name']!r}; available: {sorted(tools)}")
        calls.append(ToolCall(obj["name"], args))
    if not calls and "<tool_call>" in text:
        raise ToolError("a <tool_call> was opened but never closed with </tool_call>")
    return calls


def _daemon_executor() -> concurrent.futures.Executor:
    # One fresh daemon thread per call: a hung tool keeps its thread, never blocks the next call or exit.
    class _Once(concurrent.futures.Executor):
        def submit(self, fn, *args, **kwargs):
            future = concurrent.futures.Future()

            def target():
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - reported to the caller as an error observation
                    future.set_exception(e)

            threading.Thread(target=target, daemon=True, name="jaxpost-tool").start()
            return future

    return _Once()


_EXECUTOR = _daemon_executor()


def run_tool(fn: Callable, arguments: Mapping[str, Any], timeout_s: float = 10.0,
             max_chars: int = 4000) -> tuple[str, str | None]:
    """Runs ``fn(**arguments)``; returns ``(text, error)``: ``error`` None on success.

    ``text`` is the result as the ``tool`` message's content: a string as
    is, anything else JSON-encoded. Errors (then ``text`` is the error
    message): ``fn`` raised, it ran past ``timeout_s`` (it is abandoned in
    its daemon thread), its result is not a string or JSON-encodable value
    (garbage: bytes, objects, NaN), or its text exceeds ``max_chars``.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    future = _EXECUTOR.submit(fn, **dict(arguments))
    try:
        result = future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return (err := f"error: tool {name!r} timed out after {timeout_s:g} s"), err
    except Exception as e:  # noqa: BLE001 - any failure of user code is an observation
        return (err := f"error: tool {name!r} raised {type(e).__name__}: {str(e)[:300]}"), err
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            return (err := f"error: tool {name!r} returned an unusable {type(result).__name__} ({e})"), err
    if len(text) > max_chars:
        return (err := f"error: tool {name!r} returned {len(text)} characters, more than {max_chars}"), err
    return text, None


def tool_schema(fn: Callable) -> dict:
    """A JSON schema of ``fn`` for a system prompt or ``apply_chat_template(tools=...)``: name, doc, parameters."""
    params = {}
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation.__name__ if isinstance(p.annotation, type) else str(p.annotation)
        kind = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(ann, "string")
        params[p.name] = {"type": kind}
    required = [p.name for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    return {"type": "function", "function": {"name": fn.__name__, "description": (fn.__doc__ or "").strip(),
                                             "parameters": {"type": "object", "properties": params,
                                                            "required": required}}}
