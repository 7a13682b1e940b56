"""Synthetic data from scored samples: filter each prompt's completions, pick best and worst, write training sets.

The library half of :func:`jaxpost.recipes.synthetic.synthesize`, which
samples and scores; this module decides what is kept and writes it.

Per prompt (a JSON-lines ``prompt`` string or conversation, other fields kept
for the reward functions): ``n_samples`` completions from the KV-cache
sampler, each scored by reward functions or a reward model
(:mod:`jaxpost.generate.scorers`) -- or, with an environment
(:func:`sample_episodes`), ``n_samples`` multi-turn episodes scored by the
environment's rewards, each completion being the messages after the
episode's first observation (the model's turns, tool results, user turns)
-- then filtered in this order, every drop counted in ``stats.json`` and
the return value (never silent):

0. ``env_error`` (environment episodes): the environment failed during the episode;
1. ``unfinished`` (only with ``require_finished``): no stop token before ``max_new_tokens``;
2. ``too_short`` / ``too_long``: fewer than ``min_chars`` / more than ``max_chars`` characters
   (of an episode: of the model's turns joined by newlines);
3. ``duplicate``: the same completion as an earlier sample of the prompt after
   normalisation (``dedup``: lowercase, whitespace collapsed, stripped; of an
   episode: of the model's turns).

Outputs in ``out_dir`` (``mode`` picks the training sets):

* ``samples.jsonl`` (always): every sample with ``score``, ``kept`` and ``drop_reason``.
* ``sft.jsonl`` (``best_of_n``, ``all``): the best surviving completion of each
  prompt whose score is ``>= min_score`` -- ``messages`` for conversational
  prompts (an episode: its whole conversation, so SFT trains every model turn
  and none of the tool/user turns), else ``prompt``/``completion`` -- plus ``score``.
* ``preference.jsonl`` (``pairs``, ``all``): best vs worst surviving completion
  (``prompt``/``chosen``/``rejected``, ``chosen_score``, ``rejected_score``,
  ``margin = chosen_score - rejected_score``); prompts with fewer than two
  survivors or equal best and worst scores are skipped and counted.
  ``min_score`` does not apply to pairs (the rejected side is meant to be bad).
  For episodes, ``prompt`` is the first observation and ``chosen``/``rejected``
  the messages after it; the rejected side is the worst survivor whose first
  observation equals the best's (an environment may randomise ``reset``).
* ``stats.json``: the counts of :class:`SynthesisStats`.

Each file is written atomically (:func:`jaxpost.paths.atomic_open`) and
replaced only when the whole run succeeds (the recipe opens them), so a failed or interrupted run
leaves the previous outputs as they were. ``out_dir`` may be relative or a
``gs://`` URL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxpost.config import build, is_object_spec
from jaxpost.errors import UserError
from jaxpost.generate.environments import Environment
from jaxpost.generate.multiturn import MultiTurnConfig, MultiTurnRoller, check_environment
from jaxpost.generate.rollout import Rollout, RolloutConfig, decode_completions, rollout_sequences
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.generate.scorers import FunctionScorer, RewardModelScorer
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh

__all__ = ["MODES", "Samples", "SynthesisStats", "check_options", "episode_roller", "filter_samples",
           "make_synthesis_scorer", "model_text", "normalise", "output_files", "sample_and_score", "sample_episodes",
           "write_prompt_samples"]

MODES = ("best_of_n", "pairs", "all")


def check_options(mode: str, n_samples: int, scorer: Any, environment: Any, min_chars: int,
                  max_chars: int | None) -> None:
    """``synthesize``'s options, checked before anything loads; raises :class:`UserError` naming the option."""
    if mode not in MODES:
        raise UserError(f"unknown synthesis mode {mode!r}; choose one of {MODES}")
    if n_samples < 1 or (mode != "best_of_n" and n_samples < 2):
        raise UserError(f"n_samples={n_samples}: best_of_n needs >= 1, pairs/all need >= 2 samples per prompt")
    if (scorer is None) == (environment is None):
        raise UserError("synthesize needs exactly one of synthesize.scorer (reward functions or a reward model) "
                        f"and synthesize.environment (multi-turn episodes scored by it); got "
                        f"{'neither' if scorer is None else 'both'}")
    check_environment(environment, "synthesize")
    if max_chars is not None and max_chars < min_chars:
        raise UserError(f"max_chars={max_chars} < min_chars={min_chars}; raise max_chars or lower min_chars")


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
    env_error: int = 0
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


def model_text(completion: str | Sequence[dict]) -> str:
    """The text a completion's model wrote: the text itself, or an episode's assistant turns joined by newlines."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in completion if m.get("role") == "assistant")


def filter_samples(completions: Sequence[str | list], finished: Sequence[bool], *, min_chars: int = 0,
                   max_chars: int | None = None, dedup: bool = True, require_finished: bool = False,
                   errors: Sequence[str | None] | None = None) -> list[str | None]:
    """Drop reason per completion of ONE prompt (None = kept), in the order of the module docstring.

    A completion is a string or an episode's messages (:func:`model_text` is filtered); ``errors``: each
    episode's environment error (None: none).
    """
    seen: set[str] = set()
    reasons: list[str | None] = []
    errors = errors if errors is not None else [None] * len(completions)
    for completion, done, error in zip(completions, finished, errors):
        text = model_text(completion)
        key = normalise(text)
        if error is not None:
            reasons.append("env_error")
        elif require_finished and not done:
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


def _assistant(prompt: Any, completion: str | list) -> Any:
    """``completion`` as the answer to ``prompt``: messages for a conversation, else the text itself."""
    if isinstance(completion, list):  # an episode's messages already
        return completion
    return [{"role": "assistant", "content": completion}] if not isinstance(prompt, str) else completion


def make_synthesis_scorer(scorer: Any, partitioner: Partitioner, vocab_size: int) -> Callable:
    """``score(rollout) -> [N]`` from ``synthesize``'s ``scorer`` argument.

    A ``'module:function'`` spec (not a directory) or a reward function (or a
    list of them) gives a :class:`FunctionScorer`; a path gives a
    :class:`RewardModelScorer` of that reward-model directory, checked
    against the policy's ``vocab_size``. Anything else raises ``TypeError``.
    """
    if is_object_spec(scorer) and not os.path.isdir(scorer):  # 'my_rewards:exact': a plug-in reward function
        return FunctionScorer(scorer)
    if isinstance(scorer, (str, os.PathLike)):
        return RewardModelScorer(str(scorer), partitioner, policy_vocab_size=vocab_size, key="synthesize.scorer")
    if callable(scorer) or isinstance(scorer, (list, tuple)):
        return FunctionScorer(scorer)
    raise TypeError(f"scorer must be a reward function (or a list of them) or a reward model directory, "
                    f"got {type(scorer).__name__}")


@dataclasses.dataclass
class Samples:
    """One prompt batch's samples, each prompt's ``n_samples`` adjacent (real prompts only).

    Per sample: ``rows`` (the dataset row), ``prompts`` (the prompt; of an
    episode, its first observation's messages), ``completions`` (text; of an
    episode, the messages after the first observation), ``finished`` (ended
    by a stop token / by the environment), ``scores`` (float64) and
    ``errors`` (an episode's environment error, else None).
    """

    rows: list[Any]
    prompts: list[Any]
    completions: list[Any]
    finished: np.ndarray
    scores: np.ndarray
    errors: list[str | None]


def _real(batch: dict) -> np.ndarray:
    """``[B]`` bool: rows of a prompt batch that hold a prompt (a last batch is padded)."""
    return np.asarray(batch["prompt_mask"]).any(-1)


def sample_and_score(sampler: Sampler, params: Any, batch: dict, score: Callable, tok: Any, part: Partitioner,
                     key: jax.Array, pad: int) -> Samples:
    """Samples ``sampler.sampling.group_size`` completions of each real prompt of a prompt batch and scores them.

    Padding rows of a last batch repeat a real prompt (the sampler needs a
    token) and are cut. Raises ``ValueError`` when the scorer returns
    another shape than ``[N]``.
    """
    real = _real(batch)
    ptok, pmask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
    ptok, pmask = np.where(real[:, None], ptok, ptok[0]), np.where(real[:, None], pmask, pmask[0])
    res = jax.device_get(sampler(params, ptok, pmask, key))
    G = sampler.sampling.group_size
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
    return Samples(r.rows, r.prompts, r.completions, r.finished, scores, [None] * len(r.completions))


def episode_roller(graphdef, config: ModelConfig, tokenizer: Any, partitioner: Partitioner,
                   environment: Environment, sampling: SamplingConfig) -> MultiTurnRoller:
    """The :class:`MultiTurnRoller` of ``synthesize``: ``sampling.group_size`` episodes per prompt.

    Each model turn is sampled as ``sampling`` says (``max_new_tokens`` per
    turn, temperature, top-k/p, min-p, repetition penalty, stop ids); the
    episode budgets come from gin's ``MultiTurnConfig``.
    """
    rollout = RolloutConfig(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                            repetition_penalty=sampling.repetition_penalty, group_size=sampling.group_size,
                            stop_token_ids=sampling.stop_token_ids)
    return MultiTurnRoller(graphdef, config, tokenizer, partitioner, environment, rollout, build(MultiTurnConfig))


def sample_episodes(roller: MultiTurnRoller, params: Any, batch: dict, key: jax.Array) -> Samples:
    """``roller.cfg.group_size`` environment episodes of each real prompt of a prompt batch, as :class:`Samples`.

    Scores are the episodes' summed rewards (0 for one that hit an
    environment error), ``finished`` is "ended by the environment, not a
    budget". One process only: the conversations are this process's.
    """
    real = _real(batch)
    ep = roller.episodes(params, {"row": [r for r, ok in zip(batch["row"], real) if ok],
                                  "prompt": [p for p, ok in zip(batch["prompt"], real) if ok],
                                  "prompt_mask": np.asarray(batch["prompt_mask"])[real]}, key)
    firsts = [c[:n] for c, n in zip(ep.conversations, ep.first_messages)]
    rest = [c[n:] for c, n in zip(ep.conversations, ep.first_messages)]
    return Samples(ep.rows, firsts, rest, ep.finished, ep.score.astype(np.float64), ep.error_text)


def write_prompt_samples(files: dict, stats: SynthesisStats, row: dict, prompt: Any, completions: Sequence[Any],
                         scores: np.ndarray, finished: np.ndarray, *, min_score, min_chars, max_chars, dedup,
                         require_finished, all_scores: list, best_scores: list,
                         sample_prompts: Sequence[Any] | None = None,
                         errors: Sequence[str | None] | None = None) -> None:
    """Filters one prompt's samples, writes its sample/SFT/preference rows to ``files`` and counts everything.

    ``files`` maps the keys of :func:`output_files` to open text files;
    ``stats`` and the lists ``all_scores`` (every sample) and ``best_scores``
    (the best survivor per prompt) are updated in place. A completion is a
    string or (an episode) a list of messages; ``sample_prompts`` gives each
    sample's own prompt (an episode's first observation; default
    ``prompt`` for all), ``errors`` each episode's environment error (a
    ``samples.jsonl`` row carries it as ``error``).
    """
    prompts = list(sample_prompts) if sample_prompts is not None else [prompt] * len(completions)
    stats.prompts += 1
    stats.samples += len(completions)
    all_scores.extend(float(s) for s in scores)
    reasons = filter_samples(completions, finished, min_chars=min_chars, max_chars=max_chars, dedup=dedup,
                             require_finished=require_finished, errors=errors)
    extra = {k: v for k, v in (row or {}).items() if k not in ("prompt", "completion", "score", "kept")}
    for i, (completion, s, why) in enumerate(zip(completions, scores, reasons)):
        if why is not None:
            setattr(stats, why, getattr(stats, why) + 1)
        error = {"error": errors[i]} if errors is not None and errors[i] is not None else {}
        files["samples"].write(json.dumps({**extra, "prompt": prompts[i], "completion": completion, "sample_index": i,
                                           "score": float(s), "finished": bool(finished[i]), "kept": why is None,
                                           "drop_reason": why, **error}, ensure_ascii=False) + "\n")
    alive = [i for i, why in enumerate(reasons) if why is None]
    stats.kept += len(alive)
    if not alive:
        stats.prompts_without_samples += 1
        return
    # Ties go to the earliest sample: deterministic for a given seed.
    best = max(alive, key=lambda i: (scores[i], -i))
    prompt = prompts[best]
    # A pair shares its prompt: the rejected side comes from the samples with the best's prompt.
    worst = min((i for i in alive if prompts[i] == prompt), key=lambda i: (scores[i], i))
    alive_same = sum(prompts[i] == prompt for i in alive)
    best_scores.append(float(scores[best]))
    if "sft" in files:
        if min_score is not None and scores[best] < min_score:
            stats.sft_below_min_score += 1
        else:
            if isinstance(prompt, str):
                rec = {"prompt": prompt, "completion": completions[best]}
            else:
                rec = {"messages": list(prompt) + _assistant(prompt, completions[best])}
            files["sft"].write(json.dumps({**rec, "score": float(scores[best])}, ensure_ascii=False) + "\n")
            stats.sft_rows += 1
    if "preference" in files:
        if alive_same < 2:
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
