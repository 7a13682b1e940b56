"""Rollouts for online runs: sample, decode, score, and measure log-probs and values.

One rollout turns a batch of left-padded prompts into training rows::

    slot      0 .. P-1                    P .. P+N-1
    tokens    [pad .. pad, prompt]        completion (pad after the stop token)
    segment   0 .. 0, 1 .. 1              1 up to and including the stop token, then 0
    loss_mask 1 at t = P-1 .. P+N-2 where targets[t] is a completion token

the same layout the sampler's KV cache used, so the training forward
reproduces the sampler's log-probs. Scores come from a scorer
(:mod:`jaxpost.generate.scorers`); ``old_logp``/``ref_logp``/``old_values``
from training forwards (:func:`jaxpost.algorithms.online.make_rollout_logprobs`).

Multi-host: the prompt batch is the same global batch on every process.
Sampling and every forward run on the whole mesh; the sampled tokens and
measured log-probs are gathered to every process (they are small), so
every process holds the whole rollout and computes the same global
statistics. A scorer that runs on the devices (a reward model,
``on_devices = True``) scores the global batch at once; any other scorer
(Python reward functions) scores only this process's rows
(:func:`jaxpost.distributed.host_rows`) and the scores are all-gathered.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np

from jaxpost.algorithms.batch import LM_KEYS
from jaxpost.algorithms.online import make_rollout_logprobs
from jaxpost.data.encode import pad_id
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.distributed import all_rows, host_rows, to_host
from jaxpost.errors import UserError
from jaxpost.generate.sampler import Sampler, SamplingConfig, check_sampling_values, left_pad
from jaxpost.generate.scorers import RewardTerm
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How completions are sampled and scored.

    ``group_size`` completions per prompt (GRPO/RLOO groups, online DPO
    candidates). ``missing_eos_penalty`` (TRL): subtracted from the score of
    every completion that hit ``max_new_tokens`` without a stop token
    (None = no penalty). ``stop_token_ids`` end a completion (None: the
    tokenizer's eos and end-of-turn tokens). ``repetition_penalty`` (TRL's,
    1 = off) discourages tokens already in the prompt or the completion.
    Log-probs are those of the untempered model (the
    sampler's ``logprobs``); with ``temperature != 1`` the samples come from
    the tempered distribution, so keep ``temperature = 1`` for exact
    on-policy ratios.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    group_size: int = 1
    missing_eos_penalty: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    chunk_size: int = 512

    def __post_init__(self):
        check_sampling_values(self)
        if self.chunk_size < 1:
            raise UserError(f"RolloutConfig.chunk_size must be >= 1, got {self.chunk_size}")


@dataclasses.dataclass
class Rollout:
    """One rollout batch; every per-completion entry has ``B = prompts * group_size`` rows.

    ``batch``: LM keys (``tokens, positions, segment_ids, targets,
    loss_mask`` ``[B, P+N]``) as global arrays on the mesh, plus the
    measured ``old_logp``, ``ref_logp``, ``token_entropy`` and (PPO)
    ``old_values``. ``host``: the LM keys as numpy. ``scores`` float32 ``[B]``
    after the missing-EOS penalty, ``raw_scores`` before it; ``finished``
    bool ``[B]``: the completion ended with a stop token. ``rewards``: each
    reward term's unweighted ``[B]`` values, by name (empty when an
    environment scores).
    """

    batch: dict[str, jax.Array]
    host: dict[str, np.ndarray]
    completions: list[str]
    prompts: list[Any]
    rows: list[Any]
    finished: np.ndarray
    scores: np.ndarray | None = None
    raw_scores: np.ndarray | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    rewards: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def sample_records(r: Rollout, **columns: Sequence[Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per completion of ``r``, for a run's samples log.

    ``{"prompt", "completion", "score", "rewards": {name: value}, "finished",
    "completion_tokens", **columns}``: ``score`` after the missing-EOS
    penalty, ``rewards`` each term unweighted, ``completion_tokens`` the
    trained tokens; ``columns`` are the method's own ``[B]`` values (GRPO's
    ``advantage``, online DPO's ``pair``).
    """
    tokens = r.host["loss_mask"].sum(-1)
    out = []
    for b, completion in enumerate(r.completions):
        rec = {"prompt": r.prompts[b], "completion": completion, "score": float(r.scores[b]),
               "rewards": {name: float(v[b]) for name, v in r.rewards.items()}, "finished": bool(r.finished[b]),
               "completion_tokens": int(tokens[b])}
        rec.update({k: v[b].item() if isinstance(v[b], np.generic) else v[b] for k, v in columns.items()})
        out.append(rec)
    return out


def reward_terms(r: Rollout, roller: Roller) -> tuple[np.ndarray, np.ndarray]:
    """``([K, B] values, [K] weights)``: each reward term of ``roller``'s scorer, unweighted, as in ``r.rewards``.

    A missing-EOS penalty is one more term: ``-1`` on a completion cut
    without a stop token, weighted by ``RolloutConfig.missing_eos_penalty``
    (so that GDPO normalises it like the rest).
    """
    terms = roller.terms
    values, weights = [r.rewards[t.name] for t in terms], [t.weight for t in terms]
    if roller.cfg.missing_eos_penalty:
        values.append(-(~r.finished).astype(np.float32))
        weights.append(roller.cfg.missing_eos_penalty)
    return np.stack(values), np.asarray(weights, np.float32)


def rollout_sequences(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion_tokens: np.ndarray,
                      completion_mask: np.ndarray, pad: int) -> dict[str, np.ndarray]:
    """Prompt ``[B,P]`` (left-padded) + completion ``[B,N]`` -> LM arrays ``[B, P+N]``.

    ``segment_ids = [prompt_mask, completion_mask]`` (1 = real);
    ``positions = cumsum(segment_ids) - 1`` on real tokens, 0 on padding;
    ``targets[t] = tokens[t+1]`` when ``t`` and ``t+1`` are real, else ``pad``;
    ``loss_mask[t] = completion_mask[t+1-P]`` (1 where ``targets[t]`` is a
    sampled completion token, the stop token included).
    """
    B, P = prompt_tokens.shape
    if completion_tokens.shape[0] != B or completion_mask.shape != completion_tokens.shape:
        raise ValueError(f"completion_tokens {completion_tokens.shape} and completion_mask {completion_mask.shape} "
                         f"must be [B={B}, N]")
    seg = np.concatenate([prompt_mask != 0, completion_mask != 0], axis=1)
    tokens = np.where(seg, np.concatenate([prompt_tokens, completion_tokens], axis=1), pad).astype(np.int32)
    positions = np.where(seg, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    nxt = seg & np.concatenate([seg[:, 1:], np.zeros((B, 1), bool)], axis=1)  # t and t+1 in the one segment
    targets = np.where(nxt, np.concatenate([tokens[:, 1:], np.full((B, 1), pad, np.int32)], axis=1), pad)
    comp = np.concatenate([np.zeros((B, P), bool), completion_mask != 0], axis=1)
    loss_mask = np.concatenate([comp[:, 1:], np.zeros((B, 1), bool)], axis=1)
    return {"tokens": tokens, "positions": positions, "segment_ids": seg.astype(np.int32),
            "targets": targets.astype(np.int32), "loss_mask": loss_mask.astype(np.float32)}


def batch_prompts(batch: dict, max_prompt_len: int, pad: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Prompts of an unpacked LM batch, left-padded to ``max_prompt_len``: ``(tokens, mask, truncated)``.

    A row's prompt is its tokens up to and including position ``t0``, the
    first position with ``loss_mask = 1`` (``targets[t0]`` is the first
    response token). Longer prompts keep their last ``max_prompt_len``
    tokens; ``truncated`` counts them. Rows with nothing trained raise.
    """
    mask = np.asarray(batch["loss_mask"]) != 0
    empty = np.flatnonzero(~mask.any(-1))
    if empty.size:
        raise ValueError(f"LM batch rows {empty.tolist()} have no trained token, so no prompt/response split")
    prompts, truncated = [], 0
    for row, m in zip(np.asarray(batch["tokens"]), mask):
        ids = row[: int(np.argmax(m)) + 1]
        if len(ids) > max_prompt_len:
            ids, truncated = ids[-max_prompt_len:], truncated + 1
        prompts.append(ids)
    tokens, pmask = left_pad(prompts, max_prompt_len, pad)
    return tokens, pmask, truncated


def best_worst_pairs(scores: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chosen, rejected, valid)`` row indices ``[num_prompts]`` into ``scores`` ``[num_prompts * G]``.

    For group ``g`` (rows ``g*G .. g*G+G-1``): ``chosen = argmax``,
    ``rejected = argmin`` (first occurrence on ties), ``valid = max > min``
    (a group whose scores are all equal gives no preference and is skipped).
    """
    s = np.asarray(scores, np.float64)
    if group_size < 2 or s.ndim != 1 or s.shape[0] % group_size:
        raise ValueError(f"scores of shape {s.shape} cannot form pairs from groups of group_size={group_size} "
                         "(need group_size >= 2 dividing the number of scores)")
    g = s.reshape(-1, group_size)
    base = np.arange(g.shape[0]) * group_size
    return (base + g.argmax(1)).astype(np.int32), (base + g.argmin(1)).astype(np.int32), g.max(1) > g.min(1)


def pair_batch(host: dict[str, np.ndarray], chosen: np.ndarray, rejected: np.ndarray, valid: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Preference batch (``PREFERENCE_KEYS`` + ``pair_mask``) from rollout rows picked as pairs."""
    out = {f"chosen_{k}": host[k][chosen] for k in LM_KEYS}
    out.update({f"rejected_{k}": host[k][rejected] for k in LM_KEYS})
    out["pair_mask"] = valid.astype(np.float32)
    return out


def sampled_records(tokenizer: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, out: Any) -> list[dict]:
    """Samples-log records of a :class:`~jaxpost.generate.sampler.Sampler` call's host output ``out``, unscored:
    ``{"prompt", "completion", "finished", "completion_tokens"}``, the prompt decoded with its special tokens (as the
    model saw it), the completion without them (its stop token)."""
    prompts = [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m])
               for row, mrow in zip(prompt_tokens, prompt_mask)]
    completions = decode_completions(tokenizer, out.tokens, out.completion_mask)
    lengths = np.asarray(out.completion_mask).sum(-1)
    return [{"prompt": p, "completion": c, "finished": bool(f), "completion_tokens": int(n)}
            for p, c, f, n in zip(prompts, completions, np.asarray(out.finished), lengths)]


def decode_completions(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Text of each completion's masked tokens, special tokens (stop tokens) dropped."""
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(tokens, mask)]


def measure_rollout(measure: Callable, r: Rollout, policy, reference, value, generate_s: float) -> dict[str, float]:
    """Adds the training forwards' ``old_logp``/``ref_logp``/``token_entropy`` (and ``old_values``) to
    ``r.batch`` and returns the rollout's metrics, computed from gathered (global) values.

    ``measure`` is the compiled :func:`jaxpost.algorithms.online.make_rollout_logprobs`; ``r.scores``,
    ``r.raw_scores`` and ``r.finished`` must be set.
    """
    r.batch.update(measure(policy, reference, value, r.batch))
    return rollout_metrics(r, generate_s)


def rollout_metrics(r: Rollout, generate_s: float) -> dict[str, float]:
    """The metrics of a measured rollout (``r.batch`` holds ``old_logp``, ``ref_logp``, ``token_entropy``;
    ``r.scores``, ``r.raw_scores`` and ``r.finished`` are set), from gathered (global) values."""
    got = to_host({k: r.batch[k] for k in ("old_logp", "ref_logp", "token_entropy")})
    mask = r.host["loss_mask"]
    lengths = mask.sum(-1)
    return {
        "objective/scores": float(r.scores.mean()),
        "objective/raw_scores": float(r.raw_scores.mean()),
        # TRL: summed per sequence, averaged over sequences.
        "objective/kl": float(((got["old_logp"] - got["ref_logp"]) * mask).sum(-1).mean()),
        "objective/entropy": float((-got["old_logp"] * mask).sum(-1).mean()),
        "policy/token_entropy": float((got["token_entropy"] * mask).sum() / max(mask.sum(), 1.0)),
        "rollout/completion_length": float(lengths.mean()),
        "rollout/missing_eos_fraction": float((~r.finished).mean()),
        "rollout/tokens_per_s": float(lengths.sum() / max(generate_s, 1e-9)),
        "time/generate_s": generate_s,
    }


def check_prompt_batch(batch: dict) -> None:
    """Raises naming the rows of a prompt batch that hold no prompt (padding rows)."""
    empty = np.flatnonzero(~np.asarray(batch["prompt_mask"]).astype(bool).any(-1))
    if empty.size:
        raise ValueError(f"prompt batch rows {empty.tolist()} are padding (no prompt tokens); online runs read "
                         "prompts forever (num_epochs=None), so every batch must be full")


class Roller:
    """Samples completions for prompt batches and measures them; compiled once per shape.

    ``roller(policy, reference, value, prompt_batch, rng) -> Rollout`` with
    ``prompt_batch`` from :func:`jaxpost.data.make_prompt_pipeline` and
    ``value`` the value-model params (PPO) or None. ``measure=False``
    (held-out evaluation) skips the training forwards: the rollout's batch
    has no ``old_logp``/``ref_logp`` and its metrics only the rewards'.
    """

    def __init__(self, graphdef, config: ModelConfig, tokenizer: Any, partitioner: Partitioner,
                 scorer: Callable[[Rollout], np.ndarray], rollout: RolloutConfig, value_graphdef=None,
                 measure: bool = True):
        self.tokenizer, self.partitioner, self.scorer, self.cfg = tokenizer, partitioner, scorer, rollout
        self.pad = pad_id(tokenizer)
        stops = rollout.stop_token_ids if rollout.stop_token_ids is not None else stop_token_ids(tokenizer)
        sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                  top_k=rollout.top_k, top_p=rollout.top_p, min_p=rollout.min_p,
                                  repetition_penalty=rollout.repetition_penalty, stop_token_ids=tuple(stops),
                                  pad_token_id=self.pad, group_size=rollout.group_size)
        self.sampler = Sampler(graphdef, config, sampling, partitioner)
        self._measure = (jax.jit(make_rollout_logprobs(graphdef, config, value_graphdef, rollout.chunk_size))
                         if measure else None)
        self.has_value = value_graphdef is not None

    @property
    def terms(self) -> tuple[RewardTerm, ...]:
        """The scorer's reward terms; a scorer without ``terms`` is one (``on_devices`` if it says so)."""
        terms = getattr(self.scorer, "terms", None)
        if terms is None:
            terms = (RewardTerm(getattr(self.scorer, "__name__", "reward"), 1.0, self.scorer,
                                getattr(self.scorer, "on_devices", False)),)
        return tuple(terms)

    def _score(self, r: Rollout) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """``[B]`` float32 scores (the weighted sum of the scorer's terms), each term's values and metrics.

        A term on the devices scores the global batch at once; any other is
        called by each process on its own rows, and the values gathered. A
        scorer without ``terms`` is one term (``on_devices`` if it says so).
        """
        B = len(r.completions)
        terms = self.terms
        own = host_rows(B)
        mine = dataclasses.replace(r, batch={}, host={k: v[own] for k, v in r.host.items()},
                                   completions=r.completions[own], prompts=r.prompts[own], rows=r.rows[own],
                                   finished=r.finished[own])
        values = {}
        # Host terms first: they run while the devices finish the measuring forwards; a reward model then queues.
        for k in sorted(range(len(terms)), key=lambda k: terms[k].on_devices):
            term = terms[k]
            if term.on_devices:
                v = np.asarray(term.score(r), np.float32)
            else:
                v = np.asarray(term.score(mine), np.float32)
                if v.shape != (len(mine.completions),):
                    raise ValueError(f"reward {term.name!r} returned shape {v.shape}, expected "
                                     f"({len(mine.completions)},)")
                v = all_rows(v, B)
            if v.shape != (B,):
                raise ValueError(f"reward {term.name!r} returned shape {v.shape}, expected ({B},)")
            values[k] = v
        total, metrics = np.zeros((B,), np.float32), {}
        for k, term in enumerate(terms):  # summed in the scorer's order
            total += np.float32(term.weight) * values[k]
            metrics[f"rewards/{term.name}/mean"] = float(values[k].mean())
            metrics[f"rewards/{term.name}/std"] = float(values[k].std())
        return total, {term.name: values[k] for k, term in enumerate(terms)}, metrics

    def __call__(self, policy, reference, value, prompt_batch: dict, rng: jax.Array) -> Rollout:
        """Samples, measures and scores one prompt batch.

        The measuring forwards (``old_logp``, ``ref_logp``, values) do not
        depend on the scores: they are dispatched before the completions are
        decoded and scored on the host, so slow reward functions (a remote
        judge, a sandbox) run while the devices measure.
        """
        check_prompt_batch(prompt_batch)
        G = self.cfg.group_size
        start = time.perf_counter()
        out = to_host(self.sampler(policy, prompt_batch["prompt_tokens"], prompt_batch["prompt_mask"], rng))
        generate_s = time.perf_counter() - start
        prompt_tokens = np.repeat(np.asarray(prompt_batch["prompt_tokens"]), G, axis=0)
        prompt_mask = np.repeat(np.asarray(prompt_batch["prompt_mask"]), G, axis=0)
        host = rollout_sequences(prompt_tokens, prompt_mask, out.tokens, out.completion_mask, self.pad)
        batch = on_mesh(host, self.partitioner)
        measured = ({} if self._measure is None else  # dispatched, not waited for
                    self._measure(policy, reference, value if self.has_value else None, batch))
        r = Rollout(batch=batch, host=host,
                    completions=decode_completions(self.tokenizer, out.tokens, out.completion_mask),
                    prompts=[p for p in prompt_batch["prompt"] for _ in range(G)],
                    rows=[row for row in prompt_batch["row"] for _ in range(G)],
                    finished=np.asarray(out.finished, bool))
        score_start = time.perf_counter()
        raw, r.rewards, reward_metrics = self._score(r)
        score_s = time.perf_counter() - score_start
        penalty = self.cfg.missing_eos_penalty
        r.raw_scores = raw
        r.scores = raw - np.float32(penalty or 0.0) * (~r.finished).astype(np.float32)
        r.batch = {**batch, **measured}
        r.metrics = {**(rollout_metrics(r, generate_s) if measured else {}), **reward_metrics, "time/score_s": score_s}
        return r
