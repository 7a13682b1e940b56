"""How ``jaxpost plan`` sets up each method's step without data, a tokenizer or weights.

One entry of :data:`METHODS` per ``run.task``: it reads the recipe's gin
arguments (the values ``jaxpost train`` would pass it), builds the same loss
with the method's own loss factory, and gives the batch as
``ShapeDtypeStruct``s of the shapes the method's pipeline produces, the
frozen models the step reads (or that stay resident beside it), and, for
online methods, the sampler's shapes. Parameters are abstract
(``jax.eval_shape``): nothing is allocated.

This is a table, not a copy of the recipes: shapes and wiring only. When a
recipe changes how it builds its loss or batches, its entry here changes
with it (``tests/test_plan.py`` compiles each one).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import gin
import jax
import numpy as np

from jaxpost import models
from jaxpost.config import bound_value, build, build_if_bound
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner

__all__ = ["METHODS", "Setup", "Rollout", "recipe_arg"]


@dataclasses.dataclass
class Rollout:
    """One rollout's sampling shapes: ``prompts`` (bucketed) prompts of ``prompt_len`` tokens, x ``group_size``.

    ``repetition_penalty != 1`` adds each row's ``[V]`` context to the sampler's state.
    """

    prompts: int
    prompt_len: int
    max_new_tokens: int
    group_size: int
    repetition_penalty: float = 1.0


@dataclasses.dataclass
class Setup:
    """One method's step, abstractly: what :func:`jaxpost.plan.core.plan_current` compiles."""

    method: str
    config: ModelConfig
    graphdef: Any
    params: Any                      # ShapeDtypeStruct tree
    param_shardings: Any
    loss_fn: Callable
    batch: dict                      # name -> ShapeDtypeStruct (global shapes)
    grad_accum_steps: int = 1
    num_steps: int = 1000
    seed: int = 0
    frozen: Any = None               # passed to the step (e.g. DPO's reference)
    frozen_shardings: Any = None
    resident: dict = dataclasses.field(default_factory=dict)  # name -> (abstract tree, shardings): held, not an arg
    rollout: Rollout | None = None
    model_flops: float = 0.0         # analytic FLOPs of one step, all devices (ModelConfig.flops_per_token)
    shape_note: str = ""
    # (label, gin bindings) of settings that may reduce memory; measured by re-planning
    options: list = dataclasses.field(default_factory=list)
    batch_key: str = ""              # the gin key that sets the batch's rows (named when they do not divide)
    # The sampler's params when ``params`` holds more than the policy (PPO: {"policy", "value"}); None = params
    sampler_params: Any = None


def recipe_arg(task: Callable, name: str) -> Any:
    """The value ``jaxpost train`` passes recipe ``task``'s argument ``name``: gin's binding, else the default.

    An unset ``%gin.REQUIRED`` (or any reference) reads as None.
    """
    try:
        value = gin.query_parameter(f"{task.__name__}.{name}")
    except ValueError:
        value = inspect.signature(task).parameters[name].default
    if value is gin.REQUIRED or not isinstance(value, (str, int, float, bool, type(None), tuple, list)):
        return None
    return value


def _sds(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def model_for(task: Callable, part: Partitioner, *, head: str | None = None, init_arg: str = "init_from",
              use_model: bool = True) -> tuple[ModelConfig, Any, Any, Any]:
    """``(config, graphdef, abstract params, shardings)`` as :func:`jaxpost.models.load.load_model` would give.

    ``init_from`` naming a directory with ``config.json``: its shapes and
    dtype (as ``load_hf`` reads them), the run's :data:`RUN_FIELDS` and bound
    ``param_dtype`` on top; otherwise the run's ``ModelConfig`` (a model
    preset). Weights are never read. ``use_model=False`` (a distillation
    teacher, loaded with ``load_model(None, teacher_from)``): only ``init_arg``'s
    ``config.json`` gives it.
    """
    from jaxpost.models.hf import hf_config_to_model_config
    from jaxpost.models.load import RUN_FIELDS, _bound_fields

    model = build_if_bound(ModelConfig, None) if use_model else None
    init_from = recipe_arg(task, init_arg)
    cfg_file = Path(init_from) / "config.json" if init_from else None
    if cfg_file is not None and cfg_file.exists():
        bound = _bound_fields(model) if model is not None else set()
        dtype = model.param_dtype if model is not None and "param_dtype" in bound else None
        config = hf_config_to_model_config(json.loads(cfg_file.read_text()), dtype=dtype)
        if model is not None:
            config = config.replace(**{k: getattr(model, k) for k in RUN_FIELDS})
    elif model is not None:
        config = model
    elif not use_model:
        raise UserError(f"jaxpost plan needs the shapes of {task.__name__}.{init_arg}: set it to a Hugging Face model "
                        f"directory (only its config.json is read)")
    else:
        raise UserError(f"jaxpost plan needs the model's shapes: include a model preset (e.g. "
                        f"--gin_file=configs/models/llama3_2_1b.gin) or set --gin.{task.__name__}.{init_arg} to a "
                        f"Hugging Face model directory (only its config.json is read)")
    if head is not None:
        config = config.replace(head=head)
    graphdef, shapes = models.abstract(config)
    shardings = part.shardings(models.logical_axes(config), shapes)
    params = jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), shapes, shardings)
    return config, graphdef, params, shardings


def _lm_batch(rows: int, length: int, prefix: str = "") -> dict:
    from jaxpost.algorithms.batch import LM_KEYS
    return {prefix + k: _sds((rows, length), v) for k, v in LM_KEYS.items()}


def _common_options(task_name: str, config: ModelConfig, part: Partitioner) -> list:
    out = []
    n = part.mesh.size
    if part.mesh.shape["fsdp"] < n or part.rules.get("embed") != "fsdp":
        out.append(("FSDP over all devices (configs/mesh/fsdp.gin)",
                    ["make_mesh.data = 1", "make_mesh.fsdp = -1", "make_mesh.tensor = 1", "make_mesh.dcn_data = 1",
                     "Partitioner.rules = 'fsdp'"]))
    if config.remat != "full":
        out.append(("ModelConfig.remat = 'full'", ["ModelConfig.remat = 'full'"]))
    if config.remat == "none":
        out.append(("ModelConfig.remat = 'save_dots'", ["ModelConfig.remat = 'save_dots'"]))
    if config.lora is None:
        out.append(("LoRA (ModelConfig.lora = @LoraConfig(), rank 8)", ["ModelConfig.lora = @LoraConfig()"]))
    return out


def _accum_options(batch_rows: int, part: Partitioner, current: int) -> list:
    per_shard = batch_rows // max(part.shards("batch"), 1)
    out = []
    for k in (2, 4, 8):
        k_total = current * k
        if per_shard % k_total == 0 and batch_rows % k_total == 0:
            out.append((f"LoopConfig.grad_accum_steps = {k_total}", [f"LoopConfig.grad_accum_steps = {k_total}"]))
            if len(out) == 2:
                break
    return out


def _loop():
    from jaxpost.train.fit import LoopConfig
    return build(LoopConfig, None)


# --- offline methods -----------------------------------------------------------------------------

def plan_sft(part: Partitioner) -> Setup:
    from jaxpost.algorithms import make_sft_loss
    from jaxpost.recipes.sft import sft

    loop = _loop()
    config, graphdef, params, shardings = model_for(sft, part)
    seq_len, batch_size = recipe_arg(sft, "seq_len"), recipe_arg(sft, "batch_size")
    chunk = recipe_arg(sft, "chunk_size")
    options = _common_options("sft", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    if seq_len >= 256:
        options.append((f"sft.seq_len = {seq_len // 2}", [f"sft.seq_len = {seq_len // 2}"]))
    return Setup("sft", config, graphdef, params, shardings, make_sft_loss(graphdef, config, chunk),
                 _lm_batch(batch_size, seq_len), loop.grad_accum_steps, loop.num_steps or 1000, loop.seed,
                 model_flops=config.flops_per_token(seq_len) * batch_size * seq_len,
                 shape_note=f"{batch_size} rows x {seq_len} tokens", options=options, batch_key="sft.batch_size")


def _dpo_setup(task: Callable, part: Partitioner, seq_len: int, batch_size: int, *,
               reference_from: str | None) -> Setup:
    """DPO's step (``make_dpo_loss``, one pair per row) for recipe ``task``'s model, as ``jaxpost.recipes.dpo``
    builds it; ``reference_from``: the ``dpo`` call's argument (a copy of that model is the reference)."""
    from jaxpost.algorithms import make_dpo_loss, with_base_reference
    from jaxpost.algorithms.preference import dpo_flops
    from jaxpost.recipes.dpo import dpo

    loop = _loop()
    if recipe_arg(dpo, "packing") or recipe_arg(dpo, "shared_prompt"):
        raise UserError("jaxpost plan does not yet model dpo.packing or dpo.shared_prompt batches; plan the "
                        "one-pair-per-row layout (their default) for an upper bound")
    config, graphdef, params, shardings = model_for(task, part)
    precompute = recipe_arg(dpo, "precompute_reference")
    loss_fn = make_dpo_loss(graphdef, config)
    batch = {**_lm_batch(batch_size, seq_len, "chosen_"), **_lm_batch(batch_size, seq_len, "rejected_"),
             "row_index": _sds((batch_size,), np.int32), "pair_mask": _sds((batch_size,), np.float32)}
    frozen = frozen_shardings = None
    note = "reference: none needed"
    if loss_fn.needs_reference:
        if precompute:
            batch.update(ref_chosen_logps=_sds((batch_size,), np.float32),
                         ref_rejected_logps=_sds((batch_size,), np.float32))
            note = "reference: precomputed log-probs"
        elif config.lora is not None and reference_from is None:
            loss_fn = with_base_reference(loss_fn)
            note = "reference: the LoRA base (no copy)"
        else:
            frozen, frozen_shardings = {"reference": params}, {"reference": shardings}
            note = "reference: a frozen copy"
    options = _common_options("dpo", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    if frozen is not None:
        options.append(("dpo.precompute_reference = True", ["dpo.precompute_reference = True"]))
    key = task.__name__
    if seq_len >= 256:
        options.append((f"{key}.seq_len = {seq_len // 2}", [f"{key}.seq_len = {seq_len // 2}"]))
    return Setup("dpo", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 model_flops=dpo_flops(config, seq_len, batch_size, frozen is not None),
                 shape_note=f"{batch_size} pairs x 2 x {seq_len} tokens; {note}", options=options,
                 batch_key=f"{key}.batch_size")


def plan_dpo(part: Partitioner) -> Setup:
    from jaxpost.recipes.dpo import dpo
    return _dpo_setup(dpo, part, recipe_arg(dpo, "seq_len"), recipe_arg(dpo, "batch_size"),
                      reference_from=recipe_arg(dpo, "reference_from"))


def plan_reward_model(part: Partitioner) -> Setup:
    from jaxpost.algorithms import make_reward_loss
    from jaxpost.recipes.reward import reward_model

    loop = _loop()
    for bad in ("packing", "shared_prompt"):
        if bad in inspect.signature(reward_model).parameters and recipe_arg(reward_model, bad):
            raise UserError(f"jaxpost plan does not yet model reward_model.{bad} batches")
    config, graphdef, params, shardings = model_for(reward_model, part, head="score")
    seq_len, batch_size = recipe_arg(reward_model, "seq_len"), recipe_arg(reward_model, "batch_size")
    batch = {**_lm_batch(batch_size, seq_len, "chosen_"), **_lm_batch(batch_size, seq_len, "rejected_"),
             "row_index": _sds((batch_size,), np.int32), "pair_mask": _sds((batch_size,), np.float32)}
    options = (_common_options("reward_model", config, part)
               + _accum_options(batch_size, part, loop.grad_accum_steps))
    return Setup("reward_model", config, graphdef, params, shardings, make_reward_loss(graphdef, config), batch,
                 loop.grad_accum_steps, loop.num_steps or 1000, loop.seed,
                 model_flops=config.flops_per_token(seq_len) * 2 * batch_size * seq_len,
                 shape_note=f"{batch_size} pairs x 2 x {seq_len} tokens", options=options,
                 batch_key="reward_model.batch_size")


def _kto_setup(task: Callable, part: Partitioner, seq_len: int, batch_size: int, *,
               reference_from: str | None) -> Setup:
    """KTO's step (``make_kto_loss``: matched and KL sequences per example) for recipe ``task``'s model, as
    ``jaxpost.recipes.kto`` builds it; ``reference_from``: the ``kto`` call's argument."""
    from jaxpost.algorithms import with_base_reference
    from jaxpost.algorithms.kto import make_kto_loss

    loop = _loop()
    config, graphdef, params, shardings = model_for(task, part)
    loss_fn = make_kto_loss(graphdef, config)
    batch = {**_lm_batch(batch_size, seq_len), **_lm_batch(batch_size, seq_len, "kl_"),
             "label": _sds((batch_size,), np.float32), "example_mask": _sds((batch_size,), np.float32),
             "row_index": _sds((batch_size,), np.int32)}
    frozen = frozen_shardings = None
    if config.lora is not None and reference_from is None:
        loss_fn, note = with_base_reference(loss_fn), "reference: the LoRA base (no copy)"
    else:
        frozen, frozen_shardings, note = {"reference": params}, {"reference": shardings}, "reference: a frozen copy"
    options = _common_options("kto", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    key = task.__name__
    if seq_len >= 256:
        options.append((f"{key}.seq_len = {seq_len // 2}", [f"{key}.seq_len = {seq_len // 2}"]))
    return Setup("kto", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 model_flops=config.flops_per_token(seq_len) * 2 * batch_size * seq_len * 4 / 3,
                 shape_note=f"{batch_size} examples x 2 (matched + KL) x {seq_len} tokens; {note}", options=options,
                 batch_key=f"{key}.batch_size")


def plan_kto(part: Partitioner) -> Setup:
    from jaxpost.recipes.kto import kto
    return _kto_setup(kto, part, recipe_arg(kto, "seq_len"), recipe_arg(kto, "batch_size"),
                      reference_from=recipe_arg(kto, "reference_from"))


def plan_continual(part: Partitioner) -> list[Setup]:
    """A continual round's two steps, as ``jaxpost.recipes.continual`` runs them: KTO (thumbs, ratings), then DPO
    (choices), each from ``continual.init_from``'s shapes with ``continual.seq_len``/``batch_size`` and a frozen
    copy of ``init_from`` as the reference (``reference_from = init_from``). The plan is the larger of the two."""
    from jaxpost.recipes.continual import continual

    seq_len, batch_size = recipe_arg(continual, "seq_len"), recipe_arg(continual, "batch_size")
    ref = recipe_arg(continual, "init_from") or "init_from"  # always set by continual: a copy, never the LoRA base
    out = []
    for name, make in (("KTO", _kto_setup), ("DPO", _dpo_setup)):
        setup = make(continual, part, seq_len, batch_size, reference_from=ref)
        setup.method, setup.shape_note = "continual", f"round step {name}: {setup.shape_note}"
        out.append(setup)
    return out


def plan_distill(part: Partitioner) -> Setup:
    """Distillation: ``offline``/``sequence`` (a live teacher, or a finished top-k cache) and ``on_policy`` (GKD).

    ``on_policy`` is :func:`jaxpost.recipes.distill_on_policy.distill_on_policy`'s step: the live teacher as
    a step argument, ``alpha = 1`` (the recipe requires it), ``batch_size`` rows of ``seq_len`` tokens; and
    its sampler: the student samples ``seq_len - P`` new tokens (``P = max_prompt_len or seq_len // 2``)
    for every row's prompt, one sample each, with the teacher and optimizer state held beside it.
    """
    from jaxpost.algorithms.distill import make_cached_distill_loss, make_distill_loss
    from jaxpost.recipes.distill import distill

    loop = _loop()
    mode = recipe_arg(distill, "mode")
    on_policy = mode == "on_policy"
    if on_policy and (loop.grad_accum_steps != 1 or loop.steps_per_call != 1):
        raise UserError("distill.mode = 'on_policy' samples between updates, one batch per update: "
                        "LoopConfig.grad_accum_steps and LoopConfig.steps_per_call must be 1")
    config, graphdef, params, shardings = model_for(distill, part)
    seq_len, batch_size = recipe_arg(distill, "seq_len"), recipe_arg(distill, "batch_size")
    chunk, top_k = recipe_arg(distill, "chunk_size"), recipe_arg(distill, "top_k")
    batch = _lm_batch(batch_size, seq_len)
    frozen = frozen_shardings = None
    flops = config.flops_per_token(seq_len) * batch_size * seq_len
    teacher_cache = recipe_arg(distill, "teacher_cache")
    if teacher_cache is not None and top_k >= 1 and not on_policy:
        loss_fn = make_cached_distill_loss(graphdef, config, temperature=recipe_arg(distill, "temperature"),
                                           alpha=recipe_arg(distill, "alpha"), chunk_size=chunk)
        batch.update(teacher_topk_logps=_sds((batch_size, seq_len, top_k), np.float32),
                     teacher_topk_ids=_sds((batch_size, seq_len, top_k), np.int32))
        note = f"teacher: its top-{top_k} from the cache"
    else:
        t_config, t_graphdef, t_params, t_shardings = model_for(distill, part, init_arg="teacher_from",
                                                                use_model=False)
        loss_fn = make_distill_loss(graphdef, config, t_graphdef, t_config,
                                    divergence=recipe_arg(distill, "divergence"),
                                    temperature=recipe_arg(distill, "temperature"),
                                    alpha=1.0 if on_policy else recipe_arg(distill, "alpha"),
                                    beta=recipe_arg(distill, "beta"), top_k=top_k, chunk_size=chunk)
        frozen, frozen_shardings = {"teacher": t_params}, {"teacher": t_shardings}
        flops += t_config.flops_per_token(seq_len) * batch_size * seq_len / 3
        note = f"teacher: {t_config.num_params() / 1e9:.2f}B params, live"
    rollout = None
    if on_policy:
        from jaxpost.generate.sampler import bucket_length
        prompt_len = recipe_arg(distill, "max_prompt_len") or seq_len // 2
        if not 0 < prompt_len < seq_len:
            raise UserError(f"distill.max_prompt_len={prompt_len} must be in (0, seq_len={seq_len}): the rest "
                            f"holds sampled responses")
        rollout = Rollout(prompts=_bucket_batch(batch_size, part), prompt_len=bucket_length(prompt_len, 16),
                          max_new_tokens=seq_len - prompt_len, group_size=1)
        note += f"; on-policy: the student samples {seq_len - prompt_len} tokens after {prompt_len}-token prompts"
        options = _common_options("distill", config, part) + _fuse_option()
    else:
        options = _common_options("distill", config, part) + _accum_options(batch_size, part,
                                                                             loop.grad_accum_steps)
    if seq_len >= 256:
        options.append((f"distill.seq_len = {seq_len // 2}", [f"distill.seq_len = {seq_len // 2}"]))
    return Setup("distill", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 rollout=rollout, model_flops=flops, shape_note=f"{batch_size} rows x {seq_len} tokens; {note}",
                 options=options, batch_key="distill.batch_size")


# --- online methods ------------------------------------------------------------------------------

def _bucket_batch(rows: int, part: Partitioner) -> int:
    """``rows`` prompts as :meth:`jaxpost.generate.sampler.Sampler.bucket_batch` pads them on ``part``."""
    from jaxpost.generate.sampler import Sampler
    fake = Sampler.__new__(Sampler)  # only bucket_batch, which reads .partitioner
    fake.partitioner = part
    return fake.bucket_batch(rows)


def _rollout_shapes(rollout_cfg, online, part: Partitioner) -> Rollout:
    """Prompt batch and length as :class:`jaxpost.generate.sampler.Sampler` buckets them."""
    from jaxpost.generate.sampler import bucket_length
    return Rollout(prompts=_bucket_batch(online.prompts_per_rollout, part),
                   prompt_len=bucket_length(online.max_prompt_len, 16),
                   max_new_tokens=rollout_cfg.max_new_tokens, group_size=rollout_cfg.group_size,
                   repetition_penalty=rollout_cfg.repetition_penalty)


def _reward_model(config: ModelConfig, part: Partitioner) -> tuple[dict, str]:
    """``{"reward model": (shapes, shardings)}`` when ``make_scorer.reward_model`` names one (it stays on the
    devices for the whole run; shapes from its ``config.json``, else assumed policy-sized), and a note."""
    reward_dir = bound_value("make_scorer.reward_model")
    if not isinstance(reward_dir, str):
        return {}, ""
    note = ""
    cfg_file = Path(reward_dir) / "config.json"
    if cfg_file.exists():
        from jaxpost.models.hf import hf_config_to_model_config
        rm_config = hf_config_to_model_config(json.loads(cfg_file.read_text())).replace(head="score")
    else:
        rm_config, note = config.replace(head="score", lora=None), "; reward model: assumed policy-sized"
    _, rm_shapes = models.abstract(rm_config)
    return {"reward model": (rm_shapes, part.shardings(models.logical_axes(rm_config), rm_shapes))}, note


def _minibatch_options(task: str, mb: int, part: Partitioner, what: str) -> list:
    shards = part.shards("batch")
    for k in (2, 4):
        if mb % k == 0 and (mb // k) % shards == 0:
            return [(f"{task}.minibatch_size = {mb // k} ({k} updates per {what})",
                     [f"{task}.minibatch_size = {mb // k}"])]
    return []


def _rollout_options(ro: Rollout) -> list:
    """Settings that shrink a GRPO/PPO/online DPO rollout: shorter completions, then :func:`_fuse_option`."""
    half = ro.max_new_tokens // 2
    shorter = [(f"RolloutConfig.max_new_tokens = {half}", [f"RolloutConfig.max_new_tokens = {half}"])]
    return (shorter if ro.max_new_tokens >= 64 else []) + _fuse_option()


def _fuse_option() -> list:
    """Decoding without the stacked query/key/value and gate/up copies, when the sampler makes them."""
    from jaxpost.generate.sampler import SamplingConfig

    if not build(SamplingConfig, None).fuse_projections:
        return []
    return [("SamplingConfig.fuse_projections = False (no stacked q/k/v, gate/up copies while sampling)",
             ["SamplingConfig.fuse_projections = False"])]


def _policy_rollout(recipe, keys, rollout_cfg, online, part: Partitioner):
    """GRPO/PPO update shapes -> ``(rollout, minibatch rows, row length, batch)``: a minibatch of
    ``recipe``'s ``minibatch_size`` (default: the whole rollout) rows of prompt + new tokens."""
    ro = _rollout_shapes(rollout_cfg, online, part)
    mb = recipe_arg(recipe, "minibatch_size") or online.prompts_per_rollout * rollout_cfg.group_size
    length = ro.prompt_len + ro.max_new_tokens
    return ro, mb, length, _rollout_batch(keys, mb, length)


def _reference_and_reward(config, policy, shardings, part: Partitioner) -> tuple[dict, str]:
    """What stays resident beside a GRPO/PPO step -> ``(resident, note)``: the reference policy (a copy of the
    initial one, :func:`jaxpost.train.online.reference_policy`; none under LoRA) and a bound reward model."""
    from jaxpost.models.lora import has_adapters

    resident = {} if has_adapters(policy) else {"reference": (policy, shardings)}
    reward, note = _reward_model(config, part)
    return {**resident, **reward}, note


def _rollout_batch(keys, rows: int, length: int) -> dict:
    """ShapeDtypeStructs of a rollout batch spec (``[B, L]`` and ``[B]`` entries) of ``rows`` x ``length``."""
    return {k: _sds((rows, length) if keys.shapes[k] == "[B, L]" else (rows,), v) for k, v in keys.items()}


def plan_grpo(part: Partitioner) -> Setup:
    from jaxpost.algorithms.batch import GRPO_KEYS
    from jaxpost.algorithms.online import make_grpo_loss
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.recipes.grpo import grpo
    from jaxpost.train.online import OnlineConfig

    rollout_cfg, online = build(RolloutConfig, None, group_size=8), build(OnlineConfig, None)
    config, graphdef, params, shardings = model_for(grpo, part)
    ro, mb, length, batch = _policy_rollout(grpo, GRPO_KEYS, rollout_cfg, online, part)
    resident, reward_note = _reference_and_reward(config, params, shardings, part)
    options = (_common_options("grpo", config, part) + _minibatch_options("grpo", mb, part, "rollout")
               + _rollout_options(ro))
    loss_fn = make_grpo_loss(graphdef, config, max_len=rollout_cfg.max_new_tokens)
    return Setup("grpo", config, graphdef, params, shardings, loss_fn, batch, 1, online.num_rollouts, online.seed,
                 resident=resident, rollout=ro,
                 model_flops=config.flops_per_token(length) * mb * length,
                 shape_note=(f"{online.prompts_per_rollout} prompts x {rollout_cfg.group_size} samples, "
                             f"{ro.prompt_len} prompt + {ro.max_new_tokens} new tokens; updates on {mb} rows"
                             + reward_note),
                 options=options, batch_key="grpo.minibatch_size (or OnlineConfig.prompts_per_rollout)")


def plan_ppo(part: Partitioner) -> Setup:
    """PPO as ``jaxpost.recipes.ppo`` runs it: one state with ``params = {"policy", "value"}`` (the value model a
    policy-shaped body with a score head, from ``value_from`` or ``init_from``), ``make_ppo_loss`` on
    ``PPO_KEYS`` minibatches; the reference policy (a copy, unless LoRA) and a reward model stay resident;
    the sampler runs the policy alone."""
    from jaxpost.algorithms.batch import PPO_KEYS
    from jaxpost.algorithms.online import make_ppo_loss
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.recipes.ppo import ppo
    from jaxpost.train.online import OnlineConfig

    if _bound("ppo.environment"):
        raise UserError("jaxpost plan does not yet model ppo.environment (multi-turn episodes); plan the "
                        "single-turn run with RolloutConfig.max_new_tokens set to an episode's token budget")
    rollout_cfg, online = build(RolloutConfig, None), build(OnlineConfig, None)
    config, graphdef, policy, p_sh = model_for(ppo, part)
    v_arg = "value_from" if recipe_arg(ppo, "value_from") else "init_from"
    v_config, v_graphdef, value, v_sh = model_for(ppo, part, head="score", init_arg=v_arg)
    params, shardings = {"policy": policy, "value": value}, {"policy": p_sh, "value": v_sh}
    ro, mb, length, batch = _policy_rollout(ppo, PPO_KEYS, rollout_cfg, online, part)
    resident, reward_note = _reference_and_reward(config, policy, p_sh, part)
    options = (_common_options("ppo", config, part) + _minibatch_options("ppo", mb, part, "epoch")
               + _rollout_options(ro))
    flops = (config.flops_per_token(length) + v_config.flops_per_token(length)) * mb * length
    return Setup("ppo", config, graphdef, params, shardings, make_ppo_loss(graphdef, config, v_graphdef), batch, 1,
                 online.num_rollouts, online.seed, resident=resident, rollout=ro, model_flops=flops,
                 shape_note=(f"{online.prompts_per_rollout} prompts x {rollout_cfg.group_size} samples, "
                             f"{ro.prompt_len} prompt + {ro.max_new_tokens} new tokens; updates on {mb} rows "
                             f"(policy + value model)" + reward_note),
                 options=options, batch_key="ppo.minibatch_size (or OnlineConfig.prompts_per_rollout)",
                 sampler_params=policy)


def plan_online_dpo(part: Partitioner) -> Setup:
    """Online DPO as ``jaxpost.recipes.online_dpo`` runs it: ``group_size`` samples per prompt, one (best, worst)
    pair per prompt (``pair_batch``: the LM keys twice and ``pair_mask``, prompt + new tokens long), the
    ``make_dpo_loss`` step with the initial policy's copy as a step argument (the LoRA base under LoRA);
    a reward model stays resident."""
    from jaxpost.algorithms import make_dpo_loss, with_base_reference
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.models.lora import has_adapters
    from jaxpost.recipes.online_dpo import online_dpo
    from jaxpost.train.online import OnlineConfig

    rollout_cfg, online = build(RolloutConfig, None, group_size=2), build(OnlineConfig, None)
    if rollout_cfg.group_size < 2:
        raise UserError(f"online DPO needs RolloutConfig.group_size >= 2, got {rollout_cfg.group_size}")
    config, graphdef, params, shardings = model_for(online_dpo, part)
    ro = _rollout_shapes(rollout_cfg, online, part)
    mb = recipe_arg(online_dpo, "minibatch_size") or online.prompts_per_rollout
    length = ro.prompt_len + ro.max_new_tokens
    batch = {**_lm_batch(mb, length, "chosen_"), **_lm_batch(mb, length, "rejected_"),
             "pair_mask": _sds((mb,), np.float32)}
    loss_fn = make_dpo_loss(graphdef, config)
    frozen = frozen_shardings = None
    note = "reference: none needed"
    if loss_fn.needs_reference:
        if has_adapters(params):
            loss_fn, note = with_base_reference(loss_fn), "reference: the LoRA base (no copy)"
        else:
            frozen, frozen_shardings, note = {"reference": params}, {"reference": shardings}, "reference: a copy"
    reward, reward_note = _reward_model(config, part)
    options = (_common_options("online_dpo", config, part) + _minibatch_options("online_dpo", mb, part, "round")
               + _rollout_options(ro))
    flops = config.flops_per_token(length) * 2 * mb * length * (4 / 3 if frozen is not None else 1.0)
    return Setup("online_dpo", config, graphdef, params, shardings, loss_fn, batch, 1, online.num_rollouts,
                 online.seed, frozen=frozen, frozen_shardings=frozen_shardings, resident=reward, rollout=ro,
                 model_flops=flops,
                 shape_note=(f"{online.prompts_per_rollout} prompts x {rollout_cfg.group_size} samples, "
                             f"{ro.prompt_len} prompt + {ro.max_new_tokens} new tokens; updates on {mb} pairs; "
                             f"{note}" + reward_note),
                 options=options, batch_key="online_dpo.minibatch_size (or OnlineConfig.prompts_per_rollout)")


def _bound(key: str) -> bool:
    """True when gin binds ``key`` to something other than None."""
    return bound_value(key) is not None


METHODS: dict[str, Callable[[Partitioner], Setup | list[Setup]]] = {
    "sft": plan_sft,
    "dpo": plan_dpo,
    "reward_model": plan_reward_model,
    "kto": plan_kto,
    "distill": plan_distill,
    "grpo": plan_grpo,
    "ppo": plan_ppo,
    "online_dpo": plan_online_dpo,
    "continual": plan_continual,
}
"""``run.task`` name -> its setup (``continual``: a list, one per step a round runs; the plan is the largest).

Not modelled yet: ``ppo.environment`` (multi-turn episodes), the ``packing``/``shared_prompt`` preference
layouts, ``synthesize``."""
