"""Attention alone, forward + backward, per kernel path; prints each path's time relative to the first.

    python benchmarks/attention_bench.py --batch 8 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64

Paths (one process, one shape, bf16 on an accelerator):
``cudnn mask`` — cuDNN with the ``[B, 1, T, T]`` segment mask (what packed
rows get: the mask becomes a bias and cuDNN also computes its gradient);
``cudnn lengths`` — ``jaxpost.models.attention.cudnn_attention`` on rows of
one document (sequence lengths, no mask); ``cudnn causal`` — causal only,
the kernel's floor; ``xla blocked`` — jaxpost's XLA path. Each is
``value_and_grad`` of ``sum(out * w)`` under ``jax.jit``, median of
``--steps`` runs after one compile run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--paths", default="cudnn mask,cudnn lengths,cudnn causal,xla blocked")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpost.models.attention import blocked_causal_attention, cudnn_attention

    B, T, N, K, H = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, T, K, H), jnp.bfloat16) for kk in keys[1:3])
    w = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    seg = jnp.ones((B, T), jnp.int32)
    scale = H ** -0.5
    same = (seg[:, :, None] == seg[:, None, :])[:, None]
    paths = {
        "cudnn mask": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=same, scale=scale, is_causal=True, implementation="cudnn"),
        "cudnn lengths": lambda q, k, v: cudnn_attention(q, k, v, seg, None),
        "cudnn causal": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"),
        "xla blocked": lambda q, k, v: blocked_causal_attention(q, k, v, seg),
    }
    rows = []
    for name in a.paths.split(","):
        f = paths[name]
        step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum((f(q, k, v) * w).astype(jnp.float32)),
                                          argnums=(0, 1, 2)))
        try:
            jax.block_until_ready(step(q, k, v))
        except Exception as e:  # noqa: BLE001 — an unsupported or out-of-memory path is a result
            print(f"{name:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            ts.append(time.perf_counter() - t0)
        rows.append((name, float(np.median(ts))))
        print(f"{name:14s} {1e3 * rows[-1][1]:8.3f} ms  x{rows[-1][1] / rows[0][1]:.3f} of {rows[0][0]}", flush=True)


if __name__ == "__main__":
    main()
