"""TRL 1.16's other DPO relatives, f-DPO and loss sums: by hand, and against TRL's ``DPOTrainer`` loss in torch."""

import math

import jax
import numpy as np
import pytest

from preference_helpers import PC, PR, RC, RR, a, logsig, sig
from jaxpost.losses import PREFERENCE_LOSSES, combined_preference_loss, divergence_scores
from jaxpost.losses.dpo import hinge_loss, own_hparams, sigmoid_loss
from jaxpost.losses.dpo_relatives import (aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss, bco_pair_loss,
                                          chosen_nll_loss, discopop_loss, exo_pair_loss, nca_pair_loss,
                                          sigmoid_norm_loss, sppo_hard_loss)


def value(fn, *args, **kw):
    return float(fn(*args, **kw)[0])


def test_each_new_loss_by_hand():
    b = 0.1
    assert value(exo_pair_loss, PC, PR, RC, RR, beta=b, label_smoothing=0.1) == pytest.approx(
        sig(0.2) * (logsig(0.2) - math.log(0.9)) + sig(-0.2) * (logsig(-0.2) - math.log(0.1)), rel=1e-6)
    assert value(nca_pair_loss, PC, PR, RC, RR, beta=b) == pytest.approx(
        -logsig(0.1) - 0.5 * logsig(-0.1) - 0.5 * logsig(0.1), rel=1e-6)
    assert value(bco_pair_loss, PC, PR, RC, RR, beta=b) == pytest.approx(-2 * logsig(0.1), rel=1e-6)
    # SPPO pulls u_c to +1/(2 beta) and u_r to -1/(2 beta): at beta = 0.5 both sit on their targets.
    assert value(sppo_hard_loss, PC, PR, RC, RR, beta=0.5) == pytest.approx(0.0, abs=1e-7)
    assert value(sppo_hard_loss, PC, PR, RC, RR, beta=0.25) == pytest.approx((1 - 2) ** 2 + (-1 + 2) ** 2)
    assert value(apo_zero_loss, PC, PR, RC, RR, beta=b) == pytest.approx(2 * sig(-0.1), rel=1e-6)  # 1-s(.1)+s(-.1)
    assert value(apo_down_loss, PC, PR, RC, RR, beta=b) == pytest.approx(sig(0.1) + 1 - sig(0.2), rel=1e-6)
    m = sig(0.2 / 0.05)
    assert value(discopop_loss, PC, PR, RC, RR, beta=b) == pytest.approx(
        (1 - m) * -logsig(0.2) + m * math.exp(-0.2), rel=1e-6)
    # Lengths 2 and 4: 1/2 - (-1)/4 = 0.75.
    assert value(sigmoid_norm_loss, PC, PR, RC, RR, a(2.0), a(4.0), beta=b) == pytest.approx(-logsig(0.075), rel=1e-6)
    assert value(chosen_nll_loss, PC, PR, None, None, a(2.0), a(4.0)) == pytest.approx(0.5)


def test_aot_sorts_the_margins_and_ignores_padding_pairs():
    # Policy margins pi_c - pi_r = [3, -1], reference margins [0, 1]: sorted, [-1, 3] against [0, 1].
    pc, pr, rc, rr = a(-1.0, -2.0), a(-4.0, -1.0), a(-2.0, -1.0), a(-2.0, -2.0)
    expected = (-logsig(0.1 * (-1 - 0)) - logsig(0.1 * (3 - 1))) / 2
    assert value(aot_loss, pc, pr, rc, rr, beta=0.1) == pytest.approx(expected, rel=1e-6)
    assert value(sigmoid_loss, pc, pr, rc, rr, beta=0.1) != pytest.approx(expected, rel=1e-3)  # pairing matters
    # A padding pair whose margins would sort first changes nothing, nor do the rewards see it.
    loss, metrics = aot_loss(a(-1.0, 0.0, -2.0), a(-4.0, 0.0, -1.0), a(-2.0, 0.0, -1.0), a(-2.0, 99.0, -2.0),
                             beta=0.1, pair_mask=a(1, 0, 1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.1 * (1 + -1) / 2, abs=1e-7)
    # Unpaired: chosen log-ratios [1, -1] and rejected [-2, 1] sorted on their own: [-1, 1] against [-2, 1].
    expected = (-logsig(0.1 * 1) - logsig(0.1 * 0)) / 2
    assert value(aot_unpaired_loss, pc, pr, rc, rr, beta=0.1) == pytest.approx(expected, rel=1e-6)
    # Label smoothing as cDPO's.
    smoothed = value(aot_loss, PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    assert smoothed == pytest.approx(-0.8 * logsig(0.2) - 0.2 * logsig(-0.2), rel=1e-6)


def test_f_divergence_scores_by_hand():
    # u_c = 1, u_r = -1.
    e = math.e
    assert value(sigmoid_loss, PC, PR, RC, RR, beta=0.1, f_divergence_type="forward_kl") == pytest.approx(
        -logsig(0.1 * ((1 - 1 / e) - (1 - e))), rel=1e-6)
    # JS: log sigma(1) - log sigma(-1) = 1, so h = 1.
    assert value(sigmoid_loss, PC, PR, RC, RR, beta=0.1, f_divergence_type="js_divergence") == pytest.approx(
        -logsig(0.1), rel=1e-6)
    # alpha = 1/2: (e^(-u/2) - 1)/(-1/2) at u = 1 and -1: h = 2 (e^(1/2) - e^(-1/2)).
    assert value(sigmoid_loss, PC, PR, RC, RR, beta=0.1, f_divergence_type="alpha_divergence") == pytest.approx(
        -logsig(0.2 * (math.exp(0.5) - math.exp(-0.5))), rel=1e-6)
    assert value(hinge_loss, PC, PR, RC, RR, beta=0.1, f_divergence_type="js_divergence") == pytest.approx(0.9)
    plain = value(sigmoid_loss, PC, PR, RC, RR, beta=0.1)
    assert value(sigmoid_loss, PC, PR, RC, RR, beta=0.1, f_divergence_type="alpha_divergence",
                 f_alpha_divergence_coef=1.0) == pytest.approx(plain, rel=1e-6)
    # Far off-policy the alpha-divergence's exponential is capped (TRL's clamp at 80), so it stays finite.
    assert np.isfinite(float(divergence_scores(a(-1e4), "alpha_divergence", 0.5)[0]))
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        sigmoid_loss(PC, PR, RC, RR, f_divergence_type="jsd")
    with pytest.raises(ValueError, match=r"f_alpha_divergence_coef must be in \(0, 1\]"):
        sigmoid_loss(PC, PR, RC, RR, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5)


def test_combination_is_the_weighted_sum_with_each_term_logged():
    lengths = a(2.0)
    loss, m = combined_preference_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], PC, PR, RC, RR, lengths,
                                       lengths, beta=0.1, label_smoothing=0.1)
    sigmoid = -0.9 * logsig(0.2) - 0.1 * logsig(-0.2)  # label_smoothing goes to the loss that takes it
    assert float(m["loss/sigmoid"]) == pytest.approx(sigmoid, rel=1e-6)
    assert float(m["loss/bco_pair"]) == pytest.approx(-2 * logsig(0.1), rel=1e-6)
    assert float(m["loss/sft"]) == pytest.approx(0.5)
    assert float(loss) == float(m["loss"]) == pytest.approx(0.8 * sigmoid + 0.2 * -2 * logsig(0.1) + 0.5, rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1)  # the first loss's metrics


def test_exo_and_discopop_stay_finite_far_from_the_reference():
    pc, pr, rc, rr = a(-1.0, -900.0), a(-900.0, -1.0), a(-1.0, -1.0), a(-1.0, -1.0)  # h = +-899
    for fn in (exo_pair_loss, discopop_loss):
        loss, _ = fn(pc, pr, rc, rr, beta=1.0)
        grads = jax.grad(lambda c: fn(c, pr, rc, rr, beta=1.0)[0])(pc)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grads)), fn.__name__


# --- against TRL ----------------------------------------------------------------------------------------------------

def trl_dpo_loss(torch, loss_types, loss_weights, logps, ref_logps, lengths, beta, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05, wpo=None):
    """TRL 1.16 ``DPOTrainer._compute_loss``'s loss (trl/trainer/dpo_trainer.py), transcribed from per-sequence sums.

    ``logps``/``ref_logps``/``lengths``: ``[2B]``, chosen rows then rejected
    rows, as TRL chunks them. ``sft`` is TRL's mean over all chosen tokens,
    here from per-sequence sums (the sum over tokens of each sequence's
    log-probs over the total chosen length). ``wpo``: ``[2B]`` WPO weights of
    the sequences (``use_weighting``), multiplied into each pair's loss.
    """
    F = torch.nn.functional
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
    chosen_len, rejected_len = lengths.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores, rejected_scores = 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        coef = 1.0 / (f_alpha_divergence_coef - 1.0)
        t_c = torch.clamp((f_alpha_divergence_coef - 1.0) * chosen_logratios, max=80.0)
        t_r = torch.clamp((f_alpha_divergence_coef - 1.0) * rejected_logratios, max=80.0)
        chosen_scores, rejected_scores = (torch.exp(t_c) - 1.0) * coef, (torch.exp(t_r) - 1.0) * coef
    delta_score = chosen_scores - rejected_scores
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, loss_weights):
        if loss_type == "sigmoid":
            per = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            ipo_delta = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
            per = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            eps = torch.tensor(label_smoothing, dtype=logps.dtype)
            per = (torch.sigmoid(beta * delta_score) * (F.logsigmoid(beta * delta_score) - torch.log1p(-eps))
                   + torch.sigmoid(-beta * delta_score) * (F.logsigmoid(-beta * delta_score) - torch.log(eps)))
        elif loss_type == "nca_pair":
            c, r = beta * chosen_logratios, beta * rejected_logratios
            per = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
        elif loss_type == "robust":
            per = (-(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
                   + label_smoothing * F.logsigmoid(-beta * delta_score)) / (1 - 2 * label_smoothing)
        elif loss_type == "bco_pair":
            per = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif loss_type == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                s, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
                t, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            else:
                s, _ = torch.sort(chosen_logratios, dim=0)
                t, _ = torch.sort(rejected_logratios, dim=0)
            d = s - t
            per = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
        elif loss_type == "apo_zero":
            per = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios
                                                                                   - rejected_logratios))
        elif loss_type == "discopop":
            logits = delta_score * beta
            mod = torch.sigmoid(logits / discopop_tau)
            per = -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
        elif loss_type == "sft":
            per = (-chosen_logps.sum() / chosen_len.sum()).expand(chosen_logps.shape[0])
        elif loss_type == "sigmoid_norm":
            d = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
            per = -F.logsigmoid(beta * d)
        if wpo is not None:
            chosen_weights, rejected_weights = wpo.chunk(2, dim=0)
            per = per * chosen_weights * rejected_weights
        loss = loss + per.mean() * loss_weight
    return loss


TRL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}  # TRL's, but sft
CASES = ([([t], "reverse_kl") for t in TRL_TYPES]
         + [([t], f) for t in sorted(F_DIVERGENCE_TYPES) for f in ("forward_kl", "js_divergence", "alpha_divergence")]
         + [(["sigmoid", "bco_pair", "sft"], "reverse_kl"), (["apo_zero", "aot"], "reverse_kl"),
            (["sigmoid", "ipo"], "js_divergence")])


@pytest.mark.parametrize("loss_types,f_div", CASES, ids=lambda c: "+".join(c) if isinstance(c, list) else c)
def test_values_and_gradients_match_trl(loss_types, f_div):
    import torch

    rng = np.random.default_rng(len(loss_types) * 31 + len(f_div))
    B = 6
    logps = rng.uniform(-30.0, -5.0, size=(2, B)).astype(np.float32)
    ref = (logps + rng.normal(0.0, 1.5, size=(2, B))).astype(np.float32)
    # Equal lengths: TRL's sft averages over the batch's chosen tokens, jaxpost's over each pair (equal here).
    lengths = np.full((2, B), 7.0, np.float32) if "sft" in loss_types else \
        rng.integers(1, 20, size=(2, B)).astype(np.float32)
    weights = [0.8, 0.2, 1.0][:len(loss_types)] if len(loss_types) > 1 else [1.0]
    # TRL 1.16 reads label_smoothing in exo_pair, robust and aot only (its sigmoid has no cDPO smoothing).
    smoothed = {"exo_pair", "robust", "aot", "aot_unpaired"}
    hp = {"label_smoothing": 0.1 if set(loss_types) & smoothed and "sigmoid" not in loss_types else 0.0}
    if f_div != "reverse_kl":
        hp.update(f_divergence_type=f_div, f_alpha_divergence_coef=0.3)
    beta = 0.2

    def ours(pc, pr):
        args = (pc, pr, ref[0], ref[1], lengths[0], lengths[1])
        if len(loss_types) == 1:
            fn = PREFERENCE_LOSSES[loss_types[0]]
            return fn(*args, beta=beta, **own_hparams(fn, hp))[0]
        return combined_preference_loss(loss_types, weights, *args, beta=beta, **hp)[0]

    value_ours, grads_ours = jax.value_and_grad(ours, argnums=(0, 1))(logps[0], logps[1])
    t_logps = torch.tensor(logps.reshape(-1), dtype=torch.float64, requires_grad=True)
    expected = trl_dpo_loss(torch, loss_types, weights, t_logps, torch.tensor(ref.reshape(-1), dtype=torch.float64),
                            torch.tensor(lengths.reshape(-1), dtype=torch.float64), beta, **hp)
    expected.backward()
    np.testing.assert_allclose(float(value_ours), expected.item(), rtol=2e-5, atol=1e-6)
    g = t_logps.grad.numpy().reshape(2, B)
    np.testing.assert_allclose(np.asarray(grads_ours[0]), g[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads_ours[1]), g[1], rtol=1e-4, atol=1e-6)


# TRL weighs its sft term, a batch mean, by each pair's weight; jaxpost's sft is per pair, so weighted per pair
# (by hand below).
WPO_CASES = [["sigmoid"], ["ipo"], ["bco_pair"], ["discopop"], ["sigmoid", "bco_pair", "nca_pair"]]


@pytest.mark.parametrize("loss_types", WPO_CASES, ids="+".join)
def test_wpo_weighted_values_and_gradients_match_trl(loss_types):
    import torch

    rng = np.random.default_rng(7)
    B = 5
    logps = rng.uniform(-30.0, -5.0, size=(2, B)).astype(np.float32)
    ref = (logps + rng.normal(0.0, 1.5, size=(2, B))).astype(np.float32)
    lengths = np.full((2, B), 6.0, np.float32)
    wpo = rng.uniform(0.2, 1.5, size=(2, B)).astype(np.float32)
    weights = [0.8, 0.2, 1.0][:len(loss_types)] if len(loss_types) > 1 else [1.0]

    def ours(pc, pr):
        args = (pc, pr, ref[0], ref[1], lengths[0], lengths[1])
        if len(loss_types) == 1:
            return PREFERENCE_LOSSES[loss_types[0]](*args, beta=0.2, pair_weights=wpo[0] * wpo[1])[0]
        return combined_preference_loss(loss_types, weights, *args, beta=0.2, pair_weights=wpo[0] * wpo[1])[0]

    value_ours, grads_ours = jax.value_and_grad(ours, argnums=(0, 1))(logps[0], logps[1])
    t_logps = torch.tensor(logps.reshape(-1), dtype=torch.float64, requires_grad=True)
    expected = trl_dpo_loss(torch, loss_types, weights, t_logps, torch.tensor(ref.reshape(-1), dtype=torch.float64),
                            torch.tensor(lengths.reshape(-1), dtype=torch.float64), 0.2,
                            wpo=torch.tensor(wpo.reshape(-1), dtype=torch.float64))
    expected.backward()
    np.testing.assert_allclose(float(value_ours), expected.item(), rtol=2e-5, atol=1e-6)
    g = t_logps.grad.numpy().reshape(2, B)
    np.testing.assert_allclose(np.asarray(grads_ours[0]), g[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads_ours[1]), g[1], rtol=1e-4, atol=1e-6)
    unweighted = trl_dpo_loss(torch, loss_types, weights, t_logps.detach(), torch.tensor(ref.reshape(-1)),
                              torch.tensor(lengths.reshape(-1)), 0.2)
    assert abs(unweighted.item() - expected.item()) > 1e-3  # the weights matter in this case


def test_wpo_weights_the_sft_term_pair_by_pair():
    # Pairs with chosen NLL per token 2 and 4 (sums -6 and -8 over 3 and 2 tokens), weights 0.5 and 1.5:
    # (0.5 * 2 + 1.5 * 4) / 2 = 3.5, against 3 unweighted.
    pc, lc = a(-6.0, -8.0), a(3.0, 2.0)
    assert value(chosen_nll_loss, pc, a(-1.0, -1.0), None, None, lc, a(1.0, 1.0)) == pytest.approx(3.0)
    assert value(chosen_nll_loss, pc, a(-1.0, -1.0), None, None, lc, a(1.0, 1.0),
                 pair_weights=a(0.5, 1.5)) == pytest.approx(3.5)


def test_wpo_is_refused_where_the_terms_are_sorted():
    with pytest.raises(ValueError, match="aot averages sorted margins"):
        aot_loss(PC, PR, RC, RR, beta=0.1, pair_weights=a(1.0))
    from jaxpost.algorithms import make_dpo_loss
    from jaxpost.errors import UserError
    with pytest.raises(UserError, match=r"make_dpo_loss.use_weighting.*'aot_unpaired', whose terms are sorted"):
        make_dpo_loss(None, None, kind=["sigmoid", "aot_unpaired"], use_weighting=True)


def test_wpo_dpo_loss_of_a_model_equals_trl_from_its_full_logits():
    """``make_dpo_loss(use_weighting=True)`` on a tiny model, unpacked rows, against TRL's eq. 2 weights and the
    sigmoid loss written out in float64 from the model's full ``[B, L, V]`` logits (no chunking)."""
    import jax.numpy as jnp

    from jaxpost import models
    from jaxpost.algorithms import make_dpo_loss
    from jaxpost.data import build_tokenizer, make_preference_pipeline
    from jaxpost.models.config import ModelConfig

    config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2)
    graphdef, params = models.create(config, seed=0)
    _, ref = models.create(config, seed=1)
    rng = np.random.default_rng(5)
    word = lambda k: "".join(rng.choice(list("abcdefghij"), size=k))  # noqa: E731
    rows = [{"prompt": word(3), "chosen": word(int(rng.integers(1, 7))), "rejected": word(int(rng.integers(1, 7)))}
            for _ in range(6)]
    tok = build_tokenizer(None, vocab_size=261)
    batch = next(iter(make_preference_pipeline(rows, tok, 24, 6, num_epochs=1, shuffle=False)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, metrics = make_dpo_loss(graphdef, config, kind="sigmoid", beta=0.5, use_weighting=True, chunk_size=8)(
        params, batch, {"reference": ref})

    def side(p, s):
        hidden, _ = models.forward(graphdef, p, batch[f"{s}_tokens"], batch[f"{s}_positions"], batch[f"{s}_segment_ids"])
        z = np.asarray(models.logits(p, config, hidden), np.float64)
        logsm = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        t = np.asarray(batch[f"{s}_targets"])
        per_token = np.take_along_axis(logsm, t[..., None], -1)[..., 0]
        m = np.asarray(batch[f"{s}_loss_mask"], np.float64)
        two = 2 * logsm
        log_sum_sq = np.log(np.exp(two - two.max(-1, keepdims=True)).sum(-1)) + two.max(-1)
        aligned = (per_token - log_sum_sq) * m
        return (per_token * m).sum(1), np.exp(aligned.sum(1) / np.maximum(m.sum(1), 1))

    (pc, wc), (pr, wr) = side(params, "chosen"), side(params, "rejected")
    (rc, _), (rr, _) = side(ref, "chosen"), side(ref, "rejected")
    h = (pc - rc) - (pr - rr)
    expected = np.mean(np.log1p(np.exp(-0.5 * h)) * wc * wr)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["wpo/weights"]), np.mean(wc * wr), rtol=2e-5)
    assert np.ptp(wc * wr) > 0.05  # the pairs weigh differently, so a loss that dropped the weights would show


def test_dpo_options_benchmark_runs_tiny():
    """benchmarks/dpo_options.py end to end on a tiny model (its harness and arithmetic, not its speed)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import dpo_options

    report = dpo_options.main(["--vocab", "96", "--hidden", "32", "--intermediate", "64", "--layers", "1",
                               "--pairs", "2", "--seq-len", "16", "--repeats", "3"])
    times = report["times_s"]
    assert set(times) == {"plain", "wpo", "ld"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    assert report["paired_over_plain"]["plain"] == 1.0
    per_round = sorted(t / p for t, p in zip(times["wpo"], times["plain"]))
    assert report["paired_over_plain"]["wpo"] == pytest.approx(per_round[1])
    # The variants compute different losses of the same batch: WPO weighs the pairs, LD-DPO the excess tokens.
    assert len({round(v, 6) for v in report["loss"].values()}) == 3
