"""Multi-turn rollouts: the model talks with an environment (tools, a user) for several turns.

:class:`MultiTurnRoller` is a drop-in for :class:`jaxpost.generate.rollout.Roller`
(same call, same :class:`~jaxpost.generate.rollout.Rollout`): GRPO/RLOO
(``grpo.environment = @CalculatorEnv()``) and PPO (``ppo.environment``)
train on its rows with their existing losses and loop (:func:`make_roller`
picks it); ``synthesize`` (``synthesize.environment``) writes its
:meth:`MultiTurnRoller.episodes` as conversations. One episode per prompt x
``group_size``::

    ids = chat_template(env.reset(row), generation prompt)
    repeat up to MultiTurnConfig.max_turns:
        sample the model's turn after ids (the jaxpost Sampler; per-row budget:
            RolloutConfig.max_new_tokens, the episode's tokens left, the row's room left)
        observation, reward, done = env.step({"role": "assistant", "content": text})
        ids += observation rendered by the chat template (+ the next generation prompt)

Sampling continues from the KV cache (``MultiTurnConfig.continuation``,
the default): the first turn prefills the B first observations
(:meth:`Sampler.start <jaxpost.generate.sampler.Sampler.start>`); each later
turn prefills, per row, only the tokens added since (its last sampled
token, the observation, the next header: :meth:`Sampler.extend
<jaxpost.generate.sampler.Sampler.extend>`) and decodes on. All B rows keep
their place in the one cache; a finished episode sits the remaining turns
out with a budget of 0.

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
a turn without a stop token) rather than by the environment. PPO puts the
score on the episode's last model token; its KL, values, GAE and losses
read ``loss_mask``, so observation tokens are environment time, never
actions (:func:`jaxpost.losses.ppo.gae`).

Environment errors: an environment whose ``reset`` or ``step`` raises (or
returns something that is not messages / a finite reward, or an
observation the chat template cannot render) ends that episode, never the
run: no observation is appended, the episode scores 0 (no missing-EOS
penalty) and its ``loss_mask`` is all 0 -- the failure is the
environment's, so nothing of the episode is trained. ``env/errors``
counts such episodes per rollout; the first error's message is printed
once. A :class:`~jaxpost.errors.UserError` raised by an environment still
stops the run (a configuration mistake). Tool failures are not
environment errors: :class:`~jaxpost.generate.environments.ToolEnvironment`
turns them into error observations itself.

Observation tokens: the chat template renders the conversation with the
model's turn replaced by a probe text plus the observation; what follows
the probe (the end of the model's turn, the observation messages, the next
assistant header) is appended, minus the end-of-turn token when the model
already sampled it. The model's own tokens are never re-tokenized.

Cost: with continuation an episode of L tokens is prefilled about once
(each turn's chunk is padded to a length bucket, and every row of the batch
takes the longest chunk's bucket); decode steps attend over one cache per
batch that also holds the holes between turns (each turn adds its chunk
bucket plus the batch's longest turn, for every row), so a step reads about
``turns x (chunk bucket + longest turn)`` slots rather than the row's L.
Finished episodes ride along in the batch (budget 0) rather than being
dropped. With ``continuation=False`` (and for sliding-window models) every
turn re-prefills the live conversations whole: about T x L prefilled tokens
for T turns. ``benchmarks/multiturn_rollout.py`` times both.

Multi-host: every process holds the same global prompts and calls the
sampler with the same global batch each turn; the sampled tokens are
gathered to every process (:func:`jaxpost.distributed.to_host`). Each
process runs the environments (reset, step, tools) of its own rows only
(:func:`jaxpost.distributed.host_rows`) and their observation tokens,
rewards and flags are all-gathered (:func:`jaxpost.distributed.all_rows`),
so every process holds the same conversations. Sampling keys are
``fold_in(rng, turn)`` with the row's index among the turn's live rows
(``row_ids`` on the continuation path, whose batch holds every row): the
same on any number of hosts, and the same tokens with or without
continuation.
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
from jaxpost.config import build
from jaxpost.data.encode import encode_prompt, encode_text, pad_id, render
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.distributed import all_rows, host_rows, to_host
from jaxpost.errors import UserError
from jaxpost.generate.environments import Environment
from jaxpost.generate.rollout import (
    Roller,
    Rollout,
    RolloutConfig,
    check_prompt_batch,
    measure_rollout,
)
from jaxpost.generate.sampler import Sampler, SamplingConfig, left_pad
from jaxpost.generate.scorers import check_bound_scorer, make_scorer
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh

__all__ = ["Episodes", "MultiTurnConfig", "MultiTurnRoller", "check_environment", "check_reward_source",
           "conversation_rows", "make_roller"]

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

    ``continuation``: each turn after the first prefills only the tokens
    added since the model's last turn and continues from the batch's KV
    cache (:meth:`~jaxpost.generate.sampler.Sampler.extend`); False
    re-prefills every live conversation whole each turn (``Sampler.__call__``).
    Both give the same tokens and log-probs (up to float rounding). A model
    with a ``sliding_window`` always re-prefills (its window counts cache
    slots, and a continued cache has holes between turns).
    """

    max_turns: int = 4
    max_episode_tokens: int = 256
    max_length: int = 512
    continuation: bool = True

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


def _messages(value: Any, what: str) -> list[dict]:
    """``value`` if it is a list of ``{"role": str, "content": str, ...}`` messages, else raises ``ValueError``."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise ValueError(f"{what} returned {str(value)[:200]!r}, not a list of {{role, content}} messages")
    return value


def _describe(error: Exception, what: str) -> str:
    return f"environment {what} raised {type(error).__name__}: {error}"[:500]


@dataclasses.dataclass
class Episodes:
    """The finished episodes of one prompt batch: ``B = prompts x group_size``, the same on every process.

    ``ids``/``model``/``logp``: per episode, the conversation's token ids,
    1.0 where the model sampled the token (0 elsewhere), the sampler's
    log-prob of a sampled token (0 elsewhere); ``prompt_len`` ``[B]``: tokens
    of the first observation. ``score`` ``[B]``: the sum of the episode's
    rewards, 0 for an errored one. ``finished`` ``[B]``: ended by the
    environment (or by an environment error), not by a budget. ``errors``
    ``[B]``: the environment's ``reset`` or ``step`` raised or returned
    something unusable, and the episode ended there. ``turns`` ``[B]``:
    model turns. ``conversations``, ``first_messages`` and ``error_text``
    hold this process's episodes only (None for the others): the messages
    (first observation, the model's turns, the observations), how many of
    them the first observation is, and the error's message.
    ``info``: the mean over all episodes of every ``info_keys`` number.
    """

    ids: list[np.ndarray]
    model: list[np.ndarray]
    logp: list[np.ndarray]
    prompt_len: np.ndarray
    rows: list[Any]
    prompts: list[Any]
    score: np.ndarray
    finished: np.ndarray
    errors: np.ndarray
    turns: np.ndarray
    conversations: list[list[dict] | None]
    first_messages: list[int | None]
    error_text: list[str | None]
    info: dict[str, float]
    generate_s: float


class MultiTurnRoller:
    """Multi-turn episodes with ``environment`` for prompt batches; called like :class:`Roller`.

    ``roller(policy, reference, value, prompt_batch, rng) -> Rollout`` with
    ``B = prompts x group_size`` rows of whole conversations (module
    docstring); ``host`` also holds ``sampler_logp`` (the sampler's log-probs,
    aligned with ``targets``); ``completions`` is the text after the first
    prompt; with ``value_graphdef`` (PPO) the batch holds ``old_values``.
    Metrics add ``env/turns``, ``env/truncated_fraction``, ``env/errors``
    (episodes ended by an environment error) and the mean of every number
    in the environments' ``info``. :meth:`episodes` gives the episodes
    without the training forwards (``synthesize``); ``measure=False``
    rolls out without them too (as :class:`~jaxpost.generate.rollout.Roller`'s).
    """

    def __init__(self, graphdef, config: ModelConfig, tokenizer: Any, partitioner: Partitioner,
                 environment: Environment, rollout: RolloutConfig, multiturn: MultiTurnConfig | None = None,
                 value_graphdef=None, measure: bool = True):
        self.tokenizer, self.partitioner, self.environment, self.cfg = tokenizer, partitioner, environment, rollout
        self.mt = multiturn if multiturn is not None else MultiTurnConfig()
        self.pad = pad_id(tokenizer)
        stops = rollout.stop_token_ids if rollout.stop_token_ids is not None else stop_token_ids(tokenizer)
        self.stops = frozenset(int(s) for s in stops)
        sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                  top_k=rollout.top_k, top_p=rollout.top_p, min_p=rollout.min_p,
                                  repetition_penalty=rollout.repetition_penalty, stop_token_ids=tuple(stops),
                                  pad_token_id=self.pad, group_size=1)
        self.sampler = Sampler(graphdef, config, sampling, partitioner)
        self.continuation = self.mt.continuation and config.sliding_window is None
        self._measure = (jax.jit(make_rollout_logprobs(graphdef, config, value_graphdef, rollout.chunk_size))
                         if measure else None)
        self.has_value = value_graphdef is not None
        self.error_logged = False

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

    def _reset(self, env: Environment, row: Any) -> tuple[list[dict], np.ndarray | None, str | None]:
        """``(first observation, its prompt ids, None)``, or ``([], None, error)`` when the environment fails."""
        try:
            first = _messages(env.reset(row), "reset")
            return first, encode_prompt(self.tokenizer, first), None
        except UserError:
            raise  # a configuration mistake stops the run with its own message
        # Anything else the environment does wrong ends this episode, not the run.
        except Exception as e:  # noqa: BLE001
            return [], None, self._log(_describe(e, "reset"))

    def _step(self, env: Environment, history: list[dict], message: dict, last_token: int, stopped: bool):
        """``(observation, reward, done, observation ids, None)``; on an environment failure
        ``(None, 0.0, True, [], error)``. A turn without a stop token (cut by its budget) ends the episode."""
        try:
            observation, reward, done = env.step(message)
            observation = None if observation is None else _messages(observation, "step")
            reward, done = float(reward), bool(done) or not stopped
            if not np.isfinite(reward):
                raise ValueError(f"reward {reward} is not finite")
            add = self.observation_ids(history, last_token, observation, more=not done)  # renders: may fail too
            return observation, reward, done, add, None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- the same: this episode ends, the run goes on
            return None, 0.0, True, [], self._log(_describe(e, "step"))

    def _sample_turn(self, policy, state, ids: list, new: list, done: np.ndarray, budget: np.ndarray, key):
        """One model turn: ``(host outputs of the live rows, in order; the next continuation state or None)``.

        ``ids``: every row's conversation; ``new``: every row's tokens since its
        last turn (what the continuation prefills); ``done`` rows sample nothing.
        """
        live = np.flatnonzero(~done)
        if not self.continuation:
            tokens, mask = left_pad([ids[b] for b in live], pad_token_id=self.pad)
            return to_host(self.sampler(policy, tokens, mask, key, budget[live])), None
        # All B rows keep their place in one cache; finished rows sit the turn out (budget 0). Keys follow
        # the row's rank among the live rows, as on the re-prefill path, so both sample the same tokens.
        budget, row_ids = np.where(done, 0, budget), np.cumsum(~done) - 1
        if state is None:
            out, state = self.sampler.start(policy, *left_pad(ids, pad_token_id=self.pad), key, budget, row_ids)
        else:
            out, state = self.sampler.extend(policy, state, *left_pad(new, pad_token_id=self.pad), key, budget,
                                             row_ids)
        return to_host(out)[live], state

    def _log(self, error: str) -> str:
        # Once per run: a broken environment usually fails on every episode; env/errors counts them all.
        if not self.error_logged:
            self.error_logged = True
            print(f"[jaxpost] {error} -- the episode ends with reward 0 and is not trained; the run goes on "
                  "(env/errors counts such episodes; only this first one is printed)", flush=True)
        return error

    def episodes(self, policy, prompt_batch: dict, rng: jax.Array) -> Episodes:
        """Runs one episode per prompt x ``group_size`` to its end (see the module docstring)."""
        check_prompt_batch(prompt_batch)
        G, N, mt, W = self.cfg.group_size, self.cfg.max_new_tokens, self.mt, self.mt.max_length
        rows = [row for row in prompt_batch["row"] for _ in range(G)]
        prompts = [p for p in prompt_batch["prompt"] for _ in range(G)]
        B = len(rows)
        own = host_rows(B)
        envs = {b: self.environment.spawn() for b in range(own.start, own.stop)}
        history, first, error_text = {}, [], [None] * B
        for b, env in envs.items():
            history[b], ids_b, error_text[b] = self._reset(env, rows[b])
            first.append(ids_b if ids_b is not None else [self.pad])  # an errored episode: one untrained token
        first_messages = [len(history[b]) if b in history else None for b in range(B)]
        errors = all_rows(np.array([error_text[b] is not None for b in envs], bool), B)
        first, lengths = _pack(first, W + 1)
        first, lengths = all_rows(first, B), all_rows(lengths, B)
        if (lengths >= W).any():
            raise UserError(f"the first observation of row {int(np.argmax(lengths >= W))} has at least "
                            f"MultiTurnConfig.max_length={W} tokens; raise max_length or shorten the prompts")
        ids = [first[b, :lengths[b]] for b in range(B)]
        model = [np.zeros(len(x), np.float32) for x in ids]
        logp = [np.zeros(len(x), np.float32) for x in ids]
        prompt_len = lengths.copy()
        done, by_env = errors.copy(), errors.copy()
        score, turns, sampled = np.zeros(B, np.float32), np.zeros(B, np.int32), np.zeros(B, np.int64)
        generate_s, state, new = 0.0, None, [np.zeros(0, np.int32)] * B
        for turn in range(mt.max_turns):
            room = np.array([W - len(x) for x in ids])
            budget = np.minimum.reduce([np.full(B, N), mt.max_episode_tokens - sampled, room])
            done |= budget < 1
            live = np.flatnonzero(~done)
            if not live.size:
                break
            start = time.perf_counter()
            out, state = self._sample_turn(policy, state, ids, new, done, budget, jax.random.fold_in(rng, turn))
            generate_s += time.perf_counter() - start
            new = [np.zeros(0, np.int32)] * B  # per row: its tokens after this turn (observation, next header)
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
            obs, reward = [[] for _ in range(k)], np.zeros(k, np.float32)
            ended, failed = np.zeros(k, bool), np.zeros(k, bool)
            for b in (b for b in live if own.start <= b < own.stop):
                n = int(out.lengths[slot[int(b)]])
                text = self.tokenizer.decode([int(t) for t in ids[b][-n:]], skip_special_tokens=True)
                message = {"role": "assistant", "content": text}
                observation, r, d, add, error = self._step(envs[b], history[b], message, int(ids[b][-1]), stopped[b])
                i = b - own.start
                reward[i], ended[i], obs[i], failed[i], error_text[b] = r, d, add, error is not None, error
                history[b] = [*history[b], message, *(observation or [])]
            obs, obs_len = _pack(obs, W + 1)
            obs, obs_len = all_rows(obs, B), all_rows(obs_len, B)
            reward, ended, failed = all_rows(reward, B), all_rows(ended, B), all_rows(failed, B)
            errors |= failed
            for b in live:
                stop_env = bool(ended[b]) and stopped[b]
                add = obs[b, :obs_len[b]]
                if len(ids[b]) + len(add) > W:  # no room for the observation: the episode ends (truncated if it
                    add, ended[b] = add[:W - len(ids[b])], True  # was to go on)
                ids[b] = np.concatenate([ids[b], add])
                new[b] = add if not ended[b] else new[b]  # an ended episode is not sampled again
                model[b] = np.concatenate([model[b], np.zeros(len(add), np.float32)])
                logp[b] = np.concatenate([logp[b], np.zeros(len(add), np.float32)])
                score[b] += reward[b]
                done[b] |= bool(ended[b])
                by_env[b] = stop_env or failed[b]
        # An errored episode is the environment's fault, not the model's: it scores 0 and trains nothing.
        score[errors] = 0.0
        for b in np.flatnonzero(errors):
            model[b] = np.zeros_like(model[b])
        return Episodes(ids=ids, model=model, logp=logp, prompt_len=prompt_len, rows=rows, prompts=prompts,
                        score=score, finished=by_env, errors=errors, turns=turns,
                        conversations=[history.get(b) for b in range(B)], first_messages=first_messages,
                        error_text=error_text, info=self._gather_info(envs, B), generate_s=generate_s)

    def __call__(self, policy, reference, value, prompt_batch: dict, rng: jax.Array) -> Rollout:
        ep = self.episodes(policy, prompt_batch, rng)
        host = conversation_rows(ep.ids, ep.model, self.mt.max_length, self.pad, ep.logp)
        batch = on_mesh({k: v for k, v in host.items() if k != "sampler_logp"}, self.partitioner)
        completions = [self.tokenizer.decode([int(t) for t in x[p:]], skip_special_tokens=True)
                       for x, p in zip(ep.ids, ep.prompt_len)]
        r = Rollout(batch=batch, host=host, completions=completions, prompts=ep.prompts, rows=ep.rows,
                    finished=ep.finished)
        r.raw_scores = ep.score
        r.scores = ep.score - np.float32(self.cfg.missing_eos_penalty or 0.0) * (~ep.finished).astype(np.float32)
        measured = ({} if self._measure is None else
                    measure_rollout(self._measure, r, policy, reference, value if self.has_value else None,
                                    ep.generate_s))
        r.metrics = {**measured,
                     "rollout/conversation_length": float(host["segment_ids"].sum(-1).mean()),
                     "env/turns": float(ep.turns.mean()), "env/truncated_fraction": float((~ep.finished).mean()),
                     "env/errors": float(ep.errors.sum()), **{f"env/{k}": v for k, v in ep.info.items()}}
        return r

    def _gather_info(self, envs: dict, B: int) -> dict[str, float]:
        """Means over all episodes of the environments' ``info`` entries named in ``info_keys``."""
        keys = tuple(getattr(self.environment, "info_keys", ()))
        if not keys:
            return {}
        local = np.array([[float(getattr(envs[b], "info", {}).get(k, 0.0)) for k in keys] for b in sorted(envs)],
                         np.float32).reshape(len(envs), len(keys))
        return {k: float(v) for k, v in zip(keys, all_rows(local, B).mean(0).tolist())}


def make_roller(graphdef, config: ModelConfig, tokenizer: Any, partitioner: Partitioner, rollout: RolloutConfig,
                environment: Environment | None = None, value_graphdef=None, owner: str = "run"):
    """The online run's roller: one scored completion per sample, or multi-turn episodes with ``environment``.

    Without ``environment``: a :class:`Roller` scored by the gin-configured
    :func:`jaxpost.generate.scorers.make_scorer`. With one: a
    :class:`MultiTurnRoller` (budgets: gin's ``MultiTurnConfig``) whose
    episode rewards are the scores; no scorer is built. ``value_graphdef``
    (PPO) adds ``old_values``. Raises :class:`UserError` naming
    ``<owner>.environment`` when ``environment`` is not an :class:`Environment`
    instance (e.g. ``@CalculatorEnv`` bound without ``()``).
    """
    if environment is None:
        scorer = make_scorer(partitioner, policy_vocab_size=config.vocab_size)
        return Roller(graphdef, config, tokenizer, partitioner, scorer, rollout, value_graphdef=value_graphdef)
    check_environment(environment, owner)
    return MultiTurnRoller(graphdef, config, tokenizer, partitioner, environment, rollout, build(MultiTurnConfig),
                           value_graphdef=value_graphdef)


def make_eval_roller(roller: Roller | MultiTurnRoller) -> Roller | MultiTurnRoller:
    """``roller``'s held-out twin: one greedy completion (or episode) per prompt, scored like the run's.

    It shares ``roller``'s model, tokenizer, mesh, scorer (a reward model is
    not loaded twice) or environment, budgets and stop tokens; only
    ``temperature = 0`` and ``group_size = 1`` differ, so that evaluations
    are comparable. It skips the training forwards (``measure=False``), which an evaluation does not read.
    """
    greedy = dataclasses.replace(roller.cfg, temperature=0.0, group_size=1)
    model = (roller.sampler.graphdef, roller.sampler.config, roller.tokenizer, roller.partitioner)
    if isinstance(roller, MultiTurnRoller):
        return MultiTurnRoller(*model, roller.environment, greedy, roller.mt, measure=False)
    return Roller(*model, roller.scorer, greedy, measure=False)


def check_reward_source(environment: Any, owner: str) -> None:
    """What :func:`make_roller` will score with, checked before the run loads anything.

    ``environment`` must be None or an :class:`Environment` instance
    (:func:`check_environment`); without one, the gin-bound scorer is
    checked (:func:`jaxpost.generate.scorers.check_bound_scorer`).
    """
    check_environment(environment, owner)
    if environment is None:
        check_bound_scorer(owner)


def check_environment(environment: Any, owner: str) -> None:
    """Raises :class:`UserError` unless ``environment`` is None or an :class:`Environment` instance."""
    if environment is not None and not isinstance(environment, Environment):
        hint = " (bind it with parentheses: @CalculatorEnv(), not @CalculatorEnv)" if callable(environment) else ""
        raise UserError(f"{owner}.environment must be an Environment instance (jaxpost.generate.environments), "
                        f"got {type(environment).__name__} {str(environment)[:80]!r}{hint}")
