"""Shared set-up for the end-to-end run tests: the demo task's data and a byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gin

from jaxpost import config
from jaxpost.recipes import run

TINY_MODEL = [
    "ModelConfig.vocab_size = 264", "ModelConfig.hidden_size = 64", "ModelConfig.intermediate_size = 128",
    "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2",
]


def make_task(root: Path, **sizes) -> dict[str, Path]:
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data

    paths = write_task_data(root / "data", **sizes)
    build_tokenizer(None, vocab_size=261).save_pretrained(root / "tokenizer")
    paths["tokenizer"] = root / "tokenizer"
    return paths


ONLINE_TASKS = ("grpo", "ppo", "online_dpo")
"""Tasks configured by ``OnlineConfig`` (rollouts) rather than ``LoopConfig``."""


def run_task(task: str, bindings: list[str]) -> dict:
    """Parses ``bindings`` (plus the tiny model) with gin and runs ``task`` (e.g. ``"sft"``)."""
    loop = (["OnlineConfig.progress = False"] if task in ONLINE_TASKS
            else [f"{task}.loop = @LoopConfig()", "LoopConfig.progress = False"])
    config.parse([], [f"run.task = @{task}", f"{task}.model = @ModelConfig()", *loop, *TINY_MODEL, *bindings])
    try:
        return run()
    finally:
        gin.clear_config()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def tiny_model_dir(path: Path) -> Path:
    """A user's model directory: config.json + safetensors + a tokenizer with a chat template."""
    from jaxpost import models
    from jaxpost.data import build_tokenizer
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.hf import save_hf

    config = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    _, params = models.create(config, seed=0)
    tok = build_tokenizer(None, vocab_size=261)
    save_hf(path, config, params, extra_config={"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    tok.save_pretrained(path)
    return path
