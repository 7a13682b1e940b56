"""``jaxpost demo``: the whole post-training story on CPU, offline, in minutes.

Every stage is an ordinary gin experiment under ``configs/experiments/demo/``
run exactly as ``jaxpost train`` runs it; the demo only points their paths
at its own directory, then samples from each resulting policy on held-out
prompts. Every number in the table comes from training in this run.

Stages, in order: ``sft`` (noisy demonstrations), ``label`` (best-of-4
samples of the SFT policy, scored: synthetic data), ``reward`` (reward
model), ``ppo`` (RLHF against it), ``dpo``, ``best_of_n`` (SFT on the
labelled best samples), ``grpo`` (online RL with the task reward) and
``distill``: sequence-level distillation of the GRPO policy into a student
of hidden size 48 instead of 64 (80,880 parameters against 132,416),
trained from scratch on the teacher's greedy answers; it must beat the SFT
policy, which saw only the noisy demonstrations.

Each run writes into ``out``. A stage whose run directory already holds
checkpoints resumes from them, so an ``out`` that holds an earlier demo is
refused unless ``resume=True`` (``jaxpost demo --resume``), which continues
an interrupted demo.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import gin

from jaxpost import config as gin_config
from jaxpost.recipes import run as run_task
from jaxpost.demo.evaluate import evaluate_policy, reward_model_score
from jaxpost.demo.task import write_task_data

EXPERIMENTS = "configs/experiments/demo"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One demo stage: a gin experiment, the paths it reads/writes, and how it is judged."""

    name: str
    title: str
    task: str                      # the gin configurable the experiment runs (sft, dpo, ...)
    paths: dict                    # binding -> path relative to the demo directory
    quick: tuple = ()              # extra bindings for --quick
    kind: str = "policy"           # "policy": task reward of samples; "rlhf": reward-model score of samples;
    #                                "reward": held-out pair accuracy; "data": scores of kept vs all samples
    baseline: str = "sft"          # the stage whose metric this one must beat


def _common(task: str, run: str, data: str, init: str | None = "sft/final") -> dict:
    paths = {f"{task}.run_dir": run, f"{task}.train_data": data, f"{task}.tokenizer": "tokenizer"}
    if init:
        paths[f"{task}.init_from"] = init
    return paths


STAGES = (
    Stage("sft", "SFT on noisy demonstrations", "sft", _common("sft", "sft", "data/sft.jsonl", None),
          quick=("LoopConfig.num_steps = 300",), baseline="init"),
    Stage("label", "Label 4 samples/prompt of the SFT policy", "synthesize",
          {"synthesize.model_dir": "sft/final", "synthesize.tokenizer": "tokenizer",
           "synthesize.prompts": "data/prompts.jsonl", "synthesize.out_dir": "label"},
          kind="data", baseline="single samples"),
    Stage("reward", "Reward model on preference pairs", "reward_model",
          _common("reward_model", "reward", "data/preference.jsonl"),
          quick=("LoopConfig.num_steps = 300",), kind="reward", baseline="chance"),
    Stage("ppo", "PPO vs the reward model (RLHF)", "ppo",
          {**_common("ppo", "ppo", "data/prompts.jsonl"), "ppo.value_from": "reward/final",
           "make_scorer.reward_model": "reward/final"},
          kind="rlhf"),
    Stage("dpo", "DPO (+RPO) on static preference pairs", "dpo", _common("dpo", "dpo", "data/preference.jsonl"),
          quick=("LoopConfig.num_steps = 100",)),
    Stage("best_of_n", "SFT on best-of-4 synthetic data", "sft",
          _common("sft", "best_of_n", "label/sft.jsonl"), quick=("LoopConfig.num_steps = 60",)),
    Stage("grpo", "GRPO with a programmatic reward", "grpo", _common("grpo", "grpo", "data/prompts.jsonl"),
          quick=("OnlineConfig.num_rollouts = 12",)),
    Stage("distill", "Distil GRPO into a 1.6x smaller student", "distill",
          {**_common("distill", "distill", "data/sft.jsonl", None), "distill.teacher_from": "grpo/final"},
          quick=("LoopConfig.num_steps = 400",)),
)


def run_stage(stage: Stage, root: Path, quick: bool) -> dict:
    """Runs one stage's gin experiment with the demo's paths; returns its summary."""
    bindings = [f"{k} = '{root / v}'" for k, v in stage.paths.items()]
    bindings += ["LoopConfig.progress = False"]
    if quick:
        bindings += list(stage.quick)
    gin_config.parse([f"{EXPERIMENTS}/{stage.name}.gin"], bindings)
    try:
        return run_task()
    finally:
        gin.clear_config()


def _initial_policy(root: Path) -> Path:
    """The SFT stage's random initialisation, exported, so 'before SFT' is measured too."""
    from jaxpost import models
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.hf import save_hf

    gin_config.parse([f"{EXPERIMENTS}/model.gin"])
    try:
        config = ModelConfig()
    finally:
        gin.clear_config()
    _, params = models.create(config, seed=0)
    save_hf(root / "init", config, params)
    return root / "init"


def earlier_stages(root: Path) -> list[str]:
    """Names of the stage run directories an earlier demo left in ``root``."""
    return [s.name for s in STAGES if (root / s.name).exists()]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, resume: bool = False,
             log: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[dict]:
    """Writes the data, runs every stage, evaluates, and writes ``report.md`` + ``curves.png``.

    Returns one row per stage: ``stage``, ``metric``, ``value``, ``baseline``,
    ``baseline_value``, ``improved``, ``seconds``. Raises ``FileExistsError``
    when ``out`` holds an earlier demo's stages and ``resume`` is False:
    they would resume from their checkpoints and mix two runs' numbers.
    """
    from jaxpost.data import build_tokenizer

    root = Path(out).resolve()
    found = earlier_stages(root)
    if found and not resume:
        raise FileExistsError(f"{root} already holds a demo run (stages {', '.join(found)}); its checkpoints "
                              "would be resumed and mixed into this run. Pass --out NEW_DIR for a fresh demo, "
                              "delete the directory, or pass --resume to continue that run.")
    sizes = dict(n_eval=48) if quick else {}  # the full training sets: smaller ones get memorised
    write_task_data(root / "data", **sizes)
    build_tokenizer(None, vocab_size=261).save_pretrained(root / "tokenizer")
    eval_prompts = root / "data" / "eval_prompts.jsonl"
    samples = 2 if quick else 4

    log(f"[demo] task: reverse a string; data in {root / 'data'}")
    scores = {"init": evaluate_policy(_initial_policy(root), root / "tokenizer", eval_prompts, root / "init",
                                      samples_per_prompt=samples)}
    table = [{"stage": "init", "title": "Untrained policy (random init)", "metric": "held-out reward",
              "value": scores["init"]["reward"], **_extra(scores["init"]), "seconds": 0.0}]
    log(f"[demo] untrained policy: held-out reward {scores['init']['reward']:.3f}")
    for stage in STAGES:
        log(f"[demo] stage {stage.name}: {stage.title} ({EXPERIMENTS}/{stage.name}.gin)")
        start = time.perf_counter()
        summary = run_stage(stage, root, quick)
        seconds = time.perf_counter() - start
        if stage.kind == "reward":
            value, base_value = float(summary["eval/accuracy"]), 0.5
            row = {"metric": "held-out pair accuracy", "value": value}
        elif stage.kind == "data":
            value, base_value = float(summary["mean_score_best"]), float(summary["mean_score_all"])
            row = {"metric": "mean reward of kept data", "value": value}
        else:
            scores[stage.name] = evaluate_policy(root / stage.name / "final", root / "tokenizer", eval_prompts,
                                                 root / stage.name, samples_per_prompt=samples)
            value, base_value = scores[stage.name]["reward"], scores[stage.baseline]["reward"]
            row = {"metric": "held-out reward", "value": value, **_extra(scores[stage.name])}
            if stage.kind == "rlhf":
                # PPO maximises the reward model's score: judge it by that score on held-out
                # prompts; the task reward beside it shows how well the reward model generalises.
                rm = root / "reward" / "final"
                value = reward_model_score(rm, root / "tokenizer", root / stage.name / "samples_t1.jsonl")
                base_value = reward_model_score(rm, root / "tokenizer", root / stage.baseline / "samples_t1.jsonl")
                row.update(metric="held-out reward-model score", value=value, task_reward=scores[stage.name]["reward"])
        row.update(stage=stage.name, title=stage.title, baseline=stage.baseline, baseline_value=base_value,
                   improved=value > base_value, seconds=seconds)
        table.append(row)
        log(f"[demo]   {row['metric']} {value:.3f} (before: {stage.baseline} {base_value:.3f}) in {seconds:.0f}s")
    _write_report(root, table)
    log(_format_table(table))
    log(f"[demo] report: {root / 'report.md'}; curves: {root / 'curves.png'}")
    return table


def _extra(s: dict) -> dict:
    return {"exact": s["exact"], "greedy_exact": s["greedy_exact"]}


def _format_table(table: list[dict]) -> str:
    lines = ["| stage | what | metric | value | exact (T=1) | exact (greedy) | before | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        before = "" if r["stage"] == "init" else f"{r['baseline']} {r['baseline_value']:.3f}"
        ex = f"{r['exact']:.3f}" if "exact" in r else ""
        gx = f"{r['greedy_exact']:.3f}" if "greedy_exact" in r else ""
        lines.append(f"| {r['stage']} | {r['title']} | {r['metric']} | {r['value']:.3f} | {ex} | {gx} | {before} "
                     f"| {r['seconds']:.0f}s |")
    return "\n".join(lines)


def _write_report(root: Path, table: list[dict]) -> None:
    from jaxpost.plot import plot_runs

    runs = [root / s.name for s in STAGES if (root / s.name / "metrics.jsonl").exists()]
    plot_runs(runs, root / "curves.png", metrics=["loss", "accuracy", "rewards/accuracies", "objective/scores",
                                                  "objective/kl"],
              title="jaxpost demo: training curves")
    (root / "results.json").write_text(json.dumps(table, indent=2))
    (root / "report.md").write_text(
        "# jaxpost demo report\n\n"
        "Task: reverse a string of 3-6 letters (`reverse: cabd` -> `dbac`). The SFT data is noisy: about a third "
        "of its answers are mistakes. 'held-out reward' is the mean task reward of completions sampled at "
        "temperature 1 on prompts never seen in training (1.0 exact, at most 0.5 otherwise); PPO is judged by "
        "what it maximises, the reward model's score of its held-out samples (its task reward is in results.json); "
        "'exact' columns "
        "are exact-match rates. Each stage starts from the SFT policy, except the distillation student, trained from "
        "scratch on the GRPO policy's greedy answers; the reward stage is judged "
        "by held-out pair accuracy against chance, the label stage by the mean reward of its best-of-4 picks against "
        "all samples.\n\n" + _format_table(table) + "\n\n![curves](curves.png)\n")
