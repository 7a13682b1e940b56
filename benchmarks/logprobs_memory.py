"""Peak memory of chunked `token_logprobs` vs dense logits + log_softmax (128k vocab).

Compiles forward + backward (gradient w.r.t. hidden states and LM head) of
the sum of target log-probs both ways and reads XLA's buffer assignment
(`compiled.memory_analysis()`), so nothing large is ever allocated.

    python benchmarks/logprobs_memory.py [--batch 4 --length 2048 --vocab 128256 --hidden 512 --chunk 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig, token_logprobs
from jaxpost.models.heads import logits


def _peak_bytes(fn, *args) -> int:
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    # Arguments are the same for both variants; temporaries + outputs are what differ.
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512)
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden, num_layers=1,
                      num_heads=1, num_kv_heads=1)
    params = {"lm_head": {"kernel": jax.ShapeDtypeStruct((a.hidden, a.vocab), jnp.float32)}}
    hidden = jax.ShapeDtypeStruct((a.batch, a.length, a.hidden), jnp.float32)
    targets = jax.ShapeDtypeStruct((a.batch, a.length), jnp.int32)

    def chunked(p, h, t):
        return jax.grad(lambda p, h: token_logprobs(p, cfg, h, t, chunk_size=a.chunk).sum(), (0, 1))(p, h)

    def dense(p, h, t):
        def f(p, h):
            z = jax.nn.log_softmax(logits(p, cfg, h), axis=-1)
            return jnp.take_along_axis(z, t[..., None], -1).sum()
        return jax.grad(f, (0, 1))(p, h)

    full_logits = a.batch * a.length * a.vocab * 4
    c, d = _peak_bytes(chunked, params, hidden, targets), _peak_bytes(dense, params, hidden, targets)
    gib = 2.0 ** 30
    print(f"batch x length x vocab x 4 bytes (one float32 logits tensor): {full_logits / gib:.3f} GiB")
    print(f"dense   log_softmax fwd+bwd: temp+output {d / gib:.3f} GiB")
    print(f"chunked token_logprobs (chunk {a.chunk}) fwd+bwd: temp+output {c / gib:.3f} GiB")
    print(f"ratio dense / chunked: {d / c:.1f}x")


if __name__ == "__main__":
    main()
