"""On-policy distillation (GKD, Agarwal et al. 2024), the ``mode='on_policy'`` of :func:`jaxpost.recipes.distill.distill`.

At each step, with probability ``lmbda``, the batch's responses are
replaced by the student's own samples (current params, the KV-cache
sampler); the teacher scores every token of the batch through ``D``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpost import models
from jaxpost.algorithms.distill import make_distill_loss
from jaxpost.data import DataStats, make_lm_pipeline
from jaxpost.data.encode import pad_id
from jaxpost.data.stats import report_data_stats
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.errors import UserError
from jaxpost.generate.rollout import batch_prompts, rollout_sequences
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches, on_mesh
from jaxpost.train.fit import LoopConfig, finish_run, make_evaluator
from jaxpost.train.online import OnlineConfig, OnlineTrainer, check_single_process, rollout_rng


def distill_on_policy(run: Path, part: Partitioner, tok: Any, student: tuple, teacher: tuple, rows: Any,
                      held_out: Any, *, divergence: str, temperature: float, beta: float, top_k: int, lmbda: float,
                      seq_len: int, batch_size: int, max_prompt_len: int | None, sampling: SamplingConfig,
                      chunk_size: int, loop: LoopConfig, card: dict) -> dict:
    """GKD: per step, with probability ``lmbda`` the responses are the student's samples; the teacher scores all.

    ``student`` and ``teacher`` are ``(config, graphdef, params)``; ``card``
    holds :func:`jaxpost.train.fit.finish_run`'s model-card arguments (``method``, ``init_from``,
    ``data``). Returns the summary, also written to ``run/summary.json``.
    """
    check_single_process("on-policy distillation")
    if loop.num_epochs is not None or loop.best_metric is not None:
        raise UserError("on-policy distillation trains for LoopConfig.num_steps rollouts; num_epochs, best_metric, "
                        "export_best and patience are for offline runs: unset them")
    P = max_prompt_len or seq_len // 2
    if not 0 < P < seq_len:
        raise ValueError(f"max_prompt_len={P} must be in (0, seq_len={seq_len}): the rest holds sampled responses")
    config, graphdef, params = student
    t_config, t_graphdef, t_params = teacher
    loss_fn = make_distill_loss(graphdef, config, t_graphdef, t_config, divergence=divergence,
                                temperature=temperature, alpha=1.0, beta=beta, top_k=top_k, chunk_size=chunk_size)
    frozen = {"teacher": t_params}
    frozen_shardings = {"teacher": part.shardings(models.logical_axes(t_config), t_params)}
    online = OnlineConfig(num_rollouts=loop.num_steps, save_every=loop.save_every, keep_checkpoints=loop.keep_checkpoints,
                          seed=loop.seed)
    trainer = OnlineTrainer(run, loss_fn, params, part.shardings(models.logical_axes(config), params), part, online,
                            total_updates=loop.num_steps, frozen=frozen, frozen_shardings=frozen_shardings)
    pad = pad_id(tok)
    stops = sampling.stop_token_ids or tuple(stop_token_ids(tok))
    sampler = Sampler(graphdef, config, sampling.replace(max_new_tokens=seq_len - P, stop_token_ids=stops,
                                                          pad_token_id=pad, group_size=1), part)
    stats = DataStats()
    data = make_lm_pipeline(rows, tok, seq_len, batch_size, loop.seed, packing=False, stats=stats)
    extras = trainer.restore(data) or {"rollout": 0, "on_policy_steps": 0, "prompts_truncated": 0}
    record: dict = {}
    try:
        with part.activate():
            for i in range(extras["rollout"], loop.num_steps):
                start = time.perf_counter()
                host = {k: v for k, v in next(data).items() if isinstance(v, np.ndarray)}
                on_policy = bool(np.random.default_rng([loop.seed, i]).random() < lmbda)  # resume-stable coin
                sample_metrics = {}
                if on_policy:
                    p_tokens, p_mask, truncated = batch_prompts(host, P, pad)
                    out = jax.device_get(sampler(trainer.state.params, p_tokens, p_mask, rollout_rng(loop.seed, i)))
                    host = rollout_sequences(p_tokens, p_mask, out.tokens, out.completion_mask, pad)
                    extras = {**extras, "on_policy_steps": extras["on_policy_steps"] + 1,
                              "prompts_truncated": extras["prompts_truncated"] + truncated}
                    sample_metrics = {"rollout/completion_length": float(out.lengths.mean()),
                                      "rollout/missing_eos_fraction": float((~np.asarray(out.finished)).mean())}
                metrics = trainer.update(on_mesh(host, part), [np.arange(batch_size)])
                extras = {**extras, "rollout": i + 1}
                record = {**metrics, **sample_metrics, "on_policy": float(on_policy),
                          "on_policy_fraction": extras["on_policy_steps"] / (i + 1),
                          "time/step_s": time.perf_counter() - start}
                if (i + 1) % loop.log_every == 0 or i + 1 == loop.num_steps:
                    trainer.log(i + 1, record)
                trainer.save(i + 1, data, extras)
    finally:
        trainer.close()
    summary = {"step": int(trainer.state.step), "mode": "on_policy", **extras,
               **{k: v for k, v in record.items() if not k.startswith("time/")},
               **report_data_stats(stats, "distillation")}
    if held_out is not None:
        evaluate = make_evaluator(
            make_eval_step(loss_fn),
            lambda: MeshBatches(make_lm_pipeline(held_out, tok, seq_len, batch_size, 0, packing=False, num_epochs=1,
                                                 shuffle=False), part), loop.eval_batches, frozen=frozen)
        with part.activate():
            summary.update({f"eval/{k}": v for k, v in evaluate(trainer.state).items()})
    return finish_run(run, config, trainer.state, tok, summary, **card)
