"""Which params.yaml keys a function reads, found by reading the code (tests/test_pipeline.py holds every DVC
stage to declare them).

A section (`params.train`) is followed through names it is bound to (`cfg = params.train`, `reg = registry or
...`), through `model_copy(update={...})` (the updated keys are not read) and into the es2 functions it is
passed to, down to the leaf keys read (`train.layers`). Where it goes anywhere else (an outside function, a
property, a container, a return value) the whole section counts as read: the analysis errs towards declaring
more, never less.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache

from pydantic import BaseModel

from es2.config import Params
from es2.pipeline import module_file


@dataclass(frozen=True)
class View:
    """A params section reached at `path` (params.yaml's names), of pydantic type `model`."""

    path: tuple[str, ...]
    model: type[BaseModel]
    updated: frozenset[str] = field(default_factory=frozenset)  # keys replaced by model_copy: not read

    def key(self, leaf: str | None = None) -> str:
        return ".".join(self.path + ((leaf,) if leaf else ()))

    def child(self, attr: str) -> tuple[str, type[BaseModel] | None] | None:
        """(params.yaml name, section type or None for a leaf) of attribute `attr`; None if it is no field."""
        info = self.model.model_fields.get(attr)
        if info is None:
            return None
        sub = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
        return info.alias or attr, sub


ROOT = View((), Params)


@cache
def _module(name: str) -> tuple[ast.Module, dict[str, tuple[str, str]]]:
    """A module's tree and what its imported names stand for (name -> (module, attribute))."""
    tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
    names: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    return tree, names


def _function(module: str, name: str) -> tuple[str, ast.FunctionDef] | None:
    """The es2 function `name` of `module`, following re-exports."""
    if not module.startswith("es2") or module_file(module) is None:
        return None
    tree, names = _module(module)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return module, node
    if name in names:
        return _function(*names[name])
    return None


def _callee(module: str, func: ast.expr) -> tuple[str, ast.FunctionDef] | None:
    _, names = _module(module)
    if isinstance(func, ast.Name):
        return _function(module, func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
        return _function(".".join(names[func.value.id]), func.attr)  # `from es2 import tracking`; tracking.f()
    return None


def _parameter(fn: ast.FunctionDef, call: ast.Call, arg: ast.expr) -> str | None:
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    for i, value in enumerate(call.args):
        if value is arg and not isinstance(value, ast.Starred):
            return positional[i] if i < len(positional) else None
    return next((kw.arg for kw in call.keywords if kw.value is arg), None)


def _updated_keys(call: ast.Call) -> frozenset[str] | None:
    """The literal keys of `model_copy(update={...})`; None when they are not literal."""
    update = next((kw.value for kw in call.keywords if kw.arg == "update"), None)
    if isinstance(update, ast.Dict) and all(isinstance(k, ast.Constant) for k in update.keys):
        return frozenset(k.value for k in update.keys)
    return None


class _Function:
    """The reads of one function given the sections bound to some of its names."""

    def __init__(self, module: str, fn: ast.FunctionDef, bindings: dict[str, View]):
        self.module, self.fn, self.bindings = module, fn, dict(bindings)
        self.parent = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
        self.reads: set[str] = set()

    def run(self) -> set[str]:
        while True:  # aliases first (cfg = params.train), until no new name is bound
            known = dict(self.bindings)
            self.reads.clear()
            for node in ast.walk(self.fn):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in self.bindings:
                    self._follow(node, self.bindings[node.id])
            if known == self.bindings:
                return self.reads

    def _follow(self, node: ast.expr, view: View) -> None:
        parent = self.parent.get(node)
        while True:
            if isinstance(parent, ast.Attribute) and parent.value is node:
                child = view.child(parent.attr)
                if child is None and parent.attr == "model_copy" and isinstance(self.parent.get(parent), ast.Call):
                    keys = _updated_keys(self.parent[parent])
                    if keys is None:
                        return self._whole(view)
                    view = View(view.path, view.model, view.updated | keys)
                    node = self.parent[parent]
                elif child is None:
                    return self._whole(view)  # a method or property: everything it might read
                elif child[1] is None:
                    if child[0] not in view.updated:
                        self.reads.add(view.key(child[0]))
                    return None
                else:
                    view, node = View(view.path + (child[0],), child[1]), parent
            elif isinstance(parent, ast.BoolOp | ast.IfExp) and getattr(parent, "test", None) is not node:
                node = parent  # `registry or default`, `a if c else b`: the value may be this section
            else:
                return self._use(node, parent, view)
            parent = self.parent.get(node)

    def _use(self, node: ast.expr, parent: ast.AST | None, view: View) -> None:
        if isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name):
            self.bindings.setdefault(parent.targets[0].id, view)
            return
        if isinstance(parent, ast.Tuple) and isinstance(self.parent.get(parent), ast.Assign):
            target = self.parent[parent].targets[0]
            if isinstance(target, ast.Tuple) and len(target.elts) == len(parent.elts):
                name = target.elts[parent.elts.index(node)]
                if isinstance(name, ast.Name):
                    self.bindings.setdefault(name.id, view)
                    return
        if isinstance(parent, ast.Call) and node is not parent.func:
            callee = _callee(self.module, parent.func)
            name = _parameter(callee[1], parent, node) if callee else None
            if name is not None:
                self.reads |= function_reads(callee[0], callee[1].name, ((name, view),))
                return
        self._whole(view)

    def _whole(self, view: View) -> None:
        self.reads.add(view.key() or "*")


_ACTIVE: set[tuple] = set()  # calls being analysed: a recursive call adds nothing new


@cache
def function_reads(module: str, function: str, bindings: tuple[tuple[str, View], ...]) -> frozenset[str]:
    """The params keys `module.function` reads when its named arguments hold the given sections."""
    found = _function(module, function)
    if found is None:
        raise LookupError(f"no function {function} in {module}")
    call = (module, function, bindings)
    if call in _ACTIVE:
        return frozenset()
    _ACTIVE.add(call)
    try:
        return frozenset(_Function(*found, dict(bindings)).run())
    finally:
        _ACTIVE.discard(call)


def covered(read: str, declared: tuple[str, ...]) -> bool:
    """A read key is declared when it or a section above it is."""
    parts = read.split(".")
    return any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1))
