"""LoRA: low-rank adapters trained on top of frozen base weights.

A projection ``W [in, out]`` targeted by :class:`LoraConfig` gains two
parameters beside its kernel, ``lora_a [in, r]`` and ``lora_b [r, out]``,
and computes ``y = x W + (alpha / r) * (x A) B`` (see
:class:`jaxpost.models.layers.Linear`). ``B`` starts at zero, so an adapted
model starts as the base model exactly. Only the adapters (and a score head,
when the model has one) are trained; the base weights stay bit-identical.

Typical use, in a run script::

    config, graphdef, params, mask = apply_lora(config, params, LoraConfig(rank=8), seed=0)
    optimizer = make_optimizer(..., trainable_mask=mask)     # state for adapters only
    loss_fn = stop_frozen_gradients(loss_fn, mask)           # jaxpost.train: no weight gradients for the base
    loss_fn = with_base_reference(dpo_loss)                  # jaxpost.algorithms: DPO reference = base, no copy
    config, params = merge_lora(config, params)              # fold in, then save_hf
    save_adapters(path, params, config.lora)                 # or only the adapters

The adapter files use PEFT's names and layout (``adapter_model.safetensors``
with ``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]``, plus
``adapter_config.json``).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.api import abstract, logical_axes
from jaxpost.models.config import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, LoraConfig, ModelConfig
from jaxpost.models.layers import lora_a_init
from jaxpost.models.layout import is_scanned, to_layout
from jaxpost.models.safetensors_io import SafetensorsFile, save_file

__all__ = [
    "LoraConfig", "apply_lora", "has_adapters", "trainable_mask", "without_adapters", "merge_lora",
    "save_adapters", "load_adapters", "set_adapters",
]

ADAPTER_KEYS = ("lora_a", "lora_b")
# Heads that are trained with the adapters (PEFT's ``modules_to_save``): a score head is new or task-specific.
TRAINED_HEADS = ("score",)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_BLOCK_OF = {**{p: "attn" for p in ATTENTION_PROJECTIONS}, **{p: "mlp" for p in MLP_PROJECTIONS}}
_HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}
_PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_PEFT_HEAD = "base_model.model.score.weight"


def _key(k) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _is_adapter(path) -> bool:
    return bool(path) and _key(path[-1]) in ADAPTER_KEYS


def _is_trained(path) -> bool:
    return _is_adapter(path) or (bool(path) and _key(path[0]) in TRAINED_HEADS)


def has_adapters(params: Any) -> bool:
    """True if any leaf of ``params`` is a ``lora_a``/``lora_b`` adapter."""
    return any(_is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def trainable_mask(params: Any) -> Any:
    """Bool tree over ``params``: True on adapters (``lora_a``, ``lora_b``) and on a ``score`` head.

    Pass it as ``make_optimizer(trainable_mask=...)``: every other leaf gets
    an exactly-zero update and no optimizer state.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: _is_trained(p), params)


def _adapter_sites(shapes: dict) -> list[tuple]:
    """Key paths (up to the Linear) of every adapted projection, in tree order."""
    sites = []
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        if _key(path[-1]) == "lora_a":
            sites.append(tuple(_key(k) for k in path[:-1]))
    return sites


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _path_str(path) -> str:
    return "params" + "".join(f"[{k!r}]" for k in path)


def _copy_dicts(tree):
    """A copy of the nested dicts; the array leaves are shared, not copied."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def apply_lora(config: ModelConfig, params: dict, lora_config: LoraConfig, seed: int = 0,
               partitioner=None) -> tuple[ModelConfig, Any, dict, dict]:
    """Adds adapters to a base model -> ``(config, graphdef, params, trainable_mask)``.

    ``config`` gains ``lora=lora_config``; ``params`` gains, on each
    targeted projection, ``lora_a ~ U(+-1/sqrt(in))`` drawn from
    ``fold_in(PRNGKey(seed), crc32(path))`` and ``lora_b = 0``, so the
    adapted model computes exactly the base model's outputs until trained.
    The base arrays are shared with the input (nothing is copied). With a
    partitioner the adapters are created directly in their shards (logical
    axes: the projection's input/output axis, None on the rank).
    ``trainable_mask`` is :func:`trainable_mask` of the new params.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a LoraConfig, got {type(lora_config).__name__}")
    if config.lora is not None:
        raise ValueError(f"config already has adapters ({config.lora}); merge_lora first to stack another set")
    if has_adapters(params):
        raise ValueError("params already hold lora_a/lora_b adapters but config.lora is None")
    new_config = config.replace(lora=lora_config)
    graphdef, shapes = abstract(new_config)
    given = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(abstract(config)[1])[0]:
        k = jax.tree_util.keystr(path)
        if k not in given:
            raise KeyError(f"params{k} is missing: params do not match the model config")
        if tuple(given[k].shape) != tuple(want.shape):
            raise ValueError(f"params{k} has shape {tuple(given[k].shape)}, the config expects {tuple(want.shape)}")
    sites = _adapter_sites(shapes)

    def init():
        root = jax.random.PRNGKey(seed)
        out = {}
        for site in sites:
            a = _get(shapes, site + ("lora_a",))
            b = _get(shapes, site + ("lora_b",))
            # Keyed by the unrolled path of each layer, so both layouts draw the same adapters.
            draw = lambda unrolled_site: lora_a_init(
                jax.random.fold_in(root, zlib.crc32(_path_str(unrolled_site).encode()) & 0x7FFFFFFF),
                a.shape[-2], a.shape[-1])
            if a.ndim == 3:  # scanned layout: [L, in, r]
                init_a = jnp.stack([draw(site[:1] + (i,) + site[1:]) for i in range(a.shape[0])])
            else:
                init_a = draw(site)
            out[site] = (init_a.astype(a.dtype), jnp.zeros(b.shape, b.dtype))
        return out

    out_shardings = None
    if partitioner is not None:
        axes = logical_axes(new_config)
        out_shardings = {site: (partitioner.sharding(_get(axes, site + ("lora_a",))),
                                partitioner.sharding(_get(axes, site + ("lora_b",)))) for site in sites}
    adapters = jax.jit(init, out_shardings=out_shardings)()
    new_params = _copy_dicts(params)
    for site, (a, b) in adapters.items():
        node = _get(new_params, site)
        node["lora_a"], node["lora_b"] = a, b
    return new_config, graphdef, new_params, trainable_mask(new_params)


def without_adapters(params: dict) -> dict:
    """The base model as a params tree of the adapted model: every ``lora_b`` replaced by zeros.

    ``x W + s (x A) 0 = x W`` exactly, so this computes the base model's
    outputs with the adapted graphdef. The base arrays are shared, not
    copied; the zeros are ``r x out`` per projection (constants under jit).
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _key(p[-1]) == "lora_b" else x, params)


def merge_lora(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """Folds the adapters into the base: ``W <- W + (alpha / r) * A @ B`` -> ``(config, params)``.

    The product is formed in float32 (this is the one place ``A B`` is
    materialised) and cast to ``W``'s dtype. The result has the base
    model's layout (``config.lora = None``, no adapter leaves), ready for
    :func:`jaxpost.models.save_hf`. The input is not modified.
    """
    if config.lora is None:
        raise ValueError("config.lora is None: there are no adapters to merge")
    sites = _adapter_sites(params)
    if not sites:
        raise ValueError("config.lora is set but params hold no lora_a/lora_b adapters")
    scale = config.lora.scale
    out = _copy_dicts(params)
    for site in sites:
        node = _get(out, site)
        w, a, b = node["kernel"], node.pop("lora_a"), node.pop("lora_b")
        delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),  # per layer when stacked
                           precision=jax.lax.Precision.HIGHEST)
        node["kernel"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
    return config.replace(lora=None), out


# ---------------------------------------------------------------- adapter files


def _peft_name(site: tuple, which: str) -> str:
    layers, i, block, proj = site
    if layers != "layers" or block not in _HF_BLOCK:
        raise ValueError(f"Unexpected adapter location {_path_str(site)}")
    return f"base_model.model.model.layers.{i}.{_HF_BLOCK[block]}.{proj}.lora_{which}.weight"


def save_adapters(path: str | os.PathLike, params: dict, lora_config: LoraConfig) -> Path:
    """Writes only the adapters (and a score head if present) to directory ``path``.

    ``adapter_model.safetensors`` in PEFT's layout (``lora_A.weight = A.T``
    ``[r, in]``, ``lora_B.weight = B.T`` ``[out, r]``, the score head as
    ``base_model.model.score.weight`` ``[1, D]``) and ``adapter_config.json``
    (PEFT's keys: ``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``...). Returns ``path``.
    """
    path = Path(path)
    sites = _adapter_sites(params)
    if not sites:
        raise ValueError("params hold no lora_a/lora_b adapters to save")
    tensors = {}
    for site in sites:
        node = _get(params, site)
        a, b = np.asarray(jax.device_get(node["lora_a"])), np.asarray(jax.device_get(node["lora_b"]))
        if a.shape[-1] != lora_config.rank or b.shape[-2] != lora_config.rank:
            raise ValueError(f"{_path_str(site)} has rank {a.shape[-1]}, lora_config.rank is {lora_config.rank}")
        # One PEFT tensor per layer: a stacked (scanned) adapter [L, in, r] is written layer by layer.
        layers = [(site, a, b)] if a.ndim == 2 else [(site[:1] + (i,) + site[1:], a[i], b[i]) for i in range(len(a))]
        for layer_site, la, lb in layers:
            tensors[_peft_name(layer_site, "A")] = np.ascontiguousarray(la.T)
            tensors[_peft_name(layer_site, "B")] = np.ascontiguousarray(lb.T)
    has_head = "score" in params
    if has_head:
        tensors[_PEFT_HEAD] = np.ascontiguousarray(np.asarray(jax.device_get(params["score"]["kernel"])).T)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    meta = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if has_head else "CAUSAL_LM", "r": lora_config.rank,
        "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "target_modules": list(lora_config.targets), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": ["score"] if has_head else None, "base_model_name_or_path": None,
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_adapters(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Reads :func:`save_adapters`' output -> ``(lora_config, adapters)``.

    ``adapters`` is a partial params tree of numpy arrays in jaxpost layout
    (``adapters["layers"][i]["attn"]["q_proj"]["lora_a"]`` ``[in, r]``,
    ``["score"]["kernel"]`` ``[D, 1]`` if saved); put it into a model's
    params with :func:`set_adapters`. Raises naming the file and tensor for
    unknown names or a rank that disagrees with the config.
    """
    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found (expected a directory written by save_adapters)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type={meta.get('peft_type')!r}, only LORA adapters are supported")
    lora_config = LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                             dropout=float(meta.get("lora_dropout", 0.0)), targets=tuple(meta["target_modules"]))
    f = SafetensorsFile(weights)
    adapters: dict = {}
    for name in f.keys():
        if name == _PEFT_HEAD:
            adapters["score"] = {"kernel": np.asarray(f.get(name)).T}
            continue
        m = _PEFT_NAME.match(name)
        if m is None or m.group(3) not in _BLOCK_OF or _HF_BLOCK[_BLOCK_OF[m.group(3)]] != m.group(2):
            raise ValueError(f"{weights}: tensor {name!r} is not a LoRA adapter of a supported projection")
        i, proj, which = int(m.group(1)), m.group(3), m.group(4)
        if proj not in lora_config.targets:
            raise ValueError(f"{weights}: tensor {name!r} adapts {proj}, which {cfg_file.name} does not target "
                             f"({list(lora_config.targets)})")
        x = np.asarray(f.get(name)).T
        rank_dim = 1 if which == "A" else 0
        if x.shape[rank_dim] != lora_config.rank:
            raise ValueError(f"{weights}: tensor {name!r} has shape {f.shape(name)}, its rank dimension should "
                             f"be r={lora_config.rank}")
        node = adapters.setdefault("layers", {}).setdefault(i, {}).setdefault(_BLOCK_OF[proj], {}).setdefault(proj, {})
        node["lora_a" if which == "A" else "lora_b"] = x
    return lora_config, adapters


def set_adapters(params: dict, adapters: dict) -> dict:
    """``params`` with the leaves present in ``adapters`` replaced (same path, shape and sharding).

    Every leaf of ``adapters`` must exist in ``params`` with the same shape,
    else ``KeyError``/``ValueError`` naming the path. Values are cast to the
    existing leaf's dtype and placed with its sharding. Returns a new tree;
    other leaves are shared with ``params``. Adapters in the unrolled layout
    (as :func:`load_adapters` reads them) are stacked first when ``params``
    are scanned.
    """
    if is_scanned(params):
        adapters = to_layout(adapters, scanned=True)
    out = _copy_dicts(params)
    for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = tuple(_key(k) for k in path)
        node = out
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise KeyError(f"{_path_str(keys)} is not in the model's params (is config.lora the same?)")
            node = node[k]
        if keys[-1] not in node:
            raise KeyError(f"{_path_str(keys)} is not in the model's params (is config.lora the same?)")
        old = node[keys[-1]]
        if tuple(np.shape(x)) != tuple(old.shape):
            raise ValueError(f"{_path_str(keys)} has shape {tuple(np.shape(x))}, the model expects {tuple(old.shape)}")
        sharding = getattr(old, "sharding", None)
        node[keys[-1]] = jax.device_put(np.asarray(x).astype(old.dtype), sharding)
    return out
