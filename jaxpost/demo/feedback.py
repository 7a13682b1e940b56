"""The demo's feedback stage: simulated users rate the deployed policy, continual rounds learn from them.

    jaxpost demo --feedback        # after `jaxpost demo`, which trains the SFT policy it starts from

The SFT policy is deployed. In each of ``batches`` batches, simulated users
ask ``per_batch`` fresh questions of the demo task (reverse a string), the
deployed model answers (sampled at temperature 1), and each user gives a
thumbs up when the answer is exactly right, down otherwise, with a
``noise`` fraction of labels flipped at random. The batch arrives in the
feedback directory as a feedback log (``docs/feedback.md``) and the
continual recipe (``configs/experiments/demo/feedback.gin``) trains one
round on it: KTO from the current model, the SFT policy as the reference,
gated on held-out feedback (the SFT policy's answers to other questions,
labelled without noise). The model of an accepted round is deployed for
the next batch. After every round the deployed model's held-out task
reward (:func:`jaxpost.demo.evaluate.evaluate_policy`) goes into the table.
Everything lands in ``out/feedback/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import gin

from jaxpost import config as gin_config
from jaxpost import paths
from jaxpost.demo.evaluate import evaluate_policy
from jaxpost.generate import SamplingConfig, generate_to_jsonl
from jaxpost.recipes import run as run_task

EXPERIMENT = "configs/experiments/demo/feedback.gin"


def user_feedback(model_dir: Path, tokenizer_dir: Path, prompts: list[dict], out: Path, *, model_version: str,
                  noise: float, seed: int) -> Path:
    """The deployed model answers ``prompts``; users label each answer (flipped with probability ``noise``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    asked = out.with_name(out.stem + ".prompts.jsonl")
    asked.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    samples = out.with_name(out.stem + ".answers.jsonl")
    generate_to_jsonl(str(model_dir), str(tokenizer_dir), asked, samples,
                      SamplingConfig(max_new_tokens=12, temperature=1.0), batch_size=64, seed=seed)
    rng = random.Random(seed)
    records = []
    for row in map(json.loads, paths.jsonl_lines(samples.read_text(encoding="utf-8"))):
        right = row["completion"].strip() == row["answer"]
        records.append({"messages": [*row["prompt"], {"role": "assistant", "content": row["completion"].strip()}],
                        "label": right != (rng.random() < noise), "model_version": model_version})
    paths.atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))  # a log appears whole
    return out


def run_feedback_demo(out: str | Path = "runs/demo", *, batches: int = 3, per_batch: int = 256, noise: float = 0.15,
                      log: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[dict]:
    """Runs the feedback stage on a finished demo in ``out``; returns one table row per round (plus the SFT row)."""
    root = Path(out).resolve()
    sft, tok = root / "sft" / "final", root / "tokenizer"
    if not (sft / "config.json").exists():
        raise FileNotFoundError(f"{sft} does not exist: run `jaxpost demo --out {out}` first (its SFT policy is the "
                                "deployed model the simulated users rate)")
    fb = root / "feedback"
    inbox, live = fb / "inbox", fb / "live"
    inbox.mkdir(parents=True, exist_ok=True)
    prompts = [json.loads(x) for x in paths.jsonl_lines(paths.read_text(root / "data" / "prompts.jsonl"))]
    evals = [json.loads(x) for x in paths.jsonl_lines(paths.read_text(root / "data" / "eval_prompts.jsonl"))]
    if len(prompts) < batches * per_batch:
        raise ValueError(f"{batches} batches of {per_batch} need {batches * per_batch} prompts; the demo has "
                         f"{len(prompts)}")
    held, half = fb / "heldout.jsonl", len(evals) // 2  # half the held-out questions gate, half measure
    if not held.exists():
        user_feedback(sft, tok, evals[:half], held, model_version="sft", noise=0.0, seed=7)
    eval_path = fb / "eval_prompts.jsonl"
    eval_path.write_text("".join(json.dumps(p) + "\n" for p in evals[half:]))
    table = [{"round": 0, "model": "sft", "accepted": True, **evaluate_policy(sft, tok, eval_path, fb / "sft",
                                                                              samples_per_prompt=2)}]
    log(f"[feedback] SFT policy deployed: held-out reward {table[0]['reward']:.3f}")
    for b in range(1, batches + 1):
        state = _state(live)
        current = Path(state["current"]["model"]) if state else sft
        version = f"round-{state['current']['round']:04d}" if state else "sft"
        log_path = inbox / f"batch-{b:03d}.jsonl"
        if not log_path.exists():
            user_feedback(current, tok, prompts[(b - 1) * per_batch:b * per_batch], fb / "asked" / log_path.name,
                          model_version=version, noise=noise, seed=100 + b)
            paths.move(fb / "asked" / log_path.name, log_path)
        labels = [json.loads(x)["label"] for x in paths.jsonl_lines(paths.read_text(log_path))]
        log(f"[feedback] batch {b}: {len(labels)} ratings of {version}, {sum(labels)} thumbs up")
        gin_config.parse([EXPERIMENT], [f"continual.run_dir = '{live}'", f"continual.feedback_dir = '{inbox}'",
                                        f"continual.init_from = '{sft}'", f"continual.eval_data = '{held}'",
                                        f"continual.max_rounds = {b}", "LoopConfig.progress = False"])
        try:
            run_task()
        finally:
            gin.clear_config()
        state = _state(live)
        last = state["rounds"][-1]
        scores = evaluate_policy(state["current"]["model"], tok, eval_path, fb / f"round-{b:04d}",
                                 samples_per_prompt=2)
        table.append({"round": b, "model": f"round-{last['round']:04d}", "accepted": last["accepted"],
                      "reason": last["reason"], **scores})
        log(f"[feedback] round {b}: {'accepted' if last['accepted'] else 'rejected'} ({last['reason']}); deployed "
            f"model's held-out reward {scores['reward']:.3f} (exact {scores['exact']:.3f})")
    paths.atomic_write_text(fb / "results.json", json.dumps(table, indent=1) + "\n")
    log("\n| round | accepted | held-out reward | exact | greedy exact |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['round']} | {r['accepted']} | {r['reward']:.3f} | {r['exact']:.3f} | {r['greedy_exact']:.3f} |"
        for r in table))
    return table


def _state(live: Path) -> dict | None:
    path = live / "state.json"
    return json.loads(path.read_text()) if path.exists() else None
