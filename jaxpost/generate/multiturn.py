"""Multi-turn rollouts: the model talks with an environment (tools, a user) for several turns.

:class:`MultiTurnRoller` is a drop-in for :class:`jaxpost.generate.rollout.Roller`
(same call, same :class:`~jaxpost.generate.rollout.Rollout`): GRPO/RLOO
(``grpo.environment = @CalculatorEnv()``) train on its rows with the
existing loss and loop. One episode per prompt x ``group_size``::

    ids = chat_template(env.reset(row), generation prompt)
    repeat up to MultiTurnConfig.max_turns:
        sample the model's turn after ids (the jaxpost Sampler; per-row budget:
            RolloutConfig.max_new_tokens, the episode's tokens left, the row's room left)
        observation, reward, done = env.step({"role": "assistant", "content": text})
        ids += observation rendered by the chat template (+ the next generation prompt)

A row is the whole conversation, right-padded to ``MultiTurnConfig.max_length``::

    tokens     prompt | model turn 1 | observation 1 | model turn 2 | ... | pad
    loss_mask  1 where targets[t] is a token the model sampled (its stop tokens
               included), 0 on prompt, observations (tool results, template
               headers) and padding

so the losses see the model's own tokens only, each in its full context.
``old_logp``/``ref_logp`` come from one training forward over the whole
conversation (:func:`jaxpost.algorithms.online.make_rollout_logprobs`); they
equal the sampler's log-probs of the same tokens (the observation tokens
are exactly those the sampler was prompted with next turn). The episode's
score is the sum of its rewards; RolloutConfig.missing_eos_penalty is
subtracted from episodes that ended on a budget (turns, tokens, length, or
a turn without a stop token) rather than by the environment.

Observation tokens: the chat template renders the conversation with the
model's turn replaced by a probe text plus the observation; what follows
the probe (the end of the model's turn, the observation messages, the next
assistant header) is appended, minus the end-of-turn token when the model
already sampled it. The model's own tokens are never re-tokenized.

Cost: every turn re-prefills the whole conversation so far (the sampler
starts from a prompt; continuing from the previous turn's KV cache needs a
sampler entry point that takes a cache, not there yet). An episode of T
turns over a conversation of L tokens prefills about T x L tokens instead of
L; for short tool exchanges this is small next to the decode steps.

Multi-host: every process holds the same global prompts and calls the
sampler with the same global batch each turn; the sampled tokens are
gathered to every process (:func:`jaxpost.distributed.to_host`). Each
process runs the environments (reset, step, tools) of its own rows only
(:func:`jaxpost.distributed.host_rows`) and their observation tokens,
rewards and flags are all-gathered (:func:`jaxpost.distributed.all_rows`),
so every process holds the same conversations. Sampling keys are
``fold_in(rng, turn)`` with the row's index among the live rows: the
same on any number of hosts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np

from jaxpost.algorithms.online import make_rollout_logprobs
from jaxpost.data.encode import encode_prompt, encode_text, pad_id, render
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.distributed import all_rows, host_rows, to_host
from jaxpost.errors import UserError
from jaxpost.generate.environments import Environment
from jaxpost.generate.rollout import Rollout, RolloutConfig, check_prompt_batch, measure_rollout
from jaxpost.generate.sampler import Sampler, SamplingConfig, left_pad
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh

__all__ = ["MultiTurnConfig", "MultiTurnRoller", "conversation_rows"]

_PROBE = "jaxpost-model-turn-probe"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
    """Budgets of one episode.

    ``max_turns`` model turns; ``max_episode_tokens`` tokens sampled by the
    model over all its turns (each turn also at most
    ``RolloutConfig.max_new_tokens``); ``max_length`` tokens of the whole
    conversation (prompt, turns, observations): the width of every training
    row. An episode that reaches any budget ends (truncated).
    """

    max_turns: int = 4
    max_episode_tokens: int = 256
    max_length: int = 512

    def __post_init__(self):
        for name in ("max_turns", "max_episode_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"MultiTurnConfig.{name} must be >= 1, got {getattr(self, name)}")


def conversation_rows(ids: Sequence[np.ndarray], model: Sequence[np.ndarray], width: int, pad: int,
                      logp: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Conversations (token ids, model-sampled flags) -> right-padded LM arrays ``[B, width]``.

    ``positions = 0..n-1``, ``segment_ids`` 1 on real tokens; ``targets[t] =
    ids[t+1]``; ``loss_mask[t] = model[t+1]``. With ``logp`` (per token,
    the sampler's log-prob of a model token), ``sampler_logp[t] = logp[t+1]``.
    """
    B = len(ids)
    out = {"tokens": np.full((B, width), pad, np.int32), "positions": np.zeros((B, width), np.int32),
           "segment_ids": np.zeros((B, width), np.int32), "targets": np.full((B, width), pad, np.int32),
           "loss_mask": np.zeros((B, width), np.float32)}
    if logp is not None:
        out["sampler_logp"] = np.zeros((B, width), np.float32)
    for b, (x, m) in enumerate(zip(ids, model)):
        n = len(x)
        if n > width:
            raise ValueError(f"conversation {b} has {n} tokens, more than the row width {width}")
        out["tokens"][b, :n], out["segment_ids"][b, :n], out["positions"][b, :n] = x, 1, np.arange(n)
        out["targets"][b, :n - 1] = x[1:]
        out["loss_mask"][b, :n - 1] = m[1:]
        if logp is not None:
            out["sampler_logp"][b, :n - 1] = logp[b][1:]
    return out


def _pack(seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``([n, width] int32, lengths [n])``, each cut to ``width``."""
    arr, lengths = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs),), np.int32)
    for i, s in enumerate(seqs):
        s = np.asarray(s, np.int32)[:width]
        arr[i, :len(s)], lengths[i] = s, len(s)
    return arr, lengths


class MultiTurnRoller:
    """Multi-turn episodes with ``environment`` for prompt batches; called like :class:`Roller`.

    ``roller(policy, reference, value, prompt_batch, rng) -> Rollout`` with
    ``B = prompts x group_size`` rows of whole conversations (module
    docstring); ``host`` also holds ``sampler_logp`` (the sampler's log-probs,
    aligned with ``targets``); ``completions`` is the text after the first
    prompt; metrics add ``env/turns``, ``env/truncated_fraction`` and the
    mean of every number in the environments' ``info``.
    """

    def __init__(self, graphdef, config: ModelConfig, tokenizer: Any, partitioner: Partitioner,
                 environment: Environment, rollout: RolloutConfig, multiturn: MultiTurnConfig | None = None,
                 value_graphdef=None):
        self.tokenizer, self.partitioner, self.environment, self.cfg = tokenizer, partitioner, environment, rollout
        self.mt = multiturn if multiturn is not None else MultiTurnConfig()
        self.pad = pad_id(tokenizer)
        stops = rollout.stop_token_ids if rollout.stop_token_ids is not None else stop_token_ids(tokenizer)
        self.stops = frozenset(int(s) for s in stops)
        sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                  top_k=rollout.top_k, top_p=rollout.top_p, stop_token_ids=tuple(stops),
                                  pad_token_id=self.pad, group_size=1)
        self.sampler = Sampler(graphdef, config, sampling, partitioner)
        self._measure = jax.jit(make_rollout_logprobs(graphdef, config, value_graphdef, rollout.chunk_size))
        self.has_value = value_graphdef is not None

    def observation_ids(self, history: list[dict], last_token: int, observation: list[dict] | None,
                        more: bool) -> list[int]:
        """Tokens after the model's turn: its end (if not sampled), ``observation``, and the next header if ``more``."""
        if not observation and not more:
            return []
        conv = [*history, {"role": "assistant", "content": _PROBE}, *(observation or [])]
        text = render(self.tokenizer, conv, add_generation_prompt=more)
        tail = text[text.rindex(_PROBE) + len(_PROBE):]
        if last_token in self.stops:
            sampled = self.tokenizer.decode([last_token], skip_special_tokens=False)
            if sampled and tail.startswith(sampled):
                tail = tail[len(sampled):]
        return encode_text(self.tokenizer, tail)

    def __call__(self, policy, reference, value, prompt_batch: dict, rng: jax.Array) -> Rollout:
        check_prompt_batch(prompt_batch)
        G, N, mt, W = self.cfg.group_size, self.cfg.max_new_tokens, self.mt, self.mt.max_length
        rows = [row for row in prompt_batch["row"] for _ in range(G)]
        prompts = [p for p in prompt_batch["prompt"] for _ in range(G)]
        B = len(rows)
        own = host_rows(B)
        envs = {b: self.environment.spawn() for b in range(own.start, own.stop)}
        history = {b: envs[b].reset(rows[b]) for b in envs}
        first, lengths = _pack([encode_prompt(self.tokenizer, history[b]) for b in envs], W + 1)
        first, lengths = all_rows(first, B), all_rows(lengths, B)
        if (lengths >= W).any():
            raise UserError(f"the first observation of row {int(np.argmax(lengths >= W))} has at least "
                            f"MultiTurnConfig.max_length={W} tokens; raise max_length or shorten the prompts")
        ids = [first[b, :lengths[b]] for b in range(B)]
        model = [np.zeros(len(x), np.float32) for x in ids]
        logp = [np.zeros(len(x), np.float32) for x in ids]
        prompt_len = lengths.copy()
        done, by_env = np.zeros(B, bool), np.zeros(B, bool)
        score, turns, sampled = np.zeros(B, np.float32), np.zeros(B, np.int32), np.zeros(B, np.int64)
        generate_s = 0.0
        for turn in range(mt.max_turns):
            room = np.array([W - len(x) for x in ids])
            budget = np.minimum.reduce([np.full(B, N), mt.max_episode_tokens - sampled, room])
            done |= budget < 1
            live = np.flatnonzero(~done)
            if not live.size:
                break
            tokens, mask = left_pad([ids[b] for b in live], pad_token_id=self.pad)
            start = time.perf_counter()
            out = to_host(self.sampler(policy, tokens, mask, jax.random.fold_in(rng, turn), budget[live]))
            generate_s += time.perf_counter() - start
            stopped = np.zeros(B, bool)
            for j, b in enumerate(live):
                n = int(out.lengths[j])
                ids[b] = np.concatenate([ids[b], out.tokens[j, :n]])
                model[b] = np.concatenate([model[b], np.ones(n, np.float32)])
                logp[b] = np.concatenate([logp[b], out.logprobs[j, :n]])
                sampled[b] += n
                turns[b] += 1
                stopped[b] = bool(out.finished[j])
            # This process's environments step; their observations, rewards and flags are all-gathered.
            slot = {int(b): j for j, b in enumerate(live)}
            k = own.stop - own.start
            obs, reward, ended = [[] for _ in range(k)], np.zeros(k, np.float32), np.zeros(k, bool)
            for b in (b for b in live if own.start <= b < own.stop):
                n = int(out.lengths[slot[int(b)]])
                text = self.tokenizer.decode([int(t) for t in ids[b][-n:]], skip_special_tokens=True)
                message = {"role": "assistant", "content": text}
                observation, r, d = envs[b].step(message)
                d = bool(d) or not stopped[b]  # a turn cut by its budget ends the episode
                i = b - own.start
                reward[i], ended[i] = r, d
                obs[i] = self.observation_ids(history[b], int(ids[b][-1]), observation, more=not d)
                history[b] = [*history[b], message, *(observation or [])]
            obs, obs_len = _pack(obs, W + 1)
            obs, obs_len = all_rows(obs, B), all_rows(obs_len, B)
            reward, ended = all_rows(reward, B), all_rows(ended, B)
            for b in live:
                stop_env = bool(ended[b]) and stopped[b]
                add = obs[b, :obs_len[b]]
                if len(ids[b]) + len(add) > W:  # no room for the observation: the episode ends (truncated if it
                    add, ended[b] = add[:W - len(ids[b])], True  # was to go on)
                ids[b] = np.concatenate([ids[b], add])
                model[b] = np.concatenate([model[b], np.zeros(len(add), np.float32)])
                logp[b] = np.concatenate([logp[b], np.zeros(len(add), np.float32)])
                score[b] += reward[b]
                done[b] |= bool(ended[b])
                by_env[b] = stop_env
        host = conversation_rows(ids, model, W, self.pad, logp)
        batch = on_mesh({k: v for k, v in host.items() if k != "sampler_logp"}, self.partitioner)
        completions = [self.tokenizer.decode([int(t) for t in x[p:]], skip_special_tokens=True)
                       for x, p in zip(ids, prompt_len)]
        info = self._gather_info(envs, B)
        r = Rollout(batch=batch, host=host, completions=completions, prompts=prompts, rows=rows, finished=by_env)
        r.raw_scores = score
        r.scores = score - np.float32(self.cfg.missing_eos_penalty or 0.0) * (~by_env).astype(np.float32)
        r.metrics = {**measure_rollout(self._measure, r, policy, reference, value if self.has_value else None,
                                       generate_s),
                     "rollout/conversation_length": float(host["segment_ids"].sum(-1).mean()),
                     "env/turns": float(turns.mean()), "env/truncated_fraction": float((~by_env).mean()),
                     **{f"env/{k}": float(v) for k, v in info.items()}}
        return r

    def _gather_info(self, envs: dict, B: int) -> dict[str, float]:
        """Means over all episodes of the environments' ``info`` entries named in ``info_keys``."""
        keys = tuple(getattr(self.environment, "info_keys", ()))
        if not keys:
            return {}
        local = np.array([[float(getattr(envs[b], "info", {}).get(k, 0.0)) for k in keys] for b in sorted(envs)],
                         np.float32).reshape(len(envs), len(keys))
        return dict(zip(keys, all_rows(local, B).mean(0).tolist()))
