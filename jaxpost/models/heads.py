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


def map_position_chunks(fn, *arrays, chunk_size: int, checkpoint: bool = True, sum_chunks: bool = False):
    """Applies ``fn`` to chunks of positions of ``[B, L, ...]`` arrays; the one chunking loop of jaxpost.

    The position axis (axis 1) of every array is cut into ``n = ceil(L / C)``
    chunks of ``C = max(1, min(chunk_size, L))`` positions, zero-padded at
    the end, and ``fn(*chunks)`` runs on one chunk at a time (``[B, C, ...]``
    each) inside a ``lax.map``/``lax.scan``::

        out[:, i C : (i + 1) C] = fn(*(a[:, i C : (i + 1) C] for a in arrays))

    so whatever ``fn`` builds (e.g. ``[B, C, V]`` logits) exists for one chunk
    at a time, never as ``[B, L, V]``. With ``checkpoint`` the body is under
    ``jax.checkpoint``: autodiff stores only the chunk's inputs and
    recomputes the rest in the backward pass. Functions closing over
    weights get their gradients summed over chunks, as usual for a scan.

    Returns the pytree of ``fn``'s outputs with the chunks put back together
    to ``[B, L, ...]`` (padding cut off; ``fn`` must return ``[B, C, ...]``
    leaves), or, with ``sum_chunks``, the sum over chunks of ``fn``'s outputs
    (any shapes, e.g. scalars), accumulated in chunk order in the scan's
    carry; padded positions reach ``fn`` as zeros, so mask them there.
    """
    if not arrays:
        raise ValueError("map_position_chunks needs at least one [B, L, ...] array")
    B, L = arrays[0].shape[:2]
    for i, a in enumerate(arrays):
        if a.ndim < 2 or tuple(a.shape[:2]) != (B, L):
            raise ValueError(f"map_position_chunks: array {i} has shape {tuple(a.shape)}, expected [B, L, ...] "
                             f"with [B, L] = {(B, L)} as the first array")
    c = max(1, min(chunk_size, L))
    n = -(-L // c)
    pad = n * c - L

    def split(x):  # [B, L, ...] -> [n, B, C, ...]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, n, c) + x.shape[2:]).swapaxes(0, 1)

    chunks = tuple(split(a) for a in arrays)
    body = jax.checkpoint(fn) if checkpoint else fn
    if sum_chunks:
        shapes = jax.eval_shape(body, *(x[0] for x in chunks))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def step(total, xs):
            return jax.tree.map(jnp.add, total, body(*xs)), None

        return jax.lax.scan(step, zero, chunks)[0]
    out = jax.lax.map(lambda xs: body(*xs), chunks)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((B, n * c) + x.shape[3:])[:, :L], out)


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


def _chunk_logprobs(weight, h, t, *, dtype, return_entropy, return_log_sum_sq=False):
    z = _project(h, weight, dtype)  # [B, C, V] float32
    logp = _target_logprob(z, t)
    ent = lssp = None
    if return_entropy or return_log_sum_sq:
        lse = jax.nn.logsumexp(z, axis=-1)
    if return_entropy:
        # H = -sum p log p = lse - sum p z, with p = softmax(z).
        ent = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    if return_log_sum_sq:
        # log sum_v p_v^2 = logsumexp(2 z) - 2 lse; WPO reads it without gradient.
        lssp = jax.lax.stop_gradient(jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * lse)
    return logp, ent, lssp


def token_logprobs(params: dict, config: ModelConfig, hidden: jax.Array, targets: jax.Array,
                   chunk_size: int = 512, return_entropy: bool = False,
                   stored_logits_bytes: int | None = None, return_log_sum_sq: bool = False):
    """``log p(targets[b, t] | hidden[b, t])`` as float32 ``[B, L]``, chunked over positions.

    ``log p = z[target] - logsumexp(z)`` with ``z = hidden @ W`` (float32).
    Positions are processed ``chunk_size`` at a time (:func:`map_position_chunks`);
    each chunk body is under ``jax.checkpoint`` so that autodiff stores only
    the chunk's hidden states, never its ``[B, C, V]`` logits: peak memory is
    O(B * chunk_size * V) instead of O(B * L * V). When the float32 logits
    of the whole batch fit in ``stored_logits_bytes`` (default 256 MiB) autodiff
    keeps them instead: recomputing the head would cost a fourth matmul
    to save memory that small runs do not need. ``None`` takes the threshold
    from ``config.stored_logits_mib``. With ``return_entropy``
    also returns the entropy ``H = logsumexp(z) - sum softmax(z) * z``
    ``[B, L]``. With ``return_log_sum_sq`` also returns ``log sum_v p_v^2``
    ``[B, L]`` without gradient (WPO's weights, :func:`jaxpost.losses.wpo_weights`),
    after the entropy when both are asked for. Targets may hold any id in
    ``[0, V)`` where unused (masked by the caller).
    """
    weight = lm_head_weight(params, config)
    B, L, D = hidden.shape
    if targets.shape != (B, L):
        raise ValueError(f"targets shape {targets.shape} does not match hidden [B, L] = {(B, L)}")
    targets = targets.astype(jnp.int32)
    body = functools.partial(_chunk_logprobs, weight, dtype=jnp.dtype(config.dtype), return_entropy=return_entropy,
                             return_log_sum_sq=return_log_sum_sq)
    if stored_logits_bytes is None:
        stored_logits_bytes = config.stored_logits_mib * 2**20
    c = max(1, min(chunk_size, L))
    stored = B * -(-L // c) * c * weight.shape[-1] * 4  # float32 logits of the whole (padded) batch
    logp, ent, lssp = map_position_chunks(body, hidden, targets, chunk_size=chunk_size,
                                          checkpoint=stored > stored_logits_bytes)
    extras = ((ent,) if return_entropy else ()) + ((lssp,) if return_log_sum_sq else ())
    return (logp, *extras) if extras else logp


def scores(params: dict, hidden: jax.Array) -> jax.Array:
    """Scalar score per position, ``hidden @ score.kernel`` -> float32 ``[B, L]``.

    The weights of HF ``*ForSequenceClassification`` with one label
    (``score.weight`` ``[1, D]``, no bias). A reward model's score of a
    sequence is this value at its last token.
    """
    w = params["score"]["kernel"]
    return jnp.einsum("bld,do->blo", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)[..., 0]
