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
from jaxpost.config import build, build_if_bound
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner

__all__ = ["METHODS", "Setup", "Rollout", "recipe_arg"]


@dataclasses.dataclass
class Rollout:
    """One rollout's sampling shapes: ``prompts`` (bucketed) prompts of ``prompt_len`` tokens, x ``group_size``."""

    prompts: int
    prompt_len: int
    max_new_tokens: int
    group_size: int


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
    from jaxpost.train.online import _batch_shards
    per_shard = batch_rows // max(_batch_shards(part), 1)
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


def plan_dpo(part: Partitioner) -> Setup:
    from jaxpost.algorithms import make_dpo_loss, with_base_reference
    from jaxpost.recipes.dpo import _dpo_flops, dpo

    loop = _loop()
    if recipe_arg(dpo, "packing") or recipe_arg(dpo, "shared_prompt"):
        raise UserError("jaxpost plan does not yet model dpo.packing or dpo.shared_prompt batches; plan the "
                        "one-pair-per-row layout (their default) for an upper bound")
    config, graphdef, params, shardings = model_for(dpo, part)
    seq_len, batch_size = recipe_arg(dpo, "seq_len"), recipe_arg(dpo, "batch_size")
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
        elif config.lora is not None and recipe_arg(dpo, "reference_from") is None:
            loss_fn = with_base_reference(loss_fn)
            note = "reference: the LoRA base (no copy)"
        else:
            frozen, frozen_shardings = {"reference": params}, {"reference": shardings}
            note = "reference: a frozen copy"
    options = _common_options("dpo", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    if frozen is not None:
        options.append(("dpo.precompute_reference = True", ["dpo.precompute_reference = True"]))
    if seq_len >= 256:
        options.append((f"dpo.seq_len = {seq_len // 2}", [f"dpo.seq_len = {seq_len // 2}"]))
    return Setup("dpo", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 model_flops=_dpo_flops(config, seq_len, batch_size, frozen is not None),
                 shape_note=f"{batch_size} pairs x 2 x {seq_len} tokens; {note}", options=options,
                 batch_key="dpo.batch_size")


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


def plan_kto(part: Partitioner) -> Setup:
    from jaxpost.algorithms import with_base_reference
    from jaxpost.algorithms.kto import make_kto_loss
    from jaxpost.recipes.kto import kto

    loop = _loop()
    config, graphdef, params, shardings = model_for(kto, part)
    seq_len, batch_size = recipe_arg(kto, "seq_len"), recipe_arg(kto, "batch_size")
    loss_fn = make_kto_loss(graphdef, config)
    batch = {**_lm_batch(batch_size, seq_len), **_lm_batch(batch_size, seq_len, "kl_"),
             "label": _sds((batch_size,), np.float32), "example_mask": _sds((batch_size,), np.float32),
             "row_index": _sds((batch_size,), np.int32)}
    frozen = frozen_shardings = None
    if config.lora is not None and recipe_arg(kto, "reference_from") is None:
        loss_fn, note = with_base_reference(loss_fn), "reference: the LoRA base (no copy)"
    else:
        frozen, frozen_shardings, note = {"reference": params}, {"reference": shardings}, "reference: a frozen copy"
    options = _common_options("kto", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    if seq_len >= 256:
        options.append((f"kto.seq_len = {seq_len // 2}", [f"kto.seq_len = {seq_len // 2}"]))
    return Setup("kto", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 model_flops=config.flops_per_token(seq_len) * 2 * batch_size * seq_len * 4 / 3,
                 shape_note=f"{batch_size} examples x 2 (matched + KL) x {seq_len} tokens; {note}", options=options,
                 batch_key="kto.batch_size")


def plan_distill(part: Partitioner) -> Setup:
    """Offline distillation (``mode`` ``offline`` or ``sequence``): a live teacher, or a finished top-k cache."""
    from jaxpost.algorithms.distill import make_cached_distill_loss, make_distill_loss
    from jaxpost.recipes.distill import distill

    loop = _loop()
    mode = recipe_arg(distill, "mode")
    if mode == "on_policy":
        raise UserError("jaxpost plan does not yet model distill.mode = 'on_policy'; plan mode 'offline' for the "
                        "train step (the same step, on the student's samples)")
    config, graphdef, params, shardings = model_for(distill, part)
    seq_len, batch_size = recipe_arg(distill, "seq_len"), recipe_arg(distill, "batch_size")
    chunk, top_k = recipe_arg(distill, "chunk_size"), recipe_arg(distill, "top_k")
    batch = _lm_batch(batch_size, seq_len)
    frozen = frozen_shardings = None
    flops = config.flops_per_token(seq_len) * batch_size * seq_len
    teacher_cache = recipe_arg(distill, "teacher_cache")
    if teacher_cache is not None and top_k >= 1:
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
                                    temperature=recipe_arg(distill, "temperature"), alpha=recipe_arg(distill, "alpha"),
                                    beta=recipe_arg(distill, "beta"), top_k=top_k, chunk_size=chunk)
        frozen, frozen_shardings = {"teacher": t_params}, {"teacher": t_shardings}
        flops += t_config.flops_per_token(seq_len) * batch_size * seq_len / 3
        note = f"teacher: {t_config.num_params() / 1e9:.2f}B params, live"
    options = _common_options("distill", config, part) + _accum_options(batch_size, part, loop.grad_accum_steps)
    if seq_len >= 256:
        options.append((f"distill.seq_len = {seq_len // 2}", [f"distill.seq_len = {seq_len // 2}"]))
    return Setup("distill", config, graphdef, params, shardings, loss_fn, batch, loop.grad_accum_steps,
                 loop.num_steps or 1000, loop.seed, frozen=frozen, frozen_shardings=frozen_shardings,
                 model_flops=flops, shape_note=f"{batch_size} rows x {seq_len} tokens; {note}", options=options,
                 batch_key="distill.batch_size")


# --- online methods ------------------------------------------------------------------------------

def _rollout_shapes(rollout_cfg, online, part: Partitioner) -> Rollout:
    """Prompt batch and length as :class:`jaxpost.generate.sampler.Sampler` buckets them."""
    from jaxpost.generate.sampler import Sampler, bucket_length
    fake = Sampler.__new__(Sampler)  # only bucket_batch, which reads .partitioner
    fake.partitioner = part
    return Rollout(prompts=fake.bucket_batch(online.prompts_per_rollout),
                   prompt_len=bucket_length(online.max_prompt_len, 16),
                   max_new_tokens=rollout_cfg.max_new_tokens, group_size=rollout_cfg.group_size)


def plan_grpo(part: Partitioner) -> Setup:
    from jaxpost.algorithms.batch import GRPO_KEYS
    from jaxpost.algorithms.online import make_grpo_loss
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.models.lora import has_adapters
    from jaxpost.recipes.grpo import grpo
    from jaxpost.train.online import OnlineConfig

    rollout_cfg, online = build(RolloutConfig, None, group_size=8), build(OnlineConfig, None)
    config, graphdef, params, shardings = model_for(grpo, part)
    ro = _rollout_shapes(rollout_cfg, online, part)
    rows = online.prompts_per_rollout * rollout_cfg.group_size
    mb = recipe_arg(grpo, "minibatch_size") or rows
    length = ro.prompt_len + ro.max_new_tokens
    batch = {k: _sds((mb, length) if GRPO_KEYS.shapes[k] == "[B, L]" else (mb,), v) for k, v in GRPO_KEYS.items()}
    resident = {}
    if not has_adapters(params):  # jaxpost.train.online.reference_policy: a copy of the initial policy
        resident["reference"] = (params, shardings)
    reward_note = ""
    try:  # a reward model scorer (make_scorer.reward_model) stays on the devices for the whole run
        reward_dir = gin.query_parameter("make_scorer.reward_model")
    except ValueError:
        reward_dir = None
    if isinstance(reward_dir, str):
        cfg_file = Path(reward_dir) / "config.json"
        if cfg_file.exists():
            from jaxpost.models.hf import hf_config_to_model_config
            rm_config = hf_config_to_model_config(json.loads(cfg_file.read_text())).replace(head="score")
        else:
            rm_config, reward_note = config.replace(head="score", lora=None), "; reward model: assumed policy-sized"
        _, rm_shapes = models.abstract(rm_config)
        rm_sh = part.shardings(models.logical_axes(rm_config), rm_shapes)
        resident["reward model"] = (rm_shapes, rm_sh)
    options = _common_options("grpo", config, part)
    from jaxpost.train.online import _batch_shards
    shards = _batch_shards(part)
    for k in (2, 4):
        if mb % k == 0 and (mb // k) % shards == 0:
            options.append((f"grpo.minibatch_size = {mb // k} ({k} updates per rollout)",
                            [f"grpo.minibatch_size = {mb // k}"]))
            break
    if ro.max_new_tokens >= 64:
        options.append((f"RolloutConfig.max_new_tokens = {ro.max_new_tokens // 2}",
                        [f"RolloutConfig.max_new_tokens = {ro.max_new_tokens // 2}"]))
    loss_fn = make_grpo_loss(graphdef, config, max_len=rollout_cfg.max_new_tokens)
    return Setup("grpo", config, graphdef, params, shardings, loss_fn, batch, 1, online.num_rollouts, online.seed,
                 resident=resident, rollout=ro,
                 model_flops=config.flops_per_token(length) * mb * length,
                 shape_note=(f"{online.prompts_per_rollout} prompts x {rollout_cfg.group_size} samples, "
                             f"{ro.prompt_len} prompt + {ro.max_new_tokens} new tokens; updates on {mb} rows"
                             + reward_note),
                 options=options, batch_key="grpo.minibatch_size (or OnlineConfig.prompts_per_rollout)")


METHODS: dict[str, Callable[[Partitioner], Setup]] = {
    "sft": plan_sft,
    "dpo": plan_dpo,
    "reward_model": plan_reward_model,
    "kto": plan_kto,
    "distill": plan_distill,
    "grpo": plan_grpo,
}
"""``run.task`` name -> its setup. Not modelled yet: ppo, online_dpo, continual, distill's on_policy mode."""
