"""One generic train step for every algorithm, plus its compiled form.

An algorithm supplies ``loss_fn(params, batch, frozen) -> (loss, metrics)``;
:func:`make_train_step` turns it into a pure
``step(state, batch, frozen) -> (state, metrics)`` with gradient
accumulation, optional bf16 compute, the optimizer update and the standard
metrics; :func:`compile_train_step` jits it once with explicit shardings and
a donated state.

Gradient-accumulation convention (token-exact):

* if the loss metrics hold ``loss_sum`` and ``loss_tokens``, the step loss is
  ``sum_i loss_sum_i / sum_i loss_tokens_i`` over micro-batches ``i``;
* if they hold only ``loss_tokens``, ``loss`` is taken to be a token mean,
  so ``loss_sum_i = loss_i * loss_tokens_i``;
* otherwise the step loss is ``mean_i loss_i`` (micro-batches are equal-sized).

Either way the gradient is the gradient of that step loss, so 4 micro-batches
of 2 give the same update as one batch of 8 up to float rounding, even when
micro-batches hold different numbers of trained tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost.sharding import Partitioner
from jaxpost.train.state import TrainState

__all__ = ["make_train_step", "make_eval_step", "scan_steps", "compile_train_step", "batch_shardings",
           "stack_batches"]

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]

# Metrics that add up across micro-batches; all others are averaged.
_SUMMED = ("loss_sum", "loss_tokens")


def _split_microbatches(batch: Any, n: int) -> Any:
    """``[B, ...] -> [n, B/n, ...]`` with micro-batch ``i`` = rows ``i, i+n, i+2n, ...``.

    Strided rather than contiguous so that, with the batch split over devices,
    every device holds ``1/n`` of its own rows in each micro-batch (no
    cross-device reshuffle).
    """
    def one(path, x):
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"Batch entry {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}; its leading (batch) "
                f"dimension must be divisible by grad_accum_steps={n}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map_with_path(one, batch)


def _check_loss_output(loss, metrics):
    if jnp.ndim(loss) != 0:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
    if not isinstance(metrics, dict):
        raise TypeError(f"loss_fn must return (loss, metrics: dict), got metrics of type {type(metrics).__name__}")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    after_update: Callable[[Any, jax.Array], Any] | None = None) -> Callable:
    """Build ``step(state, batch, frozen) -> (new_state, metrics)`` (pure, jit-ready).

    Per step: ``g = grad(step loss)(params)`` (accumulated over
    ``grad_accum_steps`` micro-batches with ``lax.scan``, see module doc),
    ``updates, opt_state = optimizer.update(g, opt_state, params)``,
    ``params += updates``, ``step += 1``, ``rng = split(rng)[0]``.

    Args:
      loss_fn: ``(params, batch, frozen) -> (scalar loss, dict of scalar metrics)``.
      optimizer: any optax transformation; its ``.schedule`` (set by
        :func:`jaxpost.train.optimizer.make_optimizer`) gives the logged lr.
      grad_accum_steps: micro-batches per step; the batch's leading dimension
        must be divisible by it.
      schedule: overrides ``optimizer.schedule`` for the ``learning_rate`` metric.
      after_update: ``(params, step) -> params``, applied to the updated
        params with ``step`` the new step count (from 1), inside the
        compiled step; e.g. TR-DPO's reference following the policy
        (:func:`jaxpost.train.reference_sync.follow_policy`).

    Metrics: every loss metric (aggregated as in the module doc), ``loss``,
    ``grad_norm`` (global L2 norm of the gradient before clipping),
    ``learning_rate`` (when a schedule is known: lr used by this update),
    and ``is_finite`` (bool: loss and gradient norm are finite).

    A preference batch whose ``pair_mask`` is all 0 (no real pair: padding
    only, or an online round where every group scored alike) leaves params
    and optimizer state unchanged; ``step`` still counts it.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    schedule = schedule if schedule is not None else getattr(optimizer, "schedule", None)

    def cast_loss(params, batch, frozen):
        # bf16 compute is the model's own (ModelConfig.dtype): it casts inside the forward, so gradients
        # come back in the master params' dtype.
        loss, metrics = loss_fn(params, batch, frozen)
        _check_loss_output(loss, metrics)
        loss = loss.astype(jnp.float32)
        metrics = {k: jnp.asarray(v, jnp.float32) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
                   else jnp.asarray(v) for k, v in metrics.items()}
        return loss, metrics

    def grads_single(params, batch, frozen):
        (loss, metrics), grads = jax.value_and_grad(cast_loss, has_aux=True)(params, batch, frozen)
        return loss, metrics, grads

    def grads_accumulated(params, batch, frozen):
        n = grad_accum_steps
        micro = _split_microbatches(batch, n)
        first = jax.tree.map(lambda x: x[0], micro)
        m_shape = jax.eval_shape(cast_loss, params, first, frozen)[1]
        token_mode = "loss_tokens" in m_shape

        def summed_loss(p, mb):
            # The quantity whose sum over micro-batches is (total loss) x (normaliser).
            loss, metrics = cast_loss(p, mb, frozen)
            if token_mode:
                s = metrics["loss_sum"] if "loss_sum" in metrics else loss * jax.lax.stop_gradient(
                    metrics["loss_tokens"])
            else:
                s = loss
            return s, (loss, metrics)

        def body(acc, mb):
            g_acc, m_acc, s_acc = acc
            (s, (loss, metrics)), g = jax.value_and_grad(summed_loss, has_aux=True)(params, mb)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            # Non-summed metrics are token-weighted when tokens are known (exact for token means).
            w = metrics["loss_tokens"].astype(jnp.float32) if token_mode else jnp.float32(1.0)
            m_acc = {k: m_acc[k] + (v if k in _SUMMED else v * w) for k, v in metrics.items()}
            return (g_acc, m_acc, s_acc + s), None

        zeros_g = jax.tree.map(jnp.zeros_like, params)
        zeros_m = {k: jnp.zeros(v.shape, jnp.float32 if k not in _SUMMED else v.dtype) for k, v in m_shape.items()}
        (g_sum, m_sum, s_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m, jnp.float32(0.0)), micro)
        if token_mode:
            denom = jnp.maximum(m_sum["loss_tokens"].astype(jnp.float32), 1.0)
        else:
            denom = jnp.float32(n)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), g_sum)
        metrics = {k: (v if k in _SUMMED else v / denom) for k, v in m_sum.items()}
        return s_sum / denom, metrics, grads

    compute_grads = grads_single if grad_accum_steps == 1 else grads_accumulated

    def step(state: TrainState, batch: Any, frozen: Any = None):
        loss, metrics, grads = compute_grads(state.params, batch, frozen)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if isinstance(batch, Mapping) and "pair_mask" in batch:
            # Zero gradients would still move the params through momentum and weight decay.
            keep = jnp.sum(batch["pair_mask"]) > 0
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), (params, opt_state),
                                             (state.params, state.opt_state))
        if after_update is not None:
            params = after_update(params, state.step + 1)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics["is_finite"] = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                                  rng=jax.random.split(state.rng)[0])
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable:
    """``eval_step(params, batch, frozen) -> metrics``: the loss metrics plus ``loss``, no gradients."""
    def eval_step(params, batch, frozen=None):
        loss, metrics = loss_fn(params, batch, frozen)
        _check_loss_output(loss, metrics)
        return {**metrics, "loss": loss}
    return eval_step


def _mesh_of(shardings: Any):
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    raise ValueError("state_shardings contains no NamedSharding; build it with jaxpost.train.state_shardings")


def scan_steps(step: Callable, n: int) -> Callable:
    """``n`` train steps as one function: ``(state, batches, frozen) -> (state, metrics)``.

    ``batches`` holds ``n`` batches stacked on a new leading axis; the result
    equals ``n`` successive calls ``state, m_i = step(state, batches[i],
    frozen)``, with every metric stacked: ``metrics[k][i] = m_i[k]``. Why:
    one compiled call per ``n`` steps pays the per-call costs once. On CPU
    XLA maps and faults in a fresh temporary buffer (hundreds of MiB) on
    every call; a ``lax.scan`` reuses it. On accelerators it removes the
    host's dispatch between steps, which matters for small models.
    """
    if n < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {n}")

    def steps(state, batches, frozen=None):
        return jax.lax.scan(lambda s, b: step(s, b, frozen), state, batches)

    return steps


def compile_train_step(step: Callable, state_shardings: TrainState, batch_shardings: Any,
                       frozen_shardings: Any = None, steps_per_call: int = 1) -> Callable:
    """``jax.jit(step)`` with explicit shardings and the state donated.

    ``in_shardings=(state, batch, frozen)``, ``out_shardings=(state, replicated
    metrics)``, ``donate_argnums=(0,)``: the old state's buffers are reused
    for the new one, so a step needs no second copy of params and optimizer
    state. Do not use a state after passing it to the compiled step.

    With ``steps_per_call = n > 1`` the compiled function is
    :func:`scan_steps` ``(step, n)``: it takes ``n`` batches stacked on a new
    leading axis (:func:`stack_batches`; ``batch_shardings`` are those of one
    batch) and returns metrics stacked the same way.
    """
    replicated = NamedSharding(_mesh_of(state_shardings), PartitionSpec())
    if steps_per_call != 1:
        step = scan_steps(step, steps_per_call)
        batch_shardings = jax.tree.map(_stacked_sharding, batch_shardings)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def _stacked_sharding(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of ``n`` stacked arrays: the new leading axis unsplit, the rest as in ``s``."""
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
    if s.is_fully_replicated:  # one device, or a copy on every device
        return s
    raise TypeError(f"Cannot stack batches with sharding {s}: give them a NamedSharding (batch_shardings)")


def stack_batches(batches: list[Any]) -> Any:
    """Batches stacked on a new leading axis, for a step compiled with ``steps_per_call = len(batches)``.

    Host (numpy) batches are stacked on the host; global ``jax.Array``
    batches on their devices, each entry keeping its sharding behind the new
    (unsplit) axis, so every process passes its own part as before.
    """
    leaves, treedef = jax.tree_util.tree_flatten(batches[0])
    if all(isinstance(x, np.ndarray) for x in leaves):
        return jax.tree.map(lambda *xs: np.stack(xs), *batches)
    return _stack_jit(treedef, tuple(_stacked_sharding(x.sharding) for x in leaves))(*batches)


@functools.lru_cache(maxsize=8)
def _stack_jit(treedef, shardings: tuple) -> Callable:
    # Cached per batch structure and sharding: one compile per run, not one per call.
    out = jax.tree_util.tree_unflatten(treedef, shardings)
    return jax.jit(lambda *bs: jax.tree.map(lambda *xs: jnp.stack(xs), *bs), out_shardings=out)


def batch_shardings(batch_like: Any, partitioner: Partitioner) -> Any:
    """Each ``[batch, ...]`` entry split along its leading axis by the ``batch`` rule; scalars replicated."""
    return jax.tree.map(lambda x: partitioner.batch_sharding(x.ndim) if x.ndim else partitioner.replicated,
                        batch_like)
