"""The demo's toy task: reverse a short string. Checkable, learnable by a tiny model.

``"reverse: cabd"`` -> ``"dbac"``. The supervised data is *noisy*: a
fraction of its answers repeat the input unreversed (a plausible mistake),
so the SFT policy learns the mistake too, and the later stages (reward
model, PPO, DPO, GRPO, best-of-N) have a real error to remove. Held-out
prompts are clean.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from jaxpost.generate.rewards import register_reward

ALPHABET = "abcdefgh"


def _word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))


def prompt_text(word: str) -> str:
    return f"reverse: {word}"


def answer(word: str) -> str:
    return word[::-1]


def mistake(word: str, rng: random.Random) -> str:
    """A wrong answer: the word unreversed, or reversed with one letter changed."""
    if rng.random() < 0.7 or len(word) < 2:
        return word if word != word[::-1] else word + rng.choice(ALPHABET)
    out = list(word[::-1])
    i = rng.randrange(len(out))
    out[i] = rng.choice([c for c in ALPHABET if c != out[i]])
    return "".join(out)


@register_reward("reversal")
def reversal_reward(prompts: Sequence, completions: Sequence[str], answer: Sequence[str] | None = None,
                    **_) -> list[float]:
    """1.0 for the exact reversal; else the fraction of positions right, times 0.5.

    ``answer[i]`` is the reference for completion ``i``. Partial credit keeps
    the signal dense enough for a tiny model; a wrong answer never scores
    more than 0.5, so the mean reward above 0.5 means mostly exact answers.
    """
    if answer is None:
        raise ValueError("reversal_reward needs the rows' 'answer' field")
    out = []
    for completion, ref in zip(completions, answer):
        c = completion.strip()
        if c == ref:
            out.append(1.0)
        else:
            hits = sum(a == b for a, b in zip(c, ref))
            out.append(0.5 * hits / max(len(ref), len(c), 1))
    return out


def exact_match_rate(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of completions that equal their answer exactly (after stripping whitespace)."""
    return sum(c.strip() == a for c, a in zip(completions, answers)) / max(len(answers), 1)


def _chat(user: str, assistant: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def write_task_data(out_dir: str | Path, *, n_sft: int = 3000, n_pref: int = 1500, n_prompts: int = 1000,
                    n_eval: int = 128, noise: float = 0.35, seed: int = 0, min_len: int = 3,
                    max_len: int = 6) -> dict[str, Path]:
    """Writes the task's datasets as jsonl (TRL formats) and returns their paths.

    * ``sft.jsonl``: ``messages``; a ``noise`` fraction of answers are mistakes.
    * ``preference.jsonl``: conversational ``prompt``/``chosen``/``rejected``
      (chosen = correct, rejected = a mistake).
    * ``prompts.jsonl``: conversational ``prompt`` plus its ``answer``.
    * ``eval_prompts.jsonl``: held-out prompts (no word seen in training).
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_words: list[str] = []
    seen: set[str] = set()
    while len(eval_words) < n_eval:
        w = _word(rng, min_len, max_len)
        if w not in seen:
            seen.add(w)
            eval_words.append(w)

    def fresh() -> str:
        while True:
            w = _word(rng, min_len, max_len)
            if w not in seen:
                return w

    def write(name: str, rows: list[dict]) -> Path:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    sft = []
    for _ in range(n_sft):
        w = fresh()
        reply = mistake(w, rng) if rng.random() < noise else answer(w)
        sft.append({"messages": _chat(prompt_text(w), reply)})
    pref = []
    for _ in range(n_pref):
        w = fresh()
        pref.append({"prompt": _chat(prompt_text(w)),
                     "chosen": [{"role": "assistant", "content": answer(w)}],
                     "rejected": [{"role": "assistant", "content": mistake(w, rng)}]})
    prompts = []
    for _ in range(n_prompts):
        w = fresh()
        prompts.append({"prompt": _chat(prompt_text(w)), "answer": answer(w)})
    evals = [{"prompt": _chat(prompt_text(w)), "answer": answer(w)} for w in eval_words]
    return {"sft": write("sft.jsonl", sft), "preference": write("preference.jsonl", pref),
            "prompts": write("prompts.jsonl", prompts), "eval_prompts": write("eval_prompts.jsonl", evals)}
