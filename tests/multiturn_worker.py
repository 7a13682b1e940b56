"""One multi-turn rollout (tests/test_multiturn_multihost.py) on this process's share of the mesh.

    python tests/multiturn_worker.py OUT_DIR

Writes ``OUT_DIR/out_<process count>_<process>.json``: the rollout's rows as this
process holds them, and how many episodes this process's environments ran.
"""

import json
import sys

import jax
import numpy as np

from jaxpost import distributed
from jaxpost.data import build_tokenizer, make_prompt_pipeline
from jaxpost.generate.environments import ToolEnvironment
from jaxpost.generate.multiturn import MultiTurnConfig, MultiTurnRoller
from jaxpost.generate.rollout import RolloutConfig
from jaxpost.generate.tools import ToolCall
from jaxpost.models import ModelConfig, create
from jaxpost.sharding import Partitioner

distributed.initialize()
CONFIG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
SEEN = []

def good(x: int) -> str:
    return f"ok {x}"

def raises(x: int):
    raise RuntimeError("boom")

class Env(ToolEnvironment):
    def __init__(self):
        super().__init__([good, raises], timeout_s=1.0, system_prompt="")
    def reset(self, row):
        self.turn = 0
        SEEN.append(row["prompt"])
        return super().reset(row)
    def calls(self, text):
        self.turn += 1
        return [ToolCall(self.row["tool"], {"x": len(text)})] if self.turn <= 2 else []
    def reward(self, row, answer):
        return float(len(answer))

tok = build_tokenizer(None)
graphdef, params = create(CONFIG, seed=3)
params = jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, params)
part = Partitioner()
rows = [{"prompt": f"task {i} " * (1 + i % 3), "tool": ["good", "raises"][i % 4 == 3]} for i in range(8)]
pb = next(make_prompt_pipeline(rows, tok, 32, 8, 0, shuffle=False, num_epochs=None))
roller = MultiTurnRoller(graphdef, CONFIG, tok, part, Env(),
                         RolloutConfig(max_new_tokens=5, group_size=2, stop_token_ids=(4,) + tuple(range(140, 264))),
                         MultiTurnConfig(max_turns=3, max_episode_tokens=12, max_length=160))
with part.activate():
    params = jax.device_put(params, part.replicated)
    r = roller(params, params, None, pb, jax.random.PRNGKey(1))
    old = np.asarray(distributed.to_host(r.batch["old_logp"]))
p = jax.process_index()
with open(f"{sys.argv[1]}/out_{jax.process_count()}_{p}.json", "w") as f:
    json.dump({"tokens": r.host["tokens"].tolist(), "mask": r.host["loss_mask"].tolist(),
               "scores": r.scores.tolist(), "old": old.tolist(), "seen": len(SEEN), "metrics": r.metrics}, f)
print("done", p, r.metrics)
