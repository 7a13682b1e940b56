"""Shared harness of the preference-layout tests: three DPO-family losses, values and gradients in one jit."""

import jax

from jaxpost.algorithms import make_dpo_loss


def value_and_grad(loss_fn):
    """``loss_fn(params, batch, frozen)`` -> ``run(...)`` returning ``(loss, metrics, grads)``."""
    def run(params, batch, frozen=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, frozen)
        return loss, metrics, grads
    return run


def three_dpo_losses(graphdef, config):
    """``run(params, batch, ref)`` -> ``{kind: (loss, metrics, grads)}`` for three references, one compile per layout.

    Sigmoid + RPO reads precomputed reference log-probs from the batch, IPO runs
    the frozen reference ``ref``, SimPO needs none.
    """
    losses = {"sigmoid": make_dpo_loss(graphdef, config, kind="sigmoid", beta=0.5, rpo_alpha=0.5),
              "ipo": make_dpo_loss(graphdef, config, kind="ipo", beta=0.5),
              "simpo": make_dpo_loss(graphdef, config, kind="simpo", beta=2.0, gamma=0.3)}

    @jax.jit
    def run(params, batch, ref):
        online = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        return {"sigmoid": value_and_grad(losses["sigmoid"])(params, batch),
                "ipo": value_and_grad(losses["ipo"])(params, online, {"reference": ref}),
                "simpo": value_and_grad(losses["simpo"])(params, online)}

    return run
