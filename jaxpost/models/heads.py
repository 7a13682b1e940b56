"""Output heads on top of the transformer's hidden states.

The LM head is applied in chunks of positions so that the full
``[B, L, V]`` logits never exist at once (a 128k vocabulary at 8 x 4096
tokens would be 16 GiB in float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.config import ModelConfig


def lm_head_weight(params: dict, config: ModelConfig) -> jax.Array:
    """The ``[D, V]`` output projection: ``embedding.T`` if tied, else ``lm_head.kernel``."""
    if config.head != "lm":
        raise ValueError(f"config.head={config.head!r} has no LM head")
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(hidden: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """``hidden @ weight`` in the compute ``dtype``, accumulated and returned in float32.

    The backward pass casts the logits' float32 cotangent to ``dtype`` before
    its two matmuls. Plain autodiff would multiply the float32 cotangent by
    the bf16 operands, promoting both ``[*, V]`` backward matmuls to float32:
    on an H200 those two were 21.5% of a 1B SFT step's kernel time at vocab
    128k. In float32 compute the cast is a no-op and this is plain autodiff.
    """
    return jnp.einsum("...d,dv->...v", hidden.astype(dtype), weight.astype(dtype),
                      preferred_element_type=jnp.float32)


def _project_fwd(hidden, weight, dtype):
    return _project(hidden, weight, dtype), (hidden, weight)


def _project_bwd(dtype, residuals, dz):
    hidden, weight = residuals
    dz = dz.astype(dtype)
    dh = jnp.einsum("...v,dv->...d", dz, weight.astype(dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("...d,...v->dv", hidden.astype(dtype), dz, preferred_element_type=jnp.float32)
    return dh.astype(hidden.dtype), dw.astype(weight.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Dense float32 logits ``hidden @ W`` of shape ``[..., V]``.

    For small uses only (the sampler's last position, tests): this builds the
    whole vocabulary dimension for every position given.
    """
    return _project(hidden, lm_head_weight(params, config), jnp.dtype(config.dtype))


@jax.custom_vjp
def _target_logprob(z: jax.Array, t: jax.Array) -> jax.Array:
    """``z[t] - logsumexp(z)`` over the last axis of float32 logits ``z``.

    Its backward is the closed form ``dz = g * (onehot(t) - softmax(z))``:
    one elementwise pass over ``[*, V]``, where autodiff would scatter the
    target's cotangent into a zero ``[*, V]`` array and add a second pass
    for the ``logsumexp``.
    """
    return _target_logprob_fwd(z, t)[0]


def _target_logprob_fwd(z, t):
    lse = jax.nn.logsumexp(z, axis=-1)
    return jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0] - lse, (z, t, lse)


def _target_logprob_bwd(residuals, g):
    z, t, lse = residuals
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == t[..., None]
    dz = g[..., None] * (onehot.astype(z.dtype) - jnp.exp(z - lse[..., None]))
    return dz, np.zeros(t.shape, jax.dtypes.float0)


_target_logprob.defvjp(_target_logprob_fwd, _target_logprob_bwd)


def _chunk_logprobs(weight, h, t, *, dtype, return_entropy):
    z = _project(h, weight, dtype)  # [B, C, V] float32
    logp = _target_logprob(z, t)
    if not return_entropy:
        return logp, None
    lse = jax.nn.logsumexp(z, axis=-1)
    # H = -sum p log p = lse - sum p z, with p = softmax(z).
    ent = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    return logp, ent


def token_logprobs(params: dict, config: ModelConfig, hidden: jax.Array, targets: jax.Array,
                   chunk_size: int = 512, return_entropy: bool = False,
                   stored_logits_bytes: int | None = None):
    """``log p(targets[b, t] | hidden[b, t])`` as float32 ``[B, L]``, chunked over positions.

    ``log p = z[target] - logsumexp(z)`` with ``z = hidden @ W`` (float32).
    Positions are processed ``chunk_size`` at a time with ``jax.lax.map``;
    each chunk body is under ``jax.checkpoint`` so that autodiff stores only
    the chunk's hidden states, never its ``[B, C, V]`` logits: peak memory is
    O(B * chunk_size * V) instead of O(B * L * V). When the float32 logits
    of the whole batch fit in ``stored_logits_bytes`` (default 256 MiB) autodiff
    keeps them instead: recomputing the head would cost a fourth matmul
    to save memory that small runs do not need. ``None`` takes the threshold
    from ``config.stored_logits_mib``. With ``return_entropy``
    also returns the entropy ``H = logsumexp(z) - sum softmax(z) * z``
    ``[B, L]``. Targets may hold any id in ``[0, V)`` where unused (masked by
    the caller).
    """
    weight = lm_head_weight(params, config)
    B, L, D = hidden.shape
    if targets.shape != (B, L):
        raise ValueError(f"targets shape {targets.shape} does not match hidden [B, L] = {(B, L)}")
    targets = targets.astype(jnp.int32)
    c = max(1, min(chunk_size, L))
    n = -(-L // c)
    pad = n * c - L
    if pad:  # padded positions predict token 0 and are cut off below
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(B, n, c, D).swapaxes(0, 1)
    ts = targets.reshape(B, n, c).swapaxes(0, 1)
    body = functools.partial(_chunk_logprobs, dtype=jnp.dtype(config.dtype), return_entropy=return_entropy)
    if stored_logits_bytes is None:
        stored_logits_bytes = config.stored_logits_mib * 2**20
    if B * n * c * weight.shape[-1] * 4 > stored_logits_bytes:
        body = jax.checkpoint(body)
    logp, ent = jax.lax.map(lambda a: body(weight, *a), (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c)[:, :L]
    if return_entropy:
        return unchunk(logp), unchunk(ent)
    return unchunk(logp)


def scores(params: dict, hidden: jax.Array) -> jax.Array:
    """Scalar score per position, ``hidden @ score.kernel`` -> float32 ``[B, L]``.

    The weights of HF ``*ForSequenceClassification`` with one label
    (``score.weight`` ``[1, D]``, no bias). A reward model's score of a
    sequence is this value at its last token.
    """
    w = params["score"]["kernel"]
    return jnp.einsum("bld,do->blo", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)[..., 0]
