"""Attention kernel choice: ``ModelConfig.attention`` = xla | cudnn | auto.

The cuDNN comparison runs only where a GPU is present (the device check in
``benchmarks/gpu_run.sh`` runs this file there); on CPU the resolution rules
are checked.
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
    with pytest.raises(ValueError, match="attention must be 'xla', 'cudnn' or 'auto', got 'flash'"):
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


def _packed_batch():
    """Two rows: row 0 packs documents of 5 and 7 tokens then 4 pads; row 1 is one 13-token doc + 3 pads."""
    seg = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 13 + [0] * 3], np.int32)
    pos = np.zeros_like(seg)
    for b in range(2):
        for s in set(seg[b].tolist()) - {0}:
            idx = np.nonzero(seg[b] == s)[0]
            pos[b, idx] = np.arange(len(idx))
    tokens = np.random.default_rng(0).integers(0, 128, seg.shape).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


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


@pytest.mark.skipif(not ON_GPU, reason="cuDNN fused attention needs an NVIDIA GPU")
@pytest.mark.parametrize("sliding_window", [None, 4])
def test_cudnn_is_as_accurate_as_xla_against_float32(sliding_window):
    """bf16 cuDNN and bf16 XLA attention against an fp32 XLA reference on packed, padded rows.

    Both bf16 paths round differently, so neither equals the other; a wrong
    mask (segments, causality, window) would put cuDNN's error far above
    XLA's, which is what this bounds.
    """
    base = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, dtype="bfloat16", sliding_window=sliding_window)
    batch = _packed_batch()
    h_ref, g_ref = _grads_and_hidden(dataclasses.replace(base, dtype="float32"), batch)
    errs = {}
    for kernel in ("xla", "cudnn"):
        h, g = _grads_and_hidden(dataclasses.replace(base, attention=kernel), batch, check_kernel=kernel)
        errs[kernel] = (_rel_err(h, h_ref), max(_rel_err(a, b) for a, b in zip(g, g_ref)))
    print("relative error vs fp32 (hidden, worst gradient):", errs)
    for i, what in enumerate(("hidden", "gradient")):
        assert errs["cudnn"][i] <= 1.5 * errs["xla"][i] + 1e-2, f"{what}: cuDNN {errs['cudnn']} vs XLA {errs['xla']}"
