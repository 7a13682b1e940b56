"""Public research API: per-sequence log-prob reductions, the masked divergence, position chunking."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (average_logps, forward_kl, generalized_jsd, ld_sequence_logps, masked_divergence,
                            mean_sequence_logps, packed_sequence_logps, packed_wpo_weights, pair_sums, reverse_kl,
                            sequence_logps, wpo_weights)
from jaxpost.models.heads import map_position_chunks


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_sequence_logps_sum_length_and_mean():
    logp = -np.abs(_rand(0, 3, 7))
    mask = np.zeros((3, 7), np.float32)
    mask[0, 2:5] = 1
    mask[1, :] = 1  # row 2 is empty
    total, length = sequence_logps(logp, mask)
    np.testing.assert_allclose(total, [logp[0, 2:5].sum(), logp[1].sum(), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(length, [3, 7, 0])
    mean = mean_sequence_logps(logp, mask)
    np.testing.assert_allclose(mean, [logp[0, 2:5].mean(), logp[1].mean(), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(average_logps(total, length), mean)
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logp, mask[:, :3])


def test_packed_sequence_logps_equal_the_same_sequences_one_per_row():
    # Row 0: pair 1 (chosen t=0..2, rejected t=3..4), pair 2 (chosen t=5..6, rejected t=7), padding t=8.
    pair_ids = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
    sides = np.array([[1, 1, 1, 2, 2, 1, 1, 2, 0]], np.int32)
    logp = -np.abs(_rand(1, 1, 9))
    mask = np.array([[0, 1, 1, 0, 1, 1, 1, 1, 0]], np.float32)
    pc, pr, lc, lr = packed_sequence_logps(logp, mask, pair_ids, sides, 3)
    for k, (c, r) in enumerate([(slice(0, 3), slice(3, 5)), (slice(5, 7), slice(7, 8))]):
        ref_c = sequence_logps(logp[:, c], mask[:, c])
        ref_r = sequence_logps(logp[:, r], mask[:, r])
        np.testing.assert_allclose([pc[0, k], lc[0, k]], [ref_c[0][0], ref_c[1][0]], rtol=1e-6)
        np.testing.assert_allclose([pr[0, k], lr[0, k]], [ref_r[0][0], ref_r[1][0]], rtol=1e-6)
    assert pc[0, 2] == pr[0, 2] == lc[0, 2] == lr[0, 2] == 0  # empty slot
    np.testing.assert_array_equal(pair_sums(mask, pair_ids, sides, 3)[0], lc)


def test_ld_dpo_weights_the_longer_replys_excess_by_hand():
    # Chosen: 3 response tokens (after one prompt slot), rejected: 1; the shared length is 1.
    c_logp, c_mask = np.array([[-9.0, -1.0, -2.0, -3.0]], np.float32), np.array([[0, 1, 1, 1]], np.float32)
    r_logp, r_mask = np.array([[-9.0, -4.0, -7.0, -7.0]], np.float32), np.array([[0, 1, 0, 0]], np.float32)
    pc, pr, lc, lr = ld_sequence_logps(c_logp, c_mask, r_logp, r_mask, 0.5)
    assert float(pc[0]) == -1.0 + 0.5 * (-2.0 - 3.0) and float(pr[0]) == -4.0
    assert float(lc[0]) == 3 and float(lr[0]) == 1  # lengths stay the plain counts
    full = ld_sequence_logps(c_logp, c_mask, r_logp, r_mask, 1.0)
    np.testing.assert_array_equal(full[0], sequence_logps(c_logp, c_mask)[0])


def test_ld_dpo_against_trl_and_packed_rows_against_one_pair_per_row():
    """TRL 1.16 DPOTrainer's ld_alpha sums (shared_mask / tail_mask of completion positions), written out in numpy."""
    rng = np.random.default_rng(7)
    B, L, alpha = 4, 6, 0.3
    logp = -np.abs(_rand(2, 2 * B, L))
    lengths = rng.integers(0, L + 1, 2 * B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    comp_pos = np.cumsum(mask, axis=1)
    shared = np.minimum(lengths[:B], lengths[B:])
    shared = np.concatenate([shared, shared])[:, None]
    shared_mask, tail_mask = (comp_pos > 0) & (comp_pos <= shared), comp_pos > shared
    ignored = logp * mask  # TRL's labels are -100 off the completion, where its fused head's log-probs are 0
    trl = (ignored * shared_mask).sum(1) + alpha * (ignored * tail_mask).sum(1)
    pc, pr, lc, lr = ld_sequence_logps(logp[:B], mask[:B], logp[B:], mask[B:], alpha)
    np.testing.assert_allclose(np.concatenate([pc, pr]), trl, rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([lc, lr]), lengths)
    # The same pairs packed into one row (each reply after a 1-token prompt slot), with padding and an empty slot.
    ids, sides, lp, m = [], [], [], []
    for k in range(B):
        for side, row in ((1, k), (2, B + k)):
            ids += [k + 1] * (L + 1); sides += [side] * (L + 1)
            lp += [-5.0] + list(logp[row]); m += [0.0] + list(mask[row])
    ids, sides = np.array([ids + [0, 0]], np.int32), np.array([sides + [0, 0]], np.int32)
    lp, m = np.array([lp + [-1.0, -1.0]], np.float32), np.array([m + [0.0, 0.0]], np.float32)
    ppc, ppr, plc, plr = packed_sequence_logps(lp, m, ids, sides, B + 1, ld_alpha=alpha)
    np.testing.assert_allclose(ppc[0, :B], pc, rtol=1e-6)
    np.testing.assert_allclose(ppr[0, :B], pr, rtol=1e-6)
    np.testing.assert_array_equal(plc[0, :B], lc)
    assert ppc[0, B] == ppr[0, B] == 0  # the empty slot


def test_wpo_weights_by_hand_and_packed_as_one_per_row():
    # Token 1: p(y) = 1/2 and sum p^2 = 1/3, so p / sum p^2 = 1.5; token 2: p(y) = 1/4 = sum p^2 (uniform over 4), 1.
    # Their geometric mean is sqrt(1.5); the third token is masked out, and an empty reply weighs exp(0) = 1.
    logp = np.log([[0.5, 0.25, 0.9], [0.3, 0.3, 0.3]]).astype(np.float32)
    lssp = np.log([[1 / 3, 0.25, 0.01], [0.2, 0.2, 0.2]]).astype(np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(wpo_weights(logp, lssp, mask), [math.sqrt(1.5), 1.0], rtol=1e-6)
    grads = jax.grad(lambda x: jnp.sum(wpo_weights(x, lssp, mask)))(jnp.asarray(logp))
    assert not np.any(grads)  # a weight, not a training signal
    # Packed: pair 1 = (row 0 as chosen, a one-token rejected reply), pair 2 empty.
    ids = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
    sides = np.array([[1, 1, 1, 2, 0, 0]], np.int32)
    plogp = np.log([[0.5, 0.25, 0.9, 0.8, 0.5, 0.5]]).astype(np.float32)
    plssp = np.log([[1 / 3, 0.25, 0.01, 0.5, 0.5, 0.5]]).astype(np.float32)
    pmask = np.array([[1, 1, 0, 1, 0, 0]], np.float32)
    wc, wr = packed_wpo_weights(plogp, plssp, pmask, ids, sides, 2)
    np.testing.assert_allclose(wc, [[math.sqrt(1.5), 1.0]], rtol=1e-6)
    np.testing.assert_allclose(wr, [[1.6, 1.0]], rtol=1e-6)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, functools.partial(generalized_jsd, beta=0.3)])
def test_masked_divergence_is_the_masked_sum_of_the_per_token_divergence(fn):
    s, z = _rand(2, 2, 5, 11), _rand(3, 2, 5, 11)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]], np.float32)
    total, n = masked_divergence(s, z, mask, fn)
    per_token = np.asarray(fn(s, z))
    np.testing.assert_allclose(total, (per_token * mask).sum(), rtol=1e-6)
    assert float(n) == 5.0
    # Padding cannot leak: NaN logits under mask 0 leave the value and the gradient finite.
    s_nan = s.copy()
    s_nan[0, 2] = np.nan
    assert np.isfinite(masked_divergence(s_nan, z, mask, fn)[0])
    g = jax.grad(lambda x: masked_divergence(x, z, mask, fn)[0])(s)
    np.testing.assert_array_equal(np.asarray(g)[mask == 0], 0.0)
    with pytest.raises(ValueError, match="per-token values"):
        masked_divergence(s, z, mask, lambda a, b: jnp.sum(forward_kl(a, b)))


@pytest.mark.parametrize("length,chunk", [(12, 4), (13, 4), (5, 8), (7, 1)])
def test_map_position_chunks_equals_the_unchunked_function(length, chunk):
    h, w = _rand(4, 2, length, 6), _rand(5, 6, 9)
    t = np.random.default_rng(6).integers(0, 9, size=(2, length)).astype(np.int32)

    def per_token(h, t):  # [B, C, D], [B, C] -> ([B, C], [B, C, 2])
        z = jnp.einsum("bcd,dv->bcv", h, w)
        lp = jnp.take_along_axis(jax.nn.log_softmax(z), t[..., None], axis=-1)[..., 0]
        return lp, jnp.stack([lp, 2 * lp], axis=-1)

    got = map_position_chunks(per_token, h, t, chunk_size=chunk)
    want = per_token(h, t)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape
        np.testing.assert_allclose(g_, w_, rtol=1e-5, atol=1e-6)
    # Summed over chunks: padded positions reach fn as zeros, so a mask (padded with 0) keeps them out.
    ones = np.ones((2, length), np.float32)
    total = map_position_chunks(lambda h, t, m: jnp.sum(per_token(h, t)[0] * m), h, t, ones, chunk_size=chunk,
                                sum_chunks=True)
    np.testing.assert_allclose(total, jnp.sum(want[0]), rtol=1e-5)


def test_map_position_chunks_gradient_and_no_full_logits():
    b, length, d, v, chunk = 2, 32, 6, 13, 8
    h, w = _rand(7, b, length, d), _rand(8, d, v)

    def loss(w, chunked):
        f = lambda x: jnp.sum(jax.nn.logsumexp(jnp.einsum("bcd,dv->bcv", x, w), axis=-1))
        return map_position_chunks(f, h, chunk_size=chunk, sum_chunks=True) if chunked else f(h)

    chunked, whole = jax.grad(lambda w: loss(w, True)), jax.grad(lambda w: loss(w, False))
    np.testing.assert_allclose(chunked(w), whole(w), rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(chunked)(w).jaxpr

    def shapes(jx):
        for eqn in jx.eqns:
            for var in (*eqn.invars, *eqn.outvars):
                yield tuple(getattr(getattr(var, "aval", None), "shape", ()))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from shapes(inner)

    vocab = [s for s in shapes(jaxpr) if s and s[-1] == v]
    assert vocab and max(math.prod(s) for s in vocab) <= b * chunk * v, vocab


def test_map_position_chunks_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="expected \\[B, L"):
        map_position_chunks(lambda a, b: a, np.zeros((2, 5, 3)), np.zeros((2, 4)), chunk_size=2)
