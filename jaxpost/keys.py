"""Every gin key a run reads, with its type, default, bound value and one-line doc (``--list_keys``).

    jaxpost train --gin_file=configs/experiments/demo/sft.gin --list_keys

Nothing here is a hand-kept list. Starting from what ``jaxpost train``
calls (``run``, whose ``task`` the gin files bind to ``@sft``, ``@grpo``...),
:func:`run_keys` reads the source of each function and class the run calls
inside ``jaxpost`` (its syntax tree, never executing it), follows the
references the gin files bind (``make_scorer.reward_functions =
[@make_reward()]``) and the configurable classes named in annotations
(``model: ModelConfig | None``, ``lora: LoraConfig | None``), and collects
every gin configurable it meets. A parameter that every call site passes
explicitly is not a key (gin would ignore a binding of it); the others are.
Types and defaults come from the signatures and dataclass fields, docs from
the ``Args:`` section of the docstring, a field's trailing ``# comment``, or
the docstring's sentence that names the parameter in double backticks.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import typing
from typing import Any, Callable, Iterable

import gin
import gin.config as _gin

from jaxpost import config as jp_config

__all__ = ["Key", "run_keys", "format_keys", "every_key_name"]


@dataclasses.dataclass(frozen=True)
class Key:
    """One gin key: ``name`` (``LoopConfig.num_steps``), annotation, default and bound value as text.

    ``required``: the run cannot start without a value (``gin.REQUIRED``,
    no default, or ``%gin.REQUIRED`` in a gin file); ``bound`` is the value
    the parsed gin files and bindings give it (None: unbound), and ``is_set``
    whether that value satisfies the key.
    """

    name: str
    type: str
    default: str
    doc: str
    required: bool
    bound: str | None

    @property
    def is_set(self) -> bool:
        return self.bound is not None and self.bound != "%gin.REQUIRED"


def run_keys(roots: Iterable[Callable] | None = None) -> list[Key]:
    """The keys the run described by the current gin config reads: required ones first, then by configurable.

    ``roots``: where the walk starts (default: ``jaxpost train``'s
    ``_train``, which calls ``compilation_cache`` and ``run``; ``run.task``
    leads to the method). Call after :func:`jaxpost.config.parse` (with
    ``finalize=False`` to list keys still marked ``%gin.REQUIRED``).
    Nothing is built or loaded.
    """
    if roots is None:
        from jaxpost import cli
        roots = [cli._train]
    walk = _Walk()
    for root in roots:
        walk.visit(root)
    keys: list[Key] = []
    for conf in walk.reached:
        keys.extend(_keys_of(conf, walk.passed.get(conf.selector), walk.run_defaults.get(conf.selector, {})))
    return sorted(keys, key=lambda k: not k.required)  # stable: configurables stay in the order the run meets them


def every_key_name() -> list[str]:
    """The names of the keys some ``jaxpost`` run reads, for suggesting one in place of an unknown key.

    Every recipe's walk (as :func:`run_keys`, so a parameter every call
    site passes, like ``make_schedule.learning_rate``, is left out), then
    every parameter of the package's configurables that no walk reaches
    (those only a gin reference calls, e.g. ``make_reward``).
    """
    from jaxpost import recipes
    from jaxpost.compile_cache import compilation_cache

    names, reached = [], set()
    for root in [getattr(recipes, name) for name in recipes.__all__] + [compilation_cache]:
        walk = _Walk()  # one per run: a parameter one run always passes may be another run's key
        walk.visit(root)
        names += [k.name for conf in walk.reached for k in _keys_of(conf, walk.passed.get(conf.selector), {})]
        reached |= {conf.selector for conf in walk.reached}
    for _, conf in _gin._REGISTRY.items():
        if _ours(conf.module) and conf.selector not in reached:
            names += [f"{_gin._REGISTRY.minimal_selector(conf.selector)}.{p}" for p in _params(conf.wrapped)]
    return list(dict.fromkeys(names))


def format_keys(keys: list[Key], title: str = "") -> str:
    """Text for a terminal: a ``Required`` block, then ``Optional``; each key on one line, its doc below.

    A line reads ``name: type = default``, then ``<- bound value`` where the
    gin files or bindings set one (``NOT SET`` for a required key without).
    """
    out = [title] if title else []
    for heading, group in (("Required", [k for k in keys if k.required]),
                           ("Optional", [k for k in keys if not k.required])):
        if not group:
            continue
        out.append(f"\n{heading} ({len(group)}):")
        for k in group:
            line = f"  {k.name}{': ' + k.type if k.type else ''} = {k.default}"
            if k.is_set:
                line += f"  <- {k.bound}"
            elif k.required:
                line += "  <- NOT SET"
            out.append(line)
            if k.doc:
                out.append(f"      {k.doc}")
    return "\n".join(out) + "\n"


# --- the walk over the run's code ---------------------------------------------------------------------------------

_BUILDERS = ("build", "build_if_bound")  # jaxpost.config.build(cls, given, **run_defaults)


@functools.lru_cache(maxsize=None)
def _syntax_nodes(fn: Callable) -> tuple[ast.AST, ...]:
    """Every node of ``fn``'s parsed source (none when it has no source); cached: several walks read ``fn``."""
    try:
        return tuple(ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))))
    except (OSError, TypeError, SyntaxError):
        return ()


class _Walk:
    """Visits functions and classes of ``jaxpost`` reachable from the roots, recording configurables."""

    def __init__(self):
        self.seen: set[int] = set()
        self.reached: list[_gin.Configurable] = []
        # selector -> one set of explicitly passed parameter names per call site (empty set: reached otherwise)
        self.passed: dict[str, list[set[str]]] = {}
        self.run_defaults: dict[str, dict[str, str]] = {}

    def visit(self, obj: Any, passed: set[str] | None = None) -> None:
        """Reads ``obj`` once; ``passed``: a call of it, with the parameters that call passes explicitly.

        A configurable met otherwise (named in an annotation, handed on as a
        value) records no call: if nothing calls it, every parameter is a key.
        """
        conf = _configurable(obj)
        if conf is not None:
            if passed is not None:
                self.passed.setdefault(conf.selector, []).append(passed)
            obj = conf.wrapped
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        if conf is not None:
            self.reached.append(conf)
            self._follow_bindings(conf)
            self._follow_annotations(conf.wrapped)
        for fn in _code_of(obj):
            self._walk_function(fn)

    def _follow_bindings(self, conf: _gin.Configurable) -> None:
        # `run.task = @sft`, `make_scorer.reward_functions = [@make_reward()]`: the gin files pick what runs.
        for (_, selector), params in list(_gin._CONFIG.items()):
            if selector != conf.selector:
                continue
            for value in params.values():
                for ref in _gin.iterate_references(value):
                    if ref.configurable.module != "gin":  # gin calls it with nothing passed: all its keys count
                        self.visit(ref.configurable.wrapped, set() if ref.evaluate else None)

    def _follow_annotations(self, obj: Any) -> None:
        for tp in jp_config._type_hints(obj).values():
            for cls in _classes_in(tp):
                if _configurable(cls) is not None:
                    self.visit(cls)

    def _walk_function(self, fn: Callable) -> None:
        nodes = _syntax_nodes(fn)
        if not nodes:
            return
        scope = dict(getattr(fn, "__globals__", {}))
        for node in nodes:  # imports inside the function (`from jaxpost.x import y` in a CLI handler)
            # jaxpost's own modules only: a getattr on a lazy third-party module (transformers) imports it.
            if (isinstance(node, ast.ImportFrom) and node.module and not node.level and node.module in sys.modules
                    and _ours(node.module)):
                for alias in node.names:
                    if hasattr(sys.modules[node.module], alias.name):
                        scope[alias.asname or alias.name] = getattr(sys.modules[node.module], alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in sys.modules and _ours(alias.name):
                        scope[alias.asname or alias.name.split(".")[0]] = (
                            sys.modules[alias.name] if alias.asname else sys.modules[alias.name.split(".")[0]])
        if getattr(fn, "__closure__", None):
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    scope[name] = cell.cell_contents
                except ValueError:  # an empty cell
                    pass
        callees = set()
        for node in nodes:
            if not isinstance(node, ast.Call):
                continue
            callees.add(id(node.func))
            target = _resolve(node.func, scope)
            if target is None:
                continue
            if getattr(target, "__name__", "") in _BUILDERS and getattr(target, "__module__", "") == "jaxpost.config":
                self._builder_call(fn, node, scope)
                continue
            conf = _configurable(target)
            if conf is None:
                self.visit(target)
                continue
            self.visit(target, _passed_params(conf.wrapped, node))
        for node in nodes:  # names used but not called here: callbacks, classes handed to a builder
            if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in callees:
                target = _resolve(node, scope)
                if target is not None and (inspect.isfunction(target) or inspect.isclass(target)):
                    self.visit(target)

    def _builder_call(self, fn: Callable, node: ast.Call, scope: dict) -> None:
        cls = _resolve(node.args[0], scope) if node.args else None
        conf = _configurable(cls) if cls is not None else None
        if conf is None:
            return
        owner = _configurable(fn)
        by = owner.name if owner is not None else fn.__name__
        for kw in node.keywords:
            if kw.arg is not None:
                self.run_defaults.setdefault(conf.selector, {})[kw.arg] = f"{ast.unparse(kw.value)} ({by}'s default)"
        self.visit(cls)


def _configurable(obj: Any) -> _gin.Configurable | None:
    try:
        return _gin._inverse_lookup(obj, allow_decorators=True)
    except TypeError:  # unhashable
        return None


def _ours(module: Any) -> bool:
    return isinstance(module, str) and (module == "jaxpost" or module.startswith("jaxpost."))


def _code_of(obj: Any) -> list[Callable]:
    """The Python functions of ``obj`` to read: itself, or every method of a ``jaxpost`` class."""
    if not str(getattr(obj, "__module__", "") or "").startswith("jaxpost"):
        return []
    if inspect.isclass(obj):
        out = []
        for value in vars(obj).values():
            value = getattr(value, "fget", None) or getattr(value, "__func__", value)  # property, static/classmethod
            value = inspect.unwrap(value) if callable(value) else value
            if inspect.isfunction(value) and value.__module__.startswith("jaxpost"):
                out.append(value)
        return out
    try:
        fn = inspect.unwrap(obj)
    except ValueError:
        return []
    return [fn] if inspect.isfunction(fn) else []


def _resolve(node: ast.AST, scope: dict) -> Any:
    """The object an expression ``a`` / ``a.b.c`` names in ``scope`` (None for locals, ``self.x``...)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in scope:
        return None
    obj = scope[node.id]
    for part in reversed(parts):
        if not _ours(getattr(obj, "__module__", None) or getattr(obj, "__name__", "")):
            return None  # jnp.sum, np.asarray...: not ours, and a lazy module's getattr would import it
        try:
            obj = getattr(obj, part)
        except Exception:  # noqa: BLE001  (a property that needs an instance)
            return None
    return obj


def _params(fn_or_cls: Any) -> dict[str, inspect.Parameter]:
    try:
        sig = inspect.signature(fn_or_cls)
    except (TypeError, ValueError):
        return {}
    return {n: p for n, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}


def _passed_params(fn_or_cls: Any, call: ast.Call) -> set[str]:
    """Parameters a call site passes explicitly (gin would ignore bindings of them there)."""
    if any(isinstance(a, ast.Starred) for a in call.args):
        return set()
    names = list(_params(fn_or_cls))
    passed = set(names[:len(call.args)])
    passed.update(kw.arg for kw in call.keywords if kw.arg is not None)
    return passed


def _classes_in(tp: Any) -> list[type]:
    if inspect.isclass(tp):
        return [tp]
    return [c for a in typing.get_args(tp) for c in _classes_in(a)]


# --- one configurable's keys ----------------------------------------------------------------------------------------

def _keys_of(conf: _gin.Configurable, sites: list[set[str]] | None, run_defaults: dict[str, str]) -> list[Key]:
    obj = conf.wrapped
    params = _params(obj)
    hints = jp_config._type_hints(obj)
    # A parameter every call site passes is not the user's to bind; one reached any other way is.
    always_passed = set.intersection(*sites) if sites else set()
    bound = _gin._CONFIG.get(("", conf.selector), {})
    name = _gin._REGISTRY.minimal_selector(conf.selector)
    docs = _param_docs(obj)
    out = []
    for p, param in params.items():
        if p in always_passed or (conf.denylist and p in conf.denylist) or (conf.allowlist and p not in conf.allowlist):
            continue
        default = param.default
        required = default is gin.REQUIRED or default is inspect.Parameter.empty
        value = bound.get(p, _UNBOUND)
        bound_text = None if value is _UNBOUND else _format(value)
        if bound_text == "%gin.REQUIRED":
            required = True
        if p in run_defaults:  # `build(RolloutConfig, rollout, group_size=8)`: the run's default, not the class's
            default_text = run_defaults[p]
        elif default is gin.REQUIRED or default is inspect.Parameter.empty:
            default_text = "REQUIRED"
        else:
            default_text = repr(default)
        out.append(Key(name=f"{name}.{p}", type=jp_config._type_name(hints[p]) if p in hints else "",
                       default=default_text, doc=docs.get(p, ""), required=required, bound=bound_text))
    return out + _passed_on_keys(conf, name, params, bound)


def _passed_on_keys(conf: _gin.Configurable, name: str, params: dict[str, inspect.Parameter],
                    bound: dict) -> list[Key]:
    """Keys a configurable takes in its ``**kwargs`` and passes on (``make_dpo_loss.gamma`` for ``kind='simpo'``)."""
    values = {p: param.default for p, param in params.items() if param.default is not inspect.Parameter.empty}
    values.update({p: v for p, v in ((p, jp_config._literal(v)) for p, v in bound.items())
                   if v is not jp_config._NOT_CHECKED})
    target, extra = jp_config.passed_on_params(conf.name, values)
    if target is None:
        return []
    targets = target if isinstance(target, tuple) else (target,)  # a combination (make_dpo_loss.kind = [...])
    keys = []
    for p, param in extra.items():
        if p in params:
            continue
        takers = [t for t in targets if p in inspect.signature(t).parameters]
        t = takers[0]
        hints, docs = jp_config._type_hints(t), _param_docs(t)
        # Unbound, each loss of a combination uses its own default (exo_pair's label_smoothing is 1e-3, not 0).
        defaults = [inspect.signature(u).parameters[p].default for u in takers]
        default = (repr(param.default) if len({repr(d) for d in defaults}) == 1
                   else ", ".join(f"{d!r} ({u.__name__})" for d, u in zip(defaults, takers)))
        where = ", ".join(u.__name__ for u in takers)
        keys.append(Key(name=f"{name}.{p}", type=jp_config._type_name(hints[p]) if p in hints else "",
                        default=default, required=False, bound=_format(bound[p]) if p in bound else None,
                        doc=_one_line(f"passed on to {where}" + (f": {docs[p]}" if p in docs else ""))))
    return keys


_UNBOUND = object()


def _format(value: Any) -> str:
    return _gin._format_value(value) if _gin._is_literally_representable(value) else repr(value)


_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes):\s*$")


@functools.lru_cache(maxsize=None)
def _param_docs(obj: Any) -> dict[str, str]:
    """One line of doc per parameter: ``Args:`` entries, dataclass field comments, or the docstring's sentence."""
    doc = inspect.getdoc(obj) or ""
    docs: dict[str, str] = {}
    lines = doc.splitlines()
    for i, line in enumerate(lines):  # Google style: "Args:" then "  name: text" with indented continuations
        if not _ARGS_HEADER.match(line):
            continue
        indent, current = None, None
        for ln in lines[i + 1:]:
            if not ln.strip():
                current = None
                continue
            lead = len(ln) - len(ln.lstrip())
            if indent is None:
                indent = lead
            if lead < indent:
                break
            m = re.match(r"\s*(\w+)(?:\s*\([^)]*\))?:\s*(.*)", ln)
            if lead == indent and m:
                current = m.group(1)
                docs[current] = m.group(2)
            elif current is not None:
                docs[current] += " " + ln.strip()
    if inspect.isclass(obj):
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            source = ""
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n#]+(?:=[^#\n]*)?#\s*(.+)$", source, re.M):
            docs.setdefault(m.group(1), m.group(2).strip())
    text = " ".join(ln.strip() for ln in lines if not _ARGS_HEADER.match(ln))
    sentences = re.split(r"(?<=[.;])\s+(?=[A-Z`(])", text)
    for p in _params(obj):
        if p in docs:
            continue
        hit = next((s for s in sentences if f"``{p}``" in s or f"``{p} " in s or f"``{p}=" in s), None)
        if hit:
            docs[p] = hit
    return {k: _one_line(v) for k, v in docs.items()}


def _one_line(text: str, width: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def unset_required(fn_or_cls: Any) -> list[Key]:
    """The required keys of one configurable (``sft``) that the parsed gin config leaves unset.

    Cheap (one signature, no walk): ``jaxpost train`` checks the run's own
    parameters with it before anything is built.
    """
    conf = _configurable(fn_or_cls)
    if conf is None:
        return []
    return [k for k in _keys_of(conf, None, {}) if k.required and not k.is_set]
