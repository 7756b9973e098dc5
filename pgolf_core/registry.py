"""The technique catalogue: loading plugins from entry points and recording where each technique came from.

Built-in techniques are entry points of the ``pgolf`` distribution in group ``pgolf``, loaded exactly like a
third-party package's. Installing a plugin only fills the catalogue; a technique runs only when a stack
names it. A plugin that fails to import is recorded with its error and skipped; it becomes fatal only when
a stack uses a technique nobody registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError


@attrs.define(frozen=True, kw_only=True)
class Technique:
    """A technique a plugin offers for one slot.

    ``params`` is an attrs class (frozen, kw_only) whose fields are the technique's stack keys; field
    metadata may carry ``help``, ``unit`` and ``env`` (the reference script's environment variable).
    ``build(params, ctx, **kw)`` follows the slot contract in ``pgolf_core.hookspecs.SLOTS``.
    """

    name: str
    slot: str
    params: type
    build: Callable[..., Any]
    summary: str
    source: str = ""
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    example: str = ""
    compile_safe: bool = True
    hookspec_version: int = hookspecs.HOOKSPEC_VERSION
    enable_env: str | None = None
    """Modifiers only: a reference env var whose value 0 drops the modifier under ``--legacy-env``."""
    layers_env: dict[str, Callable[[str], Any]] = attrs.field(factory=dict)
    """Modifiers only: reference env vars that set the layer selector (value → selector)."""
    select_env: dict[str, str] | Callable[[Any], dict[str, str]] = attrs.field(factory=dict)
    """Slot techniques: the switches (``NAME -> value``) by which a reference script that offers several
    techniques for this slot chooses this one; a callable receives the technique's params, for a switch that
    depends on them. ``pgolf config --as-env`` writes them: a script that switches its alternatives by
    environment runs its own default otherwise, which need not be this technique."""

    def __attrs_post_init__(self) -> None:
        if self.slot not in hookspecs.SLOTS:
            raise ValueError(f"technique {self.name!r}: unknown slot {self.slot!r} (slots: {', '.join(hookspecs.SLOTS)})")
        if not attrs.has(self.params):
            raise TypeError(f"technique {self.name!r}: params must be an attrs class")


@attrs.define(frozen=True)
class Registration:
    technique: Technique
    distribution: str
    version: str
    module: str


@attrs.define(frozen=True)
class PluginFailure:
    entry_point: str
    distribution: str
    error: str


class Registry:
    """Techniques by (slot, name), with provenance, plus the plugins that failed to load."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._by_key: dict[tuple[str, str], Registration] = {}
        self.failures: list[PluginFailure] = []
        self._current: tuple[str, str, str] = ("unknown", "", "")
        # Historic: every plugin registered from now on is called once, at registration, with this kwarg.
        self.pm.hook.pgolf_register_techniques.call_historic(kwargs={"register": self._register})

    # -- registration -------------------------------------------------------------------------------
    def _register(self, technique: Technique) -> None:
        dist, version, module = self._current
        if technique.hookspec_version != hookspecs.HOOKSPEC_VERSION:
            self.failures.append(
                PluginFailure(
                    module,
                    f"{dist} {version}",
                    f"technique '{technique.name}' targets hook version {technique.hookspec_version}, this pgolf provides "
                    f"{hookspecs.HOOKSPEC_VERSION}; upgrade the plugin or pgolf",
                )
            )
            return
        key = (technique.slot, technique.name)
        if key in self._by_key:
            other = self._by_key[key]
            raise ConfigError(
                f"technique '{technique.name}' (slot {technique.slot}) is registered twice: by {other.distribution} "
                f"{other.version} ({other.module}) and by {dist} {version} ({module}); uninstall or block one of them"
            )
        self._by_key[key] = Registration(technique, dist, version, module)

    def add_plugin(self, plugin: Any, *, distribution: str, version: str = "", name: str | None = None) -> None:
        """Register a plugin object or module and collect the techniques it registers."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self._current = (distribution, version, module)
        try:
            self.pm.register(plugin, name=name or module)
        finally:
            self._current = ("unknown", "", "")

    def load_entry_points(self, allow: set[str] | None = None, block: set[str] | None = None) -> None:
        for ep in md.entry_points(group=hookspecs.PROJECT):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else ""
            if allow is not None and dist not in allow and dist != "pgolf":
                continue
            if block and dist in block:
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a broken third-party plugin must not take pgolf down
                self.failures.append(PluginFailure(f"{ep.group}:{ep.name}", f"{dist} {version}", _plugin_error(exc)))
                continue
            if self.pm.is_registered(plugin):
                continue
            problem = self._contained_add(plugin, distribution=dist, version=version, name=f"{dist}:{ep.name}")
            if problem:
                self.failures.append(PluginFailure(f"{ep.group}:{ep.name}", f"{dist} {version}", problem))

    def load_module(self, dotted: str) -> None:
        """Load an unpackaged local plugin module: ``--plugin my_pkg.my_technique`` or ``--plugin ./my_technique.py``.

        A dotted name is imported normally, then from the current directory as a last resort (the ``pgolf``
        console script, unlike ``python -m``, does not put it on ``sys.path``).
        """
        try:
            module = _import_local(dotted)
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"--plugin {dotted}: cannot import: {_plugin_error(exc)}") from None
        problem = self._contained_add(module, distribution=f"local:{dotted}")
        if problem:
            raise ConfigError(f"--plugin {dotted}: {problem}")

    def _contained_add(self, plugin: Any, **kw: Any) -> str | None:
        """``add_plugin``, with a plugin whose registration raises (or calls ``sys.exit``) taken out again,
        techniques and hooks alike; returns what went wrong, or None. Two plugins claiming one technique stays
        a ``ConfigError``: the user must choose."""
        before = set(self._by_key)
        try:
            self.add_plugin(plugin, **kw)
        except ConfigError:
            raise
        except (Exception, SystemExit) as exc:
            for key in set(self._by_key) - before:
                del self._by_key[key]
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return _plugin_error(exc, "pgolf_register_techniques")
        return None

    def trace_hooks(self, write: Callable[[str], None]) -> Callable[[], None]:
        """Report every hook call (name, arguments, implementations) through ``write``; returns the undo.

        ``PGOLF_TRACE_HOOKS=1`` turns this on for a whole run, printing to stderr, to see which installed
        plugin reacts to which loop event.
        """

        def before(hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
            impls = ", ".join(impl.plugin_name for impl in hook_impls) or "no implementations"
            write(f"hook {hook_name}({_describe_kwargs(kwargs)}) -> {impls}")

        def after(outcome: Any, hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
            if outcome.exception is not None:
                write(f"hook {hook_name} raised {_one_line(outcome.exception)}")

        return self.pm.add_hookcall_monitoring(before, after)

    # -- lookup ---------------------------------------------------------------------------------------
    @property
    def hooks(self) -> Any:
        """The loop-event hook relay (``pgolf_on_*``) of the installed plugins."""
        return self.pm.hook

    def get(self, slot: str, name: str) -> Registration | None:
        return self._by_key.get((slot, name))

    def names(self, slot: str) -> list[str]:
        return sorted(n for (s, n) in self._by_key if s == slot)

    def all(self) -> list[Registration]:
        return [self._by_key[k] for k in sorted(self._by_key)]

    def find(self, name: str) -> list[Registration]:
        return [r for (s, n), r in sorted(self._by_key.items()) if n == name]


def _import_local(target: str) -> Any:
    path = Path(target)
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"no such file {target}")
        name = f"pgolf_local_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != target.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(target)


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    """Hook arguments in a line: the loop state by its step, anything else by its type."""
    parts = []
    for key, value in kwargs.items():
        step = getattr(value, "step", None)
        parts.append(f"{key}<step {step}>" if isinstance(step, int) else f"{key}<{type(value).__name__}>")
    return ", ".join(parts)


def _plugin_error(exc: BaseException, hook: str = "") -> str:
    """A plugin's failure in one line: on import (no ``hook``) or in ``hook``; ``sys.exit`` is named as such
    (its code means nothing to pgolf)."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) {'in ' + hook if hook else 'on import'}"
    return f"{hook} raised {_one_line(exc)}" if hook else _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return text[-1] if text else type(exc).__name__


_DEFAULT: Registry | None = None


def default_registry(extra_modules: tuple[str, ...] = ()) -> Registry:
    """The process-wide catalogue: entry points (honouring the PGOLF_* controls) plus local modules."""
    global _DEFAULT
    if _DEFAULT is None:
        reg = Registry()
        if os.environ.get("PGOLF_TRACE_HOOKS") == "1":  # before loading, so registrations show up too
            reg.trace_hooks(lambda line: print(f"pgolf-trace: {line}", file=sys.stderr, flush=True))
        if os.environ.get("PGOLF_DISABLE_PLUGIN_AUTOLOAD") != "1":
            allow = _env_set("PGOLF_LOAD_PLUGINS")
            reg.load_entry_points(allow=allow, block=_env_set("PGOLF_BLOCK_PLUGINS"))
        else:
            # Built-ins still come from pgolf's own entry points; only third-party autoload is off.
            reg.load_entry_points(allow=set())
        _DEFAULT = reg
    for module in extra_modules:
        if not any(r.distribution == f"local:{module}" for r in _DEFAULT.all()):
            _DEFAULT.load_module(module)
    return _DEFAULT


def _env_set(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}
