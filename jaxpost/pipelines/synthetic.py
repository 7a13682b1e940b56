"""Synthetic data: sample N completions per prompt, score, filter, and write training sets.

    jaxpost train --gin_file=configs/algorithms/synthetic.gin --gin.synthesize.model_dir=runs/sft/final ...
    python -m jaxpost.pipelines.synthetic --model runs/sft/final --prompts p.jsonl --out data/ --n 8 --reward exact_match

Per prompt (a JSON-lines ``prompt`` string or conversation, other fields kept
for the reward functions): ``n_samples`` completions from the KV-cache
sampler, each scored by reward functions or a reward model
(:mod:`jaxpost.pipelines.scorers`), then filtered in this order, every
drop counted in ``stats.json`` and the return value (never silent):

1. ``unfinished`` (only with ``require_finished``): no stop token before ``max_new_tokens``;
2. ``too_short`` / ``too_long``: fewer than ``min_chars`` / more than ``max_chars`` characters;
3. ``duplicate``: the same completion as an earlier sample of the prompt after
   normalisation (``dedup``: lowercase, whitespace collapsed, stripped).

Outputs in ``out_dir`` (``mode`` picks the training sets):

* ``samples.jsonl`` (always): every sample with ``score``, ``kept`` and ``drop_reason``.
* ``sft.jsonl`` (``best_of_n``, ``all``): the best surviving completion of each
  prompt whose score is ``>= min_score`` -- ``messages`` for conversational
  prompts, else ``prompt``/``completion`` -- plus ``score``.
* ``preference.jsonl`` (``pairs``, ``all``): best vs worst surviving completion
  (``prompt``/``chosen``/``rejected``, ``chosen_score``, ``rejected_score``,
  ``margin = chosen_score - rejected_score``); prompts with fewer than two
  survivors or equal best and worst scores are skipped and counted.
  ``min_score`` does not apply to pairs (the rejected side is meant to be bad).
* ``stats.json``: the counts of :class:`SynthesisStats`.

Each file is written atomically (:func:`jaxpost.paths.atomic_open`) and
replaced only when the whole run succeeds, so a failed or interrupted run
leaves the previous outputs as they were. ``out_dir`` may be relative or a
``gs://`` URL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np

from jaxpost import paths
from jaxpost.config import build, is_object_spec
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.data.encode import pad_id
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.errors import UserError
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.models.hf import load_hf
from jaxpost.pipelines.common import on_mesh
from jaxpost.pipelines.rollout import Rollout, decode_completions, rollout_sequences
from jaxpost.pipelines.scorers import FunctionScorer, RewardModelScorer
from jaxpost.sharding import Partitioner

MODES = ("best_of_n", "pairs", "all")


def output_files(mode: str) -> dict[str, str]:
    """Output files of ``mode`` in ``out_dir`` (``stats.json`` besides): ``{"samples": "samples.jsonl", ...}``."""
    files = {"samples": "samples.jsonl"}
    if mode in ("best_of_n", "all"):
        files["sft"] = "sft.jsonl"
    if mode in ("pairs", "all"):
        files["preference"] = "preference.jsonl"
    return files


def normalise(text: str) -> str:
    """Text key for de-duplication: lowercase, runs of whitespace -> one space, stripped."""
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclasses.dataclass
class SynthesisStats:
    """What synthesis produced and dropped; ``as_dict`` goes to ``stats.json`` and the return value."""

    prompts: int = 0
    samples: int = 0
    unfinished: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0
    kept: int = 0
    prompts_without_samples: int = 0
    sft_rows: int = 0
    sft_below_min_score: int = 0
    pairs: int = 0
    pairs_skipped_single: int = 0
    pairs_skipped_tie: int = 0
    mean_score_all: float = 0.0
    mean_score_best: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def filter_samples(completions: Sequence[str], finished: Sequence[bool], *, min_chars: int = 0,
                   max_chars: int | None = None, dedup: bool = True, require_finished: bool = False
                   ) -> list[str | None]:
    """Drop reason per completion of ONE prompt (None = kept), in the order of the module docstring."""
    seen: set[str] = set()
    reasons: list[str | None] = []
    for text, done in zip(completions, finished):
        key = normalise(text)
        if require_finished and not done:
            reasons.append("unfinished")
        elif len(text) < min_chars:
            reasons.append("too_short")
        elif max_chars is not None and len(text) > max_chars:
            reasons.append("too_long")
        elif dedup and key in seen:
            reasons.append("duplicate")
        else:
            reasons.append(None)
        if reasons[-1] is None:
            seen.add(key)
    return reasons


def _assistant(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if not isinstance(prompt, str) else text


def _make_scorer(scorer: Any, partitioner: Partitioner, vocab_size: int) -> Callable:
    if is_object_spec(scorer) and not os.path.isdir(scorer):  # 'my_rewards:exact': a plug-in reward function
        return FunctionScorer(scorer)
    if isinstance(scorer, (str, os.PathLike)):
        return RewardModelScorer(str(scorer), partitioner, policy_vocab_size=vocab_size)
    if callable(scorer) or isinstance(scorer, (list, tuple)):
        return FunctionScorer(scorer)
    raise TypeError(f"scorer must be a reward function (or a list of them) or a reward model directory, "
                    f"got {type(scorer).__name__}")


@gin.configurable
def synthesize(model_dir: str = gin.REQUIRED, tokenizer: str | None = None, prompts: str = gin.REQUIRED,
               out_dir: str = gin.REQUIRED, n_samples: int = 8, sampling: SamplingConfig | None = None,
               scorer: Any = gin.REQUIRED, mode: str = "best_of_n", min_score: float | None = None,
               min_chars: int = 1, max_chars: int | None = None, dedup: bool = True, require_finished: bool = False,
               batch_size: int = 8, max_prompt_len: int = 256, seed: int = 0) -> dict:
    """Samples, scores, filters and writes the datasets of the module docstring; returns the stats.

    ``model_dir``: the policy (HF directory); ``tokenizer`` defaults to it.
    ``scorer``: a reward function ``fn(prompts, completions, **row_fields)``
    (or a list, summed), a ``'module:function'`` plug-in spec, or a reward-model directory. ``sampling`` sets
    temperature/top-k/top-p/``max_new_tokens`` (stop ids default to the
    tokenizer's). Batch ``k`` samples with ``fold_in(PRNGKey(seed), k)``.
    Raises :class:`UserError` before loading anything for a bad ``mode``,
    ``n_samples`` or ``max_chars``, and for a ``prompts`` file that is one of
    the outputs this run would overwrite. The outputs are replaced only when
    the run succeeds (see the module docstring). ``sampling`` defaults to ``SamplingConfig()`` built at
    call time, so gin's ``SamplingConfig.*`` bindings apply.
    """
    sampling = build(SamplingConfig, sampling)  # at call time: a default built at import ignores gin
    if mode not in MODES:
        raise UserError(f"unknown synthesis mode {mode!r}; choose one of {MODES}")
    if n_samples < 1 or (mode != "best_of_n" and n_samples < 2):
        raise UserError(f"n_samples={n_samples}: best_of_n needs >= 1, pairs/all need >= 2 samples per prompt")
    if max_chars is not None and max_chars < min_chars:
        raise UserError(f"max_chars={max_chars} < min_chars={min_chars}; raise max_chars or lower min_chars")
    out = paths.resolve(out_dir)
    for name in (*output_files(mode).values(), "stats.json"):
        if paths.same_file(prompts, out / name):
            raise UserError(f"prompts {prompts} is the output {name} in {out_dir}, which this run overwrites; "
                            f"move the prompts elsewhere or pass another output directory")
    if jax.process_count() > 1:
        raise RuntimeError("synthesize runs in one process")
    tok, prompt_rows = check_run_inputs("synthesize", train_data=prompts, kind="prompt", tokenizer=tokenizer,
                                        init_from=model_dir, init_key="model_dir", data_key="prompts")
    part = Partitioner()
    config, graphdef, params = load_hf(model_dir, partitioner=part)
    if len(tok) > config.vocab_size:
        raise UserError(f"tokenizer has {len(tok)} tokens but {model_dir} has vocab_size {config.vocab_size}; pass "
                        "the tokenizer the model was trained with")
    score = _make_scorer(scorer, part, config.vocab_size)
    pad = pad_id(tok)
    sampling = sampling.replace(group_size=n_samples, pad_token_id=pad,
                                stop_token_ids=sampling.stop_token_ids or tuple(stop_token_ids(tok)))
    sampler = Sampler(graphdef, config, sampling, part)
    it = make_prompt_pipeline(prompt_rows, tok, max_prompt_len, batch_size, seed, num_epochs=1, shuffle=False,
                              shard_index=0, shard_count=1)
    stats = SynthesisStats()
    all_scores, best_scores = [], []
    key = jax.random.PRNGKey(seed)
    # Each output is a temporary file until every block below exits cleanly; any error discards them all.
    with contextlib.ExitStack() as stack:
        files = {k: stack.enter_context(paths.atomic_open(out / name)) for k, name in output_files(mode).items()}
        with part.activate():
            for k, batch in enumerate(it):
                real = np.asarray(batch["prompt_mask"]).any(-1)
                ptok, pmask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
                # The last batch's padding rows repeat a real prompt (the sampler needs a token) and are cut below.
                ptok, pmask = np.where(real[:, None], ptok, ptok[0]), np.where(real[:, None], pmask, pmask[0])
                res = jax.device_get(sampler(params, ptok, pmask, jax.random.fold_in(key, k)))
                G = n_samples
                keep = np.repeat(real, G)
                host = rollout_sequences(np.repeat(ptok, G, 0)[keep], np.repeat(pmask, G, 0)[keep],
                                         res.tokens[keep], res.completion_mask[keep], pad)
                r = Rollout(batch=on_mesh(host, part) if isinstance(score, RewardModelScorer) else host, host=host,
                            completions=decode_completions(tok, res.tokens[keep], res.completion_mask[keep]),
                            prompts=[p for p, ok in zip(batch["prompt"], real) if ok for _ in range(G)],
                            rows=[row for row, ok in zip(batch["row"], real) if ok for _ in range(G)],
                            finished=np.asarray(res.finished, bool)[keep])
                scores = np.asarray(score(r), np.float64)
                if scores.shape != (len(r.completions),):
                    raise ValueError(f"scorer returned shape {scores.shape}, expected ({len(r.completions)},)")
                for j in range(len(r.completions) // G):
                    sl = slice(j * G, (j + 1) * G)
                    _write_prompt(files, stats, r.rows[j * G], r.prompts[j * G], r.completions[sl], scores[sl],
                                  r.finished[sl], min_score=min_score, min_chars=min_chars, max_chars=max_chars,
                                  dedup=dedup, require_finished=require_finished, all_scores=all_scores,
                                  best_scores=best_scores)
    stats.mean_score_all = float(np.mean(all_scores)) if all_scores else 0.0
    stats.mean_score_best = float(np.mean(best_scores)) if best_scores else 0.0
    result = stats.as_dict()
    paths.atomic_write_text(out / "stats.json", json.dumps(result, indent=2))
    dropped = {k: result[k] for k in ("unfinished", "too_short", "too_long", "duplicate", "sft_below_min_score",
                                      "pairs_skipped_single", "pairs_skipped_tie", "prompts_without_samples")
               if result[k]}
    print(f"[jaxpost] synthesize: {stats.prompts} prompts x {n_samples} samples -> {stats.kept} kept, "
          f"{stats.sft_rows} SFT rows, {stats.pairs} pairs; dropped {dropped or 'nothing'}", flush=True)
    return result


def _write_prompt(files: dict, stats: SynthesisStats, row: dict, prompt: Any, completions: Sequence[str],
                  scores: np.ndarray, finished: np.ndarray, *, min_score, min_chars, max_chars, dedup,
                  require_finished, all_scores: list, best_scores: list) -> None:
    """Filters one prompt's samples, writes its sample/SFT/preference rows and counts everything."""
    stats.prompts += 1
    stats.samples += len(completions)
    all_scores.extend(float(s) for s in scores)
    reasons = filter_samples(completions, finished, min_chars=min_chars, max_chars=max_chars, dedup=dedup,
                             require_finished=require_finished)
    extra = {k: v for k, v in (row or {}).items() if k not in ("prompt", "completion", "score", "kept")}
    for i, (text, s, why) in enumerate(zip(completions, scores, reasons)):
        if why is not None:
            setattr(stats, why, getattr(stats, why) + 1)
        files["samples"].write(json.dumps({**extra, "prompt": prompt, "completion": text, "sample_index": i,
                                           "score": float(s), "finished": bool(finished[i]), "kept": why is None,
                                           "drop_reason": why}, ensure_ascii=False) + "\n")
    alive = [i for i, why in enumerate(reasons) if why is None]
    stats.kept += len(alive)
    if not alive:
        stats.prompts_without_samples += 1
        return
    # Ties go to the earliest sample: deterministic for a given seed.
    best = max(alive, key=lambda i: (scores[i], -i))
    worst = min(alive, key=lambda i: (scores[i], i))
    best_scores.append(float(scores[best]))
    if "sft" in files:
        if min_score is not None and scores[best] < min_score:
            stats.sft_below_min_score += 1
        else:
            if isinstance(prompt, str):
                rec = {"prompt": prompt, "completion": completions[best]}
            else:
                rec = {"messages": list(prompt) + [{"role": "assistant", "content": completions[best]}]}
            files["sft"].write(json.dumps({**rec, "score": float(scores[best])}, ensure_ascii=False) + "\n")
            stats.sft_rows += 1
    if "preference" in files:
        if len(alive) < 2:
            stats.pairs_skipped_single += 1
        elif scores[best] == scores[worst]:
            stats.pairs_skipped_tie += 1
        else:
            files["preference"].write(json.dumps({
                "prompt": prompt, "chosen": _assistant(prompt, completions[best]),
                "rejected": _assistant(prompt, completions[worst]), "chosen_score": float(scores[best]),
                "rejected_score": float(scores[worst]), "margin": float(scores[best] - scores[worst])},
                ensure_ascii=False) + "\n")
            stats.pairs += 1


def synthesize_main(argv: Sequence[str] | None = None) -> int:
    """``jaxpost generate``-style command line for :func:`synthesize` (argparse flags, see ``--help``)."""
    p = argparse.ArgumentParser(prog="jaxpost synthesize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="policy: Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="JSON-lines file with a 'prompt' per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--mode", choices=MODES, default="best_of_n")
    p.add_argument("--reward", default=None, help="comma-separated registered reward names (jaxpost.generate.REWARDS)")
    p.add_argument("--reward_weights", default=None, help="comma-separated weights for --reward")
    p.add_argument("--reward_model", default=None, help="reward model directory (instead of --reward)")
    p.add_argument("--min_score", type=float, default=None)
    p.add_argument("--min_chars", type=int, default=1)
    p.add_argument("--max_chars", type=int, default=None)
    p.add_argument("--no_dedup", action="store_true")
    p.add_argument("--require_finished", action="store_true")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_prompt_len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.reward is None) == (a.reward_model is None):
        p.error("give exactly one of --reward (names) and --reward_model (a directory)")
    if a.reward is not None:
        from jaxpost.generate.rewards import make_reward
        weights = [float(w) for w in a.reward_weights.split(",")] if a.reward_weights else None
        scorer: Any = make_reward(a.reward.split(","), weights)
    else:
        scorer = a.reward_model
    synthesize(model_dir=a.model, tokenizer=a.tokenizer, prompts=a.prompts, out_dir=a.out, n_samples=a.n,
               sampling=SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                       top_p=a.top_p),
               scorer=scorer, mode=a.mode, min_score=a.min_score, min_chars=a.min_chars, max_chars=a.max_chars,
               dedup=not a.no_dedup, require_finished=a.require_finished, batch_size=a.batch_size,
               max_prompt_len=a.max_prompt_len, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(synthesize_main())
