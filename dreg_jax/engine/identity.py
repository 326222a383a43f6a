"""The identity of a user model: a fingerprint of what it computes, stable across processes.

A run of your own module is keyed (``RunSpec.run_id``) by ``"<ClassName>@<fingerprint>"``. The
fingerprint is a SHA-256 over

* the module's class and every class it inherits from outside flax/jax/Python: for each, its
  qualified name and the bytecode of every function it defines (``co_code``, constants, names,
  nested code objects: what runs, not line numbers or comments);
* the module-level values its functions read (``HIDDEN = 64`` read in a method is part of the
  model: changing it changes the id), described like fields;
* its dataclass fields (``parent`` and ``name`` aside), each described by value: numbers,
  strings, tuples, dicts, arrays (dtype, shape, bytes), nested modules (recursively), classes
  (as above), functions and lambdas (their bytecode, defaults and closure values, never their
  memory address), ``functools.partial`` (its function, arguments and keywords).

So editing a method's body changes the id (the next sweep trains instead of returning old rows),
two different lambdas give two ids, and the same code gives the same id in every process. A
value that cannot be described this way (an open file, a custom object without a stable
description) is refused with its attribute path: give the module a plain attribute instead.
``NNXModel(factory)`` is described by its factory (bytecode and closure: the NNX classes it
builds are described as classes).
"""
from __future__ import annotations

import builtins
import dataclasses
import enum
import functools
import hashlib
import inspect
import types

import numpy as np

_LIBRARY_PREFIXES = ("flax", "jax", "jaxlib", "builtins", "abc", "typing", "numpy", "optax", "dataclasses")


class UnstableIdentity(ValueError):
    """A model attribute has no description that is stable across processes."""


def model_fingerprint(model) -> str:
    """16 hex digits of the SHA-256 of ``model``'s description (see the module docstring)."""
    description = _describe(model, "module", {})
    return hashlib.sha256(repr(description).encode()).hexdigest()[:16]


def model_identity(model) -> str:
    """``"<ClassName>@<fingerprint>"``: what a run id records for a user model."""
    name = type(model).__name__
    factory = getattr(model, "factory", None)
    if factory is not None:
        name = f"NNXModel({getattr(factory, '__qualname__', type(factory).__name__)})"
    return f"{name}@{model_fingerprint(model)}"


def _is_library(obj) -> bool:
    top = (getattr(obj, "__module__", "") or "").split(".")[0]
    if top == "builtins":  # also what exec'd code (a notebook cell, a script run by exec) reports
        return getattr(builtins, getattr(obj, "__name__", ""), None) is obj
    return top in _LIBRARY_PREFIXES


def _code(code: types.CodeType):
    consts = tuple(_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return ("code", code.co_code.hex(), consts, code.co_names, code.co_varnames)


def _function(fn, where, memo):
    fn = inspect.unwrap(fn)
    if _is_library(fn) or not hasattr(fn, "__code__"):
        return ("function", getattr(fn, "__module__", None), getattr(fn, "__qualname__", repr(fn)))
    if fn in memo:  # recursion (a function that calls itself, two that call each other)
        return ("function", fn.__qualname__)
    memo[fn] = True
    closure = tuple(_describe(c.cell_contents, f"{where}.<closure>", memo) for c in (fn.__closure__ or ())
                    if _cell_filled(c))
    defaults = _describe(fn.__defaults__ or (), f"{where}.<defaults>", memo)
    globals_used = tuple(
        (name, _describe(fn.__globals__[name], f"{where}.{name}", memo))
        for name in _names(fn.__code__)
        if name in fn.__globals__ and name != "__builtins__"
    )
    return ("function", fn.__qualname__, _code(fn.__code__), closure, defaults, globals_used)


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _names(code: types.CodeType) -> tuple:
    """Every global name a code object (and the code nested in it) may read, in order."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += [n for n in _names(const) if n not in names]
    return tuple(dict.fromkeys(names))


def _class(cls, where, memo):
    if cls in memo:
        return ("class", cls.__qualname__)  # a class already described (recursion, shared bases)
    memo[cls] = True
    own = []
    for base in cls.__mro__:
        if _is_library(base) or base is object:
            continue
        members = []
        for name, value in sorted(vars(base).items()):
            if name.startswith("__") and name not in ("__call__", "__init__"):
                continue
            if inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod, property)):
                fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if getattr(getattr(fn, "__code__", None), "co_filename", "") == "<string>":
                    continue  # generated by dataclasses (__init__, __eq__): the fields say it
                members.append((name, _function(fn, f"{where}.{name}", memo)))
            elif not callable(value) and not isinstance(value, (dataclasses.Field, types.MemberDescriptorType)):
                try:
                    members.append((name, _describe(value, f"{where}.{name}", memo)))
                except UnstableIdentity:
                    continue  # class-level bookkeeping (caches, registries) is not the computation
        own.append((base.__module__, base.__qualname__, tuple(members)))
    return ("class", cls.__module__, cls.__qualname__, tuple(own))


def _describe(value, where, memo):
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, types.ModuleType):
        return ("pymodule", value.__name__)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v, f"{where}[{i}]", memo) for i, v in enumerate(value)))
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys") and not isinstance(value, type)):
        return ("dict", tuple((repr(k), _describe(v, f"{where}[{k!r}]", memo)) for k, v in sorted(
            value.items(), key=lambda kv: repr(kv[0]))))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_describe(v, where, memo)) for v in value)))
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        array = np.asarray(value)
        return ("array", str(array.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    if isinstance(value, np.dtype) or type(value).__name__ in ("dtype", "DType"):
        return ("dtype", str(value))
    if isinstance(value, type):
        return ("type", value.__module__, value.__qualname__) if _is_library(value) else _class(value, where, memo)
    if isinstance(value, functools.partial):
        return ("partial", _describe(value.func, f"{where}.func", memo), _describe(value.args, f"{where}.args", memo),
                _describe(value.keywords, f"{where}.keywords", memo))
    if inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value) or isinstance(value, np.ufunc):
        if inspect.ismethod(value):
            return ("method", _describe(value.__self__, f"{where}.__self__", memo), _function(value.__func__, where, memo))
        return _function(value, where, memo)
    if dataclasses.is_dataclass(value):  # linen modules, NNXModel, configs
        fields = tuple((f.name, _describe(getattr(value, f.name, None), f"{where}.{f.name}", memo))
                       for f in dataclasses.fields(value) if f.name not in ("parent", "name"))
        return ("object", _class(type(value), where, memo), fields)
    if _is_library(type(value)) and callable(value):  # e.g. a jax custom_jvp function (nn.gelu)
        return ("callable", type(value).__module__, type(value).__qualname__,
                getattr(value, "__name__", None) or getattr(getattr(value, "fun", None), "__qualname__", None))
    if _is_library(type(value)):  # library markers and settings (flax's sentinels, precisions)
        text = repr(value)
        return ("library", type(value).__module__, type(value).__qualname__, None if " at 0x" in text else text)
    raise UnstableIdentity(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no description "
        "that is stable across processes, so runs of this model cannot be keyed by what they compute; "
        "make it a plain attribute (number, string, tuple, function, module)")
