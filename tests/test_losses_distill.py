"""Distillation divergences against numpy re-derivations; chunked == unchunked."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (chunked_distill_loss, forward_kl, generalized_jsd, reverse_kl,
                            topk_forward_kl)


def np_softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0), -1)


S = np.array([0.0, 0.0], np.float32)          # student p_s = [.5, .5]
T = np.array([math.log(3.0), 0.0], np.float32)  # teacher p_t = [.75, .25]


def test_kl_hand_values():
    # KL(t||s) = .75 ln 1.5 + .25 ln .5 = 0.130812; KL(s||t) = .5 ln(2/3) + .5 ln 2 = 0.143841
    assert float(forward_kl(S, T)) == pytest.approx(0.130812, abs=1e-6)
    assert float(reverse_kl(S, T)) == pytest.approx(0.143841, abs=1e-6)


def test_temperature_scaling():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    ps, pt = np_softmax(s, 2.0), np_softmax(t, 2.0)
    np.testing.assert_allclose(forward_kl(s, t, temperature=2.0), 4 * np_kl(pt, ps), rtol=1e-5)
    np.testing.assert_allclose(reverse_kl(s, t, temperature=2.0), 4 * np_kl(ps, pt), rtol=1e-5)


def test_identical_distributions_give_zero():
    z = np.random.default_rng(1).normal(size=(2, 3, 5)).astype(np.float32)
    for fn in (forward_kl, reverse_kl, generalized_jsd, functools.partial(generalized_jsd, beta=0.2)):
        np.testing.assert_allclose(fn(z, z), 0.0, atol=1e-6)


def test_jsd_formula_symmetry_and_endpoints():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    ps, pt = np_softmax(s), np_softmax(t)
    for beta in (0.2, 0.5, 0.9):
        m = beta * pt + (1 - beta) * ps
        expected = beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
        np.testing.assert_allclose(generalized_jsd(s, t, beta=beta), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5), rtol=1e-5)
    assert np.all(np.asarray(generalized_jsd(s, t)) <= math.log(2) + 1e-6)
    np.testing.assert_allclose(generalized_jsd(s, t, beta=0.0), forward_kl(s, t), rtol=1e-6)
    np.testing.assert_allclose(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t), rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, beta=1.5)


def test_masked_vocab_is_finite():
    t = np.array([0.0, -np.inf, 1.0], np.float32)
    s = np.array([0.5, 0.2, -0.3], np.float32)
    assert np.isfinite(float(forward_kl(s, t)))
    g = jax.grad(lambda x: forward_kl(x, t))(jnp.asarray(s))
    assert np.all(np.isfinite(g))
    assert np.isfinite(float(generalized_jsd(s, t)))


def test_topk_forward_kl_hand_example():
    s = np.zeros(3, np.float32)  # student uniform, log p_s = -ln 3
    lp = np.log(np.array([0.5, 0.3], np.float32))
    ids = np.array([0, 1])
    # renormalised q = [.625, .375]; loss = .625 ln(.625*3) + .375 ln(.375*3)
    expected = 0.625 * math.log(1.875) + 0.375 * math.log(1.125)
    assert float(topk_forward_kl(s, lp, ids)) == pytest.approx(expected, rel=1e-6)
    # = KL(q || p_s renormalised on top-k) - log p_s(top-k) = KL([.625,.375] || [.5,.5]) - ln(2/3)
    assert expected == pytest.approx(0.625 * math.log(1.25) + 0.375 * math.log(0.75) - math.log(2 / 3))


def test_topk_with_all_tokens_equals_forward_kl():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
    lt = np.asarray(jax.nn.log_softmax(t))
    order = np.argsort(-lt, axis=-1)
    lp = np.take_along_axis(lt, order, -1)
    for temp in (1.0, 2.0):
        np.testing.assert_allclose(topk_forward_kl(s, lp, order, temperature=temp),
                                   forward_kl(s, t, temperature=temp), rtol=1e-5)


B, L, DS, DT, V = 2, 7, 8, 12, 11


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(B, L, DS)).astype(np.float32)
    ws = rng.normal(size=(DS, V)).astype(np.float32) / 3
    ht = rng.normal(size=(B, L, DT)).astype(np.float32)
    wt = rng.normal(size=(DT, V)).astype(np.float32) / 3
    mask = np.ones((B, L), np.float32)
    mask[0, 5:] = 0
    mask[1, 0] = 0
    y = rng.integers(0, V, size=(B, L)).astype(np.int32)
    return hs, ws, ht, wt, mask, y


def _numpy_reference(hs, ws, ht, wt, mask, y, alpha):
    s, t = hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt
    ps, pt = np_softmax(s), np_softmax(t)
    div = np_kl(pt, ps)
    ce = -np.log(np.take_along_axis(ps, y[..., None], -1)[..., 0])
    return np.sum(mask * (alpha * div + (1 - alpha) * ce)) / mask.sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_matches_unchunked_reference(chunk_size):
    hs, ws, ht, wt, mask, y = _inputs()
    loss, m = jax.jit(functools.partial(chunked_distill_loss, chunk_size=chunk_size, alpha=0.3))(
        hs, ws, ht, wt, mask, hard_targets=y)
    assert float(loss) == pytest.approx(_numpy_reference(hs, ws, ht, wt, mask, y, 0.3), rel=1e-5)
    assert float(m["loss_tokens"]) == mask.sum()
    assert float(m["loss"]) == pytest.approx(0.3 * float(m["distill_loss"]) + 0.7 * float(m["ce_loss"]), rel=1e-5)


def test_chunked_gradients_match_unchunked():
    hs, ws, ht, wt, mask, y = _inputs(1)
    div = functools.partial(generalized_jsd, beta=0.3)

    def unchunked(hs, ws, ht, wt):
        s, t = hs @ ws, jax.lax.stop_gradient(ht @ wt)
        ce = jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[..., None], -1)[..., 0]
        return jnp.sum(mask * (0.5 * div(s, t) + 0.5 * ce)) / mask.sum()

    def chunked(hs, ws, ht, wt):
        return chunked_distill_loss(hs, ws, ht, wt, mask, div, chunk_size=3, hard_targets=y, alpha=0.5)[0]

    ga = jax.jit(jax.grad(unchunked, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    gb = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    for a_, b_ in zip(ga, gb):
        np.testing.assert_allclose(b_, a_, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(gb[2])) and not np.any(np.asarray(gb[3]))  # teacher is frozen


def test_chunked_errors():
    hs, ws, ht, wt, mask, y = _inputs()
    with pytest.raises(ValueError, match="vocab size 11 but teacher_head_w has vocab size 10"):
        chunked_distill_loss(hs, ws, ht, wt[:, :10], mask)
    with pytest.raises(ValueError, match="needs hard_targets"):
        chunked_distill_loss(hs, ws, ht, wt, mask, alpha=0.5)
    with pytest.raises(ValueError, match="student_head_w must have shape"):
        chunked_distill_loss(hs, ws[:4], ht, wt, mask)
    with pytest.raises(ValueError, match="per-token values"):
        chunked_distill_loss(hs, ws, ht, wt, mask, divergence_fn=lambda s, t: jnp.sum(forward_kl(s, t)))


def _all_shapes(jaxpr):
    """Shapes of every value produced anywhere in a jaxpr, sub-jaxprs (scan, remat) included."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_chunked_never_builds_full_logits_forward_or_backward():
    rng = np.random.default_rng(4)
    b, length, v, chunk = 2, 64, 11, 8
    hs, ht = rng.normal(size=(b, length, DS)).astype(np.float32), rng.normal(size=(b, length, DT)).astype(np.float32)
    ws, wt = rng.normal(size=(DS, v)).astype(np.float32), rng.normal(size=(DT, v)).astype(np.float32)
    mask, y = np.ones((b, length), np.float32), np.zeros((b, length), np.int32)

    def f(hs, ws):
        return chunked_distill_loss(hs, ws, ht, wt, mask, chunk_size=chunk, hard_targets=y, alpha=0.5)[0]

    shapes = list(_all_shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hs, ws).jaxpr))
    vocab_sized = [s for s in shapes if s and s[-1] == v]
    assert vocab_sized, "expected per-chunk logits in the program"
    assert max(math.prod(s) for s in vocab_sized) <= max(b * chunk * v, DT * v), vocab_sized
