"""Model loading for a run: a Hugging Face checkpoint or a fresh init, with head switching and LoRA.

:func:`load_model` is how every recipe gets ``(config, graphdef, params)``;
:data:`RUN_FIELDS` are the fields a run's ``ModelConfig`` keeps over the
checkpoint's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import gin
import jax

from jaxpost.distributed import is_main_process
from jaxpost.errors import UserError
from jaxpost.models.api import abstract, create, logical_axes
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import load_hf
from jaxpost.models.lora import ADAPTER_CONFIG, apply_lora
from jaxpost.sharding import Partitioner

__all__ = ["RUN_FIELDS", "load_model", "load_reference"]


# How a run computes, not what the weights are: with ``init_from`` these come from the run's ModelConfig, every
# other field (shapes, rope, norms, architecture) from the checkpoint's config.json.
RUN_FIELDS = ("dtype", "remat", "attention", "stored_logits_mib", "lora", "scan_layers")


def _bound_fields(model: ModelConfig) -> set[str]:
    """Fields of ``model`` the user set: different from the dataclass default, or bound in gin (unscoped)."""
    out = set()
    for f in dataclasses.fields(model):
        if getattr(model, f.name) != f.default:
            out.add(f.name)
            continue
        try:  # a binding equal to the default (e.g. ModelConfig.num_layers = 2) is still the user's intent
            gin.query_parameter(f"ModelConfig.{f.name}")
            out.add(f.name)
        except ValueError:
            pass
    return out


def _warn_overridden(model: ModelConfig, loaded: ModelConfig, init_from: str, bound: set[str]) -> None:
    """One warning (main process) naming each bound field that the checkpoint's config.json overrides."""
    skip = set(RUN_FIELDS) | {"head", "param_dtype"}  # head: the pipeline's choice; param_dtype: honoured if bound
    clashes = [f"ModelConfig.{k} = {getattr(model, k)!r} (checkpoint: {getattr(loaded, k)!r})"
               for k in sorted(bound - skip) if getattr(model, k) != getattr(loaded, k)]
    if clashes and is_main_process():
        # stacklevel=2: one source location (load_model) for every caller, so Python's default filter shows it
        # once even when a run loads the same checkpoint twice (PPO's policy and value model).
        warnings.warn(f"init_from={init_from!r}: the checkpoint's config.json overrides the run's model bindings "
                      f"{'; '.join(clashes)}; the checkpoint's values are used. Drop these bindings (e.g. the model "
                      f"preset include) to silence this.", UserWarning, stacklevel=2)


def load_model(model: ModelConfig | None, init_from: str | None, partitioner: Partitioner, *,
               seed: int = 0, head: str | None = None) -> tuple[ModelConfig, Any, dict]:
    """``(config, graphdef, params)`` from a Hugging Face directory or a fresh init.

    ``init_from`` is a local HF model directory (``config.json`` +
    safetensors, e.g. the ``final/`` directory every jaxpost run exports) or
    None for a random init of ``model``. With ``init_from``, shapes come from
    the checkpoint and the fields in :data:`RUN_FIELDS` (``dtype``,
    ``remat``, ``attention``, ``stored_logits_mib``, ``lora``,
    ``scan_layers``) from
    ``model`` when given; ``param_dtype`` is the checkpoint's unless
    ``model`` sets it. A field ``model`` sets (non-default or bound in gin)
    that the checkpoint overrides is named in one ``UserWarning``. ``head``
    converts between heads: an LM checkpoint loaded with ``head="score"``
    keeps its body and gets a fresh scalar head (reward/value model from an
    SFT policy). With ``model.lora`` set, LoRA adapters are added to the
    loaded or initialised base (:func:`jaxpost.models.lora.apply_lora`) and
    :func:`jaxpost.train.fit.fit` then trains only the adapters (and a score head).
    Raises :class:`UserError` for neither ``model`` nor ``init_from``, and
    for an ``init_from`` that holds LoRA adapters instead of a model.
    """
    lora = model.lora if model is not None else None
    if init_from is None:
        if model is None:
            raise UserError("load_model: no model to build; give a ModelConfig (e.g. sft.model = @ModelConfig()) "
                            "or init_from = '<Hugging Face model directory>'")
        config = model.replace(lora=None) if head is None else model.replace(head=head, lora=None)
        graphdef, params = create(config, seed=seed, partitioner=partitioner)
    else:
        src = Path(init_from)
        if (src / ADAPTER_CONFIG).exists() and not (src / "config.json").exists():
            raise UserError(f"init_from={str(init_from)!r} holds LoRA adapters, not a model; use the merged model "
                            f"directory beside it (a LoRA run exports it as final/), or merge the adapters first")
        bound = _bound_fields(model) if model is not None else set()
        dtype = model.param_dtype if "param_dtype" in bound else None  # cast while loading: no second copy
        config, graphdef, params = load_hf(init_from, partitioner=partitioner, dtype=dtype,
                                           scan_layers=None if model is None else model.scan_layers)
        if model is not None:
            _warn_overridden(model, config, init_from, bound)
            # Not lora: the checkpoint is the plain base, apply_lora below adds the run's adapters to it.
            config = config.replace(**{k: getattr(model, k) for k in RUN_FIELDS if k != "lora"})
        if head is not None and head != config.head:
            config, graphdef, params = _switch_head(config, params, head, partitioner, seed)
        else:
            graphdef, _ = abstract(config)
    if lora is not None:
        config, graphdef, params, _ = apply_lora(config, params, lora, seed=seed, partitioner=partitioner)
    return config, graphdef, params


def load_reference(model: ModelConfig | None, reference_from: str | None, params: dict,
                   partitioner: Partitioner) -> dict:
    """A preference run's frozen reference: the weights of ``reference_from``, else a copy of ``params``.

    A copy, not the same arrays: the train step donates the policy's buffers.
    (Under LoRA without ``reference_from`` the runs use the base itself instead,
    :func:`jaxpost.algorithms.with_base_reference`, and never call this.)
    """
    if reference_from is not None:
        return load_model(model, reference_from, partitioner)[2]
    return jax.tree.map(lambda x: x.copy(), params)


def _switch_head(config: ModelConfig, params: dict, head: str, partitioner: Partitioner, seed: int):
    """Same body, new head -> ``(config, graphdef, params)``: fresh ``score`` (or ``lm_head``) weights.

    The body's arrays are reused as they are. The new head has the values
    :func:`jaxpost.models.create` gives it with ``seed``; only the head is
    materialised (the rest of the init is dead code in the compiled
    function), so no second body is ever allocated.
    """
    new_config = config.replace(head=head)
    graphdef, shapes = abstract(new_config)
    body = {k: v for k, v in params.items() if k in shapes and k not in ("lm_head", "score")}
    new_keys = [k for k in shapes if k not in body]
    shardings = None
    if partitioner is not None:
        axes = logical_axes(new_config)
        shardings = partitioner.shardings({k: axes[k] for k in new_keys}, {k: shapes[k] for k in new_keys})

    def init_head():
        _, fresh = create(new_config, seed=seed)
        return {k: fresh[k] for k in new_keys}

    return new_config, graphdef, {**body, **jax.jit(init_head, out_shardings=shardings)()}
