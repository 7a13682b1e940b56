"""On-policy distillation (GKD, Agarwal et al. 2024), the ``mode='on_policy'`` of :func:`jaxpost.recipes.distill.distill`.

At each step, with probability ``lmbda``, the batch's responses are
replaced by the student's own samples (current params, the KV-cache
sampler); the teacher scores every token of the batch through ``D``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxpost import models
from jaxpost.algorithms.distill import make_distill_loss
from jaxpost.data import DataStats, make_lm_pipeline
from jaxpost.data.encode import pad_id
from jaxpost.data.pipeline import array_entries
from jaxpost.data.stats import report_data_stats
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.distributed import to_host
from jaxpost.errors import UserError
from jaxpost.generate.rollout import batch_prompts, rollout_sequences, sampled_records
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches, on_mesh
from jaxpost.train.fit import LoopConfig, finish_run, make_evaluator
from jaxpost.train.online import OnlineConfig, RolloutBatches, fit_online


class StudentSamples:
    """Per step, with probability ``lmbda`` (a coin keyed by ``(seed, step)``), the batch's responses are replaced
    by the student's own samples of its prompts; ``samples`` holds them for the run's samples log."""

    def __init__(self, sampler: Sampler, partitioner: Partitioner, tokenizer: Any, pad: int, max_prompt_len: int,
                 lmbda: float, seed: int):
        self.sampler, self.partitioner, self.tokenizer = sampler, partitioner, tokenizer
        self.pad, self.P, self.lmbda, self.seed = pad, max_prompt_len, lmbda, seed
        self.counts = {"on_policy_steps": 0, "prompts_truncated": 0}
        self.samples: list[dict] | None = None

    def rollout(self, params, batch, rng, index):
        host = array_entries(batch)
        on_policy = bool(np.random.default_rng([self.seed, index]).random() < self.lmbda)
        metrics = {"on_policy": float(on_policy)}
        self.samples = None  # a step on the data's own responses has no samples to log
        if on_policy:
            p_tokens, p_mask, truncated = batch_prompts(host, self.P, self.pad)
            out = to_host(self.sampler(params, p_tokens, p_mask, rng))
            host = rollout_sequences(p_tokens, p_mask, out.tokens, out.completion_mask, self.pad)
            self.samples = sampled_records(self.tokenizer, p_tokens, p_mask, out)
            self.counts["on_policy_steps"] += 1
            self.counts["prompts_truncated"] += truncated
            metrics.update({"rollout/completion_length": float(out.lengths.mean()),
                            "rollout/missing_eos_fraction": float((~np.asarray(out.finished)).mean())})
        metrics["on_policy_fraction"] = self.counts["on_policy_steps"] / (index + 1)
        return on_mesh(host, self.partitioner), metrics

    def get_state(self) -> dict:
        return dict(self.counts)

    def set_state(self, state) -> None:
        self.counts.update({k: int(v) for k, v in state.items()})


def distill_on_policy(run: Path, part: Partitioner, tok: Any, student: tuple, teacher: tuple, rows: Any,
                      held_out: Any, *, divergence: str, temperature: float, beta: float, top_k: int, lmbda: float,
                      seq_len: int, batch_size: int, max_prompt_len: int | None, sampling: SamplingConfig,
                      chunk_size: int, loop: LoopConfig, card: dict) -> dict:
    """GKD: per step, with probability ``lmbda`` the responses are the student's samples; the teacher scores all.

    ``student`` and ``teacher`` are ``(config, graphdef, params)``; ``card``
    holds :func:`jaxpost.train.fit.finish_run`'s model-card arguments (``method``, ``init_from``,
    ``data``). Returns the summary, also written to ``run/summary.json``.
    """
    if loop.num_epochs is not None or loop.best_metric is not None:
        raise UserError("on-policy distillation trains for LoopConfig.num_steps rollouts; num_epochs, best_metric, "
                        "export_best and patience are for offline runs: unset them")
    P = max_prompt_len or seq_len // 2
    if not 0 < P < seq_len:
        raise UserError(f"distill.max_prompt_len={P} must be in (0, distill.seq_len={seq_len}): the rest of a row "
                        f"holds the sampled responses")
    config, graphdef, params = student
    t_config, t_graphdef, t_params = teacher
    loss_fn = make_distill_loss(graphdef, config, t_graphdef, t_config, divergence=divergence,
                                temperature=temperature, alpha=1.0, beta=beta, top_k=top_k, chunk_size=chunk_size)
    frozen = {"teacher": t_params}
    frozen_shardings = {"teacher": part.shardings(models.logical_axes(t_config), t_params)}
    online = OnlineConfig(num_rollouts=loop.num_steps, save_every=loop.save_every, log_every=loop.log_every,
                          keep_checkpoints=loop.keep_checkpoints, seed=loop.seed, progress=loop.progress)
    pad = pad_id(tok)
    stops = sampling.stop_token_ids or tuple(stop_token_ids(tok))
    sampler = Sampler(graphdef, config, sampling.replace(max_new_tokens=seq_len - P, stop_token_ids=stops,
                                                          pad_token_id=pad, group_size=1), part)
    stats = DataStats()
    data = make_lm_pipeline(rows, tok, seq_len, batch_size, loop.seed, packing=False, stats=stats)
    method = StudentSamples(sampler, part, tok, pad, P, lmbda, loop.seed)
    batches = RolloutBatches(method, data, part, rows=batch_size, seed=loop.seed)
    summary: dict = {}
    with part.activate():
        state = fit_online(run_dir=run, loss_fn=loss_fn, params=params,
                           param_shardings=part.shardings(models.logical_axes(config), params), partitioner=part,
                           batches=batches, online=online, frozen=frozen, frozen_shardings=frozen_shardings,
                           model_config=config, summary=summary)
    summary = {"step": int(state.step), "mode": "on_policy", **method.counts, **summary,
               **report_data_stats(stats, "distillation")}
    evaluate = None
    if held_out is not None:
        evaluate = make_evaluator(
            make_eval_step(loss_fn),
            lambda: MeshBatches(make_lm_pipeline(held_out, tok, seq_len, batch_size, 0, packing=False, num_epochs=1,
                                                 shuffle=False), part), loop.eval_batches, frozen=frozen)
    with part.activate():
        return finish_run(run, config, state, tok, summary, evaluate, **card)
