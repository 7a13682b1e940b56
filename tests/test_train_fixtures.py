"""Self-contained tiny LM, loss and checkpointable data iterator for the train tests.

Kept independent of ``jaxpost.models``/``losses``/``data`` so the training
core is tested on its own. Imported by the other ``test_train_*`` files;
the tests here check the fixtures themselves against numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, EMBED, HIDDEN = 32, 16, 32


def init_params(seed: int = 0) -> dict:
    """Embedding -> RMS-style scale -> tanh MLP -> vocab projection."""
    r = np.random.default_rng(seed)
    return {
        "embed": {"embedding": jnp.asarray(r.normal(0, 1.0, (VOCAB, EMBED)), jnp.float32)},
        "norm": {"scale": jnp.asarray(1.0 + 0.1 * r.normal(size=(EMBED,)), jnp.float32)},
        "mlp": {"kernel": jnp.asarray(r.normal(0, EMBED ** -0.5, (EMBED, HIDDEN)), jnp.float32),
                "bias": jnp.asarray(0.1 * r.normal(size=(HIDDEN,)), jnp.float32)},
        "head": {"kernel": jnp.asarray(r.normal(0, HIDDEN ** -0.5, (HIDDEN, VOCAB)), jnp.float32)},
    }


LOGICAL_AXES = {
    "embed": {"embedding": ("vocab", "embed")},
    "norm": {"scale": ("norm",)},
    "mlp": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "head": {"kernel": ("mlp", "vocab")},
}


def logits_fn(params, tokens):
    x = params["embed"]["embedding"][tokens]
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6).astype(x.dtype)
    x = x * params["norm"]["scale"]
    h = jnp.tanh(x @ params["mlp"]["kernel"] + params["mlp"]["bias"])
    return (h @ params["head"]["kernel"]).astype(jnp.float32)


def lm_loss(params, batch, frozen=None):
    """Token-mean cross entropy: ``loss_sum / loss_tokens`` over ``loss_mask``; also ``accuracy``."""
    logits = logits_fn(params, batch["tokens"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    if "scale" in batch:  # lets a test poison a batch with NaN
        nll = nll * batch["scale"][:, None]
    loss_sum = jnp.sum(nll * mask)
    tokens = jnp.sum(mask)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    denom = jnp.maximum(tokens, 1.0)
    return loss_sum / denom, {"loss_sum": loss_sum, "loss_tokens": tokens,
                              "accuracy": jnp.sum(correct * mask) / denom}


def make_batch(index: int, batch_size: int = 8, length: int = 8, seed: int = 0, uneven: bool = True) -> dict:
    """Batch number ``index`` of a deterministic stream; rows have very different numbers of loss tokens."""
    r = np.random.default_rng([seed, index])
    tokens = r.integers(0, VOCAB, (batch_size, length + 1)).astype(np.int32)
    if uneven:
        n_trained = r.integers(0, length + 1, (batch_size,))
        n_trained[0] = length  # at least one full row
    else:
        n_trained = np.full((batch_size,), length)
    mask = (np.arange(length)[None, :] < n_trained[:, None]).astype(np.float32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


class Batches:
    """Deterministic iterator with ``get_state``/``set_state`` (the position is the batch index).

    ``poison`` maps batch indices to a float multiplied into their loss (e.g. NaN).
    """

    def __init__(self, batch_size: int = 8, length: int = 8, seed: int = 0, poison: dict | None = None):
        self.batch_size, self.length, self.seed = batch_size, length, seed
        self.poison = dict(poison or {})
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = make_batch(self.index, self.batch_size, self.length, self.seed)
        b["scale"] = np.full((self.batch_size,), self.poison.get(self.index, 1.0), np.float32)
        self.index += 1
        return b

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def _np_reference_loss(params, batch):
    p = jax.tree.map(np.asarray, params)
    x = p["embed"]["embedding"][batch["tokens"]].astype(np.float64)
    x = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    h = np.tanh(x @ p["mlp"]["kernel"] + p["mlp"]["bias"])
    z = h @ p["head"]["kernel"]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def test_lm_loss_matches_numpy_cross_entropy():
    params, batch = init_params(), make_batch(0)
    loss, metrics = lm_loss(params, batch)
    np.testing.assert_allclose(float(loss), _np_reference_loss(params, batch), rtol=1e-5)
    assert float(metrics["loss_tokens"]) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["loss_sum"]), float(loss) * batch["loss_mask"].sum(), rtol=1e-6)


def test_batches_resume_from_state():
    a = Batches()
    for _ in range(3):
        next(a)
    b = Batches()
    b.set_state(a.get_state())
    np.testing.assert_array_equal(next(a)["tokens"], next(b)["tokens"])
    assert make_batch(1)["loss_mask"].sum(1).std() > 0  # token counts really differ between rows
