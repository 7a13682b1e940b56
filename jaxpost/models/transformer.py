"""The Llama-family decoder as a Flax NNX module.

One module covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 through
:class:`~jaxpost.models.config.ModelConfig`. It returns the hidden states
after the final norm; output heads live in :mod:`jaxpost.models.heads` so
that log-probabilities can be computed in chunks.

Params layout (``nnx.to_pure_dict``)::

    embed/embedding                      [V, D]      (vocab, embed)
    layers/<i>/input_norm/scale          [D]         (norm,)
    layers/<i>/attn/q_proj/kernel        [D, N*Hd]   (embed, heads)     (+ bias (heads,))
    layers/<i>/attn/{k,v}_proj/kernel    [D, K*Hd]   (embed, kv_heads)  (+ bias (kv_heads,))
    layers/<i>/attn/o_proj/kernel        [N*Hd, D]   (heads, embed)
    layers/<i>/attn/{q,k}_norm/scale     [Hd]        (norm,)            (qk_norm only)
    layers/<i>/post_attn_norm/scale      [D]         (norm,)
    layers/<i>/mlp/{gate,up}_proj/kernel [D, F]      (embed, mlp)
    layers/<i>/mlp/down_proj/kernel      [F, D]      (mlp, embed)
    .../<proj>/lora_a, lora_b            [in, r], [r, out]  (in axis, None), (None, out axis)
                                         (only on the projections config.lora targets)
    final_norm/scale                     [D]         (norm,)
    lm_head/kernel                       [D, V]      (embed, vocab)     (head="lm", untied)
    score/kernel                         [D, 1]      (embed, None)      (head="score")

With ``config.scanned`` (``ModelConfig.scan_layers``) every ``layers/<i>/...`` leaf is instead one
``layers/...`` leaf stacked on a leading ``layers`` axis (``[L, D, N*Hd]``,
logical axes ``("layers", "embed", "heads")``), and the layers run under
``jax.lax.scan``: one traced and compiled layer whatever the depth
(:mod:`jaxpost.models.layout` converts between the two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpost.models.attention import Attention, Branches, KVCache, stack_qkv
from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import (Embed, Linear, RMSNorm, lora_kwargs, rope_tables, stack_linears,
                                   stacked_linear, swiglu)
from jaxpost.sharding import constrain

ACTIVATION_AXES = ("batch", "length", "embed")

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(x W_gate) * (x W_up))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw,
                                **lora_kwargs(c, "gate_proj"))
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw,
                              **lora_kwargs(c, "up_proj"))
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw,
                                **lora_kwargs(c, "down_proj"))

    def __call__(self, x: jax.Array, gate_up=None) -> jax.Array:
        """``gate_up``: optional ``stack_linears(gate_proj, up_proj)``, for one matmul instead of two."""
        if gate_up is None:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(swiglu(*stacked_linear(self.gate_proj, self.up_proj, x, gate_up)))


def fuse_projections(block: Block) -> tuple:
    """``(query+key+value, gate+up)`` of a block (of all layers when scanned), for two matmuls instead of five.

    :func:`~jaxpost.models.attention.stack_qkv` and
    :func:`~jaxpost.models.layers.stack_linears`. A decode step (one token
    per row) multiplies a few rows by every weight, so a matmul costs about
    the reading of its weights plus a fixed overhead; one ``[D, 2F]``
    product instead of two ``[D, F]`` ones saves that overhead (XLA:CPU,
    batch 16, hidden 256: gate and up 0.085 ms against 2 x 0.062 ms). The
    gate/up stacking axis is replicated; the others keep the kernels'
    sharding.
    """
    gate_up = stack_linears(block.mlp.gate_proj, block.mlp.up_proj)
    lead = ("layers",) * (gate_up.ndim - 3)
    return stack_qkv(block.attn), constrain(gate_up, lead + ("embed", None, "mlp"))


class Block(nnx.Module):
    """Pre-norm residual layer: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.attn = Attention(c, rngs=rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, x, rope, segment_ids, kv=None, branches=None, fused=None):
        """``fused``: optional :func:`fuse_projections` of this block."""
        qkv_proj, gate_up = (None, None) if fused is None else fused
        attn_out, new_kv = self.attn(self.input_norm(x), rope, segment_ids, kv, branches, qkv_proj)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), gate_up)
        return constrain(x, ACTIVATION_AXES), new_kv


def stacked_block(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One :class:`Block` whose parameters are those of ``config.num_layers`` blocks stacked on axis 0.

    The blocks are drawn one after another from ``rngs`` as the unrolled
    model draws them, so both layouts of one seed hold the same numbers
    (layer ``i`` is ``leaf[i]``). Each parameter's ``logical_axes`` gains a
    leading ``"layers"`` (replicated by every sharding preset).
    """
    blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]

    def stack(*variables):
        first = variables[0]
        axes = ("layers",) + tuple(first.get_metadata()["logical_axes"])
        return first.replace(jnp.stack([v[...] for v in variables]), logical_axes=axes)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Decoder-only transformer; ``__call__`` returns ``(hidden, cache)``.

    ``hidden`` is ``[B, T, D]`` in ``config.dtype`` after the final RMSNorm.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.layers = (stacked_block(c, rngs) if c.scanned else
                       nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)]))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.lm_head = (Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"), **kw)
                        if c.head == "lm" and not c.tie_embeddings else None)
        self.score = Linear(c.hidden_size, 1, ("embed", None), **kw) if c.head == "score" else None

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, branches: Branches | None = None,
                 fused=None) -> tuple[jax.Array, KVCache | None]:
        """``fused``: :meth:`fused_projections` of this model: query, key and value as one matmul, and gate and
        up as another."""
        c = self.config
        if branches is not None and cache is not None:
            raise ValueError("branches apply to a whole-row forward, not to a cached (sampling) one")
        if tokens.ndim != 2 or positions.shape != tokens.shape or segment_ids.shape != tokens.shape:
            raise ValueError(f"tokens, positions, segment_ids must all be [B, T]; got {tokens.shape}, "
                             f"{positions.shape}, {segment_ids.shape}")
        segment_ids = segment_ids.astype(jnp.int32)
        x = constrain(self.embed(tokens), ACTIVATION_AXES)
        if cache is not None:
            if cache.segment_ids.shape[0] != tokens.shape[0]:
                raise ValueError(f"cache batch {cache.segment_ids.shape[0]} != tokens batch {tokens.shape[0]}")
            cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
        rope = rope_tables(positions, c.dim_per_head, c)

        def call(block: Block, x, kv, fused, layer=None):
            if kv is not None:
                kv = (kv[0], kv[1], cache_segments, cache.index, layer)
            return block(x, rope, segment_ids, kv, branches, fused)  # rope, segments, branches: closed over

        policy = REMAT_POLICIES.get(c.remat)
        kvs = None if cache is None else (cache.k, cache.v)
        if c.scanned:
            graphdef, stacked = nnx.split(self.layers)

            def body(carry, layer):
                # The stacked caches ride in the carry and each layer writes only its new slots, in place: as
                # scan inputs and outputs, every decode step would copy the whole cache (2x slower on CPU).
                x, kv = carry
                params, layer_fused, i = layer
                x, kv = call(nnx.merge(graphdef, params), x, kv, layer_fused, i)
                return (x, kv), None

            if c.remat != "none":  # per layer, as unrolled; prevent_cse is not needed inside a scan
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            (x, new_kvs), _ = jax.lax.scan(body, (x, kvs), (stacked, fused, jnp.arange(c.num_layers)))
        else:
            if c.remat != "none":
                call = nnx.remat(call, policy=policy)
            new_k, new_v = [], []
            for i, block in enumerate(self.layers):
                x, layer_kv = call(block, x, None if kvs is None else (kvs[0][i], kvs[1][i]),
                                   None if fused is None else fused[i])
                if layer_kv is not None:
                    new_k.append(layer_kv[0])
                    new_v.append(layer_kv[1])
            new_kvs = (tuple(new_k), tuple(new_v))
        hidden = self.final_norm(x)
        if cache is not None:
            cache = KVCache(k=new_kvs[0], v=new_kvs[1], segment_ids=cache_segments,
                            index=cache.index + tokens.shape[1])
        return hidden, cache

    def fused_projections(self):
        """Every layer's :func:`fuse_projections`: a list (one per layer), or one stacked over layers when scanned.

        Made once, before a decode loop, and passed to each step's ``__call__``
        (a loop-invariant computation inside the loop would be hoisted only
        within one compiled program; a sampler runs several).
        """
        return fuse_projections(self.layers) if self.config.scanned else [fuse_projections(b) for b in self.layers]
