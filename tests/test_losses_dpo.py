"""DPO-family losses against formulas re-derived here with hand-checkable numbers."""

import functools
import math

import jax
import numpy as np
import pytest

from preference_helpers import PC, PR, RC, RR, a, logsig, sig
from jaxpost.losses import PREFERENCE_LOSSES, preference_loss
from jaxpost.losses.dpo import (hinge_loss, ipo_loss, orpo_loss, robust_loss, sigmoid_loss,
                                simpo_loss)


def test_dpo_hand_example_and_metrics():
    loss, m = sigmoid_loss(PC, PR, RC, RR, beta=0.1)
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139
    assert float(loss) == pytest.approx(0.598139, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1)     # 0.1 * (-1 - -2)
    assert float(m["rewards/rejected"]) == pytest.approx(-0.1)  # 0.1 * (-3 - -2)
    assert float(m["rewards/margins"]) == pytest.approx(0.2)
    assert float(m["rewards/accuracies"]) == 1.0
    assert float(m["logps/chosen"]) == -1.0 and float(m["logps/rejected"]) == -3.0


def test_dpo_equals_log2_when_policy_is_reference():
    pc, pr = a(-5.0, -1.0, -7.5), a(-2.0, -9.0, -7.5)
    loss, m = sigmoid_loss(pc, pr, pc, pr, beta=0.3)
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(m["rewards/margins"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0


def test_dpo_gradient_matches_analytic():
    beta = 0.5
    pc, pr, rc, rr = a(-1.0, -4.0), a(-3.0, -2.0), a(-2.0, -3.0), a(-2.5, -2.0)
    h = (pc - pr) - (rc - rr)  # [2.5, -3.0]
    gc, gr = jax.grad(lambda c, r: sigmoid_loss(c, r, rc, rr, beta=beta)[0], argnums=(0, 1))(pc, pr)
    expected = np.array([-beta * sig(-beta * x) / 2 for x in h])  # mean over 2 pairs
    np.testing.assert_allclose(gc, expected, rtol=1e-6)
    np.testing.assert_allclose(gr, -expected, rtol=1e-6)


def test_cdpo_label_smoothing():
    loss, _ = sigmoid_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * logsig(0.2) - 0.2 * logsig(-0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_robust_dpo():
    loss, _ = robust_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    # rDPO: (-(1-e) log s(z) + e log s(-z)) / (1 - 2e) with z = 0.2, e = 0.2
    expected = (-0.8 * logsig(0.2) + 0.2 * logsig(-0.2)) / 0.6
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    plain, _ = robust_loss(PC, PR, RC, RR, beta=0.1)
    assert float(plain) == pytest.approx(float(sigmoid_loss(PC, PR, RC, RR, beta=0.1)[0]), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


def test_hinge():
    assert float(hinge_loss(PC, PR, RC, RR, beta=0.1)[0]) == pytest.approx(0.8)  # 1 - 0.1 * 2
    assert float(hinge_loss(PC, PR, RC, RR, beta=1.0)[0]) == 0.0                 # relu(1 - 2)


def test_ipo_uses_length_averaged_logps():
    lc, lr = a(2.0), a(4.0)
    pc, pr, rc, rr = a(-4.0), a(-4.0), a(-6.0), a(-2.0)
    # averaged: pc -2, pr -1, rc -3, rr -0.5 -> h = (-2 + 1) - (-3 + 0.5) = 1.5; target 1/(2*0.25) = 2
    loss, m = ipo_loss(pc, pr, rc, rr, lc, lr, beta=0.25)
    assert float(loss) == pytest.approx((1.5 - 2.0) ** 2)
    assert float(m["rewards/chosen"]) == pytest.approx(0.25 * (-2.0 + 3.0))
    assert float(m["logps/chosen"]) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        ipo_loss(pc, pr, rc, rr, beta=0.25)


def test_simpo_reference_free():
    pc, pr, lc, lr = a(-2.0), a(-6.0), a(4.0), a(3.0)
    # z = 2 * (-0.5) - 2 * (-2) - 0.5 = 2.5; loss = log(1 + e^-2.5) = 0.078889
    loss, m = simpo_loss(pc, pr, None, None, lc, lr, beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(0.078889, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(-1.0)
    assert float(m["rewards/rejected"]) == pytest.approx(-4.0)
    # Reference arguments, if passed, do not matter.
    loss2, _ = simpo_loss(pc, pr, a(-100.0), a(3.0), lc, lr, beta=2.0, gamma=0.5)
    assert float(loss2) == float(loss)


def test_orpo_hand_example():
    pc, pr, lc, lr = a(-1.0), a(-6.0), a(2.0), a(3.0)
    ac, ar = -0.5, -2.0
    log_odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))  # 0.432752 + 1.854587
    assert log_odds == pytest.approx(2.287339, abs=1e-6)
    loss, m = orpo_loss(pc, pr, None, None, lc, lr, beta=0.1)
    assert float(loss) == pytest.approx(0.5 - 0.1 * logsig(log_odds), rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(0.5)
    assert float(m["log_odds_chosen"]) == pytest.approx(log_odds, rel=1e-5)
    assert float(m["log_odds_ratio"]) == pytest.approx(logsig(log_odds), rel=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(-0.05)


def test_rpo_nll_term():
    loss, m = sigmoid_loss(PC, PR, RC, RR, a(4.0), a(1.0), beta=0.1, rpo_alpha=2.0)
    # DPO 0.598139 + 2 * (1 / 4)
    assert float(loss) == pytest.approx(0.598139 + 0.5, abs=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="rpo_alpha needs chosen_lengths"):
        sigmoid_loss(PC, PR, RC, RR, beta=0.1, rpo_alpha=1.0)


def test_pair_mask_drops_padding_pairs():
    pc, pr, rc, rr = a(-1.0, 0.0), a(-3.0, 0.0), a(-2.0, 50.0), a(-2.0, -50.0)
    loss, m = sigmoid_loss(pc, pr, rc, rr, beta=0.1, pair_mask=a(1.0, 0.0))
    assert float(loss) == pytest.approx(0.598139, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", sorted(PREFERENCE_LOSSES))
def test_no_nan_identical_and_zero_length(kind):
    # Pair 0: identical chosen/rejected; pair 1: both responses empty (summed logp 0, length 0).
    pc = pr = a(-3.0, 0.0)
    rc = rr = a(-2.0, 0.0)
    lengths = a(3.0, 0.0)
    fn = functools.partial(preference_loss, kind, beta=0.1)
    loss, metrics = jax.jit(fn)(pc, pr, rc, rr, lengths, lengths)
    grads = jax.grad(lambda c, r: fn(c, r, rc, rr, lengths, lengths)[0], argnums=(0, 1))(pc, pr)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_dispatch_and_errors():
    assert float(preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1)[0]) == pytest.approx(0.598139, abs=1e-6)
    with pytest.raises(ValueError, match="Unknown preference loss 'dop'"):
        preference_loss("dop", PC, PR, RC, RR)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("sigmoid", PC, PR)
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have the same shape \[B\]"):
        sigmoid_loss(PC, a(1.0, 2.0), RC, RR)
