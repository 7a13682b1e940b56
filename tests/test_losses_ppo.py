"""PPO pieces: KL estimators, KL control, token rewards, GAE, whitening, clipped losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (AdaptiveKLController, adaptive_kl_coef, entropy_from_logits, gae, kl_estimate,
                            masked_mean, masked_var, ppo_policy_loss, ppo_token_rewards, ppo_value_loss,
                            whiten)


def test_kl_estimators_hand_values():
    logp, ref = np.array([-1.0], np.float32), np.array([-2.0], np.float32)  # d = logp - ref = 1
    assert float(kl_estimate(logp, ref, "k1")[0]) == pytest.approx(1.0)
    assert float(kl_estimate(logp, ref, "k2")[0]) == pytest.approx(0.5)
    assert float(kl_estimate(logp, ref, "k3")[0]) == pytest.approx(math.exp(-1.0), rel=1e-6)  # e^-1 - (-1) - 1
    for kind in ("k1", "k2", "k3"):
        assert float(kl_estimate(logp, logp, kind)[0]) == 0.0
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_k1_k3_expectations_equal_exact_kl():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    exact = float(np.sum(p * np.log(p / q)))
    for kind in ("k1", "k3"):
        k = np.asarray(kl_estimate(np.log(p), np.log(q), kind), np.float64)
        assert float(np.sum(p * k)) == pytest.approx(exact, rel=1e-5)


def test_adaptive_kl_controller():
    # err = clip(9/6 - 1, -.2, .2) = .2 -> 0.2 * (1 + .2 * 256 / 10000) = 0.201024
    assert float(adaptive_kl_coef(0.2, 9.0, 256, 6.0, 10000.0)) == pytest.approx(0.201024, rel=1e-6)
    ctl = AdaptiveKLController(target=6.0, horizon=10000.0)
    # err = 5.7/6 - 1 = -0.05 -> 0.2 * (1 - 0.05 * 0.0256)
    assert float(ctl.update(0.2, 5.7, 256)) == pytest.approx(0.2 * (1 - 0.05 * 0.0256), rel=1e-6)
    assert float(jax.jit(ctl.update)(0.2, 5.7, 256)) == pytest.approx(0.2 * (1 - 0.05 * 0.0256), rel=1e-6)
    assert float(AdaptiveKLController(target=None).update(0.2, 100.0, 256)) == pytest.approx(0.2)


def test_ppo_token_rewards_hand_example():
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    logp = np.array([[9.0, -1.0, -2.0, 9.0], [9.0, -1.0, -1.0, -1.0]], np.float32)
    ref = np.array([[0.0, -1.5, -1.0, 0.0], [0.0, -1.0, -2.0, -0.5]], np.float32)
    # k1 on the response: row0 [.5, -1], row1 [0, 1, -.5]; kl_coef 0.1
    rewards, m = ppo_token_rewards(logp, ref, np.array([1.0, 2.0], np.float32), mask, 0.1,
                                   missing_eos=np.array([0.0, 1.0], np.float32), missing_eos_penalty=1.0)
    expected = np.array([[0.0, -0.05, 0.1 + 1.0, 0.0],
                         [0.0, 0.0, -0.1, 0.05 + (2.0 - 1.0)]])
    np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)
    assert float(m["objective/kl"]) == pytest.approx((-0.5 + 0.5) / 2, abs=1e-7)
    assert float(m["objective/scores"]) == pytest.approx(1.0)
    assert float(m["objective/rlhf_reward"]) == pytest.approx(1.0, abs=1e-6)


def test_gae_three_step_hand_example():
    r = np.array([[1.0, 0.0, 2.0, 7.0]], np.float32)   # last entry is padding (garbage)
    v = np.array([[0.5, 1.0, 1.5, 9.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = jax.jit(gae)(r, v, mask, 0.9, 0.8)
    # d2 = 2 - 1.5 = .5            A2 = .5
    # d1 = 0 + .9*1.5 - 1 = .35    A1 = .35 + .72*.5 = .71
    # d0 = 1 + .9*1 - .5 = 1.4     A0 = 1.4 + .72*.71 = 1.9112
    np.testing.assert_allclose(adv, [[1.9112, 0.71, 0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[2.4112, 1.71, 2.0, 0.0]], rtol=1e-6)


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 6)).astype(np.float32)
    v = rng.normal(size=(3, 6)).astype(np.float32)
    lengths = [6, 4, 1]
    mask = np.array([[1.0] * n + [0.0] * (6 - n) for n in lengths], np.float32)
    adv, ret = gae(r, v, mask, 1.0, 1.0)
    expected = np.zeros_like(r)
    for b, n in enumerate(lengths):
        for t in range(n):
            expected[b, t] = r[b, t:n].sum() - v[b, t]
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, (expected + v) * mask, rtol=1e-5, atol=1e-6)


def test_gae_skips_masked_gap_and_prompt():
    # [prompt, a0, tool, a1] equals GAE over the compact actions [a0, a1].
    r = np.array([[5.0, 1.0, 5.0, 2.0]], np.float32)
    v = np.array([[5.0, 0.5, 5.0, 1.5]], np.float32)
    mask = np.array([[0, 1, 0, 1]], np.float32)
    adv, _ = gae(r, v, mask, 0.9, 0.8)
    compact, _ = gae(r[:, [1, 3]], v[:, [1, 3]], np.ones((1, 2), np.float32), 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv)[:, [1, 3]], compact, rtol=1e-6)
    assert float(adv[0, 0]) == 0.0 and float(adv[0, 2]) == 0.0


def test_whiten_masked_mean0_var1():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(4, 5)).astype(np.float32)
    mask = (rng.uniform(size=(4, 5)) > 0.3).astype(np.float32)
    w = np.asarray(whiten(x, mask))
    sel = w[mask == 1]
    assert abs(sel.mean()) < 1e-5
    assert sel.var(ddof=1) == pytest.approx(1.0, rel=1e-4)
    assert np.all(w[mask == 0] == 0)
    kept = np.asarray(whiten(x, mask, shift_mean=False))[mask == 1]
    assert kept.mean() == pytest.approx(x[mask == 1].mean(), rel=1e-4)


def test_masked_mean_var_hand():
    x = np.array([[1.0, 2.0, 100.0], [3.0, np.inf, 6.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    assert float(masked_mean(x, mask)) == pytest.approx(3.0)  # (1+2+3+6)/4, inf in padding ignored
    assert float(masked_var(x, mask)) == pytest.approx(np.var([1, 2, 3, 6], ddof=1), rel=1e-6)
    assert float(masked_var(x, mask, unbiased=False)) == pytest.approx(np.var([1, 2, 3, 6]), rel=1e-6)
    assert float(masked_var(x, np.array([[1, 0, 0], [0, 0, 0]], np.float32))) == 0.0


def test_entropy_from_logits():
    np.testing.assert_allclose(entropy_from_logits(np.zeros((2, 4), np.float32)), [math.log(4)] * 2, rtol=1e-6)
    p = np.array([0.5, 0.25, 0.25])
    assert float(entropy_from_logits(np.log(p))) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)


def _policy_inputs():
    ratios = np.array([1.5, 0.5, 1.0, 0.5], np.float32)
    old = np.array([[-1.0, -2.0, -0.5, -1.5, -1.0]], np.float32)
    logp = old.copy()
    logp[0, :4] += np.log(ratios)
    logp[0, 4] = 80.0  # padding with an absurd value must not leak or overflow
    adv = np.array([[1.0, 1.0, -1.0, -1.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    return logp, old, adv, mask, ratios


def test_ppo_policy_loss_hand_example():
    logp, old, adv, mask, ratios = _policy_inputs()
    loss, m = jax.jit(ppo_policy_loss)(logp, old, adv, mask)
    # per token max(-A r, -A clip(r, .8, 1.2)):
    # r=1.5,A=1: max(-1.5,-1.2)=-1.2 (clipped); r=.5,A=1: max(-.5,-.8)=-.5
    # r=1,A=-1: 1.0; r=.5,A=-1: max(.5,.8)=.8 (clipped)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.0 + 0.8) / 4, abs=1e-6)
    assert float(m["policy/clipfrac"]) == 0.5
    assert float(m["policy/approxkl"]) == pytest.approx(0.5 * np.mean(np.log(ratios) ** 2), rel=1e-5)
    assert float(m["val/ratio"]) == pytest.approx(ratios.mean(), rel=1e-6)
    assert float(m["loss_tokens"]) == 4.0
    # clip-higher 0.6: token 0 (r=1.5 < 1.6) is no longer clipped
    loss_hi, m_hi = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert float(loss_hi) == pytest.approx((-1.5 - 0.5 + 1.0 + 0.8) / 4, abs=1e-6)
    assert float(m_hi["policy/clipfrac"]) == 0.25


def test_ppo_policy_gradient_zero_where_clipped():
    logp, old, adv, mask, ratios = _policy_inputs()
    g = np.asarray(jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask)[0])(jnp.asarray(logp)))
    # unclipped tokens: d(-A r)/dlogp = -A r / 4
    np.testing.assert_allclose(g[0], [0.0, -0.5 / 4, 1.0 / 4, 0.0, 0.0], atol=1e-7)


def test_ppo_value_loss_hand_example():
    values = np.array([[1.0, 2.0, 0.0]], np.float32)
    old = np.array([[0.5, 2.0, 1.0]], np.float32)
    returns = np.array([[0.0, 3.0, 0.0]], np.float32)
    mask = np.ones((1, 3), np.float32)
    loss, m = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # tok0: v_clip .7: max(1, .49)=1; tok1: 1; tok2: v_clip .8: max(0, .64)=.64 (clipped)
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 0.64) / 3, rel=1e-6)
    assert float(m["val/clipfrac"]) == pytest.approx(1 / 3)
    assert float(m["val/vpred"]) == pytest.approx(1.0)


def test_shape_errors_name_tensor():
    with pytest.raises(ValueError, match="old_logp"):
        ppo_policy_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="values"):
        gae(np.zeros((2, 3)), np.zeros((3,)), np.ones((2, 3)), 1.0, 1.0)
