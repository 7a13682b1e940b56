"""Training only part of the params: a loss wrapper that keeps gradients off frozen leaves.

Pair it with ``make_optimizer(trainable_mask=mask)`` (no optimizer state for
frozen leaves); under LoRA the mask is
:func:`jaxpost.models.lora.trainable_mask` of the adapted params.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

__all__ = ["stop_frozen_gradients"]


def stop_frozen_gradients(loss_fn: Callable, mask: Any) -> Callable:
    """``loss_fn`` with ``stop_gradient`` on every leaf where ``mask`` is False.

    ``wrapped(params, batch, frozen) = loss_fn(where(mask, params,
    stop_gradient(params)), batch, frozen)``: same loss and same gradients
    on trainable leaves; frozen leaves get exact zeros, so the compiler
    drops their weight-gradient matmuls (under LoRA, the backward pass
    computes only activation gradients and the adapters' gradients) and
    ``grad_norm`` is that of the trained leaves. ``mask`` is a bool tree
    over params or ``callable(params) -> bool tree``.
    """
    @functools.wraps(loss_fn)
    def wrapped(params, batch, frozen=None):
        m = mask(params) if callable(mask) else mask
        params = jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), m, params)
        return loss_fn(params, batch, frozen)

    return wrapped
