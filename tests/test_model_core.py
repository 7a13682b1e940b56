"""Transformer semantics: masking, packing, KV cache, chunked log-probs, remat, RoPE."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import (ModelConfig, RopeScaling, abstract, attention_mask, create, forward, init_cache,
                            logical_axes, logits, token_logprobs)
from jaxpost.models.layers import rope_inv_freq, rope_tables, swiglu

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, qk_norm=True, tie_embeddings=False, architecture="llama")


@pytest.fixture(scope="module")
def model():
    return create(CFG, seed=0)


fwd = jax.jit(forward, static_argnums=0)


def test_attention_mask_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = np.asarray(attention_mask(seg, seg, 0))[0, 0].astype(int)
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(m, expected)
    win = np.asarray(attention_mask(jnp.ones((1, 4), int), jnp.ones((1, 4), int), 0, sliding_window=2))[0, 0]
    np.testing.assert_array_equal(win.astype(int), np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))


def test_rope_frequencies_by_hand():
    np.testing.assert_allclose(rope_inv_freq(4, 10000.0), [1.0, 0.01], rtol=1e-6)
    # llama3 scaling with L=16, factors (lo=1, hi=4): wavelengths 2pi/f; lo_wave=16, hi_wave=4.
    # f=1 (w=6.28, medium): s = (16/6.283 - 1)/3 = 0.5155, f' = (1-s)/8 + s = 0.5761
    # f=0.01 (w=628 > 16): f/8 = 0.00125
    got = rope_inv_freq(4, 10000.0, RopeScaling(8.0, 1.0, 4.0, 16))
    s = (16 / (2 * np.pi) - 1) / 3
    np.testing.assert_allclose(got, [(1 - s) / 8 + s, 0.00125], rtol=1e-5)


def test_rope_tables_for_any_position():
    """The digit-table assembly equals cos/sin(p f) in float64, from position 0 to 2**31 - 1 and below 0."""
    config = CFG.replace(head_dim=4, rope_theta=10000.0, rope_scaling=None)
    positions = np.array([[0, 1, 2, 2047, 2048, 2049, 4_194_303, 4_194_304],
                          [123_456_789, 2**31 - 1, -1, -2048, -99_999, 65_535, 131_071, 1_000_000]])
    cos, sin = (np.asarray(t) for t in rope_tables(jnp.asarray(positions, jnp.int32), 4, config))
    assert cos.shape == sin.shape == (2, 8, 1, 2)
    # By hand: f = (1, 0.01); position 1 -> (cos 1, cos 0.01); position -1 -> sin changes sign.
    np.testing.assert_allclose(cos[0, 1, 0], [0.5403023, 0.99995], rtol=1e-6)
    np.testing.assert_allclose(sin[1, 2, 0], [-0.84147098, -0.00999983], rtol=1e-6)
    # The model's frequencies are float32 (0.01 is 0.0099999998): the reference multiplies those exactly.
    angles = positions[..., None].astype(np.float64) * rope_inv_freq(4, 10000.0).astype(np.float64)
    np.testing.assert_allclose(cos[:, :, 0], np.cos(angles), atol=3e-7)
    np.testing.assert_allclose(sin[:, :, 0], np.sin(angles), atol=3e-7)


def test_param_tree_and_logical_axes(model):
    _, params = model
    axes = logical_axes(CFG)
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_a = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_p) == len(flat_a)
    for path, x in flat_p:
        assert len(flat_a[path]) == x.ndim, path
    assert axes["layers"][0]["attn"]["q_proj"]["kernel"] == ("embed", "heads")
    assert axes["layers"][1]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    assert params["layers"][0]["attn"]["k_proj"]["kernel"].shape == (32, 2 * 8)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == CFG.num_params()


def test_packed_rows_equal_separate_documents(model):
    graphdef, params = model
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, 64, 5), rng.randint(0, 64, 4)
    packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0, 0, 0]], np.int32)
    h_packed, _ = fwd(graphdef, params, packed, pos, seg)
    h_a, _ = fwd(graphdef, params, a[None].astype(np.int32), np.arange(5)[None], np.ones((1, 5), np.int32))
    h_b, _ = fwd(graphdef, params, b[None].astype(np.int32), np.arange(4)[None], np.ones((1, 4), np.int32))
    np.testing.assert_allclose(h_packed[0, :5], h_a[0], atol=1e-5)
    np.testing.assert_allclose(h_packed[0, 5:9], h_b[0], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(h_packed)))  # padding rows are finite too


def test_kv_cache_decode_equals_full_forward_left_padded(model):
    graphdef, params = model
    B, P, G = 2, 6, 4  # prompt slots (left-padded), generated tokens
    rng = np.random.RandomState(1)
    tokens = rng.randint(1, 64, (B, P + G)).astype(np.int32)
    prompt_len = np.array([6, 3])
    pad = P - prompt_len
    seg = (np.arange(P + G)[None] >= pad[:, None]).astype(np.int32)
    tokens = tokens * seg
    pos = np.maximum(np.arange(P + G)[None] - pad[:, None], 0).astype(np.int32)
    full, _ = fwd(graphdef, params, tokens, pos, seg)

    cache = init_cache(CFG, B, P + G + 2)
    h, cache = fwd(graphdef, params, tokens[:, :P], pos[:, :P], seg[:, :P], cache)
    steps = [h]
    for t in range(P, P + G):
        h, cache = fwd(graphdef, params, tokens[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
        steps.append(h)
    assert int(cache.index) == P + G
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, :P + G], seg)


def _dense_logprobs(params, hidden, targets):
    z = logits(params, CFG, hidden)
    return jnp.take_along_axis(jax.nn.log_softmax(z, -1), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("stored", [0, 2**28], ids=["remat", "stored"])  # head recomputed / logits kept
@pytest.mark.parametrize("chunk_size", [4, 5, 64])  # divides L, does not divide L, larger than L
def test_chunked_logprobs_values_and_gradients(model, chunk_size, stored):
    _, params = model
    rng = np.random.RandomState(2)
    hidden = jnp.asarray(rng.randn(2, 12, 32), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 64, (2, 12)), jnp.int32)
    w = jnp.asarray(rng.randn(2, 12), jnp.float32)  # a non-uniform cotangent
    chunked = token_logprobs(params, CFG, hidden, targets, chunk_size=chunk_size, stored_logits_bytes=stored)
    dense = _dense_logprobs(params, hidden, targets)
    assert chunked.dtype == jnp.float32 and chunked.shape == (2, 12)
    np.testing.assert_allclose(chunked, dense, atol=1e-5)
    loss = lambda fn: lambda p, h: jnp.sum(w * fn(p, h))
    g_chunk = jax.grad(loss(lambda p, h: token_logprobs(p, CFG, h, targets, chunk_size=chunk_size,
                                                        stored_logits_bytes=stored)), (0, 1))(params, hidden)
    jaxpr = str(jax.make_jaxpr(lambda h: token_logprobs(params, CFG, h, targets, chunk_size=chunk_size,
                                                        stored_logits_bytes=stored))(hidden))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (stored == 0)
    g_dense = jax.grad(loss(lambda p, h: _dense_logprobs(p, h, targets)), (0, 1))(params, hidden)
    np.testing.assert_allclose(g_chunk[1], g_dense[1], atol=1e-5)
    np.testing.assert_allclose(g_chunk[0]["lm_head"]["kernel"], g_dense[0]["lm_head"]["kernel"], atol=1e-5)


def test_stored_logits_threshold_comes_from_the_config(model):
    """``config.stored_logits_mib`` decides whether the head is recomputed (jaxpr has a checkpoint)."""
    _, params = model
    hidden = jnp.zeros((2, 12, 32), jnp.float32)
    targets = jnp.zeros((2, 12), jnp.int32)
    for mib, recomputed in ((0, True), (1, False)):  # 2 x 12 x 64 float32 logits = 6 KiB
        cfg = CFG.replace(stored_logits_mib=mib)
        jaxpr = str(jax.make_jaxpr(lambda h: token_logprobs(params, cfg, h, targets, chunk_size=4))(hidden))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == recomputed, mib


def _dot_operand_dtypes(jaxpr, size):
    """Operand dtypes of every dot_general (nested jaxprs included) with an axis of ``size``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(size in v.aval.shape for v in eqn.invars):
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub, size)
    return found


def _primitive_names(jaxpr) -> set[str]:
    """Names of every primitive in ``jaxpr``, nested jaxprs included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitive_names(sub)
    return names


@pytest.mark.parametrize("stored", [0, 2**28], ids=["remat", "stored"])
def test_bf16_head_backward_multiplies_in_bf16(model, stored):
    """With bf16 compute every vocabulary-sized matmul, forward and backward, takes bf16 operands.

    (Plain autodiff would multiply the float32 logits cotangent by bf16
    weights, i.e. two float32 matmuls of the size of the head.) The
    gradients stay within bf16 rounding of the float32 computation.
    """
    _, params = model
    cfg = CFG.replace(dtype="bfloat16")
    rng = np.random.RandomState(3)
    hidden = jnp.asarray(rng.randn(2, 12, 32), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 64, (2, 12)), jnp.int32)
    loss = lambda c: lambda p, h: jnp.sum(token_logprobs(p, c, h, targets, chunk_size=4, stored_logits_bytes=stored))
    jaxpr = jax.make_jaxpr(jax.grad(loss(cfg), (0, 1)))(params, hidden).jaxpr
    dots = _dot_operand_dtypes(jaxpr, CFG.vocab_size)
    assert len(dots) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    g16 = jax.grad(loss(cfg), (0, 1))(params, hidden)
    g32 = jax.grad(loss(CFG), (0, 1))(params, hidden)
    for a, b in ((g16[1], g32[1]), (g16[0]["lm_head"]["kernel"], g32[0]["lm_head"]["kernel"])):
        assert a.dtype == b.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


def test_entropy_log_sum_sq_and_hand_checked_logprob():
    # One position, D=1, V=3, weight [[0, ln 2, ln 3]] and h=1: logits = ln(1, 2, 3),
    # p = (1/6, 2/6, 3/6); log p(target=2) = ln 0.5; H = -sum p ln p; log sum p^2 = log(14/36) (WPO's).
    cfg = ModelConfig(vocab_size=3, hidden_size=4, intermediate_size=4, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=2)
    params = {"lm_head": {"kernel": jnp.array([[0.0, np.log(2), np.log(3)]] + [[0.0] * 3] * 3)}}
    hidden = jnp.array([[[1.0, 0.0, 0.0, 0.0]]])
    lp, ent = token_logprobs(params, cfg, hidden, jnp.array([[2]]), return_entropy=True)
    p = np.array([1, 2, 3]) / 6
    np.testing.assert_allclose(lp, [[np.log(0.5)]], rtol=1e-6)
    np.testing.assert_allclose(ent, [[-(p * np.log(p)).sum()]], rtol=1e-6)
    # With the entropy asked for, log p keeps its gradient onehot(2) - p (W's first row, h = e_0).
    grad = jax.grad(lambda q: jnp.sum(token_logprobs(q, cfg, hidden, jnp.array([[2]]), return_entropy=True)[0]))
    np.testing.assert_allclose(grad(params)["lm_head"]["kernel"][0], [-1 / 6, -2 / 6, 1 / 2], rtol=1e-6)
    lp2, lssp = token_logprobs(params, cfg, hidden, jnp.array([[2]]), return_log_sum_sq=True)
    np.testing.assert_array_equal(lp2, lp)
    np.testing.assert_allclose(lssp, [[np.log(14 / 36)]], rtol=1e-6)
    _, ent2, lssp2 = token_logprobs(params, cfg, hidden, jnp.array([[2]]), return_entropy=True, return_log_sum_sq=True)
    np.testing.assert_array_equal(ent2, ent)
    np.testing.assert_array_equal(lssp2, lssp)
    grad = jax.grad(lambda q: jnp.sum(token_logprobs(q, cfg, hidden, jnp.array([[2]]), return_log_sum_sq=True)[1]))
    assert not np.any(grad(params)["lm_head"]["kernel"])  # a weight (WPO), not a training signal


def test_logprob_gradient_is_onehot_minus_softmax_without_a_scatter():
    # Same head as above: d log p(2) / d z = onehot(2) - p = (-1/6, -2/6, 1/2),
    # and with h = e_0 that is the gradient of W's first row.
    cfg = ModelConfig(vocab_size=3, hidden_size=4, intermediate_size=4, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=2)
    params = {"lm_head": {"kernel": jnp.array([[0.0, np.log(2), np.log(3)]] + [[0.0] * 3] * 3)}}
    hidden = jnp.array([[[1.0, 0.0, 0.0, 0.0]]])
    loss = lambda p: jnp.sum(token_logprobs(p, cfg, hidden, jnp.array([[2]])))
    grad = jax.grad(loss)(params)["lm_head"]["kernel"]
    np.testing.assert_allclose(grad[0], [-1 / 6, -2 / 6, 1 / 2], rtol=1e-6)
    np.testing.assert_allclose(grad[1:], 0.0, atol=1e-7)
    # The closed form is one elementwise pass: autodiff of take_along_axis
    # would scatter-add into a zero [*, V] array.
    prims = _primitive_names(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert "dot_general" in prims and not any("scatter" in p for p in prims), prims


def test_swiglu_gradient_hand_values():
    # y = silu(g) u, silu(g) = g s, s = sigmoid(g): dy/dg = u s (1 + g (1 - s)), dy/du = g s.
    # g = 0: s = 1/2, so dg = u / 2, du = 0. g = ln 3: s = 3/4, du = (3/4) ln 3,
    # dg = u (3/4)(1 + ln(3) / 4).
    gate = jnp.array([0.0, np.log(3.0)])
    up = jnp.array([2.0, 4.0])
    dg, du = jax.grad(lambda g, u: jnp.sum(swiglu(g, u)), argnums=(0, 1))(gate, up)
    np.testing.assert_allclose(dg, [1.0, 4 * 0.75 * (1 + np.log(3) / 4)], rtol=1e-6)
    np.testing.assert_allclose(du, [0.0, 0.75 * np.log(3)], rtol=1e-6)
    np.testing.assert_allclose(swiglu(gate, up), [0.0, 4 * 0.75 * np.log(3)], rtol=1e-6)
    # Gradients keep each input's dtype.
    bf = jax.grad(lambda g, u: jnp.sum(swiglu(g, u)).astype(jnp.float32), argnums=(0, 1))(
        gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16))
    assert [x.dtype for x in bf] == [jnp.bfloat16, jnp.bfloat16]


def test_tied_embeddings_use_embedding_transpose():
    cfg = CFG.replace(tie_embeddings=True)
    _, params = create(cfg, seed=1)
    assert "lm_head" not in params
    h = jnp.ones((1, 1, 32))
    np.testing.assert_allclose(logits(params, cfg, h)[0, 0], params["embed"]["embedding"].sum(-1), rtol=1e-5)


_REMAT_TOKENS = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 8)), jnp.int32)


def _remat_grad(graphdef, params):
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    seg = jnp.ones((2, 8), jnp.int32)

    def loss(p):
        h, _ = forward(graphdef, p, _REMAT_TOKENS, pos, seg)
        return token_logprobs(p, CFG, h, _REMAT_TOKENS).sum()

    return jax.jit(jax.grad(loss))(params)


@pytest.mark.slow
def test_remat_gives_same_gradients(model):
    graphdef, params = model
    ref = _remat_grad(graphdef, params)
    for remat in ("full", "save_dots"):
        got = _remat_grad(abstract(CFG.replace(remat=remat))[0], params)  # same params, rematted graph
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ref, got)


def test_bfloat16_compute_keeps_float32_params_and_logprobs():
    cfg = CFG.replace(dtype="bfloat16")
    graphdef, params = create(cfg, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.zeros((1, 4), jnp.int32)
    h, _ = fwd(graphdef, params, tokens, jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32))
    assert h.dtype == jnp.bfloat16
    assert token_logprobs(params, cfg, h, tokens).dtype == jnp.float32


def test_bad_input_shapes_are_reported(model):
    graphdef, params = model
    with pytest.raises(ValueError, match="tokens, positions, segment_ids"):
        forward(graphdef, params, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(params, CFG, jnp.zeros((1, 4, 32)), jnp.zeros((1, 5), jnp.int32))
