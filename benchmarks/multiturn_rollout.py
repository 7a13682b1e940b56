"""Multi-turn rollout time: continuing from the KV cache against re-prefilling every turn.

    python benchmarks/multiturn_rollout.py [--rows 16] [--turns 3] [--new 32] [--rollouts 4] [--hidden 256]

One :class:`~jaxpost.generate.multiturn.MultiTurnRoller` per mode
(``MultiTurnConfig.continuation`` True / False) runs the same episodes of a
calculator environment whose agent calls the calculator on every turn but
the last (a random-init model writes no tool calls of its own, so the tool
call is scripted; the observation is the calculator's real result, rendered
by the chat template; ``--stops`` byte tokens also end a turn, so that a
random model's turns end within the budget and episodes last ``--turns``).
Printed per mode: the median (and min) time of ``roller.episodes`` over the
rollouts after the first (which compiles),
the token slots prefilled per rollout, the programs compiled after the
first rollout (``compiled_programs()``), and the ratio re-prefill /
continuation (of the medians, and of the mins). Both modes sample with the
same keys per row and step; ``same_conversations`` says whether all
episodes came out token for token the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="max new tokens per turn")
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--stops", type=int, default=16,
                    help="byte tokens that end a turn besides <|im_end|> (a random-init model then ends its "
                         "turns after about 264 / (stops + 1) tokens, so episodes go the full --turns)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from jaxpost.data import build_tokenizer, make_prompt_pipeline
    from jaxpost.generate import sampler as sampler_module
    from jaxpost.generate.environments import CalculatorEnv, calculator
    from jaxpost.generate.multiturn import MultiTurnConfig, MultiTurnRoller
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.generate.tools import ToolCall
    from jaxpost.models import ModelConfig, create
    from jaxpost.sharding import Partitioner

    class ScriptedCalculator(CalculatorEnv):
        """The calculator task; every turn but the last calls the calculator on the row's question."""

        def reset(self, row):
            self.turn = 0
            return super().reset(row)

        def calls(self, text):
            self.turn += 1
            if self.turn >= args.turns:
                return []
            expression = self.row["prompt"].removeprefix("What is ").rstrip("?")
            return [ToolCall("calculator", {"expression": expression})]

    class Counting:
        """The roller's sampler, counting the prompt/new-token slots it is asked to prefill (real tokens)."""

        def __init__(self, sampler):
            self.sampler, self.prefilled = sampler, 0

        def __call__(self, params, tokens, mask, *a, **k):
            self.prefilled += int(np.asarray(mask).sum())
            return self.sampler(params, tokens, mask, *a, **k)

        def start(self, params, tokens, mask, *a):
            self.prefilled += int(np.asarray(mask).sum())
            return self.sampler.start(params, tokens, mask, *a)

        def extend(self, params, state, tokens, mask, *a):
            self.prefilled += int(np.asarray(mask).sum())
            return self.sampler.extend(params, state, tokens, mask, *a)

    tok = build_tokenizer(None)
    config = ModelConfig(vocab_size=264, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_layers=args.layers, num_heads=max(4, args.hidden // 64), num_kv_heads=2)
    graphdef, params = create(config, seed=0)
    part = Partitioner()
    rng = np.random.default_rng(0)
    batches = []
    for r in range(args.rollouts):
        rows = []
        for _ in range(args.rows):
            a, b, op = int(rng.integers(10, 99)), int(rng.integers(10, 99)), "+-*"[int(rng.integers(3))]
            rows.append({"prompt": f"What is {a} {op} {b}?", "answer": calculator(f"{a} {op} {b}")})
        batches.append(next(make_prompt_pipeline(rows, tok, 32, len(rows), 0, shuffle=False, num_epochs=None)))
    stops = (4,) + tuple(range(264 - args.stops, 264))
    rollout = RolloutConfig(max_new_tokens=args.new, group_size=1, temperature=1.0, stop_token_ids=stops)
    report = {"args": vars(args), "modes": {}}
    episodes = {}
    for name, continuation in (("reprefill", False), ("continuation", True)):
        mt = MultiTurnConfig(max_turns=args.turns, max_episode_tokens=args.turns * args.new, max_length=2048,
                             continuation=continuation)
        roller = MultiTurnRoller(graphdef, config, tok, part, ScriptedCalculator(), rollout, mt)
        roller.sampler = counting = Counting(roller.sampler)
        times, programs = [], []
        with part.activate():
            for r, batch in enumerate(batches):
                start = time.perf_counter()
                ep = roller.episodes(params, batch, jax.random.PRNGKey(r))
                times.append(time.perf_counter() - start)
                programs.append(sampler_module.compiled_programs())
                episodes.setdefault(name, []).append(ep)
        report["modes"][name] = {
            "first_s": times[0], "median_s": statistics.median(times[1:]), "min_s": min(times[1:]),
            "times_s": times,
            "prefilled_tokens_per_rollout": counting.prefilled / args.rollouts,
            "programs_compiled_after_first_rollout": programs[-1] - programs[0],
            "mean_turns": float(np.mean([e.turns.mean() for e in episodes[name]])),
            "mean_conversation_tokens": float(np.mean([np.mean([len(x) for x in e.ids]) for e in episodes[name]])),
        }
    same = all(len(a.ids) == len(b.ids) and all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
               for a, b in zip(episodes["reprefill"], episodes["continuation"]))
    report["same_conversations"] = same
    m = report["modes"]
    report["ratio_reprefill_over_continuation"] = m["reprefill"]["median_s"] / m["continuation"]["median_s"]
    report["ratio_of_min"] = m["reprefill"]["min_s"] / m["continuation"]["min_s"]
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
