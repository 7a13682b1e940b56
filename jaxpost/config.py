"""gin plumbing: config search paths, parsing files + bindings, operative config.

Command lines take ``--gin_file=PATH`` (repeatable) and ``--gin.KEY=VALUE``
bindings (e.g. ``--gin.ModelConfig.hidden_size=128``). An unknown
configurable or parameter raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import logging
import pathlib
import re
from typing import Sequence

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A gin file or binding that does not parse or names an unknown key."""


def register_configurables() -> None:
    """Imports every module that defines gin configurables."""
    import jaxpost.compile_cache  # noqa: F401
    import jaxpost.demo.task  # noqa: F401  (registers the demo's reward function)
    import jaxpost.pipelines  # noqa: F401  (imports models, train, data, losses)


def resolve_config_path(path: str) -> str:
    """``path`` as given if it exists, else relative to the repo's ``configs/``."""
    p = pathlib.Path(path)
    for cand in (p, REPO_ROOT / p, CONFIG_DIR / p):
        if cand.exists():
            return str(cand)
    raise ConfigError(f"gin file not found: {path} (looked in ., {REPO_ROOT}, {CONFIG_DIR})")


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Clears gin, then parses ``gin_files`` (in order) and ``bindings`` (last wins)."""
    register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(str(REPO_ROOT))
    gin.add_config_file_search_path(str(CONFIG_DIR))
    files = [resolve_config_path(f) for f in gin_files]
    quiet = _DropGinProbes()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=finalize)
    except (ValueError, KeyError, SyntaxError, ImportError) as e:
        key = _key_in_error(str(e))
        hint = f" (unknown or invalid key: {key})" if key else ""
        raise ConfigError(f"Invalid gin configuration{hint}: {e}") from None
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropGinProbes(logging.Filter):
    """gin logs an error for every search-path candidate of an include before it finds the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Path not found:")


def _key_in_error(msg: str) -> str | None:
    m = re.search(r"No configurable matching '([^']+)'", msg) or re.search(
        r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
    if not m:
        return None
    return ".".join(g for g in m.groups() if g)


def _gin_value(value: str) -> str:
    """Quotes bare strings so ``--gin.x.path=data.jsonl`` works without shell quoting."""
    v = value.strip()
    if v[:1] in "@%([{'\"" or v in ("True", "False", "None"):
        return v
    try:
        ast.literal_eval(v)
        return v
    except (ValueError, SyntaxError):
        return repr(v)


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Splits ``argv`` into (gin files, gin bindings, other args).

    Accepts ``--gin_file=F``/``--gin_file F`` and ``--gin.KEY=VALUE``/``--gin.KEY VALUE``.
    """
    files, bindings, rest = [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file"):
            files.append(arg.split("=", 1)[1] if "=" in arg else next(it))
        elif arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                key, value = body, next(it)
            bindings.append(f"{key} = {_gin_value(value)}")
        else:
            rest.append(arg)
    return files, bindings, rest
