"""SFT and reward-model losses against hand-derived values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (bradley_terry_loss, gather_last, last_token_index, masked_token_nll,
                            segment_last_token_indices, sft_loss, token_accuracy)

LOGPS = np.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 0], [1, 0, 0]], np.float32)


def test_masked_token_nll_sums_and_counts():
    total, n = masked_token_nll(LOGPS, MASK)
    assert float(total) == pytest.approx(1.0 + 2.0 + 0.5)  # masked -3 and -4 are dropped
    assert float(n) == 3.0


def test_sft_loss_mean_and_metrics():
    loss, metrics = jax.jit(sft_loss)(LOGPS, MASK)
    assert float(loss) == pytest.approx(3.5 / 3)
    assert float(metrics["loss"]) == pytest.approx(3.5 / 3)
    assert float(metrics["loss_tokens"]) == 3.0


def test_sft_loss_empty_mask_is_zero_not_nan():
    loss, metrics = sft_loss(LOGPS, np.zeros_like(MASK))
    assert float(loss) == 0.0 and float(metrics["loss_tokens"]) == 0.0


def test_accumulation_sum_over_count_equals_full_batch():
    # Micro-batch rows 0 and 1 have 2 and 1 tokens: averaging their means (1.5, 0.5) gives 1.0,
    # the correct full-batch mean is 3.5 / 3.
    parts = [masked_token_nll(LOGPS[i:i + 1], MASK[i:i + 1]) for i in range(2)]
    accumulated = sum(float(p[0]) for p in parts) / sum(float(p[1]) for p in parts)
    assert accumulated == pytest.approx(float(sft_loss(LOGPS, MASK)[0]))
    assert np.mean([float(p[0]) / float(p[1]) for p in parts]) == pytest.approx(1.0)


def test_sft_gradient_is_minus_mask_over_count():
    g = jax.grad(lambda lp: sft_loss(lp, MASK)[0])(jnp.asarray(LOGPS))
    np.testing.assert_allclose(g, -MASK / 3.0)


def test_token_accuracy():
    pred = np.array([[1, 2, 3], [4, 5, 6]])
    tgt = np.array([[1, 0, 3], [4, 5, 0]])
    mask = np.array([[1, 1, 1], [1, 0, 1]], np.float32)
    # trained: (1==1) (2!=0) (3==3) (4==4) (6!=0) -> 3 of 5
    assert float(token_accuracy(pred, tgt, mask)) == pytest.approx(0.6)


def test_sft_shape_error_names_tensor():
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss(LOGPS, MASK[:, :2])
    with pytest.raises(ValueError, match=r"token_logps must have shape \[B,L\]"):
        sft_loss(LOGPS[0], MASK[0])


RC = np.array([1.0, 0.0], np.float32)
RR = np.array([0.0, 0.5], np.float32)


def _nls(x):
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


def test_bradley_terry_hand_example():
    loss, m = jax.jit(bradley_terry_loss)(RC, RR)
    # -log s(1) = 0.313262, -log s(-0.5) = 0.974077
    assert float(loss) == pytest.approx((0.313262 + 0.974077) / 2, abs=1e-6)
    assert float(loss) == pytest.approx((_nls(1.0) + _nls(-0.5)) / 2, rel=1e-6)
    assert float(m["accuracy"]) == 0.5
    assert float(m["margin"]) == pytest.approx((1.0 - 0.5) / 2)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5)
    assert float(m["rewards/rejected"]) == pytest.approx(0.25)
    assert float(m["rewards/mean"]) == pytest.approx(0.375)
    assert float(m["rewards/std"]) == pytest.approx(np.std([1.0, 0.0, 0.0, 0.5]), rel=1e-6)


def test_bradley_terry_margin_and_centering():
    margin = np.array([0.5, 0.0], np.float32)
    loss, _ = bradley_terry_loss(RC, RR, margin=margin, center_coef=0.01)
    # pair 0: -log s(1 - 0.5); centering: 0.01 * mean((1+0)^2, (0+0.5)^2) = 0.01 * 0.625
    expected = (_nls(0.5) + _nls(-0.5)) / 2 + 0.01 * 0.625
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_pair_mask_and_gradient():
    loss, m = bradley_terry_loss(RC, RR, pair_mask=np.array([1.0, 0.0], np.float32))
    assert float(loss) == pytest.approx(_nls(1.0), rel=1e-6)
    assert float(m["accuracy"]) == 1.0
    # d/dr_c of -log s(r_c - r_r) = -s(-(r_c - r_r)); mean over 2 pairs
    g = jax.grad(lambda rc: bradley_terry_loss(rc, RR)[0])(jnp.asarray(RC))
    sig = lambda x: 1 / (1 + math.exp(-x))
    np.testing.assert_allclose(g, [-sig(-1.0) / 2, -sig(0.5) / 2], rtol=1e-6)


def test_bradley_terry_shape_error():
    with pytest.raises(ValueError, match="rejected_rewards"):
        bradley_terry_loss(RC, RR[:1])


def test_last_token_index_any_padding():
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(last_token_index(mask), [1, 3, 0, 1])
    seg = np.array([[1, 1, 2, 2, 0], [0, 0, 1, 1, 1]], np.int32)
    np.testing.assert_array_equal(last_token_index(seg), [3, 4])
    np.testing.assert_array_equal(segment_last_token_indices(seg, 3), [[1, 3, -1], [4, -1, -1]])
    scores = np.arange(20, dtype=np.float32).reshape(4, 5)[:2]
    np.testing.assert_array_equal(gather_last(scores, seg), [3.0, 9.0])
