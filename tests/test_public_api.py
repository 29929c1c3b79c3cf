"""The public interface is fully annotated: every name ``shardkit`` exports, and every public
method of its classes, has a type for each parameter and for what it returns (``py.typed`` tells
type checkers to trust them)."""

from __future__ import annotations

import inspect

import pytest

import shardkit

DUNDERS = {"__init__", "__iter__", "__len__", "__getitem__", "__call__", "__enter__", "__exit__"}


def _callables():
    for name in shardkit.__all__:
        obj = getattr(shardkit, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue  # exception types: their constructors are documented by message
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in DUNDERS:
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member
                elif isinstance(member, property) and member.fget is not None:
                    yield f"{name}.{attr}", member.fget
        elif inspect.isfunction(obj):
            yield name, obj


def _missing(fn) -> list[str]:
    sig = inspect.signature(fn)
    out = [p.name for i, p in enumerate(sig.parameters.values())
           if p.annotation is inspect.Parameter.empty
           and not (i == 0 and p.name in ("self", "cls"))]
    if sig.return_annotation is inspect.Signature.empty:
        out.append("return")
    return out


def test_public_functions_and_methods_are_fully_annotated():
    names = dict(_callables())
    assert {"pack_folder", "StreamingDataset.__init__", "StreamingDataset.state_dict",
            "Manifest.load", "make_loader", "index_shards"} <= set(names)
    missing = {name: m for name, fn in names.items() if (m := _missing(fn))}
    assert not missing, f"not annotated: {missing}"


def test_the_check_sees_a_missing_annotation():
    def f(a: int, b) -> int:
        return a

    def g(a: int):
        return a

    assert _missing(f) == ["b"] and _missing(g) == ["return"]


@pytest.mark.parametrize("module", ["shardkit", "shardkit.packing", "shardkit.storage"])
def test_every_exported_name_exists(module):
    import importlib

    mod = importlib.import_module(module)
    assert all(hasattr(mod, n) for n in getattr(mod, "__all__", []))
