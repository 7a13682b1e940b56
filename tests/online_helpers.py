"""Shared setup of the online-run tests: a byte tokenizer, prompt data, a tiny model, a toy reward."""

import json

import gin
import jax
import pytest

from jaxpost.data import build_tokenizer
from jaxpost.models import ModelConfig, create

CONFIG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)


def lowercase_fraction(prompts, completions, **_):
    """Toy reward: the fraction of completion characters that are lowercase letters (about 0.1 at random init)."""
    return [sum(c.islower() for c in s) / max(len(s), 1) for s in completions]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("online")
    build_tokenizer(None).save_pretrained(d / "tok")
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"Q{i}: say", "answer": str(i)}) + "\n")
    return d


@pytest.fixture
def gin_scope():
    """Bindings made in a test are dropped afterwards."""
    gin.clear_config()
    yield gin
    gin.clear_config()


def scores_and_kl(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rows = [r for r in rows if "objective/scores" in r]  # held-out evaluations are records of their own
    return [r["objective/scores"] for r in rows], [r["objective/kl"] for r in rows], rows


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None)


@pytest.fixture(scope="module")
def model():
    """The tiny policy with larger weights: peaked, context-dependent distributions (the default init is near uniform)."""
    graphdef, params = create(CONFIG, seed=3)
    return graphdef, jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, params)
