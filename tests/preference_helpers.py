"""Shared pieces of the preference tests: hand-example helpers, and four DPO-family losses in one jit."""

import math

import jax
import numpy as np

from jaxpost.algorithms import make_dpo_loss


def a(*xs):
    return np.array(xs, np.float32)


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# One pair: policy log-ratio chosen-rejected = 2, reference = 0, so h = 2 (u_c = 1, u_r = -1).
PC, PR, RC, RR = a(-1.0), a(-3.0), a(-2.0), a(-2.0)


def value_and_grad(loss_fn):
    """``loss_fn(params, batch, frozen)`` -> ``run(...)`` returning ``(loss, metrics, grads)``."""
    def run(params, batch, frozen=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, frozen)
        return loss, metrics, grads
    return run


def dpo_losses(graphdef, config):
    """``run(params, batch, ref)`` -> ``{kind: (loss, metrics, grads)}`` for three references, one compile per layout.

    Sigmoid + RPO reads precomputed reference log-probs from the batch, IPO runs
    the frozen reference ``ref`` with WPO's weights (``wpo/weights`` logged), SimPO needs none. A sum of AOT (which sorts
    the batch's margins, so the pairs' order and padding slots must not
    matter), length-normalised DPO and the chosen NLL, over LD-DPO's weighted
    sums (``ld_alpha``), runs ``ref`` too.
    """
    losses = {"sigmoid": make_dpo_loss(graphdef, config, kind="sigmoid", beta=0.5, rpo_alpha=0.5),
              "ipo": make_dpo_loss(graphdef, config, kind="ipo", beta=0.5, use_weighting=True),
              "simpo": make_dpo_loss(graphdef, config, kind="simpo", beta=2.0, gamma=0.3),
              "sum": make_dpo_loss(graphdef, config, kind=["aot", "sigmoid_norm", "sft"], beta=0.5,
                                   loss_weights=[1.0, 0.5, 0.1], label_smoothing=0.1, ld_alpha=0.4)}

    @jax.jit
    def run(params, batch, ref):
        online = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        return {"sigmoid": value_and_grad(losses["sigmoid"])(params, batch),
                "ipo": value_and_grad(losses["ipo"])(params, online, {"reference": ref}),
                "simpo": value_and_grad(losses["simpo"])(params, online),
                "sum": value_and_grad(losses["sum"])(params, online, {"reference": ref})}

    return run
