"""GRPO / Dr. GRPO / batch-std / RLOO advantages and the GRPO, GSPO, CISPO and SAPO losses on hand examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (advantages_of, gdpo_advantages, group_advantages, grpo_loss, high_entropy_mask, off_policy_sequence_mask,
                            rloo_advantages)


def test_group_advantages_hand_example():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], np.float32)
    # group 0: mean .5, sample std sqrt(4 * .25 / 3) = 0.577350; group 1: all equal -> 0
    std = math.sqrt(1 / 3)
    expected = np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / np.array([std + 1e-4] * 4 + [1e-4] * 4)
    np.testing.assert_allclose(jax.jit(group_advantages, static_argnums=1)(rewards, 4), expected, rtol=1e-5)
    np.testing.assert_allclose(group_advantages(rewards, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # scale="batch" (TRL's scale_rewards="batch"): the same centring, over the batch's sample std. The batch mean is
    # 10/8 = 1.25; squared deviations .0625, 1.5625, 1.5625, .0625 and 4 x .5625 sum to 5.5; 5.5/7 -> std 0.886405.
    batch_std = math.sqrt(5.5 / 7)
    np.testing.assert_allclose(group_advantages(rewards, 4, scale="batch"),
                               np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(advantages_of(rewards, 4, "grpo_batch_std"), group_advantages(rewards, 4, "batch"))
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(rewards, 4, scale=False)


def test_rloo_hand_example_and_identity():
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], np.float32)
    # group 0: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; group 1: -2, -2, 4
    np.testing.assert_allclose(rloo_advantages(rewards, 3), [-1.5, 0.0, 1.5, -2.0, -2.0, 4.0])
    # leave-one-out = G/(G-1) * (r - group mean)
    np.testing.assert_allclose(rloo_advantages(rewards, 3), 1.5 * group_advantages(rewards, 3, scale="none"),
                               rtol=1e-6)


def test_gdpo_normalises_each_reward_in_its_group_then_the_sum_over_the_batch():
    import torch

    # Two terms, two groups of 2. Term 1: group 0 (1, 3) -> -+1/sqrt2 (mean 2, sample std sqrt2), group 1 equal -> 0.
    # Term 2: (0, 1) -> -+1/sqrt2, (5, 1) -> +-1/sqrt2. Sum s = (-sqrt2, sqrt2, 1/sqrt2, -1/sqrt2): mean 0, sample
    # std sqrt((2 + 2 + .5 + .5) / 3) = sqrt(5/3).
    terms = np.array([[1.0, 3.0, 0.0, 0.0], [0.0, 1.0, 5.0, 1.0]], np.float32)
    r2 = math.sqrt(2)
    want = np.array([-r2, r2, 1 / r2, -1 / r2]) / math.sqrt(5 / 3)
    np.testing.assert_allclose(gdpo_advantages(terms, [1.0, 1.0], 2), want, rtol=1e-3)
    # Summed first (plain GRPO), term 2's spread of 4 in group 1 would decide that group alone; GDPO weighs the
    # terms' normalised values: TRL's normalize_then_sum, transcribed, on random rewards with weights.
    rng = np.random.default_rng(0)
    terms = np.stack([rng.normal(0, 1, 12), rng.normal(0, 30, 12), rng.integers(0, 2, 12)]).astype(np.float32)
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    grouped = torch.tensor(terms.T).view(-1, 4, 3)
    reward_k = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 3)
    rewards = (reward_k * torch.tensor(weights)).sum(1)
    trl = ((rewards - rewards.mean()) / (rewards.std() + 1e-4)).numpy()
    np.testing.assert_allclose(gdpo_advantages(terms, weights, 4), trl, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="call gdpo_advantages"):
        advantages_of(terms.sum(0), 4, "gdpo")
    with pytest.raises(ValueError, match=r"weights must have shape \[K\]=\(3,\)"):
        gdpo_advantages(terms, [1.0], 4)


def test_group_size_errors():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(np.zeros(6, np.float32), 4)
    with pytest.raises(ValueError, match="group_size=1"):
        rloo_advantages(np.zeros(6, np.float32), 1)


MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
ADV = np.array([1.0, -2.0], np.float32)
LOGP = np.array([[-1.0, -2.0, 50.0], [-0.5, -1.5, -1.0]], np.float32)


@pytest.mark.parametrize("aggregation,expected", [
    ("sequence", (-1.0 + 2.0) / 2),       # row means: -1 and 2
    ("token", (-2.0 + 6.0) / 5),          # token sum over 5 tokens
    ("dr_grpo", (-2.0 + 6.0) / (2 * 4)),  # constant B * max_len
])
def test_grpo_on_policy_aggregations(aggregation, expected):
    # old_logp=None: ratio 1, per-token loss -A
    loss, m = grpo_loss(LOGP, None, None, ADV, MASK, aggregation=aggregation, max_len=4)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["loss_tokens"]) == 5.0
    assert float(m["clip_ratio/region_mean"]) == 0.0


def test_grpo_sequence_gradient():
    g = jax.grad(lambda lp: grpo_loss(lp, None, None, ADV, MASK)[0])(jnp.asarray(LOGP))
    # d/dlogp = -A / len_b / B
    np.testing.assert_allclose(g, [[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)


def test_grpo_clipping_and_kl_hand_example():
    old = np.array([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)
    ratios = np.array([[1.5, 1.1, 1.0], [0.5, 1.0, 1.3]], np.float32)
    logp = old + np.log(ratios)
    ref = logp.copy()
    ref[1, 1] = logp[1, 1] + 1.0  # one token with ref - logp = 1: k3 = e - 1 - 1
    loss, m = grpo_loss(logp, old, ref, ADV, MASK, clip_eps_low=0.2, clip_eps_high=0.28, beta=0.1,
                        aggregation="token")
    # A=+1 row: -min(r, clip(r,.8,1.28)): r=1.5 -> -1.28 (high clip), r=1.1 -> -1.1
    # A=-2 row: -min(-2r, -2 clip(r)) = 2 max(r, clip(r)): r=.5 -> 1.6 (low clip), r=1 -> 2, r=1.3 -> 2.6
    k3 = math.e - 2.0
    expected = (-1.28 - 1.1 + 1.6 + 2.0 + 0.1 * k3 + 2.6) / 5
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(m["kl"]) == pytest.approx(k3 / 5, rel=1e-5)
    # high: r>1.28 & A>0 -> token (0,0); low: r<.8 & A<0 -> token (1,0); r=1.3 with A<0 is not counted
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(2 / 5)


def test_policy_weights_drop_tokens_from_the_surrogate_only():
    """The clipping example above with tokens (0, 0) and (1, 2) weighted 0: their surrogate terms go, the KL of
    token (1, 1) and the 5-token normaliser stay (TRL's entropy mask multiplies the surrogate, then adds beta * kl)."""
    old = np.array([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)
    logp = old + np.log(np.array([[1.5, 1.1, 1.0], [0.5, 1.0, 1.3]], np.float32))
    ref = logp.copy()
    ref[1, 1] = logp[1, 1] + 1.0
    weights = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    loss, m = grpo_loss(logp, old, ref, ADV, MASK, clip_eps_low=0.2, clip_eps_high=0.28, beta=0.1,
                        aggregation="token", policy_weights=weights)
    assert float(loss) == pytest.approx((-1.1 + 1.6 + 2.0 + 0.1 * (math.e - 2.0)) / 5, rel=1e-5)
    assert float(m["loss_tokens"]) == 5.0


def test_high_entropy_mask_by_hand_and_as_trl_computes_it():
    import torch

    ent = np.array([[0.1, 0.5, 0.9, 7.0], [0.3, 0.7, 0.2, 9.0]], np.float32)  # the 7 and 9 sit under padding
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.float32)
    # The six entropies sorted: .1 .2 .3 .5 .7 .9. The 0.5 quantile interpolates at index 2.5: 0.4, so .5 .9 .7
    # stay; the 0.8 quantile (top 0.2) is index 4: 0.7, so .9 and .7 stay.
    np.testing.assert_array_equal(high_entropy_mask(ent, mask, 0.5), [[0, 1, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(high_entropy_mask(ent, mask, 0.2), [[0, 0, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(high_entropy_mask(ent, mask, 1.0), mask)
    rng = np.random.default_rng(0)
    ent = rng.gamma(2.0, 1.0, (8, 30)).astype(np.float32)
    mask = (rng.random((8, 30)) < 0.7).astype(np.float32)
    for q in (0.2, 0.5, 0.9):
        # TRL's get_high_entropy_mask, written out: the quantile of the unpadded entropies, then a comparison.
        e, m = torch.from_numpy(ent), torch.from_numpy(mask).bool()
        want = ((e * m.float()) >= torch.quantile(e[m], 1 - q)) & m
        np.testing.assert_array_equal(np.asarray(high_entropy_mask(ent, mask, q)), want.numpy().astype(np.float32))
    with pytest.raises(ValueError, match=r"top_quantile must be in \(0, 1\]"):
        high_entropy_mask(ent, mask, 0.0)


def test_gspo_sequence_ratio_hand_example():
    """GSPO (Zheng et al. 2025): s_b = exp(mean over the row's tokens of logp - old), clipped per sequence,
    l_b = -min(s_b A_b, clip(s_b, 1 - eps_low, 1 + eps_high) A_b), the same on each of the row's tokens."""
    old = np.array([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)
    logp = old + np.array([[0.2, 0.0, 7.0], [-0.3, 0.0, 0.0]], np.float32)  # padding's 7.0 must not count
    # s_0 = e^0.1 = 1.10517 (A = +1): clipped to 1.05 -> -1.05; s_1 = e^-0.1 = 0.904837 (A = -2):
    # -min(-2 * 0.904837, -2 * 0.95) = 1.9.
    kw = dict(clip_eps_low=0.05, clip_eps_high=0.05, ratio_level="sequence")
    loss, m = grpo_loss(logp, old, None, ADV, MASK, aggregation="sequence", **kw)
    assert float(loss) == pytest.approx((-1.05 + 1.9) / 2, rel=1e-6)
    loss, m = grpo_loss(logp, old, None, ADV, MASK, aggregation="token", **kw)
    assert float(loss) == pytest.approx((2 * -1.05 + 3 * 1.9) / 5, rel=1e-6)
    # Whole sequences clip: row 0's two tokens above (A > 0), row 1's three below (A < 0).
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(2 / 5)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(3 / 5)
    # Token-level ratios on the same numbers clip only row 0's first token (e^0.2 > 1.05) and row 1's first.
    _, m = grpo_loss(logp, old, None, ADV, MASK, aggregation="token", clip_eps_low=0.05, clip_eps_high=0.05)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    # Unclipped, d loss / d logp_bt = -A_b * s_b / len_b / B (sequence aggregation).
    g = jax.grad(lambda lp: grpo_loss(lp, old, None, ADV, MASK, clip_eps_low=0.9, clip_eps_high=0.9,
                                      ratio_level="sequence")[0])(jnp.asarray(logp))
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    np.testing.assert_allclose(g, [[-s0 / 4, -s0 / 4, 0.0], [s1 / 3, s1 / 3, s1 / 3]], rtol=1e-5)
    # On-policy (old_logp None): ratio 1 at either level, the same loss.
    assert float(grpo_loss(LOGP, None, None, ADV, MASK, ratio_level="sequence")[0]) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="Unknown ratio_level 'seq'"):
        grpo_loss(LOGP, None, None, ADV, MASK, ratio_level="seq")


def test_two_sided_clipping_caps_the_ratio_of_negative_advantages():
    """delta (INTELLECT-2's two-sided clipping): l = -min(min(r, delta) A, clip(r, 1 - eps, 1 + eps) A)."""
    old = np.array([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)
    ratios = np.array([[3.0, 0.5, 1.0], [3.0, 1.1, 0.5]], np.float32)
    logp = old + np.log(ratios)
    # A = +1: -min(r, clip(r, .8, 1.2)): r=3 -> -1.2, r=.5 -> -.5; the cap (2) changes neither.
    # A = -2: 2 max(r, clip(r)): r=3 -> 6, capped 2 max(2, 1.2) = 4; r=1.1 -> 2.2; r=.5 -> 1.6.
    plain, _ = grpo_loss(logp, old, None, ADV, MASK, aggregation="token")
    assert float(plain) == pytest.approx((-1.2 - 0.5 + 6.0 + 2.2 + 1.6) / 5, rel=1e-6)
    capped, _ = grpo_loss(logp, old, None, ADV, MASK, aggregation="token", delta=2.0)
    assert float(capped) == pytest.approx((-1.2 - 0.5 + 4.0 + 2.2 + 1.6) / 5, rel=1e-6)
    with pytest.raises(ValueError, match="delta must be None or > 1"):
        grpo_loss(logp, old, None, ADV, MASK, delta=1.0)


OLD = np.array([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)


def test_cispo_clips_the_weight_not_the_update():
    """CISPO: l = -sg(min(r, max_ratio)) A logp. Every token keeps the gradient -w A, clipped ones included."""
    ratios = np.array([[3.0, 0.5, 1.0], [3.0, 1.1, 0.5]], np.float32)
    logp = jnp.asarray(OLD + np.log(ratios))
    fn = lambda lp: grpo_loss(lp, OLD, None, ADV, MASK, aggregation="token", surrogate="cispo",  # noqa: E731
                              cispo_max_ratio=2.0)
    (loss, m), grad = jax.value_and_grad(fn, has_aux=True)(logp)
    # Weights min(r, 2): 2, .5 | 2, 1.1, .5. Gradient -w A / 5 tokens: A = +1 -> -.4, -.1; A = -2 -> .8, .44, .2.
    np.testing.assert_allclose(grad, [[-0.4, -0.1, 0.0], [0.8, 0.44, 0.2]], rtol=1e-5)
    w = np.array([[2.0, 0.5, 0.0], [2.0, 1.1, 0.5]])
    assert float(loss) == pytest.approx(float(np.sum(-w * ADV[:, None] * np.asarray(logp) * MASK) / 5), rel=1e-5)
    assert float(m["cispo_clip_ratio"]) == pytest.approx(1 / 5)  # r > 2 with A > 0: token (0, 0) only
    assert "clip_ratio/region_mean" not in m


def test_sapo_soft_gate_by_hand():
    """SAPO: l = -sigmoid(tau (r - 1)) 4 / tau A, tau 1.0 for A > 0 and 1.05 otherwise."""
    fn = lambda lp, old: grpo_loss(lp, old, None, ADV, MASK, aggregation="token", surrogate="sapo")  # noqa: E731
    (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(LOGP), None)
    # On-policy r = 1: sigmoid(0) = 1/2, so l = -2 A / tau: -2 on both A = +1 tokens, +4/1.05 on the three A = -2
    # ones; the gradient is the plain surrogate's, -A / 5.
    assert float(loss) == pytest.approx((-4.0 + 12.0 / 1.05) / 5, rel=1e-6)
    np.testing.assert_allclose(grad, [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]], rtol=1e-5)
    # Off-policy, one A = +1 token at r = 2 (tau 1): l = -4 sigmoid(1) and dl/dlogp = -4 sigmoid'(1) r, which
    # fades (0.786 x 2 here) where the hard clip would give 0 and the plain surrogate -r = -2.
    s1 = 1 / (1 + math.exp(-1.0))
    logp = np.array([[math.log(2.0) - 1.0]], np.float32)
    (one, _), g = jax.value_and_grad(lambda lp: grpo_loss(lp, np.array([[-1.0]], np.float32), None,
                                                          np.array([1.0], np.float32), np.ones((1, 1)),
                                                          surrogate="sapo"), has_aux=True)(jnp.asarray(logp))
    assert float(one) == pytest.approx(-4 * s1, rel=1e-6)
    assert float(g[0, 0]) == pytest.approx(-4 * s1 * (1 - s1) * 2.0, rel=1e-5)


def test_off_policy_sequence_mask_by_hand():
    """Drop a sequence when A < 0 and its mean (sampling - current) log-prob gap exceeds the threshold."""
    logp = np.zeros((3, 3), np.float32)
    sampling = np.array([[2.0, 2.0, 9.0], [0.4, 0.8, 9.0], [0.2, 0.2, 0.2]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1]], np.float32)  # the 9s sit under padding
    adv = np.array([1.0, -1.0, -1.0], np.float32)
    # Mean gaps: 2 (A > 0: kept), 0.6 > 0.5 with A < 0: dropped, 0.2: kept.
    np.testing.assert_array_equal(off_policy_sequence_mask(logp, sampling, adv, mask, 0.5), [[1], [0], [1]])
    np.testing.assert_array_equal(off_policy_sequence_mask(logp, sampling, adv, mask, 0.7), [[1], [1], [1]])
    # As policy_weights it removes that sequence's surrogate terms: on-policy l = -A, so only row 1's two +1s go.
    keep = off_policy_sequence_mask(logp, sampling, adv, mask, 0.5)
    loss, _ = grpo_loss(logp, None, None, adv, mask, aggregation="token", policy_weights=keep)
    assert float(loss) == pytest.approx((-2.0 + 3.0) / 7, rel=1e-6)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        off_policy_sequence_mask(logp, sampling, adv, mask, 0.0)


def test_kl_ratio_correction_adds_the_kl_to_its_gradient():
    """beta * k3 * r with r = exp(logp - sg(logp)): the value is unchanged on-policy, the gradient gains beta * k3."""
    logp = jnp.asarray([[-1.0]])
    ref = np.array([[0.0]], np.float32)  # d = ref - logp = 1: k3 = e - 2, dk3/dlogp = 1 - e
    one = np.ones((1, 1), np.float32)
    zero = np.zeros((1,), np.float32)
    plain = jax.value_and_grad(lambda lp: grpo_loss(lp, None, ref, zero, one, beta=0.5)[0])(logp)
    fixed = jax.value_and_grad(lambda lp: grpo_loss(lp, None, ref, zero, one, beta=0.5, kl_ratio_correction=True)[0])(logp)
    assert float(plain[0]) == float(fixed[0]) == pytest.approx(0.5 * (math.e - 2.0), rel=1e-6)
    assert float(plain[1][0, 0]) == pytest.approx(0.5 * (1.0 - math.e), rel=1e-6)
    assert float(fixed[1][0, 0]) == pytest.approx(0.5 * (1.0 - math.e) + 0.5 * (math.e - 2.0), rel=1e-6)


def test_vespo_and_luspo_by_hand():
    # One sequence of two tokens, log-ratios 0.5 and -0.2: w = e^0.3; A = 1 >= 0 takes k = 2, lambda = 3.
    logp = np.array([[-1.0, -2.0]], np.float32)
    old = logp - np.array([[0.5, -0.2]], np.float32)
    one, adv = np.ones((1, 2), np.float32), np.array([1.0], np.float32)
    phi = math.exp(3 + 2 * 0.3 - 3 * math.exp(0.3))
    value, grad = jax.value_and_grad(lambda lp: grpo_loss(lp, old, None, adv, one, surrogate="vespo")[0])(logp)
    assert float(value) == pytest.approx(-phi * (-1.0 - 2.0) / 2, rel=1e-5)
    np.testing.assert_allclose(grad, [[-phi / 2, -phi / 2]], rtol=1e-5)  # the weight carries no gradient
    # A < 0 takes k = 3, lambda = 2; on-policy (w = 1) the weight is 1 either way: REINFORCE.
    m = grpo_loss(logp, old, None, -adv, one, surrogate="vespo")[1]
    assert float(m["vespo/phi_seq_mean"]) == pytest.approx(math.exp(2 + 3 * 0.3 - 2 * math.exp(0.3)), rel=1e-5)
    assert float(grpo_loss(logp, None, None, adv, one, surrogate="vespo")[0]) == pytest.approx(1.5, rel=1e-6)
    # LUSPO: on-policy every token's term is -A; the sequences' sums (lengths 1 and 3) are averaged.
    mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
    lp3 = np.full((2, 3), -1.0, np.float32)
    loss = grpo_loss(lp3, None, None, np.array([1.0, -1.0], np.float32), mask, aggregation="luspo")[0]
    assert float(loss) == pytest.approx(-(1.0 * 1 - 1.0 * 3) / 2)


@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo", "vespo"])
def test_surrogates_against_trls_compute_loss_written_out_in_torch(surrogate):
    """TRL 1.16's GRPOTrainer.compute_loss, transcribed in torch: loss_type grpo/cispo/sapo/vespo with an off-policy
    mask (threshold 0.3), the KL term with use_bias_correction_kl, both aggregations; values and gradients."""
    import torch

    rng = np.random.default_rng(3)
    B, L = 6, 5
    logp = rng.uniform(-3, -0.1, (B, L)).astype(np.float32)
    old = (logp + rng.normal(0, 0.6, (B, L))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, L))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    mask = (np.arange(L)[None] < rng.integers(1, L + 1, B)[:, None]).astype(np.float32)
    eps_low, eps_high, beta, cap, tau_pos, tau_neg = 0.2, 0.28, 0.05, 1.5, 1.0, 1.05

    def trl(aggregation):
        lp = torch.tensor(logp, requires_grad=True)
        old_t, ref_t, m = torch.tensor(old), torch.tensor(ref), torch.tensor(mask)
        a = torch.tensor(adv).unsqueeze(1)
        kl_div = old_t - lp.detach()
        avg_kl = (kl_div * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((a >= 0) | (avg_kl <= 0.3)).to(m.dtype)
        coef_1 = torch.exp(lp - old_t)
        per_token_kl = (torch.exp(ref_t - lp) - (ref_t - lp) - 1) * coef_1
        if surrogate == "cispo":
            per_token_loss = -torch.clamp(coef_1, max=cap).detach() * a * lp
        elif surrogate == "sapo":
            t = torch.where(a > 0, tau_pos, tau_neg)
            per_token_loss = -torch.sigmoid(t * (coef_1 - 1)) * 4 / t * a
        elif surrogate == "vespo":  # get_gamma_weights, under torch.no_grad
            with torch.no_grad():
                log_w = torch.clamp(torch.sum(torch.clamp(lp - old_t, -20.0, 20.0) * m, -1, keepdim=True),
                                    math.log(1e-8), 20.0)
                k = torch.where(a >= 0, 2.0, 3.0)
                lam = torch.where(a >= 0, 3.0, 2.0).clamp(min=1e-4)
                phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            per_token_loss = -phi * a * lp
        else:
            coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
        per_token_loss = per_token_loss * off_policy_mask + beta * per_token_kl
        if aggregation == "sequence":  # loss_type grpo / sapo
            loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        else:  # dapo / cispo on one process without accumulation: the batch's completion tokens
            loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
        loss.backward()
        return loss.item(), lp.grad.numpy()

    for aggregation in ("sequence", "token"):
        def ours(lp):
            keep = off_policy_sequence_mask(lp, old, adv, mask, 0.3)
            return grpo_loss(lp, old, ref, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high, beta=beta,
                             aggregation=aggregation, surrogate=surrogate, cispo_max_ratio=cap,
                             sapo_temperatures=(tau_pos, tau_neg), kl_ratio_correction=True, policy_weights=keep)[0]

        value, grad = jax.value_and_grad(ours)(jnp.asarray(logp))
        ref_value, ref_grad = trl(aggregation)
        assert float(value) == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    dropped = 1 - np.asarray(off_policy_sequence_mask(logp, old, adv, mask, 0.3))
    assert 0 < dropped.sum() < B, "the example should drop some sequences and keep others"


def test_luspo_against_trls_compute_loss_written_out_in_torch():
    """TRL 1.16's loss_type='luspo' with importance_sampling_level='sequence' and the KL term, in torch."""
    import torch

    rng = np.random.default_rng(5)
    B, L = 5, 6
    logp = rng.uniform(-3, -0.1, (B, L)).astype(np.float32)
    old = (logp + rng.normal(0, 0.2, (B, L))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, L))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    mask = (np.arange(L)[None] < rng.integers(1, L + 1, B)[:, None]).astype(np.float32)
    lp = torch.tensor(logp, requires_grad=True)
    old_t, ref_t, m, a = torch.tensor(old), torch.tensor(ref), torch.tensor(mask), torch.tensor(adv).unsqueeze(1)
    coef_1 = torch.exp(((lp - old_t) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a) + 0.05 * (torch.exp(ref_t - lp) - (ref_t - lp) - 1)
    expected = (per_token_loss * m).sum(-1).mean()
    expected.backward()
    value, grad = jax.value_and_grad(lambda x: grpo_loss(x, old, ref, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28,
                                                         beta=0.05, ratio_level="sequence",
                                                         aggregation="luspo")[0])(jnp.asarray(logp))
    assert float(value) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, lp.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_grpo_jit_and_errors():
    loss = jax.jit(lambda lp: grpo_loss(lp, None, lp, ADV, MASK, beta=0.04)[0])(jnp.asarray(LOGP))
    assert float(loss) == pytest.approx(0.5, rel=1e-6)  # ref == policy: KL 0
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(LOGP, None, None, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="Unknown aggregation"):
        grpo_loss(LOGP, None, None, ADV, MASK, aggregation="bnpo")
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_loss(LOGP, None, None, ADV[:1], MASK)
    with pytest.raises(ValueError, match="Unknown surrogate 'gspo'"):
        grpo_loss(LOGP, None, None, ADV, MASK, surrogate="gspo")
    with pytest.raises(ValueError, match="surrogate='cispo' has none"):
        grpo_loss(LOGP, None, None, ADV, MASK, surrogate="cispo", delta=2.0)
    with pytest.raises(ValueError, match="policy_weights must have shape"):
        grpo_loss(LOGP, None, None, ADV, MASK, policy_weights=np.ones((2, 2), np.float32))
