"""Scoring a policy on held-out prompts of the demo task, by sampling from it."""

from __future__ import annotations

import json
from pathlib import Path

from jaxpost import paths
from jaxpost.demo.task import exact_match_rate, reversal_reward
from jaxpost.generate import SamplingConfig, generate_to_jsonl


def evaluate_policy(model_dir: str | Path, tokenizer_dir: str | Path, prompts_path: str | Path,
                    out_dir: str | Path, *, samples_per_prompt: int = 4, seed: int = 1234) -> dict[str, float]:
    """Held-out metrics of a policy export, from completions it generates now.

    * ``reward``: mean task reward of completions sampled at temperature 1
      (``samples_per_prompt`` per prompt) -- what RL maximises;
    * ``exact``: fraction of those samples that are exactly right;
    * ``greedy_exact``: fraction of prompts answered exactly by greedy decoding.

    The samples are kept as ``out_dir/samples_t1.jsonl`` and
    ``out_dir/samples_greedy.jsonl`` for inspection.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, temperature, n in (("t1", 1.0, samples_per_prompt), ("greedy", 0.0, 1)):
        path = out_dir / f"samples_{name}.jsonl"
        generate_to_jsonl(str(model_dir), str(tokenizer_dir), prompts_path, path,
                          SamplingConfig(max_new_tokens=12, temperature=temperature), n_samples_per_prompt=n,
                          batch_size=64, seed=seed)
        rows = [json.loads(line) for line in paths.jsonl_lines(path.read_text(encoding="utf-8"))]
        completions = [r["completion"] for r in rows]
        answers = [r["answer"] for r in rows]
        if name == "t1":
            results["reward"] = sum(reversal_reward(None, completions, answer=answers)) / len(rows)
            results["exact"] = exact_match_rate(completions, answers)
        else:
            results["greedy_exact"] = exact_match_rate(completions, answers)
    return results


def reward_model_score(reward_model_dir: str | Path, tokenizer_dir: str | Path, samples_path: str | Path) -> float:
    """Mean reward-model score of sampled completions (a ``samples_*.jsonl`` of :func:`evaluate_policy`).

    Each prompt is rendered with the generation prompt, followed by the
    completion and the end-of-turn token -- the sequence PPO's rollouts hand
    the reward model -- and scored at its last token.
    """
    from types import SimpleNamespace

    import jax
    import numpy as np

    from jaxpost.data import load_tokenizer
    from jaxpost.data.encode import encode_prompt, encode_text
    from jaxpost.generate.scorers import RewardModelScorer
    from jaxpost.sharding import Partitioner, make_mesh

    tok = load_tokenizer(tokenizer_dir)
    rows = [json.loads(line) for line in paths.jsonl_lines(Path(samples_path).read_text(encoding="utf-8"))]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [np.r_[encode_prompt(tok, r["prompt"]), encode_text(tok, r["completion"]), end].astype(np.int32)
            for r in rows]
    length = max(len(s) for s in seqs)
    batch = {k: np.zeros((len(seqs), length), np.int32) for k in ("tokens", "positions", "segment_ids")}
    for i, s in enumerate(seqs):
        batch["tokens"][i, :len(s)] = s
        batch["positions"][i, :len(s)] = np.arange(len(s))
        batch["segment_ids"][i, :len(s)] = 1
    scorer = RewardModelScorer(str(reward_model_dir), Partitioner(make_mesh(fsdp=1, devices=jax.devices()[:1])))
    return float(np.mean(scorer(SimpleNamespace(batch=batch))))
