"""Per-pair reductions over packed preference rows (layout: :mod:`jaxpost.data.pair_packing`).

A packed row holds up to ``K`` pairs; token ``t`` of row ``b`` belongs to
pair slot ``pair_ids[b, t]`` (``1..K``, 0 = padding) on side
``pair_sides[b, t]`` (1 = chosen, 2 = rejected). Every reduction here is
row-local (a pair never straddles rows), so it shards along the batch axis
with no cross-device traffic. The reductions themselves live in
:mod:`jaxpost.losses.sequence`; this module runs the model and feeds them.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jaxpost.losses.sequence import packed_sequence_logps, packed_wpo_weights, pair_last_index
from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import scores, token_logprobs


def packed_pair_logps(graphdef, config: ModelConfig, params, batch: Mapping, *, chunk_size: int = 512,
                      ld_alpha: float | None = None, wpo: bool = False):
    """Summed response log-probs and response lengths per pair, from one forward over the packed rows.

    ``pi_side[b, k] = sum_t log p(targets[b, t]) loss_mask[b, t]`` over the
    tokens of slot ``k`` on that side; ``len_side`` the same sum of
    ``loss_mask``. Returns ``(pi_c, pi_r, len_c, len_r)``, each ``[B, K]``
    with ``K = batch["pair_mask"].shape[1]``; ``ld_alpha``: LD-DPO's weighted
    sums (:func:`~jaxpost.losses.sequence.ld_sequence_logps`). With ``wpo``
    also each pair's WPO weight ``w_c w_r`` ``[B, K]``
    (:func:`~jaxpost.losses.sequence.packed_wpo_weights`).
    """
    hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    out = token_logprobs(params, config, hidden, batch["targets"], chunk_size=chunk_size, return_log_sum_sq=wpo)
    logp = out[0] if wpo else out
    where = (batch["loss_mask"], batch["pair_ids"], batch["pair_sides"], batch["pair_mask"].shape[1])
    sums = packed_sequence_logps(logp, *where, ld_alpha=ld_alpha)
    if not wpo:
        return sums
    wc, wr = packed_wpo_weights(logp, out[1], *where)
    return (*sums, wc * wr)


def packed_pair_scores(graphdef, params, batch: Mapping):
    """Scalar scores at each sequence's last token (``head="score"`` model): ``(r_c, r_r)`` ``[B, K]``."""
    hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    s = scores(params, hidden).astype(jnp.float32)
    k = batch["pair_mask"].shape[1]
    ic, ir = pair_last_index(batch["pair_ids"], batch["pair_sides"], k)
    return jnp.take_along_axis(s, ic, axis=1), jnp.take_along_axis(s, ir, axis=1)
