"""What bounds a decode step: the sampler's step against its own matrix products alone, and their memory rate against the machine's.

    python benchmarks/decode_bound.py --repeats 7

On the sampler benchmark's model (``configs/models/bench.gin``'s shape:
vocab 8192, hidden 256, 4 layers, fp32, seed-0 weights), 16 prompts x 64
ids, greedy (``--temperature``: sampled). Three measurements, called in
turn each round:

* ``step``: the ``Sampler``'s cost per decode step, from two whole calls:
  ``(t(--long new tokens) - t(--short new tokens)) / (--long - --short)``.
  With the defaults (64, 128) these are the steps of the cache's 192-slot
  phase: the second half of ``sampler_throughput.py``'s ``equal``
  workload.
* ``products``: that step's matrix products and nothing else: per layer
  the (fused) query+key+value, the two attention products over a cache of
  ``--slots`` slots, the output, the (fused) gate+up and the down
  projections, then the LM head, on the model's own shapes, in a loop of
  dependent steps. No norms, rotary embedding, softmax, cache writes,
  vocabulary softmax or token choice.
* ``read``: the machine's rate for a plain read (a sum over 256 MB).

Then each weight product alone at ``--prompts`` rows with its weights
streamed from memory (copies cycled past the last-level cache, as a step
that also reads its KV cache streams them), run by XLA and by OpenBLAS
(numpy's ``@``, an independent kernel), in GB/s of weights read.

Printed: medians, and ``step / products`` and ``products`` against
``read`` as medians of the per-round ratios ("paired": a round's calls
are seconds apart, so drift in the machine's speed cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from sampler_throughput import PAD, add_model_args, model_config


def weight_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of a decode step's weight products, projections fused as ``fuse_projections`` fuses them."""
    hd = config.hidden_size // config.num_heads
    qkv = (config.num_heads + 2 * config.num_kv_heads) * hd
    return {"qkv": (config.hidden_size, qkv), "out": (config.num_heads * hd, config.hidden_size),
            "gate_up": (config.hidden_size, 2 * config.intermediate_size),
            "down": (config.intermediate_size, config.hidden_size), "lm_head": (config.hidden_size, config.vocab_size)}


def step_bytes(config, rows: int, slots: int) -> dict[str, int]:
    """Bytes a decode step must read in fp32: every weight but the embedding table, and the keys and values of ``slots``."""
    shapes = weight_shapes(config)
    weights = sum(i * o for name, (i, o) in shapes.items() if name != "lm_head") * config.num_layers
    weights += shapes["lm_head"][0] * shapes["lm_head"][1]
    hd = config.hidden_size // config.num_heads
    cache = 2 * config.num_layers * rows * config.num_kv_heads * hd * slots
    return {"weights": 4 * weights, "cache": 4 * cache}


def step_flops(config, rows: int, slots: int) -> int:
    """Floating-point operations of a step's products: ``2 * rows`` per weight read, and ``2 * 2 * rows * heads * head_dim * slots`` per layer for attention."""
    weights = step_bytes(config, rows, slots)["weights"] // 4
    return 2 * rows * weights + 4 * config.num_layers * rows * config.hidden_size * slots


def products_step(config, rows: int, slots: int, steps: int, seed: int = 0):
    """A jitted loop of ``steps`` dependent decode steps made of the step's products only; returns ``run() -> s per step``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = weight_shapes(config)
    w = lambda name: jnp.asarray(rng.standard_normal(shapes[name], np.float32) * 0.05)
    layers = [{n: w(n) for n in ("qkv", "out", "gate_up", "down")} for _ in range(config.num_layers)]
    head = w("lm_head")
    G, hd, H = config.num_kv_heads, config.hidden_size // config.num_heads, config.num_heads
    keys = [jnp.asarray(rng.standard_normal((rows, G, hd, slots), np.float32)) for _ in layers]  # the sampler's layouts
    values = [jnp.asarray(rng.standard_normal((rows, G, slots, hd), np.float32)) for _ in layers]
    F = config.intermediate_size

    def step(_, x):
        for p, k, v in zip(layers, keys, values):
            q = (x @ p["qkv"])[:, :H * hd].reshape(rows, G, H // G, hd)
            s = jnp.einsum("bgqd,bgds->bgqs", q, k) * 1e-2
            a = jnp.einsum("bgqs,bgsd->bgqd", s, v).reshape(rows, H * hd)
            x = x + (a * 1e-3) @ p["out"]
            gu = x @ p["gate_up"]
            x = x + (gu[:, :F] * gu[:, F:] * 1e-3) @ p["down"]
        return x * 0.5 + (x @ head)[:, :config.hidden_size] * 1e-4

    loop = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, x))
    x = jnp.full((rows, config.hidden_size), 0.1, jnp.float32)
    loop(x).block_until_ready()

    def run() -> float:
        t = time.perf_counter()
        loop(x).block_until_ready()
        return (time.perf_counter() - t) / steps

    return run


def read_rate(mbytes: int):
    """``run() -> GB/s`` of a jitted sum over ``mbytes`` MB of fp32 (the machine's plain read rate, all cores)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()

    def run() -> float:
        t = time.perf_counter()
        total(a).block_until_ready()
        return a.nbytes / (time.perf_counter() - t) / 1e9

    return run


def peak_rate(n: int):
    """``run() -> GFLOP/s`` of dependent ``[n, n] @ [n, n]`` fp32 products (what the cores compute when nothing waits on memory)."""
    import jax
    import jax.numpy as jnp

    a = jnp.full((n, n), 1.0 / n, jnp.float32)
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, 8, lambda _, x: x @ a, a))
    loop(a).block_until_ready()

    def run() -> float:
        t = time.perf_counter()
        loop(a).block_until_ready()
        return 8 * 2 * n**3 / (time.perf_counter() - t) / 1e9

    return run


def streamed_product_rates(shapes: dict, rows: int, mbytes: int, repeats: int) -> dict[str, dict[str, float]]:
    """GB/s of weights read by ``x[rows, in] @ W[in, out]`` with ``W`` cycled over copies filling ``mbytes`` MB, XLA and numpy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    out = {}
    for name, (i, o) in shapes.items():
        copies = max(2, mbytes * 2**20 // (4 * i * o))
        host = [rng.standard_normal((i, o), np.float32) for _ in range(copies)]
        dev = [jnp.asarray(h) for h in host]
        x, xh = jnp.ones((rows, i), jnp.float32), np.ones((rows, i), np.float32)
        xla = jax.jit(lambda x, ws: sum(x @ w for w in ws))  # every output used: no product can be cut short
        jax.block_until_ready(xla(x, dev))
        times = {"xla": [], "openblas": []}
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(xla(x, dev))
            times["xla"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for h in host:
                xh @ h
            times["openblas"].append(time.perf_counter() - t)
        out[name] = {k: copies * 4 * i * o / statistics.median(v) / 1e9 for k, v in times.items()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--short", type=int, default=64, help="new tokens of the shorter call")
    ap.add_argument("--long", type=int, default=128, help="new tokens of the longer call")
    ap.add_argument("--slots", type=int, default=192, help="cache slots of the products-only step (the phase timed)")
    ap.add_argument("--steps", type=int, default=64, help="steps per products-only loop")
    ap.add_argument("--temperature", type=float, default=0.0, help="of the sampler (0: greedy)")
    ap.add_argument("--read-mb", type=int, default=256)
    ap.add_argument("--peak-n", type=int, default=1024, help="size of the square products of the peak FLOP rate")
    ap.add_argument("--stream-mb", type=int, default=96, help="weight copies per streamed product (past the LLC)")
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the report here")
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from jaxpost.generate.sampler import Sampler, SamplingConfig
    from jaxpost.models import create

    config = model_config(a)
    graphdef, params = create(config, seed=a.seed)
    prompts = np.random.default_rng(a.seed).integers(3, a.vocab, size=(a.prompts, a.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts)
    sampling = SamplingConfig(max_new_tokens=a.long, temperature=a.temperature, pad_token_id=PAD)
    sampler = Sampler(graphdef, config, sampling)

    def call(n: int) -> float:
        budget = np.full((a.prompts,), n, np.int32)
        t = time.perf_counter()
        out = sampler(params, prompts, mask, jax.random.key(0), max_new_tokens=budget)
        lengths = jax.device_get(out.lengths)
        assert (lengths == n).all(), lengths  # no stop tokens: every row decodes exactly n steps
        return time.perf_counter() - t

    products = products_step(config, a.prompts, a.slots, a.steps, a.seed)
    read = read_rate(a.read_mb)
    peak = peak_rate(a.peak_n)
    call(a.short), call(a.long)  # compile
    rounds = {"step_s": [], "products_s": [], "read_gbs": [], "peak_gflops": []}
    for _ in range(a.repeats):
        short, long = call(a.short), call(a.long)
        rounds["step_s"].append((long - short) / (a.long - a.short))
        rounds["products_s"].append(products())
        rounds["read_gbs"].append(read())
        rounds["peak_gflops"].append(peak())
    nbytes = step_bytes(config, a.prompts, a.slots)
    total = nbytes["weights"] + nbytes["cache"]
    flops = step_flops(config, a.prompts, a.slots)
    report = {
        "args": vars(a), "device": jax.devices()[0].device_kind, "rounds": rounds, "bytes_per_step": nbytes,
        "median": {k: statistics.median(v) for k, v in rounds.items()},
        "paired_step_over_products": statistics.median([s / p for s, p in zip(rounds["step_s"], rounds["products_s"])]),
        "paired_products_gbs_over_read": statistics.median([total / p / 1e9 / r
                                                 for p, r in zip(rounds["products_s"], rounds["read_gbs"])]),
        "paired_products_gflops_over_peak": statistics.median([flops / p / 1e9 / f for p, f in
                                                                zip(rounds["products_s"], rounds["peak_gflops"])]),
        "flops_per_step": flops,
        "streamed_gbs": streamed_product_rates(weight_shapes(config), a.prompts, a.stream_mb, a.repeats),
    }
    m = report["median"]
    print(f"{a.prompts} rows, {a.slots}-slot cache, temperature {a.temperature}, vocab {a.vocab}, "
          f"hidden {a.hidden}, {a.layers} layers, fp32, {report['device']}, median of {a.repeats}")
    print(f"  sampler decode step     {m['step_s'] * 1e3:7.3f} ms")
    print(f"  its products alone      {m['products_s'] * 1e3:7.3f} ms  (reading {nbytes['weights'] / 1e6:.1f} MB of "
          f"weights + {nbytes['cache'] / 1e6:.1f} MB of cache: {total / m['products_s'] / 1e9:.1f} GB/s)")
    print(f"  plain read              {m['read_gbs']:7.1f} GB/s")
    print(f"  square products         {m['peak_gflops']:7.1f} GFLOP/s  (the step's products: "
          f"{flops / m['products_s'] / 1e9:.1f})")
    print(f"  paired: step / products {report['paired_step_over_products']:.3f}; products' rate / read rate "
          f"{report['paired_products_gbs_over_read']:.3f}; products' FLOP rate / square products' "
          f"{report['paired_products_gflops_over_peak']:.3f}")
    print(f"  weight products at {a.prompts} rows, weights streamed (GB/s):")
    for name, r in report["streamed_gbs"].items():
        i, o = weight_shapes(config)[name]
        print(f"    {name:8} {i:5} x {o:<5}  xla {r['xla']:5.1f}  openblas {r['openblas']:5.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
