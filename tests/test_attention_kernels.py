"""Attention kernels: ``ModelConfig.attention`` = xla | cudnn | splash | auto.

The cuDNN comparison runs only where a GPU is present (the device check in
``benchmarks/gpu_run.sh`` runs this file there). The Pallas splash kernel
runs everywhere: interpreted off TPU, so CPU checks its masks and gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import ModelConfig, create, forward
from jaxpost.models.attention import attention_kernel

ON_GPU = jax.default_backend() == "gpu"


def test_attention_choice_is_validated():
    with pytest.raises(ValueError, match="ModelConfig.attention must be one of 'xla', 'cudnn', 'splash', 'auto', "
                                         "got 'flash'"):
        ModelConfig(attention="flash")


def test_auto_resolution_rules():
    bf16 = ModelConfig(attention="auto", hidden_size=64, num_heads=4, dtype="bfloat16")
    expected = "cudnn" if ON_GPU else "xla"
    assert attention_kernel(bf16, jnp.bfloat16) == expected
    # fp32 compute and head dims cuDNN's kernel does not take stay on XLA everywhere.
    assert attention_kernel(bf16, jnp.float32) == "xla"
    assert attention_kernel(dataclasses.replace(bf16, head_dim=12), jnp.bfloat16) == "xla"
    assert attention_kernel(dataclasses.replace(bf16, head_dim=256), jnp.bfloat16) == "xla"
    assert attention_kernel(ModelConfig(attention="cudnn"), jnp.float32) == "cudnn"
    assert attention_kernel(ModelConfig(), jnp.bfloat16) == expected  # "auto" is the default
    assert attention_kernel(ModelConfig(attention="xla"), jnp.bfloat16) == "xla"
    on_tpu = jax.default_backend() == "tpu"
    assert attention_kernel(ModelConfig(), jnp.float32, 256) == ("splash" if on_tpu else "xla")
    assert attention_kernel(ModelConfig(), jnp.float32, 100) == "xla"  # not a multiple of 128


def _batch_from_segments(seg, seed):
    """``(tokens, positions, segment_ids)`` for segment ids ``seg``: positions restart per document."""
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for s in set(seg[b].tolist()) - {0}:
            idx = np.nonzero(seg[b] == s)[0]
            pos[b, idx] = np.arange(len(idx))
    tokens = np.random.default_rng(seed).integers(0, 128, seg.shape).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _packed_batch():
    """Two rows: row 0 packs documents of 5 and 7 tokens then 4 pads; row 1 is one 13-token doc + 3 pads."""
    return _batch_from_segments(np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 13 + [0] * 3], np.int32), seed=0)


def _grads_and_hidden(config, batch, check_kernel=None):
    tokens, pos, seg = batch
    graphdef, params = create(config, seed=0)
    real = (seg > 0)[..., None]

    def loss(p):
        hidden, _ = forward(graphdef, p, tokens, pos, seg)
        hidden = jnp.where(real, hidden.astype(jnp.float32), 0.0)
        return jnp.sum(hidden ** 2), hidden

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if check_kernel is not None:
        hlo = step.lower(params).compile().as_text().lower()
        assert ("fmha" in hlo) == (check_kernel == "cudnn"), f"{check_kernel}: cuDNN call present = {'fmha' in hlo}"
    (_, hidden), grads = step(params)
    return np.asarray(hidden), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def _single_document_batch():
    """Rows of one document then padding (cuDNN's sequence-length branch): 13 tokens + 3 pads, 16, 0."""
    return _batch_from_segments(np.array([[1] * 13 + [0] * 3, [1] * 16, [0] * 16], np.int32), seed=0)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN fused attention needs an NVIDIA GPU")
@pytest.mark.parametrize("rows", ["packed", "single"])
@pytest.mark.parametrize("sliding_window", [None, 4])
def test_cudnn_is_as_accurate_as_xla_against_float32(sliding_window, rows):
    """bf16 cuDNN and bf16 XLA attention against an fp32 XLA reference on packed, padded rows.

    Both bf16 paths round differently, so neither equals the other; a wrong
    mask (segments, causality, window) would put cuDNN's error far above
    XLA's, which is what this bounds. ``single`` rows take cuDNN's
    sequence-length branch, ``packed`` rows its segment-mask branch.
    """
    base = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, dtype="bfloat16", sliding_window=sliding_window)
    batch = _packed_batch() if rows == "packed" else _single_document_batch()
    h_ref, g_ref = _grads_and_hidden(dataclasses.replace(base, dtype="float32"), batch)
    errs = {}
    for kernel in ("xla", "cudnn"):
        h, g = _grads_and_hidden(dataclasses.replace(base, attention=kernel), batch, check_kernel=kernel)
        errs[kernel] = (_rel_err(h, h_ref), max(_rel_err(a, b) for a, b in zip(g, g_ref)))
    print("relative error vs fp32 (hidden, worst gradient):", errs)
    for i, what in enumerate(("hidden", "gradient")):
        assert errs["cudnn"][i] <= 1.5 * errs["xla"][i] + 1e-2, f"{what}: cuDNN {errs['cudnn']} vs XLA {errs['xla']}"


def _splash_batch(length=128):
    """Row 0 packs documents of 40 and 60 tokens then pads; row 1 is one document of 110 tokens + pads."""
    seg = np.zeros((2, length), np.int32)
    seg[0, :40], seg[0, 40:100], seg[1, :110] = 1, 2, 1
    return _batch_from_segments(seg, seed=1)


@pytest.mark.parametrize("sliding_window", [None, 24])
def test_splash_equals_xla_values_and_gradients(sliding_window):
    """fp32: the splash kernel (interpreted off TPU) against the XLA path, packed and padded rows, GQA."""
    base = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                       num_kv_heads=2, sliding_window=sliding_window)
    batch = _splash_batch()
    h_x, g_x = _grads_and_hidden(dataclasses.replace(base, attention="xla"), batch)
    h_s, g_s = _grads_and_hidden(dataclasses.replace(base, attention="splash"), batch)
    np.testing.assert_allclose(h_s, h_x, atol=2e-5, rtol=2e-5)
    for a, b in zip(g_s, g_x):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_under_fsdp_tp_shards_matches_single_device():
    """Under a 2 x 2 x 2 data/fsdp/tensor mesh the kernel runs per (batch, heads) shard via shard_map."""
    from jaxpost.sharding import Partitioner, make_mesh

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, attention="splash")
    # 4 rows, so that the batch splits over data x fsdp = 4 shards.
    tokens, pos, seg = (jnp.concatenate([x, x[::-1]]) for x in _splash_batch())
    graphdef, params = create(config, seed=0)
    single, _ = jax.jit(lambda p: forward(graphdef, p, tokens, pos, seg))(params)
    part = Partitioner(make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tp")
    _, sharded_params = create(config, seed=0, partitioner=part)

    def run(p, t, q, s):
        with part.activate():
            return forward(graphdef, p, t, q, s)[0]

    b_sh = part.batch_sharding()
    sharded = jax.jit(run, in_shardings=(None, b_sh, b_sh, b_sh))(sharded_params, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-5, rtol=2e-5)


def test_splash_rejects_lengths_off_its_block_multiple():
    config = ModelConfig(vocab_size=128, hidden_size=64, num_layers=1, attention="splash")
    graphdef, params = create(config, seed=0)
    tokens, pos, seg = _packed_batch()  # length 16
    with pytest.raises(ValueError, match="multiple of 128; got 16"):
        forward(graphdef, params, tokens, pos, seg)


@pytest.mark.parametrize("prefix", [0, 70])
@pytest.mark.parametrize("sliding_window", [None, 30])
def test_blocked_xla_attention_equals_one_masked_call(sliding_window, prefix):
    """Query blocks that skip keys above the diagonal (and outside the window) change nothing.

    T = 150 is not a multiple of the block of 64 (a short last block); row 0
    packs three documents, row 1 ends in padding. With a prefix, the keys
    are ``prefix + T`` long and the queries sit after them (``q_start``).
    """
    from jaxpost.models.attention import attention_mask, blocked_causal_attention

    rng = np.random.default_rng(2)
    B, T, N, K, H = 2, 150, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(B, prefix + T, K, H)).astype(np.float32)) for _ in range(2))
    seg = np.ones((B, prefix + T), np.int32)
    seg[0, prefix + 45:prefix + 100], seg[0, prefix + 100:], seg[1, prefix + 125:] = 2, 3, 0
    seg[1, :prefix // 2] = 0  # a left-padded prefix in row 1
    seg = jnp.asarray(seg)
    q_seg = seg[:, prefix:]

    def one_call(q, k, v):
        mask = attention_mask(q_seg, seg, prefix, sliding_window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5)

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, q_seg, sliding_window, block=64, k_segments=seg if prefix else None)

    np.testing.assert_allclose(np.asarray(jax.jit(blocked)(q, k, v)), np.asarray(jax.jit(one_call)(q, k, v)),
                               atol=1e-5)
    w = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grad(blocked), grad(one_call)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_branches_equal_separate_rows(sliding_window):
    """A row ``prefix | branch 1 | branch 2`` under ``Branches`` gives each branch the hidden
    states (and the parameters the gradients) of its own row ``prefix | branch``."""
    from jaxpost.models import Branches, ModelConfig, create, forward

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=sliding_window)
    graphdef, params = create(cfg, seed=3)
    rng = np.random.default_rng(0)
    B, P, R = 2, 6, 9
    prefix = rng.integers(1, 64, (B, P)).astype(np.int32)
    prefix_seg = np.ones((B, P), np.int32)
    prefix_seg[1, :2] = 0  # row 1's prefix is left-padded: 4 real tokens
    n_real = prefix_seg.sum(1)
    branch = [rng.integers(1, 64, (B, R)).astype(np.int32) for _ in range(2)]
    branch_seg = [np.ones((B, R), np.int32), np.ones((B, R), np.int32)]
    branch_seg[1][0, 5:] = 0  # right padding in one branch
    prefix_pos = np.maximum(np.cumsum(prefix_seg, 1) - 1, 0).astype(np.int32)
    branch_pos = (n_real[:, None] + np.arange(R)[None]).astype(np.int32)

    row = lambda parts: np.concatenate(parts, axis=1)
    tokens, seg = row([prefix, *branch]), row([prefix_seg, *branch_seg])
    pos = row([prefix_pos, branch_pos, branch_pos])
    weights = rng.normal(size=(B, P + 2 * R, cfg.hidden_size)).astype(np.float32)
    weights[:, :P] = 0.0  # one loss over the branch slots only

    def joint(p):
        h, _ = forward(graphdef, p, tokens, pos, seg, branches=Branches(prefix=P, count=2))
        return h, jnp.sum(h * weights)

    def separate(p):
        hs, total = [], 0.0
        for i in range(2):
            h, _ = forward(graphdef, p, row([prefix, branch[i]]), row([prefix_pos, branch_pos]),
                           row([prefix_seg, branch_seg[i]]))
            hs.append(h[:, P:])
            total = total + jnp.sum(h[:, P:] * weights[:, P + i * R:P + (i + 1) * R])
        return hs, total

    h_joint, _ = jax.jit(joint)(params)
    h_sep, _ = jax.jit(separate)(params)
    for i in range(2):
        real = branch_seg[i].astype(bool)
        np.testing.assert_allclose(np.asarray(h_joint[:, P + i * R:P + (i + 1) * R])[real],
                                   np.asarray(h_sep[i])[real], atol=1e-5)
    g_joint = jax.jit(jax.grad(lambda p: joint(p)[1]))(params)
    g_sep = jax.jit(jax.grad(lambda p: separate(p)[1]))(params)
    for a, b in zip(jax.tree.leaves(g_joint), jax.tree.leaves(g_sep)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not a prefix of 6 plus 2 equal branches"):
        forward(graphdef, params, tokens[:, :-1], pos[:, :-1], seg[:, :-1], branches=Branches(prefix=P, count=2))


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("rows", ["single", "packed"])
def test_cudnn_branches_follow_the_mask_rule(rows, sliding_window):
    """The cuDNN wrapper's two branches, run through XLA: sequence lengths for rows of one
    document then padding (an all-padding row included), the segment mask for packed rows.

    Compared with one masked call on the real slots (values and gradients);
    padding slots come out 0 on the lengths branch.
    """
    from jaxpost.models.attention import attention_mask, cudnn_attention, single_segment_lengths

    rng = np.random.default_rng(3)
    B, T, N, K, H = 3, 24, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)).astype(np.float32)) for n in (N, K, K))
    seg = np.zeros((B, T), np.int32)
    seg[0, :24], seg[1, :17] = 1, 1  # row 2 is all padding
    if rows == "packed":
        seg[0, 10:] = 2
    seg = jnp.asarray(seg)
    lengths, single = single_segment_lengths(seg)
    assert bool(single) == (rows == "single") and lengths.tolist() == [24, 17, 0]
    real = (seg > 0)[:, :, None, None]

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg, seg, 0, sliding_window), scale=H ** -0.5)
        return jnp.where(real, out, 0.0)

    def wrapped(q, k, v):
        return jnp.where(real, cudnn_attention(q, k, v, seg, sliding_window, implementation="xla"), 0.0)

    out = np.asarray(jax.jit(lambda *a: cudnn_attention(*a, seg, sliding_window, implementation="xla"))(q, k, v))
    np.testing.assert_allclose(np.where(np.asarray(real), out, 0.0), np.asarray(jax.jit(reference)(q, k, v)),
                               atol=1e-5)
    if rows == "single":
        assert np.all(out[np.asarray(seg) == 0] == 0.0)
    w = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grad(wrapped), grad(reference)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_single_segment_lengths_rejects_left_padding_and_gaps():
    from jaxpost.models.attention import single_segment_lengths

    for row in ([0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 2, 0]):
        lengths, single = single_segment_lengths(jnp.asarray([row, [1, 1, 1, 0]], jnp.int32))
        assert not bool(single), row
    lengths, single = single_segment_lengths(jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32))
    assert bool(single) and lengths.tolist() == [3, 4]
