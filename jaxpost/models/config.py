"""Model configuration: one frozen dataclass covers the Llama family.

Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (``qkv_bias``) and Qwen3 (``qk_norm``)
differ only in the fields below. Presets live in ``configs/models/*.gin``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin

from jaxpost.errors import UserError, require


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""The Hugging Face families a config can name (``ModelConfig.architecture``), i.e. load from and export to."""
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _check_fields(config: Any, *, ints: dict[str, int] | None = None, optional_ints: dict[str, int] | None = None,
                  positive_floats: tuple[str, ...] = (), choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming ``<class>.<field>`` for a value of the wrong kind or range.

    ``ints`` / ``optional_ints`` (None allowed): field -> its minimum;
    ``choices``: field -> the allowed values. A gin binding reaches the
    dataclass as written, so ``num_layers = 0`` or ``dtype = 'bf16'`` must
    fail here, in one line, rather than deep in a model build.
    """
    name = type(config).__name__
    for fields, optional in ((ints or {}, False), (optional_ints or {}, True)):
        for f, low in fields.items():
            v = getattr(config, f)
            ok = (optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= low)
            require(f"{name}.{f}", v, ok, ("None or " if optional else "") + f"an int >= {low}")
    for f in positive_floats:
        v = getattr(config, f)
        require(f"{name}.{f}", v, isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")
    for f, allowed in (choices or {}).items():
        require(f"{name}.{f}", getattr(config, f), getattr(config, f) in allowed,
                "one of " + ", ".join(map(repr, allowed)))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_fields(self, ints={"original_max_position_embeddings": 1},
                      positive_floats=("factor", "low_freq_factor", "high_freq_factor"))
        if self.high_freq_factor <= self.low_freq_factor:
            raise UserError(f"RopeScaling.high_freq_factor={self.high_freq_factor} must be > "
                            f"RopeScaling.low_freq_factor={self.low_freq_factor}")


# Depth from which ``ModelConfig(scan_layers=None)`` scans: from here on the scanned step compiles faster than
# the unrolled one at the same step time (benchmarks/scan_layers.py); below it both are about equal.
SCAN_LAYERS_FROM = 16

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_PRESETS = {
    "attention": ATTENTION_PROJECTIONS,
    "mlp": MLP_PROJECTIONS,
    "all": ATTENTION_PROJECTIONS + MLP_PROJECTIONS,
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections.

    A targeted kernel ``W [in, out]`` gains ``lora_a [in, rank]`` and
    ``lora_b [rank, out]``; the layer computes
    ``y = x W + (alpha / rank) * (x A) B`` as two thin matmuls (``A B`` is
    never formed). ``targets`` is a preset name (``"attention"``, ``"mlp"``,
    ``"all"``) or projection names among ``q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj``; it is stored as a tuple of names in the
    decoder's order.

    ``dropout`` must stay 0.0: the generic loss signature ``loss(params,
    batch, frozen)`` carries no random key, so a dropout mask could not be
    drawn per step without breaking the contract; a non-zero value raises
    instead of being silently ignored.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Any = "all"

    def __post_init__(self):
        _check_fields(self, ints={"rank": 1}, positive_floats=("alpha",))
        if self.dropout != 0.0:
            raise UserError(
                f"LoraConfig.dropout={self.dropout!r} is not supported: the loss signature loss(params, batch, "
                "frozen) has no random key to draw a dropout mask from; use dropout=0.0")
        targets = self.targets
        if isinstance(targets, str):
            if targets in LORA_TARGET_PRESETS:
                targets = LORA_TARGET_PRESETS[targets]
            else:
                targets = (targets,)
        targets = tuple(targets)
        allowed = LORA_TARGET_PRESETS["all"]
        unknown = [t for t in targets if t not in allowed]
        if unknown or not targets:
            raise UserError(f"LoraConfig.targets has unknown projection(s) {unknown or targets!r}; use a preset "
                            f"{sorted(LORA_TARGET_PRESETS)} or names among {allowed}")
        # Canonical order and no duplicates, so equal configs compare (and hash) equal.
        object.__setattr__(self, "targets", tuple(t for t in allowed if t in targets))

    @property
    def scale(self) -> float:
        """The factor ``alpha / rank`` on the adapter branch."""
        return self.alpha / self.rank


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``head`` selects the output head: ``"lm"`` (next-token logits over the
    vocabulary) or ``"score"`` (a scalar per position, for reward and value
    models; Hugging Face's ``*ForSequenceClassification`` with one label).
    ``dtype`` is the compute dtype; ``param_dtype`` the stored (master) one.
    ``remat`` is the rematerialisation policy per layer: ``"none"``,
    ``"full"`` or ``"save_dots"``. ``architecture`` names the Hugging Face
    family used on export (``llama``, ``mistral``, ``qwen2``, ``qwen3``).
    ``attention`` picks the kernel of forwards without a KV cache (training,
    scoring): ``"xla"`` (any backend), ``"cudnn"`` (the fused flash-attention
    kernel of NVIDIA GPUs; bf16/fp16 compute, head dim a multiple of 8 up
    to 128), ``"splash"`` (the Pallas splash-attention kernel of TPUs;
    sequence length a multiple of 128; runs interpreted, slowly, elsewhere)
    or ``"auto"`` (the default: cuDNN or splash where they apply on a GPU or
    TPU, XLA elsewhere). Sampling (prefill and decode against the cache)
    uses XLA.
    ``stored_logits_mib``: the LM head's float32 logits of a whole batch are
    kept for autodiff when they fit in this many MiB; above it each chunk of
    positions is recomputed in the backward pass (a fourth head matmul in
    exchange for O(chunk) memory; see :func:`jaxpost.models.heads.token_logprobs`).
    ``sliding_window`` (Mistral v0.1): a query attends only to the last
    ``sliding_window`` slots, itself included. ``lora`` (a
    :class:`LoraConfig` or None) adds low-rank adapters to the projections
    it targets (see :mod:`jaxpost.models.lora`); parameter and FLOP counts
    below are those of the base model.
    ``scan_layers``: run the layers under ``jax.lax.scan`` over parameters
    stacked on a leading ``layers`` axis (``params["layers"]["attn"]...``
    ``[L, ...]``) instead of a Python loop over ``params["layers"][i]``.
    Tracing and compile time then stay flat in depth; ``remat`` applies
    per layer either way. ``None`` (the default) scans models of
    :data:`SCAN_LAYERS_FROM` layers or more, where scanning compiles faster
    and steps as fast (``benchmarks/scan_layers.py``); :attr:`scanned` is
    the layout in use. The numbers are the same in both layouts, and
    :mod:`jaxpost.models.layout` converts params, optimizer state and
    checkpoints between them.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    head: str = "lm"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    stored_logits_mib: int = 256
    architecture: str = "llama"
    sliding_window: int | None = None
    lora: LoraConfig | None = None
    scan_layers: bool | None = None

    def __post_init__(self):
        _check_fields(self, ints={**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "num_kv_heads", "max_position_embeddings"), 1),
                                  "stored_logits_mib": 0},  # 0: the LM head's logits are always recomputed
                      optional_ints={"head_dim": 1, "sliding_window": 1},
                      positive_floats=("rope_theta", "rms_norm_eps"),
                      choices={"head": ("lm", "score"), "remat": ("none", "full", "save_dots"),
                               "attention": ("xla", "cudnn", "splash", "auto"), "architecture": ARCHITECTURES,
                               "dtype": FLOAT_DTYPES, "param_dtype": FLOAT_DTYPES})
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise UserError(f"ModelConfig.lora must be a LoraConfig or None (ModelConfig.lora = @LoraConfig()), "
                            f"got {self.lora!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise UserError(f"ModelConfig.rope_scaling must be a RopeScaling or None "
                            f"(ModelConfig.rope_scaling = @RopeScaling()), got {self.rope_scaling!r}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                            f"ModelConfig.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise UserError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                            f"ModelConfig.num_heads={self.num_heads}; set ModelConfig.head_dim explicitly")
        if self.dim_per_head % 2:
            raise UserError(f"the head dimension {self.dim_per_head} (ModelConfig.head_dim, or hidden_size / "
                            "num_heads) must be even for rotary embeddings")

    @property
    def scanned(self) -> bool:
        """Whether the layers run under ``jax.lax.scan`` (stacked params): ``scan_layers``, or by depth when None."""
        return self.num_layers >= SCAN_LAYERS_FROM if self.scan_layers is None else bool(self.scan_layers)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the config alone (used for FLOPs/MFU)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        per_layer = attn + 3 * d * f + 2 * d
        n = self.num_layers * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d
            if self.head == "lm" and not self.tie_embeddings:
                n += self.vocab_size * d
        if self.head == "score":
            n += d
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward).

        6 * N_matmul + 12 * layers * heads * head_dim * seq_len, the standard
        dense-transformer estimate (PaLM appendix B), where N_matmul counts the
        weights that take part in matmuls (the LM head but not the embedding
        lookup).
        """
        n = self.num_params(include_embeddings=False)
        if self.head == "lm":
            n += self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_heads * self.dim_per_head * seq_len
        return 6.0 * n + attn


def _gin_literal(value: Any) -> str:
    """``value`` as a gin (Python) literal; tuples/lists of names stay tuples/lists."""
    if isinstance(value, (bool, int, float, str, tuple, list)) or value is None:
        return repr(value)
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as a gin literal")


def model_config_gin(config: ModelConfig) -> str:
    """``config`` as gin binding lines that rebuild it exactly: ``ModelConfig.hidden_size = 128`` ...

    One line per field of :class:`ModelConfig`, defaults included, in field
    order; a nested :class:`RopeScaling` or :class:`LoraConfig` is written as
    ``ModelConfig.lora = @LoraConfig()`` followed by its own fields' lines.
    Parsing the text with gin and calling ``ModelConfig()`` gives back a
    config equal to ``config`` (so it records what a run used, e.g. the
    shapes read from an ``init_from`` checkpoint). Returns the text with a
    trailing newline.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"model_config_gin needs a ModelConfig, got {type(config).__name__}")
    lines, nested = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            name = type(value).__name__
            lines.append(f"ModelConfig.{f.name} = @{name}()")
            nested += [f"{name}.{g.name} = {_gin_literal(getattr(value, g.name))}" for g in dataclasses.fields(value)]
        else:
            lines.append(f"ModelConfig.{f.name} = {_gin_literal(value)}")
    return "\n".join(lines + nested) + "\n"
