"""Multi-host GRPO on CPU: 2 processes x 4 devices against 1 process x 8 devices, same numbers, step time.

    python benchmarks/online_grpo.py [--rollouts 6] [--max-new-tokens 32] [--out runs/bench_online_grpo]

Both layouts run ``jaxpost train`` with ``configs/experiments/local_multihost_grpo.gin``
(2 processes through ``launch/local.sh``) on the demo task's prompts, from the
same command. Printed: whether the logged scores, KL and losses agree, the
median time per rollout (sampling, scoring and updates) of each layout and
their ratio, and the share of a rollout spent sampling
(``time/generate_fraction``). The first rollout (compilation) is left out of
the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "configs/experiments/local_multihost_grpo.gin"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/bench_online_grpo")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    sys.path.insert(0, str(REPO))
    from jaxpost.data import build_tokenizer
    from jaxpost.demo.task import write_task_data

    data = write_task_data(out / "data", n_sft=8, n_pref=8, n_prompts=256, n_eval=8)
    build_tokenizer(None, vocab_size=261).save_pretrained(out / "tokenizer")
    gin = [f"--gin_file={EXPERIMENT}", f"--gin.grpo.train_data={data['prompts']}",
           f"--gin.grpo.tokenizer={out / 'tokenizer'}", f"--gin.OnlineConfig.num_rollouts={args.rollouts}",
           f"--gin.RolloutConfig.max_new_tokens={args.max_new_tokens}", "--gin.OnlineConfig.save_every=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    wall = {
        "2x4": _run(["bash", "launch/local.sh", "2", sys.executable, "-m", "jaxpost", "train", *gin,
                     f"--gin.grpo.run_dir={out / 'two'}"],
                    {**env, "PORT": os.environ.get("PORT", "12377"), "LOG_DIR": str(out / "logs")}),
        "1x8": _run([sys.executable, "-m", "jaxpost", "train", *gin, f"--gin.grpo.run_dir={out / 'one'}"],
                    {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
    }
    two, one = _records(out / "two"), _records(out / "one")
    keys = ("objective/scores", "objective/kl", "loss", "grad_norm", "rollout/completion_length")
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(two, one) for k in keys if k in b)
    print(f"GRPO, {args.rollouts} rollouts x 16 completions of up to {args.max_new_tokens} tokens, "
          f"tiny Llama, CPU")
    print(f"same numbers: {'yes' if worst < 1e-4 else 'NO'} (largest relative difference {worst:.2e} over {keys})")
    updates = one[1]["step"] - one[0]["step"]
    cycle = {}
    for name, rows, label in (("2x4", two, "2 processes x 4 devices"), ("1x8", one, "1 process x 8 devices")):
        cycle[name] = statistics.median(updates / r["steps_per_s"] for r in rows[1:])
        sample = statistics.median(r["time/generate_s"] for r in rows[1:])
        print(f"{label:>24}: median step (rollout: sample, score, {updates} updates) {cycle[name]:.3f} s, "
              f"sampling {sample:.3f} s = {sample / cycle[name]:.0%} of it; whole command {wall[name]:.1f} s")
    print(f"2x4 / 1x8 step time: {cycle['2x4'] / cycle['1x8']:.2f}x (cross-process gloo collectives on one machine)")


if __name__ == "__main__":
    main()
