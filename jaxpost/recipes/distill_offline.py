"""Distillation on fixed data, the ``mode='offline'`` and ``mode='sequence'`` of :func:`jaxpost.recipes.distill.distill`.

* ``offline``: LM batches of the dataset; per response token the loss
  ``alpha D(student, teacher) + (1 - alpha) CE``. With ``teacher_cache``
  the teacher's top-k is read from disk (built there first when missing).
* ``sequence``: the teacher samples completions of the prompts once, is
  dropped, and the student is trained with SFT on them (Kim & Rush 2016).
"""

from __future__ import annotations

from typing import Any

from etils import epath

from jaxpost import models
from jaxpost.algorithms import make_sft_eval, make_sft_loss
from jaxpost.algorithms.distill import make_cached_distill_loss, make_distill_loss
from jaxpost.algorithms.teacher_cache import TeacherCache, build_teacher_cache, make_cache_pipeline
from jaxpost.data import DataStats, make_lm_pipeline
from jaxpost.data.stats import report_data_stats
from jaxpost.generate.sampler import SamplingConfig
from jaxpost.generate.teacher_samples import teacher_samples
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step
from jaxpost.train.batches import MeshBatches
from jaxpost.train.fit import LoopConfig, finish_run, fit, make_evaluator


def distill_offline(run: epath.Path, part: Partitioner, tok: Any, student: tuple, teacher: tuple | None, rows: Any,
                    held_out: Any, *, mode: str, divergence: str, temperature: float, alpha: float, beta: float,
                    top_k: int, teacher_cache: str | None, seq_len: int, batch_size: int, packing: bool,
                    sampling: SamplingConfig, teacher_samples_per_prompt: int, teacher_batch_size: int,
                    chunk_size: int, loop: LoopConfig, card: dict) -> dict:
    """Trains ``student`` (``(config, graphdef, params)``) with ``fit``; exports ``run/final``; returns the summary.

    ``teacher`` is ``(config, graphdef, params)``, or None when
    ``teacher_cache`` is already built. ``card`` holds the model-card
    arguments of :func:`jaxpost.train.fit.finish_run`.
    """
    config, graphdef, params = student
    stats = DataStats()
    frozen = frozen_shardings = eval_loss = cache = None
    extra: dict[str, Any] = {}
    if mode == "sequence":
        rows = teacher_samples(run, rows, tok, teacher, sampling, teacher_samples_per_prompt, part, loop.seed,
                               batch_size=teacher_batch_size)
        extra["teacher_samples"] = len(rows)
        teacher = None  # SFT on the samples: the teacher is no longer needed
        loss_fn = make_sft_loss(graphdef, config, chunk_size)
    elif teacher_cache is not None:
        if teacher is not None:  # the cache is not built yet
            with part.activate():
                build_teacher_cache(teacher_cache, rows, tok, teacher, seq_len, top_k, batch_size=batch_size,
                                    partitioner=part, chunk_size=chunk_size)
            teacher = None
        cache = TeacherCache(teacher_cache)
        cache.check_compatible(seq_len, config.vocab_size)
        if cache.top_k != top_k:
            raise ValueError(f"teacher cache {teacher_cache} holds top_k={cache.top_k}, the run asks for top_k={top_k}")
        extra.update({f"cache/{k}": v for k, v in cache.meta["data"].items()})
        loss_fn = make_cached_distill_loss(graphdef, config, temperature=temperature, alpha=alpha,
                                           chunk_size=chunk_size)
        stats = None
    else:
        t_config, t_graphdef, t_params = teacher
        loss_fn = eval_loss = make_distill_loss(graphdef, config, t_graphdef, t_config, divergence=divergence,
                                                temperature=temperature, alpha=alpha, beta=beta, top_k=top_k,
                                                chunk_size=chunk_size)
        frozen = {"teacher": t_params}
        frozen_shardings = {"teacher": part.shardings(models.logical_axes(t_config), t_params)}

    epoch_batches = None  # one epoch of the training stream, for LoopConfig.num_epochs (not with a teacher cache)
    if cache is not None:
        batches = MeshBatches(make_cache_pipeline(cache, batch_size, loop.seed), part)
    else:
        batches = MeshBatches(make_lm_pipeline(rows, tok, seq_len, batch_size, loop.seed, packing=packing,
                                               stats=stats), part)
        epoch_batches = lambda: make_lm_pipeline(rows, tok, seq_len, batch_size, loop.seed, packing=packing,
                                                 num_epochs=1)
    evaluate = None
    if held_out is not None:
        def eval_batches():
            return MeshBatches(make_lm_pipeline(held_out, tok, seq_len, batch_size, 0, packing=packing, num_epochs=1,
                                                shuffle=False), part)
        step = make_eval_step(eval_loss) if eval_loss is not None else make_sft_eval(graphdef, config, chunk_size)
        evaluate = make_evaluator(step, eval_batches, loop.eval_batches, frozen=frozen)

    flops = config.flops_per_token(seq_len) * batch_size * seq_len
    if teacher is not None:  # a teacher forward is a third of a train step of its size
        flops += teacher[0].flops_per_token(seq_len) * batch_size * seq_len / 3
    run_info: dict = {}  # fit's decisions: num_steps from epochs, best state, early stop
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=loss_fn, params=params,
                    param_shardings=part.shardings(models.logical_axes(config), params), partitioner=part,
                    batches=batches, loop=loop, frozen=frozen, frozen_shardings=frozen_shardings, evaluate=evaluate,
                    flops_per_step=flops, data_stats=stats, epoch_batches=epoch_batches, summary=run_info)
        summary = {"step": int(state.step), "mode": mode, **extra, **run_info}
        if stats is not None:
            summary.update(report_data_stats(stats, "distillation"))
    return finish_run(run, config, state, tok, summary, evaluate, **card)
