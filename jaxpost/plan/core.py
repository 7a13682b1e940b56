"""``jaxpost plan``'s engine: compile the real train step on the current mesh, abstractly, and account its memory.

:func:`plan_current` runs in a process that already has the planned number of
devices (``jax.devices()``; on a laptop: ``--xla_force_host_platform_device_count``).
It builds the run's step with the functions ``jaxpost train`` uses
(``make_optimizer``, ``abstract_state``/``state_shardings``,
``make_train_step``/``compile_train_step``, the method's loss factory), lowers
it with ``ShapeDtypeStruct`` arguments that carry their shardings, compiles
it, and reads XLA's ``memory_analysis()`` and ``cost_analysis()``. Online
methods also compile the sampler's program (:func:`jaxpost.generate.sampler.sample`)
for their rollout shapes. Nothing is allocated: parameters, optimizer state,
batches and caches are shapes.

Exact (from shapes and shardings): parameters, optimizer state, gradients,
frozen models, KV cache. Estimated: XLA's temporaries and the peak, which come
from the compile for the backend this process has (CPU here, with
:data:`jaxpost.plan.PLAN_XLA_FLAGS` when started by ``jaxpost plan``), a
stand-in for the TPU/GPU compile of the same program.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import gin
import jax
import numpy as np

from jaxpost.errors import UserError
from jaxpost.plan.devices import GiB, DeviceKind
from jaxpost.plan.methods import METHODS, Setup
from jaxpost.sharding import Partitioner

__all__ = ["Plan", "plan_current", "per_device_bytes", "bound_task"]


def bound_task() -> str:
    try:
        ref = gin.query_parameter("run.task")
    except ValueError:
        raise UserError("run.task is not set: a gin file must pick the method, e.g. `run.task = @sft` "
                        "(configs/runs/*.gin do; or add --gin.run.task=@sft)") from None
    name = getattr(getattr(ref, "configurable", None), "name", None)
    if name not in METHODS:
        raise UserError(f"jaxpost plan does not model run.task = @{name} yet; it plans {', '.join(METHODS)}")
    return name


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs), from each leaf's (or the given) sharding.

    The largest shard is counted (devices differ only when a dimension does not divide evenly).
    """
    leaves = jax.tree.leaves(tree)
    shs = (jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
           if shardings is not None else [getattr(x, "sharding", None) for x in leaves])
    total = 0
    for x, sh in zip(leaves, shs):
        if not hasattr(x, "shape"):
            continue
        shape = tuple(x.shape)
        local = sh.shard_shape(shape) if isinstance(sh, jax.sharding.Sharding) else shape
        total += math.prod(local) * np.dtype(x.dtype).itemsize
    return total


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Plan:
    """Per-device memory (bytes), FLOPs and timing of one run's step on one mesh."""

    method: str
    model: str
    num_params: int
    mesh: dict
    rules: str
    shape_note: str
    devices: int
    params: int
    optimizer: int
    gradients: int
    frozen: dict                    # name -> bytes
    kv_cache: int
    step_arguments: int
    step_outputs: int
    step_aliased: int
    step_temp: int
    step_peak: int                  # XLA: arguments + outputs - aliased + temporaries
    rollout_peak: int               # 0 for offline methods
    peak: int
    xla_flops: float                # per device, one step
    model_flops: float              # per device, one step (analytic)
    compile_s: float
    backend: str
    settings: dict = dataclasses.field(default_factory=dict)
    resident: int = 0               # of ``frozen``: the bytes held beside the step (not its arguments)

    @property
    def frozen_total(self) -> int:
        return sum(self.frozen.values())

    def fits(self, kind: DeviceKind) -> bool:
        return self.peak <= kind.memory_bytes

    def step_seconds(self, kind: DeviceKind) -> float:
        return max(self.xla_flops, self.model_flops) / kind.peak_flops


def _mesh_label(part: Partitioner) -> dict:
    return {k: int(v) for k, v in part.mesh.shape.items()}


def _rules_name(part: Partitioner) -> str:
    from jaxpost.sharding import PRESETS
    for name, rules in PRESETS.items():
        if dict(rules) == part.rules:
            return name
    return "custom"


def _memory(compiled) -> tuple[int, int, int, int]:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("XLA gave no memory analysis for this backend")
    return (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
            int(ma.temp_size_in_bytes))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _compile_step(setup: Setup, part: Partitioner):
    from jaxpost.models.lora import has_adapters, trainable_mask as lora_trainable_mask
    from jaxpost.train.optimizer import make_optimizer
    from jaxpost.train.state import abstract_state, state_shardings
    from jaxpost.train.step import batch_shardings, compile_train_step, make_train_step
    from jaxpost.train.trainable import stop_frozen_gradients

    loss_fn, mask = setup.loss_fn, None
    if has_adapters(setup.params):  # as jaxpost.train.fit.fit
        mask = lora_trainable_mask(setup.params)
        loss_fn = stop_frozen_gradients(loss_fn, mask)
    optimizer = make_optimizer(total_steps=setup.num_steps, trainable_mask=mask)
    abstract = abstract_state(setup.params, optimizer, setup.seed)
    shardings = state_shardings(abstract, setup.param_shardings, part, optimizer)
    step = make_train_step(loss_fn, optimizer, grad_accum_steps=setup.grad_accum_steps)
    b_shardings = batch_shardings(setup.batch, part)
    jitted = compile_train_step(step, shardings, b_shardings, setup.frozen_shardings)
    frozen = None if setup.frozen is None else _with_shardings(setup.frozen, setup.frozen_shardings)
    lowered = jitted.lower(_with_shardings(abstract, shardings), _with_shardings(setup.batch, b_shardings), frozen)
    compiled = lowered.compile()
    grads = setup.params if mask is None else jax.tree.map(lambda p, m: p if m else None, setup.params, mask)
    grad_bytes = per_device_bytes(grads, None)
    return compiled, abstract, shardings, grad_bytes


def _compile_sampler(setup: Setup, part: Partitioner):
    """The sampler's whole program (prefill + decode phases) for one rollout batch, and its KV cache's shapes."""
    from jaxpost.generate.sampler import SamplingConfig, cache_capacities, sample
    from jaxpost.models.attention import cache_logical_axes, init_cache

    ro, config = setup.rollout, setup.config
    sampling = SamplingConfig(max_new_tokens=ro.max_new_tokens, group_size=ro.group_size, pad_token_id=0,
                              stop_token_ids=(1,), repetition_penalty=ro.repetition_penalty)
    shards = part.shards("batch")
    prompt_sh = part.batch_sharding(2) if ro.prompts % shards == 0 else part.replicated

    def run(params, tokens, mask, rng):
        return sample(setup.graphdef, params, config, tokens, mask, rng, sampling, part)

    tokens = jax.ShapeDtypeStruct((ro.prompts, ro.prompt_len), np.int32, sharding=prompt_sh)
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=part.replicated)
    policy = setup.params if setup.sampler_params is None else setup.sampler_params
    compiled = jax.jit(run).lower(policy, tokens, tokens, rng).compile()
    rows = ro.prompts * ro.group_size
    slots = cache_capacities(ro.prompt_len, ro.max_new_tokens, sampling.cache_block)[-1]
    cache = jax.eval_shape(lambda: init_cache(config, rows, slots, dtype=sampling.cache_dtype))
    cache_sh = part.shardings(cache_logical_axes(config), cache)
    return compiled, per_device_bytes(cache, cache_sh)


def _check_batch_divides(setup: Setup, part: Partitioner) -> None:
    shards = part.shards("batch")
    rows = {x.shape[0] for x in jax.tree.leaves(setup.batch) if x.ndim}
    bad = sorted(r for r in rows if r % (shards * setup.grad_accum_steps))
    if bad:
        raise UserError(f"a batch of {bad[0]} rows does not split over the {shards} batch shards of the mesh "
                        f"{_mesh_label(part)}" + (f" x {setup.grad_accum_steps} micro-batches"
                                                 if setup.grad_accum_steps > 1 else "")
                        + f"; make {setup.batch_key or 'the batch size'} a multiple of "
                        f"{shards * setup.grad_accum_steps}")


def plan_current(device_count: int | None = None) -> Plan:
    """Plans the run gin describes now on ``jax.devices()`` (its count must be ``device_count`` when given).

    A method whose run holds several different steps (``continual``: KTO, then DPO) is planned for each; the
    plan returned is the one with the largest peak (its ``shape_note`` names that step).
    """
    task = bound_task()
    n = len(jax.devices())
    if device_count is not None and n != device_count:
        raise RuntimeError(f"this process has {n} devices, not {device_count}")
    try:
        part = Partitioner()
    except ValueError as e:
        raise UserError(f"the mesh does not fit {n} devices: {e}") from None
    t0 = time.perf_counter()
    with part.activate():
        try:
            setups = METHODS[task](part)
        except ValueError as e:  # e.g. a dimension that does not divide over the mesh
            raise UserError(f"jaxpost plan: {e}") from None
        plans = [_plan_setup(setup, part, n) for setup in (setups if isinstance(setups, list) else [setups])]
    best = max(plans, key=lambda p: p.peak)
    best.compile_s = time.perf_counter() - t0
    return best


def _plan_setup(setup: Setup, part: Partitioner, n: int) -> Plan:
    """One step's :class:`Plan` on ``part``'s mesh of ``n`` devices (its sampler too, for an online method).

    Raises :class:`UserError` when the batch does not split over the batch shards. ``compile_s`` is left 0
    (:func:`plan_current` sets it for the whole run).
    """
    _check_batch_divides(setup, part)
    compiled, abstract, shardings, grad_bytes = _compile_step(setup, part)
    args, outs, alias, temp = _memory(compiled)
    xla_flops = _flops(compiled)
    step_peak = args + outs - alias + temp
    param_bytes = per_device_bytes(abstract.params, shardings.params)
    opt_bytes = per_device_bytes(abstract.opt_state, shardings.opt_state)
    frozen = {}
    if setup.frozen is not None:
        for name, tree in setup.frozen.items():
            frozen[name] = per_device_bytes(tree, setup.frozen_shardings[name])
    frozen_args = sum(frozen.values())
    resident = {name: per_device_bytes(tree, sh) for name, (tree, sh) in setup.resident.items()}
    frozen.update(resident)
    resident_total = sum(resident.values())
    kv, rollout_peak = 0, 0
    if setup.rollout is not None:
        s_compiled, kv = _compile_sampler(setup, part)
        s_args, s_outs, s_alias, s_temp = _memory(s_compiled)
        # While sampling: the sampler's program (the policy params are its arguments) plus what stays on the
        # devices: optimizer state, trained params the sampler does not read (PPO's value model), and the
        # frozen models (the step's own, e.g. a reference or teacher, and those held beside it).
        unsampled = 0 if setup.sampler_params is None else param_bytes - per_device_bytes(setup.sampler_params)
        rollout_peak = (s_args + s_outs - s_alias + s_temp + opt_bytes + unsampled + frozen_args
                        + resident_total)
    train_peak = step_peak + resident_total
    return Plan(method=setup.method, model=_model_label(setup.config), num_params=setup.config.num_params(),
                mesh=_mesh_label(part), rules=_rules_name(part), shape_note=setup.shape_note, devices=n,
                params=param_bytes, optimizer=opt_bytes, gradients=grad_bytes, frozen=frozen, kv_cache=kv,
                step_arguments=args, step_outputs=outs, step_aliased=alias, step_temp=temp, step_peak=train_peak,
                rollout_peak=rollout_peak, peak=max(train_peak, rollout_peak), xla_flops=xla_flops,
                model_flops=setup.model_flops / n, compile_s=0.0, backend=jax.default_backend(),
                settings={"options": setup.options, "remat": setup.config.remat,
                          "grad_accum_steps": setup.grad_accum_steps, "lora": setup.config.lora is not None},
                resident=resident_total)


def _model_label(config) -> str:
    """Size and the settings that decide memory, including the layer layout where the config has one."""
    n = config.num_params()
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
    scanned = getattr(config, "scanned", None)  # ModelConfig.scan_layers (layers under lax.scan), when it exists
    layout = "" if scanned is None else " scanned" if scanned else " unrolled"
    return (f"{size} params ({config.num_layers}{layout} layers, hidden {config.hidden_size}, {config.dtype} compute, "
            f"{config.param_dtype} params, remat {config.remat}{', LoRA' if config.lora else ''})")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.01 * GiB else f"{n / 2 ** 20:.2f} MiB"
