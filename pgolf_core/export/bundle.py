"""One Python file holding exactly the code a stack runs: the bundler behind ``pgolf export``.

The exported ``train_gpt.py`` is not a second implementation: it is pgolf's own source, cut down. Starting
from the entry point (``pgolf_core.standalone.main``) and the registrations of the techniques the stack
uses, the bundler follows every name to its top-level definition, across modules, and keeps only those
definitions (tree shaking). Then it flattens the modules into one namespace:

* imports of bundled modules disappear; a name that two modules define gets a suffix;
* imports of anything else (torch, numpy, sentencepiece, the compressor's library, the standard library)
  are gathered at the top, only those still used;
* a technique's params class becomes plain baked data (``standalone.Params``), or a ``params_factory`` where
  technique code constructs one itself; its registration hook disappears, its ``build`` expression and the
  environment switches it declares are kept;
* the resolved stack and the table of reference environment variables are appended as data, with a
  ``main()`` call.

What may not be bundled is refused by name: a module outside pgolf that a technique's code needs would
have to be installed where the script runs, so only the libraries a record may import are allowed.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigError

BUNDLED_PREFIXES = ("pgolf_core", "pgolf")
DROPPED_IMPORTS = {"attrs", "cattrs", "pluggy", "tomli", "tomli_w", "tomllib"}
"""Imports that only pgolf's configuration and plugin machinery use: never reachable from a run's code."""


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions that provide it."""
    return importlib.metadata.packages_distributions()


def external_allowed(top: str) -> bool:
    """An exported script may import the standard library and any installed distribution (torch, numpy,
    sentencepiece, a compressor's library, a plugin's own dependency), never pgolf's configuration machinery."""
    if top in DROPPED_IMPORTS:
        return False
    return top in sys.stdlib_module_names or top in installed_modules()


@dataclass
class Symbol:
    module: str
    name: str


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    defs: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """local name → (bundled module, attribute or None for the module itself)."""
    externals: dict[str, ast.stmt] = field(default_factory=dict)
    """local name → the import statement that binds it (outside pgolf)."""
    order: list[str] = field(default_factory=list)


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _resolve(current: str, level: int, module: str | None, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _is_attrs_params(node: ast.stmt) -> bool:
    """``@attrs.define(...) class XParams``: a technique's (or the config's) typed parameters."""
    if not isinstance(node, ast.ClassDef):
        return False
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "attrs":
            return True
    return False


def _is_hookimpl(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and any(isinstance(d, ast.Name) and d.id == "hookimpl" for d in node.decorator_list)


class Bundler:
    """Reads modules on demand. ``packages``: the top-level packages whose code is copied into the script (pgolf
    and every package that registers a technique the stack uses); imports from anything else stay imports."""

    def __init__(self, packages: Iterable[str] = BUNDLED_PREFIXES) -> None:
        self.modules: dict[str, Module] = {}
        self.packages = tuple(dict.fromkeys([*BUNDLED_PREFIXES, *packages]))

    def is_bundled(self, module: str) -> bool:
        return _within(module, self.packages)

    # -- reading modules ---------------------------------------------------------------------------------
    def module(self, name: str) -> Module:
        if name in self.modules:
            return self.modules[name]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise ConfigError(f"export: cannot find the source of module {name}")
        path = Path(spec.origin)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        mod = Module(name, path, tree)
        package = spec.submodule_search_locations is not None
        for stmt in tree.body:
            self._index(mod, stmt, package)
        self.modules[name] = mod
        return mod

    def _index(self, mod: Module, stmt: ast.stmt, package: bool) -> None:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            return  # a docstring
        if isinstance(stmt, ast.ImportFrom):
            if stmt.module == "__future__":
                return
            source = _resolve(mod.name, stmt.level, stmt.module, package)
            for alias in stmt.names:
                local = alias.asname or alias.name
                if self.is_bundled(source):
                    sub = f"{source}.{alias.name}"
                    mod.imports[local] = (sub, None) if _is_module(sub) else (source, alias.name)
                else:
                    mod.externals[local] = ast.ImportFrom(module=stmt.module, names=[alias], level=0)
            return
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                if self.is_bundled(alias.name):
                    mod.imports[local] = (alias.name if alias.asname else alias.name.split(".")[0], None)
                else:
                    mod.externals[local] = ast.Import(names=[alias])
            return
        for name in _bound_names(stmt):
            mod.defs[name] = stmt
            mod.order.append(name)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, ast.Assign):
        return [n.id for t in stmt.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    if isinstance(stmt, (ast.If, ast.Try)):
        out = []
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out += [(a.asname or a.name.split(".")[0]) for a in node.names]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.append(node.id)
        return out
    return []


# -- scopes -----------------------------------------------------------------------------------------------
def _local_names(fn: ast.AST) -> set[str]:
    """Names a function, lambda or comprehension binds itself (they shadow the module's)."""
    names: set[str] = set()
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = fn.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]:
            names.add(arg.arg)
        body = fn.body if isinstance(fn.body, list) else [fn.body]
    elif isinstance(fn, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        for gen in fn.generators:
            names |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
        return names
    else:
        body = []
    declared_global: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            for d in node.decorator_list:
                visit(d)
            return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return
        if isinstance(node, ast.Global):
            declared_global.update(node.names)
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        if isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in body:
        visit(stmt)
    return names - declared_global


class _Refs(ast.NodeVisitor):
    """The module-level names (and ``module.attr`` pairs) a definition refers to, honouring local scopes."""

    def __init__(self, mod: Module) -> None:
        self.mod = mod
        self.scopes: list[set[str]] = []
        self.found: list[tuple[str, str | None]] = []  # (name, attribute) or (name, None)
        self.local_imports: list[ast.ImportFrom] = []

    def _shadowed(self, name: str) -> bool:
        return any(name in scope for scope in self.scopes)

    def _scoped(self, node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                self.visit(d)
            for d in [*node.args.defaults, *[k for k in node.args.kw_defaults if k is not None]]:
                self.visit(d)
            self.scopes.append(_local_names(node))
            for stmt in node.body:
                self.visit(stmt)
            self.scopes.pop()
            return
        self.scopes.append(_local_names(node))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped
    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _scoped

    def visit_arg(self, node: ast.arg) -> None:
        """Annotations are never evaluated (``from __future__ import annotations``): not references."""

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if self.scopes:
            self.local_imports.append(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and not self._shadowed(node.value.id):
            target = self.mod.imports.get(node.value.id)
            if target is not None and target[1] is None:
                self.found.append((node.value.id, node.attr))
                return
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not self._shadowed(node.id):
            self.found.append((node.id, None))


class _HoistLocalImports(ast.NodeTransformer):
    """Function-local imports of pgolf modules (lazy at run time) become module-level bindings: in one file
    there is nothing to defer."""

    def __init__(self, bundler: "Bundler", mod: Module, package: bool) -> None:
        self.bundler, self.mod, self.package = bundler, mod, package
        self.depth = 0

    def _fn(self, node: ast.AST) -> ast.AST:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _fn

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        source = _resolve(self.mod.name, node.level, node.module, self.package)
        if self.depth == 0 or not self.bundler.is_bundled(source):
            return node
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            self.mod.imports.setdefault(alias.asname or alias.name, (sub, None) if _is_module(sub) else (source, alias.name))
        return ast.Pass()


def _read(self: Bundler, name: str) -> Module:
    if name in self.modules:
        return self.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ConfigError(f"export: cannot find the source of module {name}")
    path = Path(spec.origin)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = spec.submodule_search_locations is not None
    mod = Module(name, path, tree)
    _HoistLocalImports(self, mod, package).visit(tree)
    for stmt in tree.body:
        self._index(mod, stmt, package)
    self.modules[name] = mod
    return mod


Bundler.module = _read  # the reader with local imports hoisted


# -- registrations ------------------------------------------------------------------------------------------
@dataclass
class Registration:
    """What a technique's ``pgolf_register_techniques`` declares that a run needs: how to build it, its params
    class, and the environment switches of a modifier."""

    module: str
    build: ast.expr
    params: str | None
    enable_env: str | None
    layers_env: dict[str, ast.expr]


def registration(bundler: Bundler, module: str, slot: str, name: str) -> Registration:
    mod = bundler.module(module)
    hook = mod.defs.get("pgolf_register_techniques")
    for node in ast.walk(hook) if hook is not None else ():
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Technique"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if _literal(kw.get("name")) != name or _literal(kw.get("slot")) != slot:
            continue
        layers = kw.get("layers_env")
        layers_env = {}
        if isinstance(layers, ast.Dict):
            layers_env = {_literal(k): v for k, v in zip(layers.keys, layers.values)}
        params = kw.get("params")
        return Registration(module, kw["build"], params.id if isinstance(params, ast.Name) else None, _literal(kw.get("enable_env")), layers_env)
    raise ConfigError(f"export: {module} does not register {slot} technique '{name}' with Technique(name=..., slot=..., build=...) literals")


def _literal(node: ast.expr | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


# -- the closure and the flat namespace --------------------------------------------------------------------
class Closure:
    """The definitions reachable from the seeds, with one global name each."""

    def __init__(self, bundler: Bundler) -> None:
        self.bundler = bundler
        self.included: dict[tuple[str, str], ast.stmt] = {}
        self.params_classes: dict[tuple[str, str], ast.ClassDef] = {}
        self.externals: dict[str, str] = {}  # local name → import statement text
        self.queue: list[tuple[str, str]] = []

    def resolve(self, module: str, name: str, attr: str | None = None) -> tuple[str, str] | None:
        """The defining (module, name) of ``name`` (``name.attr`` for a module alias) seen from ``module``;
        None for builtins and external names (recorded as needed)."""
        mod = self.bundler.module(module)
        if attr is not None:
            target = mod.imports.get(name)
            return self.resolve(target[0], attr) if target else None
        if name in mod.defs:
            return (module, name)
        if name in mod.imports:
            target_module, target_name = mod.imports[name]
            if target_name is None:
                return None  # a module object used bare: only ``alias.attr`` is followed
            return self.resolve(target_module, target_name)
        if name in mod.externals:
            stmt = mod.externals[name]
            top = (stmt.module if isinstance(stmt, ast.ImportFrom) else stmt.names[0].name).split(".")[0]
            if not external_allowed(top):
                why = "pgolf's configuration machinery, which a run never needs" if top in DROPPED_IMPORTS else "not installed"
                raise ConfigError(
                    f"export: {module} needs '{name}' from {top} ({why}); an exported script imports only the "
                    f"standard library and installed distributions: move the import where the run does not reach it"
                )
            text = ast.unparse(stmt)
            if self.externals.get(name, text) != text:
                raise ConfigError(f"export: the name '{name}' is imported differently in two modules ({self.externals[name]!r}, {text!r})")
            self.externals[name] = text
        return None

    def add(self, key: tuple[str, str]) -> None:
        if key in self.included or key in self.params_classes:
            return
        stmt = self.bundler.module(key[0]).defs[key[1]]
        if _is_attrs_params(stmt):
            self.params_classes[key] = stmt
            return
        if _is_hookimpl(stmt):
            raise ConfigError(f"export: {key[0]}.{key[1]} is a plugin hook, not code a run executes")
        self.included[key] = stmt
        for other in _bound_names(stmt):  # one statement may bind several names
            self.included.setdefault((key[0], other), stmt)
        self.queue.append(key)

    def seed(self, module: str, node: ast.AST) -> None:
        refs = _Refs(self.bundler.module(module))
        refs.visit(node)
        for name, attr in refs.found:
            target = self.resolve(module, name, attr)
            if target is not None:
                self.add(target)

    def close(self) -> None:
        while self.queue:
            module, name = self.queue.pop()
            self.seed(module, self.included[(module, name)])


def _module_order(closure: Closure) -> list[str]:
    """Modules in an order where each one's module-level references (class bases, decorators, defaults,
    constants) are defined before it: dependencies first, otherwise the order of first use."""
    deps: dict[str, set[str]] = {}
    for (module, _), stmt in closure.included.items():
        refs = _Refs(closure.bundler.module(module))
        for node in _module_level_parts(stmt):
            refs.visit(node)
        for name, attr in refs.found:
            target = closure.resolve(module, name, attr)
            if target is not None and target[0] != module:
                deps.setdefault(module, set()).add(target[0])
    order: list[str] = []
    seen: set[str] = set()

    def visit(m: str) -> None:
        if m in seen:
            return
        seen.add(m)
        for d in sorted(deps.get(m, ())):
            visit(d)
        order.append(m)

    for module in sorted({m for m, _ in closure.included}):
        visit(module)
    return order


def _module_level_parts(stmt: ast.stmt) -> list[ast.AST]:
    """The parts of a definition Python evaluates when the module runs (not function bodies)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = stmt.args
        return [*stmt.decorator_list, *a.defaults, *[d for d in a.kw_defaults if d is not None]]
    if isinstance(stmt, ast.ClassDef):
        parts: list[ast.AST] = [*stmt.decorator_list, *stmt.bases, *[k.value for k in stmt.keywords]]
        for item in stmt.body:
            parts += _module_level_parts(item) if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else [item]
        return parts
    return [stmt]


class _Rename(ast.NodeTransformer):
    """Rewrites one module's definitions into the flat namespace."""

    def __init__(self, closure: Closure, module: str, names: dict[tuple[str, str], str]) -> None:
        self.closure, self.module, self.names = closure, module, names
        self.mod = closure.bundler.module(module)
        self.scopes: list[set[str]] = []
        self.in_class = 0

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.bases = [self.visit(b) for b in node.bases]
        node.keywords = [self.visit(k) for k in node.keywords]
        self.in_class += 1
        node.body = [self.visit(s) for s in node.body]
        self.in_class -= 1
        return node

    def _final(self, name: str, attr: str | None = None) -> str | None:
        target = self.closure.resolve(self.module, name, attr)
        return self.names.get(target) if target is not None else None

    def _scoped(self, node: ast.AST) -> ast.AST:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.decorator_list = [self.visit(d) for d in node.decorator_list]
            node.args = self.visit(node.args)  # defaults are evaluated outside the function's scope
            self.scopes.append(_local_names(node))
            node.body = [self.visit(s) for s in node.body]
            self.scopes.pop()
            return node
        self.scopes.append(_local_names(node))
        self.generic_visit(node)
        self.scopes.pop()
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped
    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _scoped

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return node  # annotations stay as written: never evaluated

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        node.target = self.visit(node.target)
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and not any(node.value.id in s for s in self.scopes):
            target = self.mod.imports.get(node.value.id)
            if target is not None and target[1] is None:
                final = self._final(node.value.id, node.attr)
                if final is not None:
                    return ast.copy_location(ast.Name(id=final, ctx=node.ctx), node)
        self.generic_visit(node)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if any(node.id in s for s in self.scopes) or (self.in_class and not isinstance(node.ctx, ast.Load)):
            return node  # a local, or a class attribute being defined
        final = self._final(node.id)
        if final is not None and final != node.id:
            return ast.copy_location(ast.Name(id=final, ctx=node.ctx), node)
        return node


def flat_names(closure: Closure) -> dict[tuple[str, str], str]:
    """One global name per definition: its own name when no other bundled definition (or external import)
    shares it, else ``name_<module>``."""
    keys = list(closure.included) + list(closure.params_classes)
    taken: dict[str, int] = {}
    for _, name in keys:
        taken[name] = taken.get(name, 0) + 1
    out = {}
    for module, name in keys:
        if taken[name] == 1 and name not in closure.externals:
            out[(module, name)] = name
        else:
            out[(module, name)] = f"{name}_{module.rsplit('.', 1)[-1]}"
    return out


# -- the script ---------------------------------------------------------------------------------------------
ENTRY = ("pgolf_core.standalone", "main")
FACTORY = ("pgolf_core.standalone", "params_factory")
CORE_TABLES = ("run", "data", "model")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _fields(instance: Any) -> dict[str, Any]:
    import attrs

    return {a.name: _plain(getattr(instance, a.name)) for a in attrs.fields(type(instance))}


def _env_rows(cls: type, where: str, key: Any) -> list[list[Any]]:
    import attrs

    from ..config.envvalues import env_kind

    rows = []
    for a in attrs.fields(cls):
        names = a.metadata.get("env") or ()
        for name in (names,) if isinstance(names, str) else names:
            rows.append([name, where, key, a.name, env_kind(a.type), a.metadata.get("env_values")])
    return rows


def stack_data(stack: Any) -> dict[str, Any]:
    """The resolved stack as plain data, what ``pgolf_core.standalone.Stack`` reads."""
    data: dict[str, Any] = {"path": "train_gpt.py", "meta": {"name": stack.meta.name}}  # errors name the script
    for table in CORE_TABLES:
        data[table] = _fields(getattr(stack, table))
    data["data"].update(_local_sample_paths(stack.data))
    data["slots"] = {slot: [c.technique, _fields(c.params)] for slot, c in stack.slots.items()}
    data["modifiers"] = [[m.technique, _plain(m.layers), _fields(m.params)] for m in stack.modifiers]
    return data


def _local_sample_paths(data: Any) -> dict[str, str]:
    """A stack on the built-in sample (``sample:sp1024``) runs its script on this machine's copy of it: the
    script cannot resolve pgolf's names, so the shards' directory and the tokenizer file are written in."""
    from ..sample import is_sample, sample_dir, tokenizer_path

    out = {}
    if is_sample(str(data.path)):
        out["path"] = str(sample_dir(str(data.path)))
    if is_sample(str(data.tokenizer)):
        out["tokenizer"] = tokenizer_path(str(data.tokenizer))
    return out


def env_table(stack: Any) -> list[list[Any]]:
    """Every reference environment variable ``--legacy-env`` would apply to this stack, and where it lands."""
    rows = []
    for table in CORE_TABLES:
        rows += _env_rows(type(getattr(stack, table)), table, None)
    for slot, choice in stack.slots.items():
        rows += _env_rows(type(choice.params), "slot", slot)
    for index, mod in enumerate(stack.modifiers):
        rows += _env_rows(type(mod.params), "modifier", index)
    return rows


def _used(stack: Any) -> list[tuple[str, str]]:
    return [(slot, c.technique) for slot, c in stack.slots.items()] + [("modifier", m.technique) for m in stack.modifiers]


MAIN_LINE = "if __name__ == '__main__':"


def code_key(stack: Any) -> list[tuple[str, str]]:
    """What the code of the exported script depends on in a stack: its techniques, in order (modifiers by
    position, since their environment switches are indexed). Parameter values are data (``data_lines``)."""
    return _used(stack)


def data_lines(stack: Any, compact: bool = False) -> str:
    """The stack's values as the script's ``STACK`` and ``ENV`` tables: the only part that changes when a
    stack changes a number, a path or a seed (``compact``: written without spaces, for the packed script)."""
    if compact:
        from .pack import literal

        return f"STACK={literal(stack_data(stack))}\nENV={literal(env_table(stack))}\n"
    return f"STACK = {stack_data(stack)!r}\nENV = {env_table(stack)!r}\n"


def script_source(stack: Any, registry: Any) -> str:
    """The readable exported script for ``stack``: the code it runs, its data, and the ``main`` call."""
    return splice(script_code(stack, registry), data_lines(stack))


def splice(code: str, data: str) -> str:
    """``data`` put just before the script's closing ``if __name__ == '__main__'`` line of ``code`` (readable or
    minified: the minifier keeps that statement last and leaves the free names ``STACK`` and ``ENV`` alone)."""
    for line in (MAIN_LINE, "if __name__=='__main__':"):
        head, sep, tail = code.rpartition("\n" + line)
        if sep:
            return f"{head}\n{data.rstrip()}{sep}{tail}"
    raise AssertionError("the exported code has no closing main line")


def script_code(stack: Any, registry: Any) -> str:
    """The exported script without its data tables: every statement ``main`` needs, the technique table and the
    closing main call, which reads the free names ``STACK`` and ``ENV`` that ``splice`` defines."""
    used = {key: registry.get(*key) for key in dict.fromkeys(_used(stack))}
    bundler = Bundler(found.module.split(".")[0] for found in used.values())
    closure = Closure(bundler)
    closure.add(ENTRY)
    regs: dict[tuple[str, str], Registration] = {}
    for (slot, name), found in used.items():
        regs[(slot, name)] = reg = registration(bundler, found.module, slot, name)
        closure.seed(reg.module, reg.build)
        for expr in reg.layers_env.values():
            closure.seed(reg.module, expr)
    closure.close()
    if closure.params_classes:
        closure.add(FACTORY)
        closure.close()
    names = flat_names(closure)
    body: list[str] = []
    for module in _module_order(closure):
        mod = bundler.module(module)
        emitted: set[int] = set()
        for stmt in mod.tree.body:
            if id(stmt) in emitted or not any(closure.included.get((module, n)) is stmt for n in _bound_names(stmt)):
                continue
            emitted.add(id(stmt))
            node = _Rename(closure, module, names).visit(_copy(stmt))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                node.name = names[(module, stmt.name)]
            body.append(ast.unparse(node))
    for (module, name), cls in closure.params_classes.items():
        cls_object = getattr(importlib.import_module(module), name)
        fields = [a.name for a in attrs.fields(cls_object) if a.init]
        body.append(f"{names[(module, name)]} = {names[FACTORY]}({fields!r}, {_fields_defaults(cls_object)!r})")

    def expr(module: str, node: ast.expr) -> str:
        return ast.unparse(_Rename(closure, module, names).visit(_copy(node)))

    builds = ", ".join(f"{key!r}: {expr(r.module, r.build)}" for key, r in regs.items())
    switches = []
    for index, mod in enumerate(stack.modifiers):
        r = regs[("modifier", mod.technique)]
        if r.enable_env or r.layers_env:
            layers = ", ".join(f"{k!r}: {expr(r.module, v)}" for k, v in r.layers_env.items())
            switches.append(f"[{index}, {r.enable_env!r}, {{{layers}}}]")
    header = sorted(set(closure.externals.values()), key=lambda s: (not s.startswith("import "), s))
    lines = ["from __future__ import annotations", *header, "", *body, ""]
    lines.append(f"BUILDS = {{{builds}}}")
    lines.append(f"SWITCHES = [{', '.join(switches)}]")
    lines.append(f"{MAIN_LINE}\n    {names[ENTRY]}(STACK, BUILDS, ENV, SWITCHES)")
    return "\n".join(lines) + "\n"


def _fields_defaults(cls: type) -> dict[str, Any]:
    return {a.name: _plain(a.default) for a in attrs.fields(cls) if a.default is not attrs.NOTHING}


def _copy(node: Any) -> Any:
    """A copy of an AST through its fields and positions only. Not ``copy.deepcopy``: CPython shares one
    ``ast.Load()``/``ast.Store()`` instance among all trees, and a tool that annotates nodes (python-minifier
    gives each a parent and a namespace) leaves those singletons pointing at its whole tree, which deepcopy
    would then copy for every name (minutes per stack)."""
    if isinstance(node, ast.AST):
        new = type(node)()
        for name in node._fields:
            if hasattr(node, name):
                setattr(new, name, _copy(getattr(node, name)))
        for name in node._attributes:
            if hasattr(node, name):
                setattr(new, name, getattr(node, name))
        return new
    if isinstance(node, list):
        return [_copy(item) for item in node]
    return node
