"""TR-DPO's reference that follows the policy (Gorbatovski et al. 2024): ``ref <- (1 - alpha) ref + alpha policy``.

DPO and KTO runs (:func:`follow_policy`) and GRPO/RLOO runs
(:func:`online_reference`, TRL's ``GRPOConfig.sync_ref_model``) take it.

The reference joins the trained params as ``{"policy": ..., "reference":
...}``, frozen to the optimizer (no gradient, no optimizer state), so it
is saved, restored and sharded with the state and a resumed run continues
exactly. After each optimizer step ``s`` (counted from 1) with ``s %
every == 0`` the step's ``after_update`` (:func:`jaxpost.train.make_train_step`)
mixes the updated policy into it, as TRL's ``SyncRefModelCallback`` does
at the end of such a step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import gin
import jax

from jaxpost.errors import UserError
from jaxpost.train.online import reference_policy

__all__ = ["OnlineReference", "ReferenceSync", "check_sync", "follow_policy", "mix_reference", "online_reference",
           "state_reference", "with_state_reference"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReferenceSync:
    """How a DPO, KTO or GRPO run's reference follows the policy (TR-DPO; TRL's ``sync_ref_model``).

    ``every``: mix the policy into the reference after every ``every``-th
    optimizer step (TRL's ``ref_model_sync_steps``, 512 there); 0 (the
    default) keeps the reference frozen. ``alpha``: the policy's share of
    each mix, ``ref <- (1 - alpha) ref + alpha policy``, in ``(0, 1]``
    (TRL's ``ref_model_mixup_alpha``, 0.6; 1 copies the policy).
    """

    every: int = 0
    alpha: float = 0.6

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 0:
            raise UserError(f"ReferenceSync.every must be an int >= 0 (0: a frozen reference), got {self.every!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"ReferenceSync.alpha must be in (0, 1], got {self.alpha!r}")


def check_sync(sync: ReferenceSync, loss_fn: Callable, config: Any, precompute_reference: bool) -> ReferenceSync:
    """``sync``, or a :class:`UserError` when a run with this loss and model cannot let its reference follow the policy.

    ``config``: the policy's ``ModelConfig`` (LoRA policies are refused: the
    reference has no adapters to mix into, as TRL refuses PEFT).
    """
    if not sync.every:
        return sync
    what = f"ReferenceSync.every={sync.every}"
    if not loss_fn.needs_reference:
        raise UserError(f"{what}: the {loss_fn.kind!r} loss reads no reference; unset ReferenceSync.every")
    if precompute_reference:
        raise UserError(f"{what} changes the reference as the policy trains, so its log-probs cannot be computed "
                        f"once: set dpo.precompute_reference = False, or ReferenceSync.every = 0")
    _refuse_lora(what, config)
    return sync


def _refuse_lora(what: str, config: Any) -> None:
    if config.lora is not None:
        raise UserError(f"{what}: a LoRA policy's adapters cannot be mixed into a reference without them; train "
                        f"without ModelConfig.lora, or set ReferenceSync.every = 0")


def mix_reference(policy: Any, reference: Any, alpha: float) -> Any:
    """``(1 - alpha) * reference + alpha * policy``, leaf by leaf, in the reference's dtype."""
    return jax.tree.map(lambda p, r: ((1.0 - alpha) * r + alpha * p).astype(r.dtype), policy, reference)


def with_state_reference(loss_fn: Callable) -> Callable:
    """``loss_fn(params, batch, frozen)`` on ``{"policy", "reference"}`` params: the policy is trained,
    the reference is passed on as ``frozen["reference"]`` (``make_dpo_loss`` reads it under ``stop_gradient``).

    Attributes of ``loss_fn`` (``kind``, ``needs_reference``) are kept.
    """
    @functools.wraps(loss_fn)
    def wrapped(params, batch, frozen=None):
        return loss_fn(params["policy"], batch, {**(frozen or {}), "reference": params["reference"]})

    return wrapped


def state_reference(sync: ReferenceSync, params: Any, reference: Any, shardings: Any):
    """The train state's pieces for a reference that lives in it: ``(params, shardings, trainable_mask, after_update)``.

    ``params``/``shardings`` are the policy's, ``reference`` its starting
    reference (same tree, its own buffers: the step donates the state's).
    The results go to :func:`jaxpost.train.fit`: params and shardings
    ``{"policy", "reference"}``, ``trainable_mask`` keeps the reference out
    of the optimizer, ``after_update(params, step)`` mixes it after every
    ``sync.every``-th step.
    """
    every, alpha = sync.every, sync.alpha

    def after_update(p, step):
        mixed = jax.lax.cond(step % every == 0, lambda: mix_reference(p["policy"], p["reference"], alpha),
                             lambda: p["reference"])
        return {**p, "reference": mixed}

    mask = {"policy": jax.tree.map(lambda _: True, params), "reference": jax.tree.map(lambda _: False, reference)}
    return ({"policy": params, "reference": reference}, {"policy": shardings, "reference": shardings}, mask,
            after_update)


def follow_policy(sync: ReferenceSync, loss_fn: Callable, params: Any, reference: Any, shardings: Any):
    """A run's pieces for a reference in the state: ``(loss_fn, params, shardings, trainable_mask, after_update)``.

    :func:`state_reference`'s pieces, and ``loss_fn`` wrapped by
    :func:`with_state_reference`; ``state.params["policy"]`` is the trained policy.
    """
    return (with_state_reference(loss_fn), *state_reference(sync, params, reference, shardings))


@dataclasses.dataclass(frozen=True)
class OnlineReference:
    """An online run's policy and reference, both read from its train state's params.

    ``params``/``shardings`` and ``fit_args`` (``trainable_mask``,
    ``after_update``) go to :func:`jaxpost.train.online.fit_online` with
    ``loss(loss_fn)``; ``policy_of(p)`` and ``reference_of(p)`` read the
    policy and the reference from the state's params (rollouts, evaluation,
    export).
    """

    params: Any
    shardings: Any
    policy_of: Callable[[Any], Any]
    reference_of: Callable[[Any], Any]
    fit_args: dict = dataclasses.field(default_factory=dict)

    def loss(self, loss_fn: Callable) -> Callable:
        """``loss_fn`` of the policy, on the state's params."""
        return with_state_reference(loss_fn) if self.fit_args else loss_fn


def online_reference(sync: ReferenceSync, params: Any, shardings: Any, config: Any, beta: float) -> OnlineReference:
    """The reference of a GRPO/RLOO run: frozen (:func:`jaxpost.train.online.reference_policy`), or with
    ``sync.every`` a copy of the initial policy in the state that follows it (TRL's ``GRPOConfig.sync_ref_model``).

    The rollouts read it for ``ref_logp`` (the loss's KL term, weight
    ``beta``), so a mix after step ``s`` shows from the next rollout on.
    :class:`UserError` for ``beta == 0`` (nothing in the loss reads the
    reference; TRL refuses it too) and for a LoRA policy.
    """
    if not sync.every:
        return OnlineReference(params, shardings, lambda p: p, reference_policy(params))
    what = f"ReferenceSync.every={sync.every}"
    if beta == 0:
        raise UserError(f"{what}: make_grpo_loss.beta = 0 puts no KL to the reference in the loss, so there is "
                        f"nothing to follow the policy; set make_grpo_loss.beta > 0, or ReferenceSync.every = 0")
    _refuse_lora(what, config)
    both, both_shardings, mask, after = state_reference(sync, params, jax.tree.map(lambda x: x.copy(), params),
                                                        shardings)
    return OnlineReference(both, both_shardings, lambda p: p["policy"], lambda p: p["reference"],
                           {"trainable_mask": mask, "after_update": after})
