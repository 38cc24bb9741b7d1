"""Backend selection: ``XTK_BACKEND``, what each backend supports and why not, ``pick()``.

Each op (``attention``, ``rms_norm``, ``glu``, ``activation``) has an ordered list of
backends. A backend is a module-level ``Backend`` object living beside its implementation;
it is imported lazily, and an import failure becomes the reason it cannot run. ``pick``
takes the forced backend (the call's ``backend=`` argument, else ``XTK_BACKEND``) or, for
``auto``, the first backend whose reasons list is empty.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("xtk")

BACKEND_NAMES = ("auto", "eager", "chunked", "triton", "ext")


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    reasons(inputs, forced) -> list of strings saying why it cannot run these inputs
    (empty: it can). ``forced`` is True when the user asked for this backend by name
    (e.g. the Triton interpreter on CPU tensors is allowed only then).
    run(inputs) -> the op's result."""

    name: str
    op: str
    reasons: Callable[[Any, bool], list]
    run: Callable[[Any], Any]


# op -> ordered list of (backend name, "module:attribute") tried by auto, first to last
_LAZY: dict[str, list[tuple[str, str]]] = {
    "attention": [
        ("triton", "xtk.ops.attention_triton:BACKEND"),
        ("chunked", "xtk.ops.attention_chunked:BACKEND"),
        ("eager", "xtk.ops.attention:EAGER"),
    ],
    "attention_with_kvcache": [  # attention_kvcache._pick: the kernel, else the reference path (not a backend name)
        ("triton", "xtk.ops.attention_kvcache_triton:BACKEND"),
        ("reference", "xtk.ops.attention_kvcache:REFERENCE"),
    ],
    "rms_norm": [
        ("ext", "xtk.ops.ext_backends:RMS_NORM"),
        ("eager", "xtk.ops.rms_norm:EAGER"),
    ],
    "glu": [
        ("ext", "xtk.ops.ext_backends:GLU"),
        ("eager", "xtk.ops.glu:EAGER_GLU"),
    ],
    "activation": [
        ("ext", "xtk.ops.ext_backends:ACTIVATION"),
        ("eager", "xtk.ops.glu:EAGER_ACTIVATION"),
    ],
}
_loaded: dict[tuple[str, str], Any] = {}


def load(op: str, name: str):
    """The ``Backend`` object, or a string saying why it could not be imported."""
    key = (op, name)
    if key not in _loaded:
        entries = dict(_LAZY[op])
        if name not in entries:
            _loaded[key] = f"no {name!r} backend exists for {op} (have: {', '.join(entries)})"
        else:
            mod, attr = entries[name].split(":")
            try:
                _loaded[key] = getattr(importlib.import_module(mod), attr)
            except Exception as e:  # ImportError, missing triton, missing built extension ...
                _loaded[key] = f"not importable: {type(e).__name__}: {e}"
    return _loaded[key]


def preload() -> None:
    """Import every backend now (``import xtk`` does this), so that picking one inside
    ``torch.compile`` is a dictionary lookup, not an import (which dynamo cannot trace)."""
    for op, entries in _LAZY.items():
        for name, _ in entries:
            load(op, name)


def names(op: str) -> list[str]:
    return [n for n, _ in _LAZY[op]]


# names that were backends once -> what to say instead of "expected one of"
_RENAMED = {"sdpa": "the backend 'sdpa' is now called 'chunked' (torch's fused CPU attention kernel fed query chunk "
                    "by query chunk; it never was torch.nn.functional.scaled_dot_product_attention itself)"}


def _check_name(what: str, name: str) -> None:
    if name not in BACKEND_NAMES:
        hint = f": {_RENAMED[name]}" if name in _RENAMED else ""
        raise ValueError(f"{what}: expected one of {BACKEND_NAMES}, got {name!r}{hint}")


def requested(backend: str) -> str:
    """The backend asked for: the call's ``backend`` unless it is 'auto', else ``XTK_BACKEND``."""
    _check_name("backend", backend)
    if backend != "auto":
        return backend
    env = os.environ.get("XTK_BACKEND", "auto").strip() or "auto"
    _check_name("XTK_BACKEND", env)
    return env


def reasons(op: str, name: str, inputs, forced: bool) -> list:
    b = load(op, name)
    if isinstance(b, str):
        return [b]
    return list(b.reasons(inputs, forced))


def pick(op: str, inputs, backend: str = "auto") -> Backend:
    """The backend that runs ``op`` on ``inputs``; raises with every reason when none can."""
    want = requested(backend)
    if want != "auto" and backend == "auto" and want not in dict(_LAZY[op]):
        want = "auto"  # XTK_BACKEND names a backend this op does not have (e.g. triton for rms_norm): auto
    if want != "auto":
        why = reasons(op, want, inputs, forced=True)
        if why:
            raise RuntimeError(f"{op}: backend {want!r} was requested but cannot run these inputs: " + "; ".join(why))
        return load(op, want)
    collected = []
    has_ext = "ext" in names(op)  # attention has none: nothing to fall back from
    for name in names(op):
        why = reasons(op, name, inputs, forced=False)
        if not why:
            if (has_ext and name != "ext" and isinstance(_loaded.get((op, "ext")), str)
                    and not torch.compiler.is_compiling()):
                _warn_extension_missing(op, name, _loaded[(op, "ext")])  # (dynamo cannot trace warnings.warn)
            return load(op, name)
        collected.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(f"{op}: no backend can run these inputs: " + " | ".join(collected))


def explain(op: str, inputs) -> list[tuple[str, list]]:
    """For ``python -m xtk info``: each backend of ``op`` with its reasons on ``inputs`` (auto mode)."""
    return [(name, reasons(op, name, inputs, forced=False)) for name in names(op)]


class ExtensionMissingWarning(UserWarning):
    """An op fell back from the C++/CUDA extension xtk._C, which is not built or does not load."""


_extension_warned = False


def _warn_extension_missing(op: str, chosen: str, why: str) -> None:
    """Once per process: auto picked ``chosen`` for ``op`` because the extension is missing (not when
    the user forced a backend: then the choice is theirs)."""
    global _extension_warned
    if not _extension_warned:
        _extension_warned = True
        warnings.warn(f"xtk: {op} falls back to the {chosen} backend, the extension backend is {why}. Said once "
                      "per process; XTK_BACKEND=eager chooses eager on purpose, without this warning",
                      ExtensionMissingWarning, stacklevel=4)


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
