"""Hugging Face Hub names for models, tokenizers and datasets, resolved through huggingface_hub's cache.

Everywhere a run takes a directory (``init_from``, ``tokenizer``,
``teacher_from``, ``train_data``...) it also takes a Hub name
(``"org/name"``). The order is always:

1. a local path (relative to the working directory) that exists;
2. the snapshot of that repository already in huggingface_hub's cache
   (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``,
   read when called) — this works offline and never waits on a network;
3. unless ``HF_HUB_OFFLINE=1``, a download of the files jaxpost reads into
   that cache (``snapshot_download``; token and endpoint as huggingface_hub
   configures them).

Anything else is a :class:`jaxpost.errors.UserError` that names the path or
name and says where it was looked for. Nothing downloaded is executed:
weights are safetensors, tokenizers are JSON, ``trust_remote_code`` is never
set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from jaxpost import paths
from jaxpost.errors import UserError

__all__ = ["hub_cache_dir", "hub_offline", "is_hub_name", "resolve_model_dir", "resolve_tokenizer_dir",
           "cached_dataset_dir", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any one of these makes a directory a tokenizer directory."""

_TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                       "*.model", "*.tiktoken", "chat_template.*", "config.json", "generation_config.json"]
# A model download also takes its tokenizer: `tokenizer` defaults to the model directory.
_MODEL_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *_TOKENIZER_PATTERNS]
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether Hub downloads are off (``HF_HUB_OFFLINE``), read now rather than at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache_dir() -> str:
    """huggingface_hub's cache directory, from the environment as it is now.

    ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default.
    Read at call time (huggingface_hub reads it once, at import), so a process
    that points these variables elsewhere later is honoured.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_hub_name(name: str) -> bool:
    """True when ``name`` is a valid repository id (``"name"`` or ``"org/name"``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _snapshot(name: str, repo_type: str, patterns: Sequence[str] | None,
              complete: Callable[[Path], bool]) -> tuple[Path | None, str]:
    """``(snapshot dir, "")`` from the cache or a download, or ``(None, what was tried)``."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        cached = Path(snapshot_download(name, repo_type=repo_type, cache_dir=cache, local_files_only=True))
        if complete(cached):
            return cached, ""
    except Exception:  # noqa: BLE001 -- not cached (LocalEntryNotFoundError) or a broken cache entry
        pass
    if hub_offline():
        return None, f"not in the Hugging Face cache {cache} (HF_HUB_OFFLINE=1, so nothing is downloaded)"
    try:
        path = Path(snapshot_download(name, repo_type=repo_type, cache_dir=cache, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- not found, gated, no network: all become one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, (f"not in the Hugging Face cache {cache}, and the Hub download failed "
                      f"({type(e).__name__}: {reason})")
    if not complete(path):
        return None, f"the Hub repository {name} has none of the files needed"
    return path, ""


def _local(name_or_path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(name_or_path))))


def _resolve(name_or_path: str | os.PathLike, what: str, key: str | None, patterns: Sequence[str],
             complete: Callable[[Path], bool], needs: str) -> str:
    text = os.fspath(name_or_path)
    if text.startswith(("gs://", "s3://")):  # object storage: a local copy, checked like a local directory
        try:
            text = paths.local_copy(text)
        except FileNotFoundError as e:
            raise UserError(f"{key or what}: {e}") from None
    local = _local(text)
    label = f"{key}={text!r}" if key else f"{what} {text!r}"
    if local.is_dir():
        if not complete(local) and complete(local / "final"):  # `runs/sft` for `runs/sft/final`
            raise UserError(f"{label} is a jaxpost run directory, not a {what} directory: the run exported its "
                            f"model to {os.path.join(text, 'final')}; pass that")
        if not complete(local):
            present = sorted(p.name for p in local.iterdir())[:12]
            raise UserError(f"{what} directory {local} ({label}) has no {needs} (it holds {present}); "
                            f"point it at a Hugging Face {what} directory")
        return str(local)
    if local.exists():
        raise UserError(f"{label} is a file ({local}); pass the directory that holds its {needs}")
    if not is_hub_name(text):
        raise UserError(f"{label} does not exist: no directory {local}; give an existing directory "
                        "or a Hugging Face Hub name such as 'org/name'")
    path, reason = _snapshot(text, "model", patterns, complete)
    if path is None:
        raise UserError(f"{label} not found: no local directory {local}, and as a Hub name it is {reason}; "
                        f"give an existing {what} directory, or a Hub name that is cached or reachable")
    return str(path)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def resolve_model_dir(name_or_path: str | os.PathLike, *, key: str | None = "init_from") -> str:
    """A local Hugging Face model directory for a directory or a Hub name.

    An existing directory is returned (absolute) as it is and must hold a
    ``config.json``; otherwise ``name_or_path`` is a Hub repository id whose
    snapshot (``config.json``, safetensors and tokenizer files) comes from the
    cache, else from the Hub unless offline. Raises :class:`UserError`
    naming ``key`` and the path/name and saying where it was looked for.
    """
    return _resolve(name_or_path, "model", key, _MODEL_PATTERNS, lambda p: (p / "config.json").is_file(),
                    "config.json")


def resolve_tokenizer_dir(name_or_path: str | os.PathLike, *, key: str | None = "tokenizer") -> str:
    """A local tokenizer directory for a directory or a Hub name (as :func:`resolve_model_dir`).

    The directory must hold one of :data:`TOKENIZER_FILES`; a Hub download
    takes the tokenizer files only.
    """
    return _resolve(name_or_path, "tokenizer", key, _TOKENIZER_PATTERNS, _has_tokenizer,
                    "tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")")


def cached_dataset_dir(name: str) -> Path | None:
    """The cached snapshot directory of the Hub dataset ``name``, or None when it is not cached.

    Never touches the network: downloads of datasets go through
    ``datasets.load_dataset`` itself, which fetches only the files of the
    requested config and split.
    """
    if not is_hub_name(name):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", cache_dir=hub_cache_dir(), local_files_only=True))
    except Exception:  # noqa: BLE001 -- not cached
        return None
