"""Knowledge distillation, start to finish: a frozen teacher, a smaller trainable student.

    jaxpost train --gin_file=configs/algorithms/distill.gin --gin_file=my_experiment.gin

Modes (``mode``): ``offline`` (the teacher's distribution per response token,
live or from a ``teacher_cache``) and ``sequence`` (SFT on the teacher's
samples) in :mod:`jaxpost.recipes.distill_offline`; ``on_policy`` (GKD) in
:mod:`jaxpost.recipes.distill_on_policy`. Student and teacher share the
tokenizer and vocabulary (checked) and may differ in depth and width.
"""

from __future__ import annotations

import json
from pathlib import Path

import gin

from jaxpost.algorithms.distill import check_same_vocab
from jaxpost.config import build, build_if_bound, check_values
from jaxpost.data import check_run_inputs, train_eval_split
from jaxpost.errors import UserError
from jaxpost.generate.sampler import SamplingConfig
from jaxpost.hub import resolve_model_dir
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import hf_config_to_model_config
from jaxpost.models.load import load_model
from jaxpost.recipes.distill_offline import distill_offline
from jaxpost.recipes.distill_on_policy import distill_on_policy
from jaxpost.sharding import Partitioner
from jaxpost.train.fit import LoopConfig
from jaxpost.train.run_dir import prepare_run_dir

MODES = ("offline", "sequence", "on_policy")


@gin.configurable
def distill(run_dir: str = gin.REQUIRED, train_data: str = gin.REQUIRED, tokenizer: str | None = None,
            teacher_from: str | None = None, model: ModelConfig | None = None, init_from: str | None = None,
            mode: str = "offline", divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0,
            beta: float = 0.5, lmbda: float = 0.5, teacher_cache: str | None = None, top_k: int = 0,
            eval_data: str | None = None, eval_fraction: float | None = None, seq_len: int = 512,
            batch_size: int = 8, packing: bool = True, max_prompt_len: int | None = None,
            sampling: SamplingConfig | None = None, teacher_samples_per_prompt: int = 1,
            teacher_batch_size: int = 8, chunk_size: int = 128, loop: LoopConfig | None = None) -> dict:
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
    check_values("distill", locals())  # for callers that bypass gin; `jaxpost train` ran them
    # Built here, at call time, so that bindings of SamplingConfig/LoopConfig/ModelConfig apply without
    # `distill.loop = @LoopConfig()` (a default built at import time would ignore them).
    sampling, loop = build(SamplingConfig, sampling), build(LoopConfig, loop)
    model = build_if_bound(ModelConfig, model)
    if mode not in MODES:
        raise UserError(f"distill.mode={mode!r} is unknown; choose one of {MODES}")
    if mode != "offline" and teacher_cache is not None:
        raise UserError(f"distill.teacher_cache is for mode='offline'; mode={mode!r} needs the live teacher")
    if teacher_cache is not None and top_k < 1:
        raise UserError(f"distill.teacher_cache stores the teacher's top-k: set distill.top_k >= 1 (got {top_k})")
    if mode == "on_policy" and alpha != 1.0:
        raise UserError(f"distill.mode='on_policy' trains on the student's own samples, where a hard-label term "
                        f"would imitate the student itself: set distill.alpha = 1.0 (got {alpha}), e.g. "
                        f"--gin.distill.alpha=1.0")
    if mode == "on_policy" and (loop.steps_per_call != 1 or loop.grad_accum_steps != 1):
        raise UserError("distill.mode='on_policy' samples between updates, one batch per update: "
                        f"LoopConfig.steps_per_call={loop.steps_per_call} and LoopConfig.grad_accum_steps="
                        f"{loop.grad_accum_steps} must both be 1 (the offline modes take them)")
    cached_ready = teacher_cache is not None and (Path(teacher_cache) / "meta.json").exists()
    if teacher_from is None and not cached_ready:
        raise UserError("distill needs distill.teacher_from (a Hugging Face model directory) unless "
                        "distill.teacher_cache is a finished cache")

    if teacher_from is not None and not cached_ready and model is not None and init_from is None:
        # Fail before any weights are built or read.
        t_dir = Path(resolve_model_dir(teacher_from, key="distill.teacher_from"))
        t_hf = json.loads((t_dir / "config.json").read_text())
        check_same_vocab(model, hf_config_to_model_config(t_hf))
    tok, rows = check_run_inputs("distill", train_data=train_data, kind="lm", tokenizer=tokenizer,
                                 init_from=init_from, model=model, eval_data=eval_data,
                                 other_models={"teacher_from": None if cached_ready else teacher_from})
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
    student = (config, graphdef, params)
    card = dict(method="distill", init_from=init_from, data={"train": train_data, "eval": eval_data})
    if mode == "on_policy":
        return distill_on_policy(run, part, tok, student, teacher, rows, held_out, divergence=divergence,
                                 temperature=temperature, beta=beta, top_k=top_k, lmbda=lmbda, seq_len=seq_len,
                                 batch_size=batch_size, max_prompt_len=max_prompt_len, sampling=sampling,
                                 chunk_size=chunk_size, loop=loop, card=card)
    return distill_offline(run, part, tok, student, teacher, rows, held_out, mode=mode, divergence=divergence,
                           temperature=temperature, alpha=alpha, beta=beta, top_k=top_k, teacher_cache=teacher_cache,
                           seq_len=seq_len, batch_size=batch_size, packing=packing, sampling=sampling,
                           teacher_samples_per_prompt=teacher_samples_per_prompt,
                           teacher_batch_size=teacher_batch_size, chunk_size=chunk_size, loop=loop, card=card)
