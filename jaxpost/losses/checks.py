"""Shape checks for loss inputs, run at trace time (shapes are static under jit)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def check_rank(name: str, x, rank: int, what: str) -> None:
    """Raises ``ValueError`` unless ``x`` has ``rank`` dimensions; ``what`` names them (e.g. "[B,L]")."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(jnp.shape(x))}")


def check_same_shape(names: Sequence[str], arrays: Sequence, what: str) -> None:
    """Raises ``ValueError`` unless every non-None array has the shape of the first one."""
    ref_name, ref = next((n, a) for n, a in zip(names, arrays) if a is not None)
    for n, a in zip(names, arrays):
        if a is not None and tuple(jnp.shape(a)) != tuple(jnp.shape(ref)):
            raise ValueError(
                f"{n} must have the same shape {what} as {ref_name} {tuple(jnp.shape(ref))}, "
                f"got {tuple(jnp.shape(a))}")


def f32(x):
    """Casts to float32 (all loss math is done in float32, whatever the model dtype)."""
    return None if x is None else jnp.asarray(x, jnp.float32)
