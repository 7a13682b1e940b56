"""Hugging Face checkpoint exchange: ``config.json`` + safetensors <-> jaxpost params.

Supported architectures (``config.json`` ``architectures[0]``):
``{Llama,Mistral,Qwen2,Qwen3}ForCausalLM`` (head ``"lm"``) and
``{Llama,Mistral,Qwen2,Qwen3}ForSequenceClassification`` with one label
(head ``"score"``). Weights of PyTorch ``nn.Linear`` (``[out, in]``) are
transposed to jaxpost kernels (``[in, out]``); HF's rotate-half RoPE is
jaxpost's convention, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import paths
from jaxpost.errors import UserError
from jaxpost.hub import resolve_model_dir
from jaxpost.models.api import abstract, logical_axes
from jaxpost.models.config import FLOAT_DTYPES, ModelConfig, RopeScaling
from jaxpost.models.layout import layer_index
from jaxpost.models.safetensors_io import SafetensorsFile, save_file

_FAMILIES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3"}
_HEADS = {"ForCausalLM": "lm", "ForSequenceClassification": "score"}
SUPPORTED_ARCHITECTURES = tuple(f + h for f in _FAMILIES for h in _HEADS)
_CLASS_PREFIX = {v: k for k, v in _FAMILIES.items()}
# Tensors some checkpoints carry that hold no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def hf_config_to_model_config(hf: dict, dtype=None) -> ModelConfig:
    """Maps a Hugging Face ``config.json`` dict to a :class:`ModelConfig`.

    Reads both the transformers >= 5 layout (``rope_parameters``) and the
    older one (``rope_theta`` + ``rope_scaling``). ``dtype`` sets
    ``param_dtype`` and ``dtype``; by default the checkpoint's own
    (``dtype``/``torch_dtype``, else float32). Fields config.json does not
    describe (``lora``, ``remat``, ``attention``...) are the dataclass
    defaults, whatever gin binds. Raises ``ValueError`` naming the field for
    anything the model cannot represent.
    """
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Unsupported architecture {arch!r} in config.json; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    family = next(v for k, v in _FAMILIES.items() if arch.startswith(k) and arch[len(k):] in _HEADS)
    head = _HEADS[arch[len(_CLASS_PREFIX[family]):]]

    def unsupported(field, why):
        raise ValueError(f"config.json field {field}={hf.get(field)!r} is not supported for {arch}: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "only SwiGLU with silu is implemented")
    if hf.get("mlp_bias"):
        unsupported("mlp_bias", "MLP biases are not implemented")
    if family in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        unsupported("attention_bias", "it adds an o_proj bias, which is not implemented")
    if head == "score":
        n_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
        if n_labels != 1:
            raise ValueError(f"{arch} with {n_labels} labels is not supported; a score head has exactly 1")

    rope = dict(hf.get("rope_parameters") or {})
    if not rope or "rope_theta" not in rope:  # transformers < 5 layout
        legacy = dict(hf.get("rope_scaling") or {})
        rope = {**legacy, **rope, "rope_theta": hf.get("rope_theta", rope.get("rope_theta", 10000.0))}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                          hf.get("max_position_embeddings", 8192))))
    elif rope_type != "default":
        raise ValueError(f"config.json rope type {rope_type!r} is not supported; supported: 'default', 'llama3'")

    if family == "mistral":
        window = hf.get("sliding_window", 4096)  # transformers' MistralConfig default
    else:
        window = None
        if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            unsupported("use_sliding_window", "per-layer sliding windows are not implemented")

    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // n_heads and hf["hidden_size"] % n_heads == 0:
        head_dim = None
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = _dtype_name(dtype)
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"config.json dtype {dtype!r} is not supported; load the checkpoint with dtype= one of "
                         f"{', '.join(FLOAT_DTYPES)}")
    # Every field is passed, the unmapped ones at their dataclass defaults: ModelConfig is gin-configurable,
    # and a field left out would silently take the run's gin binding (e.g. ``ModelConfig.lora`` from
    # lora.gin), so the same config.json would read differently depending on the run's config.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**defaults, **dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        rope_theta=float(rope["rope_theta"]), rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3", max_position_embeddings=hf.get("max_position_embeddings", 2048),
        head=head, dtype=dtype, param_dtype=dtype, architecture=family, sliding_window=window)})


def check_exportable(config: ModelConfig) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``ModelConfig`` keys when ``config.architecture``'s
    Hugging Face class cannot hold the model.

    Llama and Mistral have neither a q/k/v bias nor q/k norms, Qwen2 has the
    bias (always), Qwen3 the norms (always), and only Mistral's config has a
    sliding window. Runs call it before training a fresh model, whose
    ``final/`` export would otherwise fail after the last step.
    """
    c, family = config, config.architecture
    cls = _CLASS_PREFIX[family]
    for key, owner in (("qkv_bias", "qwen2"), ("qk_norm", "qwen3")):
        value = getattr(c, key)
        if value != (family == owner):
            fix = f"ModelConfig.architecture = '{owner}'" if value else f"ModelConfig.{key} = True"
            raise UserError(f"ModelConfig.{key}={value} does not fit ModelConfig.architecture={family!r}: the "
                            f"Hugging Face {cls} model a run exports {'always has' if value is False else 'has no'} "
                            f"{key.replace('_', ' ')}; set {fix}")
    if c.sliding_window is not None and family != "mistral":
        raise UserError(f"ModelConfig.sliding_window={c.sliding_window} does not fit ModelConfig.architecture="
                        f"{family!r}: only the Hugging Face Mistral config has a sliding window; "
                        "set ModelConfig.architecture = 'mistral'")


def model_config_to_hf_config(config: ModelConfig, dtype=None) -> dict:
    """The ``config.json`` dict that transformers loads as the same model.

    Writes ``rope_parameters`` (transformers >= 5) and also ``rope_theta`` /
    ``rope_scaling`` for older readers.
    """
    c = config
    if c.lora is not None:
        raise ValueError("config.lora is set: Hugging Face configs describe the base model only; fold the adapters "
                         "in with jaxpost.models.lora.merge_lora(config, params) first (or save_adapters)")
    check_exportable(c)
    family = c.architecture
    head_suffix = {"lm": "ForCausalLM", "score": "ForSequenceClassification"}[c.head]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    legacy_scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings}
        rope.update(legacy_scaling)
    hf = {
        "architectures": [_CLASS_PREFIX[family] + head_suffix], "model_type": family,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": legacy_scaling, "rope_parameters": rope,
        "tie_word_embeddings": c.tie_embeddings, "dtype": _dtype_name(dtype or c.param_dtype),
    }
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family == "mistral":
        hf["sliding_window"] = c.sliding_window
    if family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if c.head == "score":
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
    return hf


def weight_map(config: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """The jaxpost <-> Hugging Face parameter-name map: ``(hf_name, path, transpose)`` per tensor.

    One entry for every tensor of ``config``'s model (what :func:`load_hf`
    reads and :func:`save_hf` writes), in checkpoint order: ``hf_name`` is
    the safetensors key of the ``transformers`` class (e.g.
    ``"model.layers.0.self_attn.q_proj.weight"``), ``path`` the key path
    into jaxpost's params dict (``("layers", 0, "attn", "q_proj",
    "kernel")``: ``params["layers"][0]["attn"]["q_proj"]["kernel"]``), and
    ``transpose`` is True where the HF tensor is a PyTorch ``nn.Linear``
    weight ``[out, in]`` and the jaxpost one a kernel ``[in, out]`` (the
    tensors are otherwise equal). LoRA adapters have no entry (merge them
    first, :func:`jaxpost.models.merge_lora`).
    """
    c = config
    out = [("model.embed_tokens.weight", ("embed", "embedding"), False)]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}self_attn.{name}.weight", ("layers", i, "attn", name, "kernel"), True))
            if c.qkv_bias and name != "o_proj":
                out.append((f"{p}self_attn.{name}.bias", ("layers", i, "attn", name, "bias"), False))
        if c.qk_norm:
            out.append((f"{p}self_attn.q_norm.weight", ("layers", i, "attn", "q_norm", "scale"), False))
            out.append((f"{p}self_attn.k_norm.weight", ("layers", i, "attn", "k_norm", "scale"), False))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append((f"{p}mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), True))
        out.append((f"{p}input_layernorm.weight", ("layers", i, "input_norm", "scale"), False))
        out.append((f"{p}post_attention_layernorm.weight", ("layers", i, "post_attn_norm", "scale"), False))
    out.append(("model.norm.weight", ("final_norm", "scale"), False))
    if c.head == "lm" and not c.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True))
    if c.head == "score":
        out.append(("score.weight", ("score", "kernel"), True))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _tensor_of(params: dict, jpath: tuple, config: ModelConfig):
    """The array at unrolled key path ``jpath`` (layer ``i`` of a stacked leaf in the scanned layout)."""
    leaf_path, i = layer_index(jpath, config.scanned)
    x = _get(params, leaf_path)
    return x if i is None else x[i]


def _checkpoint_files(path: Path) -> dict[str, str]:
    """tensor name -> file name, from the index or the single safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.exists():
        return {k: single.name for k in SafetensorsFile(single).keys()}
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (found {present}); "
                            "only safetensors checkpoints are read (never pickles)")


def load_hf(path: str | os.PathLike, partitioner=None, dtype=None, scan_layers: bool | None = None):
    """Loads a Hugging Face checkpoint directory (or Hub name, :mod:`jaxpost.hub`) -> ``(config, graphdef, params)``.

    Reads tensor by tensor (memory-mapped), transposes linear weights to
    ``[in, out]``, casts to ``dtype`` (default: the checkpoint's dtype) and,
    with a partitioner, puts each straight into its ``NamedSharding``.
    Raises ``KeyError`` naming a missing tensor and ``ValueError`` naming a
    mis-shaped one with expected and actual shapes. ``scan_layers`` sets
    ``ModelConfig.scan_layers`` (None: by depth); in the scanned layout
    (:mod:`jaxpost.models.layout`) each device reads only its slice of
    every layer's tensor.
    """
    path = Path(resolve_model_dir(path, key=None))  # a directory, or a Hub name through the hub cache
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found")
    config = hf_config_to_model_config(json.loads(cfg_file.read_text()), dtype=dtype).replace(scan_layers=scan_layers)
    graphdef, shapes = abstract(config)
    shardings = None if partitioner is None else partitioner.shardings(logical_axes(config), shapes)
    files = _checkpoint_files(path)
    opened: dict[str, SafetensorsFile] = {}
    used = set()

    def tensor(hf_name: str, jpath: tuple, transpose: bool, want) -> np.ndarray:
        """The checkpoint's tensor as a memory-mapped view in jaxpost's orientation, shape-checked."""
        if hf_name not in files:
            raise KeyError(f"{path}: tensor {hf_name!r} (for params{''.join(f'[{k!r}]' for k in jpath)}) "
                           f"is missing from the checkpoint")
        fname = files[hf_name]
        if fname not in opened:
            opened[fname] = SafetensorsFile(path / fname)
        f = opened[fname]
        if hf_name not in f.header:
            raise KeyError(f"{path / fname}: tensor {hf_name!r} listed in the index is not in the file")
        expected = tuple(reversed(want)) if transpose else tuple(want)
        if f.shape(hf_name) != expected:
            raise ValueError(f"{path / fname}: tensor {hf_name!r} has shape {f.shape(hf_name)}, "
                             f"expected {expected} for {config.architecture} config")
        used.add(hf_name)
        x = f.get(hf_name)
        return x.T if transpose else x

    # Scanned layout: the L per-layer tensors of one stacked leaf are read together.
    groups: dict[tuple, list] = {}
    for hf_name, jpath, transpose in weight_map(config):
        leaf_path, _ = layer_index(jpath, config.scanned)
        groups.setdefault(leaf_path, []).append((hf_name, jpath, transpose))
    params: dict = {}
    for leaf_path, members in groups.items():
        want = _get(shapes, leaf_path)
        sharding = None if shardings is None else _get(shardings, leaf_path)
        if not (config.scanned and leaf_path[0] == "layers"):
            (member,) = members
            x = jax.device_put(np.asarray(tensor(*member, want.shape)).astype(want.dtype), sharding)
        else:
            views = [tensor(*m, want.shape[1:]) for m in members]
            if sharding is None:
                x = jax.device_put(np.stack([np.asarray(v).astype(want.dtype) for v in views]))
            else:  # each device reads only its slice of every layer's (memory-mapped) tensor
                x = jax.make_array_from_callback(want.shape, sharding, lambda idx, views=views, dtype=want.dtype:
                                                 np.stack([np.asarray(v[idx[1:]]).astype(dtype)
                                                           for v in views[idx[0]]]))
        _set(params, leaf_path, x)
    unused = sorted(k for k in files if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                    and not (k == "lm_head.weight" and config.tie_embeddings))
    if unused:
        warnings.warn(f"{path}: {len(unused)} checkpoint tensors were not used, e.g. {unused[:5]}")
    return config, graphdef, params


def save_hf(path: str | os.PathLike, config: ModelConfig, params: dict, dtype=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None,
            generation_config: dict | None = None) -> None:
    """Writes ``config.json``, ``generation_config.json`` and safetensors weights.

    ``transformers.AutoModelFor{CausalLM,SequenceClassification}
    .from_pretrained(path)`` loads the result. Weights are cast to ``dtype``
    (default ``config.param_dtype``); above ``max_shard_bytes`` they are
    split into ``model-0000k-of-0000n.safetensors`` with an index. Tensors
    are gathered to the host one shard file at a time. ``extra_config`` is
    merged into config.json (e.g. token ids), ``generation_config`` into
    generation_config.json (e.g. a list of stop ids as ``eos_token_id``).

    A local ``path`` (relative to the working directory) is created if
    needed and each file in it is replaced atomically; other files in it
    are kept. A ``gs://`` URL is written to a local directory first and
    uploaded as a whole (:func:`jaxpost.paths.staged_dir`), replacing what
    was there.
    """
    model_config_to_hf_config(config)  # fail on an unexportable config (e.g. unmerged LoRA) before writing
    if paths.is_remote(path):  # safetensors are written to local files only
        with paths.staged_dir(path) as local:
            save_hf(local, config, params, dtype, max_shard_bytes, extra_config, generation_config)
        return
    path = Path(os.fspath(paths.resolve(path)))
    path.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(dtype or config.param_dtype)
    entries = weight_map(config)
    sizes = [math.prod(_tensor_of(params, p, config).shape) * dtype.itemsize for _, p, _ in entries]
    shards: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if shards[-1] and acc + size > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(i)
        acc += size
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_files = {}
    for name, members in zip(names, shards):
        tensors = {}
        for i in members:
            hf_name, jpath, transpose = entries[i]
            x = np.asarray(jax.device_get(_tensor_of(params, jpath, config))).astype(dtype)
            tensors[hf_name] = x.T if transpose else x
            weight_files[hf_name] = name
        save_file(tensors, path / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_files.items()))}
        paths.atomic_write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    hf = model_config_to_hf_config(config, dtype=dtype)
    hf.update(extra_config or {})
    paths.atomic_write_text(path / "config.json", json.dumps(hf, indent=2, sort_keys=True))
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    gen.update(generation_config or {})
    paths.atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True))
