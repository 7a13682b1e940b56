"""Synthetic data: sample N completions per prompt, score, filter, and write training sets.

    jaxpost train --gin_file=configs/algorithms/synthetic.gin --gin.synthesize.model_dir=runs/sft/final ...
    jaxpost synthesize --model runs/sft/final --prompts p.jsonl --out data/ --n 8 --reward exact_match
    jaxpost train --gin_file=configs/algorithms/synthetic.gin --gin.synthesize.environment=@CalculatorEnv() ...

Per prompt (a JSON-lines ``prompt`` string or conversation, other fields kept
for the reward functions): ``n_samples`` completions from the KV-cache
sampler, each scored by reward functions or a reward model
(:mod:`jaxpost.generate.scorers`), or ``n_samples`` multi-turn episodes
scored by an ``environment``; then filtered and written as described in
:mod:`jaxpost.generate.synthesis` (``samples.jsonl``, ``sft.jsonl``,
``preference.jsonl``, ``stats.json``; every drop counted, never silent).
The outputs are replaced only when the whole run succeeds.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import gin
import jax
import numpy as np

from jaxpost import paths
from jaxpost.config import build, check_values
from jaxpost.data import check_run_inputs, make_prompt_pipeline
from jaxpost.data.encode import pad_id
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.errors import UserError
from jaxpost.generate.environments import Environment
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.generate.synthesis import (SynthesisStats, check_options, episode_roller, make_synthesis_scorer,
                                        output_files, sample_and_score, sample_episodes, write_prompt_samples)
from jaxpost.models.hf import load_hf
from jaxpost.sharding import Partitioner


@gin.configurable
def synthesize(model_dir: str = gin.REQUIRED, tokenizer: str | None = None, prompts: str = gin.REQUIRED,
               out_dir: str = gin.REQUIRED, n_samples: int = 8, sampling: SamplingConfig | None = None,
               scorer: Any = None, mode: str = "best_of_n", min_score: float | None = None,
               min_chars: int = 1, max_chars: int | None = None, dedup: bool = True, require_finished: bool = False,
               batch_size: int = 8, max_prompt_len: int = 256, seed: int = 0,
               environment: Environment | None = None) -> dict:
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
    ``environment`` (e.g. ``@CalculatorEnv()``), instead of ``scorer``: each sample is a multi-turn episode
    (budgets: gin's ``MultiTurnConfig``; ``sampling.max_new_tokens`` per model turn), scored by the
    environment's rewards; the rows are its conversations. Exactly one of ``scorer`` and ``environment``.
    """
    check_values("synthesize", locals())  # for callers that bypass gin; `jaxpost train` ran them
    sampling = build(SamplingConfig, sampling)  # at call time: a default built at import ignores gin
    check_options(mode, n_samples, scorer, environment, min_chars, max_chars)
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
    pad = pad_id(tok)
    sampling = sampling.replace(group_size=n_samples, pad_token_id=pad,
                                stop_token_ids=sampling.stop_token_ids or tuple(stop_token_ids(tok)))
    if environment is None:
        score = make_synthesis_scorer(scorer, part, config.vocab_size)
        sampler = Sampler(graphdef, config, sampling, part)
    else:
        roller = episode_roller(graphdef, config, tok, part, environment, sampling)
    it = make_prompt_pipeline(prompt_rows, tok, max_prompt_len, batch_size, seed, num_epochs=1, shuffle=False)
    stats = SynthesisStats()
    all_scores, best_scores = [], []
    key = jax.random.PRNGKey(seed)
    # Each output is a temporary file until every block below exits cleanly; any error discards them all.
    with contextlib.ExitStack() as stack:
        files = {k: stack.enter_context(paths.atomic_open(out / name)) for k, name in output_files(mode).items()}
        with part.activate():
            for k, batch in enumerate(it):
                kk = jax.random.fold_in(key, k)
                s = (sample_and_score(sampler, params, batch, score, tok, part, kk, pad) if environment is None
                     else sample_episodes(roller, params, batch, kk))
                for j in range(len(s.completions) // n_samples):
                    sl = slice(j * n_samples, (j + 1) * n_samples)
                    write_prompt_samples(files, stats, s.rows[sl.start], s.prompts[sl.start], s.completions[sl],
                                         s.scores[sl], s.finished[sl], min_score=min_score, min_chars=min_chars,
                                         max_chars=max_chars, dedup=dedup, require_finished=require_finished,
                                         all_scores=all_scores, best_scores=best_scores,
                                         sample_prompts=s.prompts[sl], errors=s.errors[sl])
    stats.mean_score_all = float(np.mean(all_scores)) if all_scores else 0.0
    stats.mean_score_best = float(np.mean(best_scores)) if best_scores else 0.0
    result = stats.as_dict()
    paths.atomic_write_text(out / "stats.json", json.dumps(result, indent=2))
    dropped = {k: result[k] for k in ("env_error", "unfinished", "too_short", "too_long", "duplicate",
                                      "sft_below_min_score", "pairs_skipped_single", "pairs_skipped_tie",
                                      "prompts_without_samples") if result[k]}
    print(f"[jaxpost] synthesize: {stats.prompts} prompts x {n_samples} samples -> {stats.kept} kept, "
          f"{stats.sft_rows} SFT rows, {stats.pairs} pairs; dropped {dropped or 'nothing'}", flush=True)
    return result
