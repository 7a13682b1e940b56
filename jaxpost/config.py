"""gin plumbing: config search paths, parsing files + bindings, type checks, plug-ins.

Command lines take ``--gin_file=PATH`` (repeatable) and ``--gin.KEY=VALUE``
bindings (e.g. ``--gin.ModelConfig.hidden_size=128``). An unknown
configurable or parameter, a value of the wrong type for the configurable's
annotation, and a ``%gin.REQUIRED`` key left unset raise :class:`ConfigError`
(a :class:`jaxpost.errors.UserError`) naming the key, right after parsing.

Sub-configs of a run (``loop: LoopConfig | None = None``) are built at call
time with :func:`build`, so ``LoopConfig.num_steps = 50`` applies without
``sft.loop = @LoopConfig()``.

Plug-ins (reward functions, scorers, configurables of your own) come from
``module:attr`` or ``path/to/file.py:attr`` specs (:func:`import_object`) or
whole modules (:func:`import_modules`, ``jaxpost train --import MODULE``, or
``import MODULE`` in a gin file); the current directory is on the import path.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import pathlib
import re
import sys
import types
import typing
from typing import Any, Callable, Sequence

import gin
import gin.config as _gin

from jaxpost.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(UserError):
    """A gin file or binding that does not parse, names an unknown key, or has a value of the wrong type."""


def register_configurables() -> None:
    """Imports every module that defines gin configurables."""
    import jaxpost.compile_cache  # noqa: F401
    import jaxpost.recipes  # noqa: F401  (imports models, train, data, losses)


def resolve_config_path(path: str) -> str:
    """``path`` as given if it exists, else relative to the repo's ``configs/``."""
    p = pathlib.Path(path)
    for cand in (p, REPO_ROOT / p, CONFIG_DIR / p):
        if cand.exists():
            return str(cand)
    raise ConfigError(f"gin file not found: {path} (looked in ., {REPO_ROOT}, {CONFIG_DIR}); "
                      f"give an existing --gin_file path")


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Clears gin, then parses ``gin_files`` (in order) and ``bindings`` (last wins), and checks them.

    Raises :class:`ConfigError` (nothing is built or loaded yet) for a file
    that does not exist or parse, an unknown configurable or parameter, a
    value whose type does not match the parameter's annotation
    (:func:`check_bindings`) and, with ``finalize``, a key a file marks
    ``%gin.REQUIRED`` that no later file or binding sets. ``finalize=False``
    leaves the config unlocked and allows unset ``%gin.REQUIRED`` keys (for
    listing keys, or adding bindings later).
    """
    register_configurables()
    _cwd_on_path()  # `import my_rewards` in a gin file finds a module in the working directory
    _guard_gin_file_readers()
    gin.clear_config()
    gin.add_config_file_search_path(str(REPO_ROOT))
    gin.add_config_file_search_path(str(CONFIG_DIR))
    files = [resolve_config_path(f) for f in gin_files]
    quiet = _DropGinProbes()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
        check_bindings()
        if finalize:
            gin.finalize()
    except ConfigError:
        raise
    except (ValueError, KeyError, SyntaxError, ImportError) as e:
        msg = _first_lines(str(e))
        m = re.search(r"(\S+) set to `%gin.REQUIRED` but not subsequently overridden", msg)
        if m:
            raise ConfigError(f"required key {m.group(1)} is not set (a gin file marks it %gin.REQUIRED); add "
                              f"--gin.{m.group(1)}=VALUE or bind it in your gin file. `jaxpost train --gin_file=... "
                              f"--list_keys` lists every key of the run") from None
        key = _key_in_error(msg)
        hint = f" (unknown or invalid key: {key})" if key else ""
        close = suggest_keys(key) if key else []
        fix = ((f"; did you mean {' or '.join(close)}?" if close else "; check the spelling:")
               + " `jaxpost train --gin_file=... --list_keys` lists every key the run reads" if key else "")
        raise ConfigError(f"Invalid gin configuration{hint}: {msg}{fix}") from None
    finally:
        logging.getLogger().removeFilter(quiet)


def _guard_gin_file_readers() -> None:
    """Makes gin's package-path probe of an include answer "not here" instead of raising ``TypeError``.

    gin looks for ``include 'configs/x.gin'`` relative to the working
    directory first, and if it is not there asks ``importlib`` for a package
    ``configs``; a plain ``configs/`` directory on ``sys.path`` (the user's
    own, or this repository's) is a namespace package without a file, and
    gin's probe then crashes before it tries the search paths that hold it.
    """
    for i, (reader, exists) in enumerate(_gin._FILE_READERS):
        if getattr(exists, "_jaxpost_guarded", False):
            continue

        def guarded(path, _exists=exists):
            try:
                return _exists(path)
            except TypeError:
                return False

        guarded._jaxpost_guarded = True
        _gin._FILE_READERS[i] = (reader, guarded)


def _first_lines(msg: str) -> str:
    """gin's message without its source-pointer caret line and the ``In call to configurable`` trail."""
    keep = [ln for ln in msg.splitlines() if ln.strip() and set(ln.strip()) != {"^"}
            and not ln.strip().startswith("In call to configurable")]
    return " ".join(" ".join(keep).split())


class _DropGinProbes(logging.Filter):
    """gin logs an error for every search-path candidate of an include before it finds the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Path not found:")


def suggest_keys(key: str, limit: int = 3) -> list[str]:
    """Keys a user may have meant by the unknown ``key`` (``Configurable.param``, or a configurable's name).

    Among the keys some run reads (:func:`jaxpost.keys.every_key_name`), in
    this order: the same parameter under another configurable
    (``sft.learning_rate`` -> ``make_optimizer.learning_rate``), close
    spellings of the parameter under the same configurable
    (``LoopConfig.num_step`` -> ``LoopConfig.num_steps``), close spellings
    under any configurable; for a bare name, close configurable names.
    """
    import difflib

    from jaxpost.keys import every_key_name

    params: dict[str, list[str]] = {}
    for k in every_key_name():
        conf, _, param = k.rpartition(".")
        params.setdefault(conf, []).append(param)
    name, _, param = key.rpartition(".")
    if not name:
        return difflib.get_close_matches(key, list(params), n=limit, cutoff=0.75)
    found = [f"{c}.{param}" for c, ps in params.items() if param in ps and c != name]
    found += [f"{name}.{p}" for p in difflib.get_close_matches(param, params.get(name, []), n=limit, cutoff=0.75)]
    by_param: dict[str, list[str]] = {}
    for c, ps in params.items():
        for p in ps:
            by_param.setdefault(p, []).append(f"{c}.{p}")
    found += [k for p in difflib.get_close_matches(param, list(by_param), n=limit, cutoff=0.8) for k in by_param[p]]
    return list(dict.fromkeys(k for k in found if k != key))[:limit]


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


def unread_bindings(bindings: Sequence[str]) -> list[str]:
    """The keys of ``bindings`` (``"KEY = VALUE"``, as :func:`split_gin_args` gives them) that nothing has read.

    A key is read once gin has supplied it to a call: it is then in gin's
    operative config. Bound but unread means the run never calls that
    configurable, or every call passes that parameter itself (a
    ``SamplingConfig.temperature`` binding in a GRPO run, whose sampler
    takes ``RolloutConfig.temperature``). Macros (no ``.``) are not keys.
    """
    read = _read_keys()
    keys = [b.split("=", 1)[0].strip() for b in bindings]
    return [k for k in keys if "." in k.split("/")[-1] and k not in read]


_FILE_BINDING = re.compile(r"^([A-Za-z_][\w./]*\.[A-Za-z_]\w*)\s*=", re.M)


def user_file_bindings(gin_files: Sequence[str]) -> dict[str, list[str]]:
    """``{file: ["KEY = ...", ...]}`` for the gin files given that are not jaxpost's own (``configs/``).

    The keys a user wrote themselves, for :func:`unread_bindings`; the
    shipped presets bind keys for many kinds of run (a model preset's
    ``ModelConfig`` fields when ``init_from`` gives the model), so an unread
    one there is no mistake. Lines of a binding's value (indented) and
    macros (no ``.``) are not keys.
    """
    shipped = CONFIG_DIR.resolve()
    out = {}
    for f in gin_files:
        path = pathlib.Path(resolve_config_path(f)).resolve()
        if path.is_relative_to(shipped):
            continue
        out[f] = [f"{key} = ..." for key in _FILE_BINDING.findall(path.read_text(encoding="utf-8"))]
    return out


def read_keys_like(key: str) -> list[str]:
    """Keys the run read with ``key``'s parameter name: ``OnlineConfig.progress`` for ``LoopConfig.progress``.

    What a misplaced binding (:func:`unread_bindings`) was probably meant for.
    """
    param = key.rsplit(".", 1)[-1]
    return sorted(k for k in _read_keys() if k.rsplit(".", 1)[-1] == param and k != key)


def _read_keys() -> set[str]:
    return set(re.findall(r"^([\w./]+)\s*=", gin.operative_config_str(), re.M))


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


# --- sub-configs built at call time -----------------------------------------------------------------------------

def bound_value(key: str) -> Any:
    """What gin binds ``key`` (``make_scorer.reward_model``) to, unscoped; None when it binds nothing."""
    try:
        return gin.query_parameter(key)
    except ValueError:  # not bound
        return None


def build(cls: type, given: Any = None, **defaults: Any) -> Any:
    """``given`` if not None, else ``cls()`` built now, with gin's bindings of ``cls`` applied.

    A run's sub-config parameter defaults to None and is built here, at call
    time, so ``LoopConfig.num_steps = 50`` applies even when the gin files
    never bind ``sft.loop = @LoopConfig()`` (a default ``LoopConfig()`` in a
    signature would be built at import time, before any binding, and the
    binding would be silently ignored). ``defaults`` are the run's own
    defaults for fields of ``cls`` (GRPO's ``group_size=8``); each is used
    only where gin binds nothing for that field, since an explicit argument
    would override gin's binding.
    """
    if given is not None:
        return given
    bound = gin.get_bindings(cls, resolve_references=False)
    return cls(**{k: v for k, v in defaults.items() if k not in bound})


def build_if_bound(cls: type, given: Any = None) -> Any:
    """``given`` if not None; else ``cls()`` when gin binds any field of ``cls``; else None.

    For sub-configs whose absence means something (``model=None``: take the
    model from ``init_from``): a bound ``ModelConfig.dtype = 'bfloat16'``
    still reaches the run instead of being ignored.
    """
    if given is not None:
        return given
    return cls() if gin.get_bindings(cls, resolve_references=False) else None


# --- type checks of bound values ---------------------------------------------------------------------------------

_NOT_CHECKED = object()  # a value only known when the run calls it (a reference, an unbound macro)


def check_bindings() -> None:
    """Checks every bound literal against its configurable's type annotation; raises :class:`ConfigError`.

    ``LoopConfig.num_steps = 'abc'`` fails here, in milliseconds, with
    ``LoopConfig.num_steps: expected int, got 'abc'`` instead of a
    ``TypeError`` deep inside the run. Checked: ``int`` (not bool),
    ``float`` (int accepted), ``bool``, ``str``, ``None``, unions, and the
    elements of tuples, lists, sequences and dicts; a gin configurable class
    never matches a literal. References (``@fn()``) are not checked, nor are
    annotations of other classes (they may convert what they are given).
    """
    for (scope, selector), params in list(_gin._CONFIG.items()):
        configurable = _gin._REGISTRY.get(selector)
        if configurable is None or selector in ("gin.macro", "gin.constant"):
            continue
        hints = _type_hints(configurable.wrapped)
        name = _gin._REGISTRY.minimal_selector(selector)
        for param, value in params.items():
            if param not in hints:
                continue
            value = _literal(value)
            if value is _NOT_CHECKED or _matches(value, hints[param]):
                continue
            key = f"{scope + '/' if scope else ''}{name}.{param}"
            raise ConfigError(f"{key}: expected {_type_name(hints[param])}, got {value!r}; fix the binding in "
                              f"your gin file or on the command line (--gin.{key}=VALUE)")


_VALUE_CHECKS: dict[str, list[Callable[..., None]]] = {}
_PASSES_ON: dict[str, Callable[[dict], tuple[Callable, dict[str, inspect.Parameter]]]] = {}


def checks_values_of(name: str, passes_on: Callable[[dict], tuple[Callable, dict[str, inspect.Parameter]]] | None = None
                     ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Registers the decorated function as a value check of the configurable ``name`` (``make_optimizer``).

    The check takes some of the configurable's parameters as keywords (all
    of them that it names; with ``**kwargs``, also the ones the configurable
    collects in its own ``**kwargs``) and raises :class:`UserError` naming
    ``name.<param>``. :func:`check_bound_values` runs it on the gin
    bindings, before a run loads anything; the configurable may also run it
    on what it is given, for callers that bypass gin (the recipes call
    :func:`check_values`; the loss and optimizer factories call their check). ``passes_on``, for a configurable with ``**kwargs``:
    ``passes_on(values)`` (its defaults and bound values) is the function
    those keywords go to and its parameters that can be bound, which
    ``--list_keys`` then lists as keys of ``name`` (:func:`passed_on_params`).
    """
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        _VALUE_CHECKS.setdefault(name, []).append(fn)
        if passes_on is not None:
            _PASSES_ON[name] = passes_on
        return fn
    return register


def passed_on_params(name: str, values: dict) -> tuple[Callable | None, dict[str, inspect.Parameter]]:
    """``(function, parameters)`` that the configurable ``name`` passes its ``**kwargs`` on to, given its ``values``.

    ``(None, {})`` when ``name`` registered no ``passes_on`` or ``values``
    do not pick a function (e.g. an unknown loss ``kind``).
    """
    passes_on = _PASSES_ON.get(name)
    if passes_on is None:
        return None, {}
    try:
        return passes_on(values)
    except (KeyError, TypeError, ValueError):
        return None, {}


def check_values(name: str, values: dict[str, Any]) -> None:
    """Runs the value checks registered for the configurable ``name`` on ``values``, its arguments by name.

    A configurable calls this on what it was given (``check_values("grpo",
    locals())`` first thing), so that callers who bypass gin get the same
    one-line :class:`UserError` that :func:`check_bound_values` gives a run
    before anything loads. Each check gets the values it takes (a check
    with ``**kwargs`` gets all of them).
    """
    configurable = _gin._REGISTRY.get_match(name)
    own = inspect.signature(configurable.wrapped).parameters if configurable is not None else values
    for check in _VALUE_CHECKS.get(name, []):
        _run_check(check, values, own)


def _run_check(check: Callable[..., None], values: dict[str, Any], own) -> None:
    """``check`` on the ``values`` it takes: those it names and, when it has ``**kwargs``, those the
    configurable's own parameters ``own`` lack (what the configurable collects in its ``**kwargs``)."""
    takes = inspect.signature(check).parameters
    extra = any(p.kind is p.VAR_KEYWORD for p in takes.values())
    check(**{k: v for k, v in values.items() if k in takes or (extra and k not in own)})


def check_bound_values() -> None:
    """Runs every registered value check (:func:`checks_values_of`) on the parsed gin config; raises :class:`UserError`.

    Each check gets the configurable's defaults overlaid with the literal
    values bound to it (macros resolved; references are left to the call),
    once per scope that binds it: in scope ``a/b``, the bindings of no scope,
    then of ``a``, then of ``a/b``, as gin applies them.
    """
    config = dict(_gin._CONFIG)
    for scope, selector in list(config):
        configurable = _gin._REGISTRY.get(selector)
        checks = _VALUE_CHECKS.get(getattr(configurable, "name", None), [])
        if not checks:
            continue
        own = inspect.signature(configurable.wrapped).parameters
        values = {n: p.default for n, p in own.items() if p.default is not p.empty and p.default is not gin.REQUIRED}
        parts = scope.split("/") if scope else []
        for outer in ["/".join(parts[:i]) for i in range(len(parts) + 1)]:
            for param, value in config.get((outer, selector), {}).items():
                value = _literal(value)
                if value is not _NOT_CHECKED:
                    values[param] = value
        for check in checks:
            _run_check(check, values, own)


def _type_hints(fn_or_cls: Any) -> dict[str, Any]:
    """Resolved annotations of a function's parameters or a dataclass's fields; unresolvable ones left out."""
    target = fn_or_cls
    if inspect.isclass(fn_or_cls) and not dataclasses.is_dataclass(fn_or_cls):
        target = fn_or_cls.__init__
    target = inspect.unwrap(target)
    raw = dict(getattr(target, "__annotations__", {}) or {})
    if dataclasses.is_dataclass(fn_or_cls):
        raw = {}
        for klass in reversed(fn_or_cls.__mro__):
            raw.update(getattr(klass, "__annotations__", {}) or {})
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    namespace = dict(vars(module)) if module else {}
    out = {}
    for k, ann in raw.items():
        if k == "return":
            continue
        try:
            out[k] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307  (our own annotations)
        except Exception:  # a name only imported under TYPE_CHECKING: skip, the run checks it
            continue
    return out


def _literal(value: Any) -> Any:
    """The value gin will pass, as far as it is known before the call (macros resolved)."""
    if isinstance(value, _gin.ConfigurableReference):
        if value.configurable.selector == "gin.macro" and value.scopes:
            try:
                return _literal(gin.query_parameter("%" + "/".join(value.scopes)))
            except ValueError:
                return _NOT_CHECKED
        return _NOT_CHECKED
    if isinstance(value, (list, tuple)):
        items = [_literal(v) for v in value]
        return _NOT_CHECKED if any(v is _NOT_CHECKED for v in items) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _literal(v) for k, v in value.items()}
        return _NOT_CHECKED if any(v is _NOT_CHECKED for v in items.values()) else items
    return value


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (a gin literal) can be the argument annotated ``tp``; lenient where unsure."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.TypeVar)):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args)))
    if origin in (list, collections.abc.Sequence) or tp in (list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if inspect.isclass(tp) and _gin._inverse_lookup(tp) is not None:
        return isinstance(value, tp)  # a configurable class (ModelConfig...) is bound as @Class(), never a literal
    return True


def _type_name(tp: Any) -> str:
    """``int``, ``str | None``, ``tuple[int, ...]``: the annotation as a user reads it."""
    if tp is type(None):
        return "None"
    if inspect.isclass(tp) and not typing.get_args(tp):
        return tp.__name__
    text = str(tp).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")
    return re.sub(r"\b(?:[a-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)  # jaxpost.models.config.ModelConfig -> ModelConfig


# --- plug-ins: user modules and objects ----------------------------------------------------------------------------

def _cwd_on_path() -> None:
    # `python -m` puts the working directory on sys.path but the `jaxpost` console script does not.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_modules(specs: Sequence[str]) -> list[types.ModuleType]:
    """Imports each ``spec``, a module name (``my_rewards``) or a file (``path/to/my_rewards.py``).

    What a module registers on import (``@gin.configurable``,
    ``@register_reward("name")``) is then usable in gin files and bindings.
    Module names are found on ``sys.path`` and in the current directory;
    files are relative to the current directory. A spec that does not
    import raises :class:`UserError` naming it.
    """
    _cwd_on_path()
    return [_import_module(spec, "--import") for spec in specs]


def _import_module(spec: str, what: str) -> types.ModuleType:
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = pathlib.Path(spec)
        if not path.is_file():
            raise UserError(f"{what} {spec!r}: no file {path.resolve()}; give an existing .py file (relative to "
                            f"{os.getcwd()}) or an importable module name")
        name = "jaxpost_plugin_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
        if name in sys.modules:  # the same file twice in one process: one module, registrations run once
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise UserError(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise UserError(f"{what} {spec!r}: no module named {e.name!r} on the import path (the current directory "
                            f"{os.getcwd()} and sys.path); give a module name or a path/to/file.py") from e
        raise UserError(f"{what} {spec!r}: importing it failed: {e}") from e
    except Exception as e:
        raise UserError(f"{what} {spec!r}: importing it failed: {type(e).__name__}: {e}") from e


def is_object_spec(text: Any) -> bool:
    """Whether ``text`` reads as ``module:attr`` / ``path/to/file.py:attr`` (``gs://bucket/x`` does not)."""
    if not isinstance(text, str):
        return False
    module_part, sep, attr = text.rpartition(":")
    return bool(sep and module_part and attr and all(p.isidentifier() for p in attr.split(".")))


def import_object(spec: str, what: str = "plug-in") -> Any:
    """The object named by ``spec``: ``module:attr`` (``my_rewards:exact``) or ``path/to/file.py:attr``.

    ``attr`` may be dotted (``module:Class.method``). Module names are found
    on ``sys.path`` and in the current directory; file paths are relative to
    the current directory. ``what`` names the thing in errors (``reward``).
    A malformed spec, a module or file that does not import, or a missing
    attribute raises :class:`UserError` naming ``spec``.
    """
    if not is_object_spec(spec):
        raise UserError(f"{what} {spec!r} is not a 'module:function' or 'path/to/file.py:function' spec")
    module_part, _, attr = spec.rpartition(":")
    _cwd_on_path()
    obj = _import_module(module_part, what + " " + repr(spec) + ": module")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {spec!r}: {module_part} has no attribute {attr!r}; define it there or fix the "
                            f"name after the ':'")
        obj = getattr(obj, part)
    return obj
