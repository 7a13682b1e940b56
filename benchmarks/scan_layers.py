"""Compile time and step time against depth: layers unrolled (a Python loop) vs scanned (``jax.lax.scan``).

    python benchmarks/scan_layers.py                         # 2, 8, 16, 32, 64 layers, hidden 256, 8 x 512
    python benchmarks/scan_layers.py --layers 2 32 --steps 3 --batch 8 --seq 512

For each depth and layout: one SFT train step built with the public API
(``create``, ``make_sft_loss``, ``make_optimizer``, ``make_train_step``,
``compile_train_step``: explicit shardings, donated state), timed as
``trace`` (``jit(...).trace``), ``lower`` and ``compile`` separately, then the
median of ``--steps`` executed steps after one warm-up step. Both layouts
start from the same weights (``create`` draws the same numbers), so their
first losses must agree; the script checks it. The model is the issue's:
Llama-style, hidden 256, 4 heads (2 kv), MLP 688, vocab 8192, fp32. Each
configuration runs in a fresh process so that no compilation cache, warm
allocator or earlier trace is shared. Prints a table and the ratios the
target is stated in (scanned 32 layers' trace + compile against scanned 2
layers'; scanned step time against unrolled), and writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(layers: int, scan: bool, batch: int, seq: int, steps: int) -> dict:
    """One configuration, in this process: trace, lower, compile and step times (seconds) and the first loss."""
    import jax
    import numpy as np

    from jaxpost.algorithms import make_sft_loss
    from jaxpost.models import ModelConfig, create, logical_axes
    from jaxpost.sharding import Partitioner
    from jaxpost.train import (abstract_state, batch_shardings, compile_train_step, init_sharded_state,
                               make_optimizer, make_train_step, state_shardings)

    config = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=layers, num_heads=4,
                         num_kv_heads=2, scan_layers=scan)
    part = Partitioner(rules="fsdp")
    graphdef, params = create(config, seed=0, partitioner=part)
    param_sh = part.shardings(logical_axes(config), params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
    lm = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": np.ones((batch, seq), np.float32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "segment_ids": np.ones((batch, seq), np.int32)}
    lm["loss_mask"][:, -1] = 0
    opt = make_optimizer("adamw", learning_rate=1e-4, schedule="constant", weight_decay=0.0, clip_norm=1.0)
    shardings = state_shardings(abstract_state(params, opt), param_sh, part, opt)
    state = init_sharded_state(params, opt, shardings)
    del params
    b_sh = batch_shardings(lm, part)
    lm = jax.device_put(lm, b_sh)
    step = compile_train_step(make_train_step(make_sft_loss(graphdef, config), opt), shardings, b_sh, None)
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    traced = step.trace(state, lm, None)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    times, losses = [], []
    for _ in range(1 + steps):
        s0 = time.perf_counter()
        state, metrics = compiled(state, lm, None)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - s0)
        losses.append(float(metrics["loss"]))
    return {"layers": layers, "scan": scan, "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
            "step_s": float(np.median(times[1:])), "first_loss": losses[0], "batch": batch, "seq": seq,
            "device": jax.devices()[0].device_kind, "n_devices": jax.device_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after 1 warm-up)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layers, scan = args.child.split(",")
        print(json.dumps(measure(int(layers), scan == "1", args.batch, args.seq, args.steps)))
        return
    rows = []
    for layers in args.layers:
        for scan in (False, True):
            cmd = [sys.executable, __file__, "--child", f"{layers},{int(scan)}", "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps)]
            env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}  # every compile is a real one
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{layers:3d} layers {'scanned ' if scan else 'unrolled'}: trace {row['trace_s']:6.2f} s  "
                  f"lower {row['lower_s']:5.2f} s  compile {row['compile_s']:6.2f} s  step {row['step_s']:7.3f} s  "
                  f"loss {row['first_loss']:.6f}", flush=True)
    by = {(r["layers"], r["scan"]): r for r in rows}
    print("\n| layers | unrolled trace+compile (s) | scanned trace+compile (s) | unrolled step (s) | "
          "scanned step (s) | scanned/unrolled step |")
    print("|---|---|---|---|---|---|")
    for layers in args.layers:
        u, s = by[(layers, False)], by[(layers, True)]
        tc = lambda r: r["trace_s"] + r["lower_s"] + r["compile_s"]
        print(f"| {layers} | {tc(u):.1f} | {tc(s):.1f} | {u['step_s']:.3f} | {s['step_s']:.3f} | "
              f"{s['step_s'] / u['step_s']:.2f}x |")
        assert abs(u["first_loss"] - s["first_loss"]) < 1e-4, (layers, u["first_loss"], s["first_loss"])
    if 2 in args.layers and 32 in args.layers:
        tc = lambda r: r["trace_s"] + r["lower_s"] + r["compile_s"]
        print(f"\nscanned: 32 layers' trace + compile = {tc(by[(32, True)]) / tc(by[(2, True)]):.2f}x 2 layers' "
              f"(target <= 1.5x); unrolled: {tc(by[(32, False)]) / tc(by[(2, False)]):.2f}x")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}_scan_layers.json"
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
