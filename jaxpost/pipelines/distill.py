"""Knowledge distillation, start to finish: a frozen teacher, a smaller trainable student.

    jaxpost train --gin_file=configs/algorithms/distill.gin --gin_file=my_experiment.gin

Modes (``mode``):

* ``offline``: LM batches of the dataset; per response token the loss
  ``alpha D(student, teacher) + (1 - alpha) CE`` (:func:`make_distill_loss`).
  With ``teacher_cache`` (a directory) the teacher's top-k is read from
  disk (built there first from ``teacher_from`` when missing) and the
  teacher never sits in memory during training.
* ``sequence``: sequence-level KD (Kim & Rush 2016): the teacher samples
  completions of the dataset's prompts once (``run_dir/teacher_samples.jsonl``),
  is dropped, and the student is trained with SFT on them.
* ``on_policy``: GKD (Agarwal et al. 2024): at each step, with probability
  ``lmbda``, the batch's responses are replaced by the student's own samples
  (current params, the KV-cache sampler); the teacher scores every token
  of the batch through ``D``.

Student and teacher share the tokenizer and vocabulary (checked, with both
sizes named) and may differ in depth and width; the teacher's params are
``frozen`` with their own shardings from its own logical axes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from etils import epath

from jaxpost import models, paths
from jaxpost.algorithms import make_sft_eval, make_sft_loss
from jaxpost.algorithms.distill import check_same_vocab, make_cached_distill_loss, make_distill_loss
from jaxpost.config import build, build_if_bound
from jaxpost.data import DataStats, check_run_inputs, make_lm_pipeline, train_eval_split
from jaxpost.data.encode import pad_id
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.errors import UserError
from jaxpost.generate import SamplingConfig, generate_to_jsonl
from jaxpost.hub import resolve_model_dir
from jaxpost.generate.sampler import Sampler, left_pad
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import hf_config_to_model_config
from jaxpost.pipelines.common import (finish_run, LoopConfig, MeshBatches, export, fit, load_model, make_evaluator, on_mesh,
                                      prepare_run_dir, report_data_stats, write_operative_config, write_summary)
from jaxpost.pipelines.online import OnlineConfig, OnlineTrainer, check_single_process, rollout_rng
from jaxpost.pipelines.rollout import rollout_sequences
from jaxpost.pipelines.teacher_cache import TeacherCache, build_teacher_cache, make_cache_pipeline
from jaxpost.sharding import Partitioner
from jaxpost.train import make_eval_step

MODES = ("offline", "sequence", "on_policy")


@gin.configurable
def distill(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
            teacher_from: str | None = None, model: ModelConfig | None = None, init_from: str | None = None,
            mode: str = "offline", divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0,
            beta: float = 0.5, lmbda: float = 0.5, teacher_cache: str | None = None, top_k: int = 0,
            eval_data: str | None = None, eval_fraction: float | None = None, seq_len: int = 512,
            batch_size: int = 8, packing: bool = True, max_prompt_len: int | None = None,
            sampling: SamplingConfig | None = None, teacher_samples_per_prompt: int = 1,
            teacher_batch_size: int = 8,
            chunk_size: int = 128, loop: LoopConfig | None = None) -> dict:
    """Distils ``teacher_from`` (an HF directory) into the student; exports ``run_dir/final``.

    ``model`` (a fresh student) or ``init_from`` (an HF directory) gives the
    student. ``divergence``: ``forward_kl``, ``reverse_kl`` or ``jsd``
    (``beta``); ``temperature`` softens both distributions (``T^2``
    scaling); ``alpha`` weighs ``D`` against the hard-label CE. ``top_k > 0``
    keeps only the teacher's top-k tokens (forward KL; required with
    ``teacher_cache``). ``lmbda``: on-policy fraction of steps (GKD).
    ``sampling``: teacher sampling (``sequence``) or student sampling
    (``on_policy``; its ``max_new_tokens`` is ``seq_len - max_prompt_len``);
    ``sampling.temperature = 0`` gives the teacher's greedy answers.
    ``teacher_samples_per_prompt`` and ``teacher_batch_size`` (prompts per
    sampler call): the teacher's sampling in ``sequence`` mode.
    Summary: step, data counts, and held-out ``eval/*`` metrics (the
    distillation loss terms with a live teacher, else SFT loss/accuracy).
    ``sampling`` (default ``SamplingConfig()``), ``loop`` (``LoopConfig()``) and ``model`` (``ModelConfig()``
    where gin binds any of its fields) are built at call time with gin's bindings.
    """
    # Built here, at call time, so that bindings of SamplingConfig/LoopConfig/ModelConfig apply without
    # `distill.loop = @LoopConfig()` (a default built at import time would ignore them).
    sampling, loop = build(SamplingConfig, sampling), build(LoopConfig, loop)
    model = build_if_bound(ModelConfig, model)
    if mode not in MODES:
        raise ValueError(f"Unknown distillation mode {mode!r}; choose one of {MODES}")
    if mode != "offline" and teacher_cache is not None:
        raise ValueError(f"teacher_cache is for mode='offline'; mode={mode!r} needs the live teacher")
    if teacher_cache is not None and top_k < 1:
        raise ValueError("teacher_cache stores the teacher's top-k: set top_k >= 1")
    if mode == "on_policy" and not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda (fraction of on-policy steps) must be in [0, 1], got {lmbda}")
    if mode == "on_policy" and alpha != 1.0:
        raise ValueError(f"mode='on_policy' trains on the student's own samples, where a hard-label term would "
                         f"imitate the student itself; use alpha=1.0 (got {alpha})")
    if mode == "on_policy" and (loop.steps_per_call != 1 or loop.grad_accum_steps != 1):
        raise ValueError("mode='on_policy' samples between updates, one batch per update: LoopConfig.steps_per_call"
                         f"={loop.steps_per_call} and LoopConfig.grad_accum_steps={loop.grad_accum_steps} must both "
                         "be 1 (the offline modes take them)")
    cached_ready = teacher_cache is not None and (Path(teacher_cache) / "meta.json").exists()
    if teacher_from is None and not cached_ready:
        raise ValueError("distill needs teacher_from (a Hugging Face model directory) unless teacher_cache is a "
                         "finished cache")

    if teacher_from is not None and not cached_ready and model is not None and init_from is None:
        # Fail before any weights are built or read.
        t_dir = Path(resolve_model_dir(teacher_from, key="distill.teacher_from"))
        t_hf = json.loads((t_dir / "config.json").read_text())
        check_same_vocab(model, hf_config_to_model_config(t_hf))
    tok, rows = check_run_inputs("distill", train_data=train_data, kind="lm", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data)
    run = prepare_run_dir(run_dir)
    part = Partitioner()
    config, graphdef, params = load_model(model, init_from, part, seed=loop.seed)
    teacher = None
    if teacher_from is not None and not cached_ready:
        t_config, t_graphdef, t_params = load_model(None, teacher_from, part)
        check_same_vocab(config, t_config)
        teacher = (t_config, t_graphdef, t_params)

    held_out = None
    if eval_data or eval_fraction:
        rows, held_out = train_eval_split(rows, eval_path=eval_data, eval_fraction=None if eval_data else eval_fraction,
                                          seed=loop.seed)
    if mode == "on_policy":
        return _on_policy(run, part, tok, config, graphdef, params, teacher, rows, held_out, divergence=divergence,
                          temperature=temperature, beta=beta, top_k=top_k, lmbda=lmbda, seq_len=seq_len,
                          batch_size=batch_size, max_prompt_len=max_prompt_len, sampling=sampling,
                          chunk_size=chunk_size, loop=loop,
                          card=dict(method="distill", init_from=init_from,
                                    data={"train": train_data, "eval": eval_data}))

    param_shardings = part.shardings(models.logical_axes(config), params)
    host_batch = batch_size // jax.process_count()
    stats = DataStats()
    frozen = frozen_shardings = None
    eval_loss = None
    extra: dict[str, Any] = {}
    epoch_batches = None  # one epoch of the training stream, for LoopConfig.num_epochs (not with a teacher cache)
    if mode == "sequence":
        rows = _teacher_samples(run, rows, tok, teacher, sampling, teacher_samples_per_prompt, part, loop.seed,
                                batch_size=teacher_batch_size)
        extra["teacher_samples"] = len(rows)
        teacher = None  # SFT on the samples: the teacher is no longer needed
        loss_fn = make_sft_loss(graphdef, config, chunk_size)
        batches = MeshBatches(make_lm_pipeline(rows, tok, seq_len, host_batch, loop.seed, packing=packing,
                                               stats=stats), part)
        epoch_batches = lambda: make_lm_pipeline(rows, tok, seq_len, host_batch, loop.seed, packing=packing,
                                                 num_epochs=1)
    elif teacher_cache is not None:
        if not cached_ready:
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
        batches = MeshBatches(make_cache_pipeline(cache, host_batch, loop.seed), part)
        stats = None
    else:
        t_config, t_graphdef, t_params = teacher
        loss_fn = make_distill_loss(graphdef, config, t_graphdef, t_config, divergence=divergence,
                                    temperature=temperature, alpha=alpha, beta=beta, top_k=top_k,
                                    chunk_size=chunk_size)
        frozen = {"teacher": t_params}
        frozen_shardings = {"teacher": part.shardings(models.logical_axes(t_config), t_params)}
        eval_loss = loss_fn
        batches = MeshBatches(make_lm_pipeline(rows, tok, seq_len, host_batch, loop.seed, packing=packing,
                                               stats=stats), part)
        epoch_batches = lambda: make_lm_pipeline(rows, tok, seq_len, host_batch, loop.seed, packing=packing,
                                                 num_epochs=1)

    evaluate = None
    if held_out is not None:
        def eval_batches():
            return MeshBatches(make_lm_pipeline(held_out, tok, seq_len, host_batch, 0, packing=packing, num_epochs=1,
                                                shuffle=False), part)
        step = make_eval_step(eval_loss) if eval_loss is not None else make_sft_eval(graphdef, config, chunk_size)
        evaluate = make_evaluator(step, eval_batches, loop.eval_batches, frozen=frozen)

    flops = config.flops_per_token(seq_len) * batch_size * seq_len
    if teacher is not None:  # a teacher forward is a third of a train step of its size
        flops += teacher[0].flops_per_token(seq_len) * batch_size * seq_len / 3
    run_info: dict = {}  # fit's decisions: num_steps from epochs, best state, early stop
    with part.activate():
        state = fit(run_dir=run, model_config=config, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                    partitioner=part, batches=batches, loop=loop, frozen=frozen, frozen_shardings=frozen_shardings,
                    evaluate=evaluate, flops_per_step=flops, data_stats=stats, epoch_batches=epoch_batches,
                    summary=run_info)
        summary = {"step": int(state.step), "mode": mode, **extra, **run_info}
        if stats is not None:
            summary.update(report_data_stats(stats, "distillation"))
    return finish_run(run, config, state, tok, summary, evaluate, method="distill", init_from=init_from,
                      data={"train": train_data, "eval": eval_data})


def prompt_of(row: dict) -> Any:
    """The prompt of an LM/prompt row: ``prompt``, or a ``messages`` conversation up to its last assistant turn.

    Raises ``ValueError`` naming the fields when a row has neither.
    """
    if row.get("prompt") is not None:
        return row["prompt"]
    messages = row.get("messages")
    if messages:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        if last == 0:
            raise ValueError(f"a messages row starts with an assistant turn; no prompt: {messages!r}")
        return list(messages[:last])
    raise ValueError(f"cannot find a prompt in a row with fields {sorted(row)} (need 'prompt' or 'messages')")


def _teacher_samples(run: epath.Path, rows: Any, tok: Any, teacher: tuple, sampling: SamplingConfig, n: int,
                     part: Partitioner, seed: int, batch_size: int = 8) -> list[dict]:
    """Teacher completions of the rows' prompts as prompt/completion rows (generated once per run dir)."""
    out = run / "teacher_samples.jsonl"
    if not out.exists():  # a resumed run reuses the samples its checkpoints were trained on
        prompts = run / "teacher_prompts.jsonl"
        paths.atomic_write_text(prompts, "".join(json.dumps({"prompt": prompt_of(row)}, ensure_ascii=False) + "\n"
                                                 for row in rows))
        with part.activate():  # generate_to_jsonl writes atomically: ``out`` exists only once complete
            generate_to_jsonl(teacher, tok, prompts, out, sampling=sampling.replace(pad_token_id=pad_id(tok)),
                              n_samples_per_prompt=n, batch_size=batch_size, seed=seed, partitioner=part)
    samples = []
    for line in out.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        completion = r["completion"]
        if not isinstance(r["prompt"], str):  # a conversation continues with an assistant turn
            completion = [{"role": "assistant", "content": completion}]
        samples.append({"prompt": r["prompt"], "completion": completion})
    return samples


def batch_prompts(batch: dict, max_prompt_len: int, pad: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Prompts of an unpacked LM batch, left-padded to ``max_prompt_len``: ``(tokens, mask, truncated)``.

    A row's prompt is its tokens up to and including position ``t0``, the
    first position with ``loss_mask = 1`` (``targets[t0]`` is the first
    response token). Longer prompts keep their last ``max_prompt_len``
    tokens; ``truncated`` counts them. Rows with nothing trained raise.
    """
    mask = np.asarray(batch["loss_mask"]) != 0
    empty = np.flatnonzero(~mask.any(-1))
    if empty.size:
        raise ValueError(f"LM batch rows {empty.tolist()} have no trained token, so no prompt/response split")
    prompts, truncated = [], 0
    for row, m in zip(np.asarray(batch["tokens"]), mask):
        ids = row[: int(np.argmax(m)) + 1]
        if len(ids) > max_prompt_len:
            ids, truncated = ids[-max_prompt_len:], truncated + 1
        prompts.append(ids)
    tokens, pmask = left_pad(prompts, max_prompt_len, pad)
    return tokens, pmask, truncated


def _on_policy(run: Path, part: Partitioner, tok: Any, config: ModelConfig, graphdef, params, teacher: tuple,
               rows: Any, held_out: Any, *, divergence: str, temperature: float, beta: float, top_k: int, lmbda: float,
               seq_len: int, batch_size: int, max_prompt_len: int | None, sampling: SamplingConfig,
               chunk_size: int, loop: LoopConfig, card: dict) -> dict:
    """GKD: per step, with probability ``lmbda`` the responses are the student's samples; teacher scores all.

    ``card``: :func:`export`'s model-card arguments (``method``, ``init_from``, ``data``).
    """
    check_single_process("on-policy distillation")
    if loop.num_epochs is not None or loop.best_metric is not None:
        raise UserError("on-policy distillation trains for LoopConfig.num_steps rollouts; num_epochs, best_metric, "
                        "export_best and patience are for offline runs: unset them")
    P = max_prompt_len or seq_len // 2
    if not 0 < P < seq_len:
        raise ValueError(f"max_prompt_len={P} must be in (0, seq_len={seq_len}): the rest holds sampled responses")
    t_config, t_graphdef, t_params = teacher
    loss_fn = make_distill_loss(graphdef, config, t_graphdef, t_config, divergence=divergence,
                                temperature=temperature, alpha=1.0, beta=beta, top_k=top_k, chunk_size=chunk_size)
    frozen = {"teacher": t_params}
    frozen_shardings = {"teacher": part.shardings(models.logical_axes(t_config), t_params)}
    online = OnlineConfig(num_rollouts=loop.num_steps, save_every=loop.save_every, keep_checkpoints=loop.keep_checkpoints,
                          seed=loop.seed, mixed_precision=loop.mixed_precision, progress=loop.progress)
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
    write_operative_config(run, config)
    export(run, config, trainer.state.params, tok, summary=summary, **card)
    write_summary(run, summary)
    return summary
