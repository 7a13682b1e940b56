"""Held-out evaluation of online runs: the current policy's greedy completions of held-out prompts, scored.

An online run's loss says little about its reward on prompts it never
trained on; a :class:`RewardEvaluator` measures that. Every evaluation
samples one greedy completion (or episode) per held-out prompt with the
run's own scorer or environment (:func:`~jaxpost.generate.multiturn.make_eval_roller`),
so two evaluations differ only by the policy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxpost.data import load_rows, make_prompt_pipeline
from jaxpost.generate.multiturn import make_eval_roller

EVAL_KEY = 0  # greedy: the key draws nothing, but the sampler takes one


class RewardEvaluator:
    """``evaluate(state)``: means over every held-out prompt of its greedy completion's score and rewards.

    ``roller``: a greedy single-sample roller (``make_eval_roller``);
    ``rows``: prompt rows (the run's prompt formats); batches of
    ``batch_size`` prompts (it must divide over the mesh's batch shards),
    the last one filled up with copies of a real prompt, which are not
    counted. ``policy_of`` / ``reference_of`` map ``state.params`` to the
    policy's and the reference's params. Returns ``{"score", "rewards/<name>/mean",
    "completion_length", "missing_eos_fraction"}`` (``score`` after the
    missing-EOS penalty, as in training; :attr:`keys` lists them before any
    call); the training loop logs them as ``eval/...``. The prompts are
    encoded once; a second call at the same ``state.step`` (the loop's
    evaluation at the last step, then the run's final one) returns the
    first call's numbers without sampling again.
    """

    def __init__(self, roller: Any, rows: Any, tokenizer: Any, max_prompt_len: int, batch_size: int,
                 policy_of: Callable[[Any], Any], reference_of: Callable[[Any], Any]):
        self.roller, self.rows, self.tokenizer = roller, rows, tokenizer
        self.max_prompt_len, self.batch_size = max_prompt_len, batch_size
        self.policy_of, self.reference_of = policy_of, reference_of
        # An environment's episodes carry no separate reward terms: their reward is the score.
        names = [term.name for term in getattr(roller, "terms", ())]
        self.keys = ("score", *(f"rewards/{n}/mean" for n in names), "completion_length", "missing_eos_fraction")
        self._batches: list[tuple[dict, np.ndarray]] = []  # encoded at the first evaluation
        self._last: dict[str, Any] = {}  # the newest evaluation, by step

    def __call__(self, state) -> dict[str, float]:
        step = int(state.step)
        if self._last.get("step") == step:
            return dict(self._last["metrics"])
        if not self._batches:
            for batch in make_prompt_pipeline(self.rows, self.tokenizer, self.max_prompt_len, self.batch_size, 0,
                                              num_epochs=1, shuffle=False):
                real = np.asarray(batch["prompt_mask"]).any(-1)
                self._batches.append((batch if real.all() else _filled(batch, real), real))
        policy, reference = self.policy_of(state.params), self.reference_of(state.params)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        for batch, real in self._batches:
            r = self.roller(policy, reference, None, batch, jax.random.PRNGKey(EVAL_KEY))
            parts["score"].append(r.scores[real])
            parts["completion_length"].append(r.host["loss_mask"][real].sum(-1))
            parts["missing_eos_fraction"].append(~r.finished[real])
            for name, values in r.rewards.items():
                parts.setdefault(f"rewards/{name}/mean", []).append(values[real])
        metrics = {k: float(np.concatenate(v).astype(np.float64).mean()) for k, v in parts.items()}
        self._last.update(step=step, metrics=metrics)
        return dict(metrics)


def _filled(batch: dict, real: np.ndarray) -> dict:
    """``batch`` with its padding rows replaced by copies of its first real row (the sampler needs real prompts)."""
    first = int(np.flatnonzero(real)[0])
    out = dict(batch)
    for k in ("prompt_tokens", "prompt_mask"):
        v = np.array(batch[k])
        v[~real] = v[first]
        out[k] = v
    for k in ("prompt", "row"):
        out[k] = [x if ok else batch[k][first] for x, ok in zip(batch[k], real)]
    return out


def online_evaluator(eval_data: Any, roller: Any, online, policy_of: Callable[[Any], Any],
                     reference_of: Callable[[Any], Any]) -> RewardEvaluator | None:
    """An online run's ``evaluate`` for its ``eval_data`` (a path, Hub name or rows), or None without one.

    Greedy completions of the held-out prompts (:func:`make_eval_roller` of
    the run's ``roller``), cut at ``online.max_prompt_len`` tokens as the
    training prompts are, in batches of as many prompts as a rollout samples
    completions (``prompts_per_rollout * group_size``: a batch the run's
    mesh divides and its memory holds).
    """
    if eval_data is None:
        return None
    is_path = isinstance(eval_data, (str, bytes)) or hasattr(eval_data, "__fspath__")
    rows = load_rows(eval_data) if is_path else eval_data
    return RewardEvaluator(make_eval_roller(roller), rows, roller.tokenizer, online.max_prompt_len,
                           online.prompts_per_rollout * roller.cfg.group_size, policy_of, reference_of)
