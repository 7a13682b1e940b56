"""The tool demo: a tiny policy learns by GRPO that calling a calculator pays.

    jaxpost demo --tools [--quick] [--out runs/demo]

Task (:mod:`jaxpost.demo.arithmetic`): multiply two 2-digit numbers. Two
stages, each an ordinary gin experiment under ``configs/experiments/demo_tools/``
run as ``jaxpost train`` runs it: ``sft`` (demonstrations, only some of which
call the tool) and ``grpo`` (multi-turn episodes with
:class:`~jaxpost.demo.arithmetic.ArithmeticEnv`, the calculator available).
Then three policies answer the held-out questions greedily, each episode run
through the environment (:func:`episode_success`):

* ``sft, no tool``: the SFT policy without the calculator -- it must answer in
  its head (the no-tool baseline);
* ``sft, tool``: the SFT policy with the calculator;
* ``grpo, tool``: the GRPO policy with the calculator.

The table goes to the log and ``out/tools/results.json``; every stage's
files land in ``out/tools/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import gin

from jaxpost import config as gin_config
from jaxpost import paths
from jaxpost.demo.arithmetic import ArithmeticEnv, write_tool_data
from jaxpost.generate.multiturn import MultiTurnConfig
from jaxpost.recipes import run as run_task

EXPERIMENTS = "configs/experiments/demo_tools"
QUICK = {"sft": ("LoopConfig.num_steps = 60",),
         "grpo": ("OnlineConfig.num_rollouts = 3",)}
"""Bindings of ``--quick``: shorter runs, the same experiments."""


def episode_budgets() -> tuple[MultiTurnConfig, int]:
    """The GRPO stage's episode budgets (``MultiTurnConfig``, ``RolloutConfig.max_new_tokens``), read from its gin."""
    from jaxpost.generate.rollout import RolloutConfig

    gin_config.parse([f"{EXPERIMENTS}/grpo.gin"])
    try:
        return MultiTurnConfig(), RolloutConfig().max_new_tokens
    finally:
        gin.clear_config()


def episode_success(model_dir: str | Path, tokenizer_dir: str | Path, rows: list[dict], *, tool: bool,
                    temperature: float = 0.0, seed: int = 0, out: str | Path | None = None, batch_size: int = 64,
                    budgets: tuple[MultiTurnConfig, int] | None = None) -> dict[str, float]:
    """Held-out success of a policy: one episode per row through :class:`ArithmeticEnv`.

    Episodes run with :class:`jaxpost.generate.multiturn.MultiTurnRoller`, the
    roller GRPO trains with, at ``temperature`` (0: greedy; otherwise
    sampled with keys from ``seed``), within ``budgets`` (default: the GRPO
    stage's, :func:`episode_budgets`). Returns ``success`` (the
    fraction of episodes whose final answer is the product) and
    ``tool_calls`` (mean calls per episode). With ``out`` the conversations
    are written there as jsonl (``prompt``, ``answer``, ``completion``: the
    text after the question, ``score``).
    """
    import jax
    import numpy as np

    from jaxpost.data import load_tokenizer
    from jaxpost.generate.multiturn import MultiTurnRoller
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.models.hf import load_hf
    from jaxpost.sharding import Partitioner, make_mesh

    multiturn, max_new_tokens = budgets if budgets is not None else episode_budgets()
    tok = load_tokenizer(tokenizer_dir)
    part = Partitioner(make_mesh(fsdp=1, devices=jax.devices()[:1]))  # a few tiny episodes: one device
    config, graphdef, params = load_hf(model_dir, partitioner=part)
    roller = MultiTurnRoller(graphdef, config, tok, part, ArithmeticEnv(tool=tool),
                             RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, group_size=1),
                             multiturn)
    scores, calls, records = [], [], []
    with part.activate():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = {"row": chunk, "prompt": [r["prompt"] for r in chunk],
                     "prompt_mask": np.ones((len(chunk), 1), np.int32)}  # every row holds a prompt
            r = roller(params, params, None, batch, jax.random.fold_in(jax.random.PRNGKey(seed), start))
            scores += [float(s) for s in r.raw_scores]
            calls.append(r.metrics.get("env/tool_calls", 0.0) * len(chunk))
            records += [{"prompt": row["prompt"], "answer": row["answer"], "completion": text, "score": float(s)}
                        for row, text, s in zip(chunk, r.completions, r.raw_scores)]
    if out is not None:
        paths.atomic_write_text(Path(out), "".join(json.dumps(x) + "\n" for x in records))
    return {"success": sum(scores) / len(scores), "tool_calls": sum(calls) / len(scores)}


def run_stage(name: str, root: Path, quick: bool) -> dict:
    """Runs ``configs/experiments/demo_tools/<name>.gin`` with its paths under ``root``; returns its summary."""
    data = root / "data" / ("sft.jsonl" if name == "sft" else "prompts.jsonl")
    # The stage's gin configurable has the stage's name (sft, grpo).
    bindings = [f"{name}.run_dir = '{root / name}'", f"{name}.tokenizer = '{root / 'tokenizer'}'",
                f"{name}.train_data = '{data}'",
                "LoopConfig.progress = False"]
    if name == "grpo":
        bindings += [f"grpo.init_from = '{root / 'sft' / 'final'}'", "OnlineConfig.progress = False"]
    gin_config.parse([f"{EXPERIMENTS}/{name}.gin"], bindings + list(QUICK[name] if quick else ()))
    try:
        return run_task()
    finally:
        gin.clear_config()


def run_tools_demo(out: str | Path = "runs/demo", quick: bool = False,
                   log: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[dict]:
    """Writes the data, runs the SFT and GRPO stages, evaluates; returns the table (also ``tools/results.json``).

    Rows: ``policy``, ``tool`` (whether the calculator was available),
    ``success`` and ``tool_calls`` of greedy episodes, ``success_t1`` and
    ``tool_calls_t1`` of episodes sampled at temperature 1, ``held_out`` (number of questions),
    ``seconds`` (of the stage that trained the policy). Raises
    ``FileExistsError`` when ``out/tools`` holds an earlier tool demo
    (its checkpoints would be resumed and mixed into this run).
    """
    from jaxpost.data import build_tokenizer

    root = Path(out).resolve() / "tools"
    found = [s for s in ("sft", "grpo") if (root / s).exists()]
    if found:
        raise FileExistsError(f"{root} already holds a tool demo (stages {', '.join(found)}); its checkpoints "
                              "would be resumed and mixed into this run. Pass --out NEW_DIR or delete the directory.")
    data = write_tool_data(root / "data", **({"n_eval": 64} if quick else {}))
    build_tokenizer(None, vocab_size=261).save_pretrained(root / "tokenizer")
    evals = [json.loads(x) for x in paths.jsonl_lines(paths.read_text(data["eval_prompts"]))]
    log(f"[tools] task: multiply two 2-digit numbers, a calculator tool; data in {root / 'data'}")
    seconds = {}
    for name in ("sft", "grpo"):
        log(f"[tools] stage {name} ({EXPERIMENTS}/{name}.gin)")
        start = time.perf_counter()
        run_stage(name, root, quick)
        seconds[name] = time.perf_counter() - start
        log(f"[tools]   done in {seconds[name]:.0f}s")
    budgets, table = episode_budgets(), []
    for policy, tool in (("sft", False), ("sft", True), ("grpo", True)):
        label = f"{policy}-{'tool' if tool else 'no-tool'}"
        greedy, sampled = (episode_success(root / policy / "final", root / "tokenizer", evals, tool=tool,
                                           temperature=t, out=root / "eval" / f"{label}-t{t:g}.jsonl",
                                           budgets=budgets)
                           for t in (0.0, 1.0))
        table.append({"policy": policy, "tool": tool, **greedy, "success_t1": sampled["success"],
                      "tool_calls_t1": sampled["tool_calls"], "held_out": len(evals), "seconds": seconds[policy]})
        log(f"[tools] {label}: held-out success {greedy['success']:.3f} greedy, {sampled['success']:.3f} sampled; "
            f"tool calls per episode {greedy['tool_calls']:.2f} greedy, {sampled['tool_calls']:.2f} sampled")
    paths.atomic_write_text(root / "results.json", json.dumps(table, indent=1) + "\n")
    log(format_table(table))
    return table


def format_table(table: list[dict]) -> str:
    """The results as a markdown table."""
    header = ("| policy | calculator | held-out success (greedy) | tool calls / episode | success (T=1) "
              "| tool calls (T=1) |")
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {'yes' if r['tool'] else 'no'} | {r['success']:.3f} | {r['tool_calls']:.2f} "
              f"| {r['success_t1']:.3f} | {r['tool_calls_t1']:.2f} |" for r in table]
    return "\n".join(lines)
