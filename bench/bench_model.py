"""A whole model: TransformerWrapper + Decoder (the seeds' GPT-like 512-dim config:
``dim=512, depth=12, heads=8, num_tokens=20000, max_seq_len=1024``) with ALiBi, T5 relative
bias, dynamic position bias, rotary+xpos, QK-norm, top-k (8), or none; a training step (forward, next-token cross entropy,
backward) and KV-cached generation in tokens/s; xtk's auto backends vs ``XTK_BACKEND=eager``
on the same model and inputs, and x-transformers itself (2.31.x, what xtk replaces; the same weights,
loaded into xtk's model; skipped, saying how to install it, when absent). The implementations of
a row are timed interleaved. The quick sweep uses depth 2, shorter sequences. Generation also
runs as ``xtk-cat``: xtk with the cache grown by ``torch.cat`` every step (the decoding loop's
preallocation, ``xtk.models.autoregressive.preallocate``, switched off): what the preallocated
cache saves.

The model classes are written alongside this suite: until ``xtk.TransformerWrapper``,
``xtk.Decoder`` and ``xtk.AutoregressiveWrapper`` import, every row is skipped with the reason.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from .common import BusyLoad, Result, measure_interleaved

IMPLS = ["xtk", "eager", "xtk-cat", "x-transformers"]
CASES = {"none": {}, "alibi": {"alibi_pos_bias": True}, "t5": {"rel_pos_bias": True},
         "dynamic": {"dynamic_pos_bias": True}, "rotary_xpos": {"rotary_pos_emb": True, "rotary_xpos": True},
         "qknorm": {"attn_qk_norm": True}, "topk": {"attn_sparse_topk": 8}}
MODES = ["step", "generate"]


VOCAB = 20000
SHAPE_KEYS = ("depth", "batch", "seq", "prompt", "gen", "vocab", "dim")


def config(device: str, full: bool, override: dict | None = None) -> dict:
    """The sweep's model size; ``override`` (``--model-shape``) replaces any of SHAPE_KEYS."""
    if full:
        cfg = dict(depth=12, batch=4 if device == "cuda" else 1, seq=1024, prompt=64, gen=256)
    elif device == "cuda":
        cfg = dict(depth=12, batch=4, seq=1024, prompt=64, gen=128)
    else:
        cfg = dict(depth=2, batch=1, seq=128, prompt=8, gen=16)
    cfg["vocab"], cfg["dim"] = VOCAB, 512
    cfg.update(override or {})
    return cfg


def parse_shape(text: str) -> dict:
    """``depth=2,seq=1024,vocab=256`` -> dict; raises ValueError on unknown keys or non-positive values."""
    out = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in SHAPE_KEYS or int(val) <= 0:
            raise ValueError(item)
        out[key] = int(val)
    return out


def classes():
    """(TransformerWrapper, Decoder, AutoregressiveWrapper) or a string saying why not."""
    try:
        import xtk
        return xtk.TransformerWrapper, xtk.Decoder, xtk.AutoregressiveWrapper
    except Exception as e:  # noqa: BLE001
        return f"xtk model classes not importable yet ({type(e).__name__}: {e})"


def impls_for(mode: str, impls=None) -> list:
    """The implementations a mode runs: ``xtk-cat`` only generates."""
    return [i for i in (impls or IMPLS) if not (i == "xtk-cat" and mode != "generate")]


@contextlib.contextmanager
def concatenated_cache(on: bool):
    """With ``on``, the decoding loop keeps its cache as ``torch.cat`` grows it (no preallocation)."""
    from xtk.models import autoregressive
    keep = autoregressive.preallocate
    if on:
        autoregressive.preallocate = lambda cache, steps_left: cache
    try:
        yield
    finally:
        autoregressive.preallocate = keep


@contextlib.contextmanager
def backend_env(impl: str):
    old = os.environ.get("XTK_BACKEND")
    os.environ["XTK_BACKEND"] = "eager" if impl == "eager" else "auto"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XTK_BACKEND", None)
        else:
            os.environ["XTK_BACKEND"] = old


def x_transformers_classes():
    """x-transformers' (TransformerWrapper, Decoder, AutoregressiveWrapper), or why not."""
    try:
        import x_transformers as xt
        return xt.TransformerWrapper, xt.Decoder, xt.AutoregressiveWrapper
    except Exception as e:  # noqa: BLE001
        return (f"x-transformers not installed ({type(e).__name__}); pip install x-transformers==2.31.10 "
                f"for this column")


def build(case: str, cfg: dict, device: str, dtype):
    """-> (xtk model, xtk's AutoregressiveWrapper, (x-transformers model, its wrapper) or why not).
    With x-transformers installed both models hold the same weights: x-transformers' model is
    built (seed 0) and its state_dict loaded into xtk's (``xtk.load_x_transformers_weights``)."""
    TW, Dec, AR = classes()
    kwargs = dict(num_tokens=cfg["vocab"], max_seq_len=max(1024, cfg["seq"], cfg["prompt"] + cfg["gen"]))
    layers = dict(dim=cfg["dim"], depth=cfg["depth"], heads=8, **CASES[case])
    torch.manual_seed(0)
    model = TW(attn_layers=Dec(**layers), **kwargs)
    xt = x_transformers_classes()
    if not isinstance(xt, str):
        import xtk
        torch.manual_seed(0)
        xt_model = xt[0](attn_layers=xt[1](**layers), **kwargs)
        xtk.load_x_transformers_weights(model, xt_model.state_dict())
        xt = (xt_model.to(device=device, dtype=dtype), xt[2])
    return model.to(device=device, dtype=dtype), AR, xt


def make_call(impl, case, mode, cfg, device, dtype, model, AR, xt=None):
    """The timed callable of one (impl, mode): a training step (forward, cross entropy, backward) or
    a KV-cached generation. ``impl`` 'x-transformers' runs ``xt`` = (its model, its wrapper)."""
    g = torch.Generator().manual_seed(0)
    if impl == "x-transformers":
        model, AR = xt
    if mode == "step":
        model.train()
        x = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=g).to(device)

        def step():
            with backend_env(impl):
                for p in model.parameters():
                    p.grad = None
                logits = model(x[:, :-1])
                loss = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:])
                loss.backward()
        return step
    model.eval()
    wrapper = AR(model)
    prompt = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["prompt"]), generator=g).to(device)

    def gen():
        with backend_env(impl), concatenated_cache(impl == "xtk-cat"), torch.no_grad():
            return wrapper.generate(prompt, cfg["gen"], cache_kv=True)
    return gen


def run(device: str, full: bool, dtype, impls=None, modes=None, cases=None, progress=None, shape=None, busy=0):
    """One ``Result`` per (case, mode, impl); the implementations of one (case, mode) are timed
    interleaved (``measure_interleaved``), so that a noisy machine slows all alike. ``busy`` > 0:
    every row again with that many competing processes (``BusyLoad``), its case named ``<case>
    busy<N>``."""
    results = []
    cfg = config(device, full, shape)
    why = classes()
    for case in cases or CASES:
        model = AR = xt = None
        if not isinstance(why, str):
            model, AR, xt = build(case, cfg, device, dtype)
        for mode in modes or MODES:
            for load in [0] + ([busy] if busy else []):
                rows = _rows(case, mode, cfg, dtype, impls, load)
                with BusyLoad(load):
                    _measure_rows(rows, why, xt, lambda impl: make_call(impl, case, mode, cfg, device, dtype, model, AR, xt),
                                  device, full)
                results += [r for r, _ in rows]
                if progress:
                    for _ in rows:
                        progress()
        model = AR = xt = None  # free both models before the next case
    return results


def _rows(case, mode, cfg, dtype, impls, load) -> list:
    """[(Result, impl)] of one (case, mode) under ``load`` competing processes."""
    params = dict(cfg, heads=8, dtype=str(dtype).replace("torch.", ""), busy=load)
    tokens = cfg["batch"] * (cfg["seq"] if mode == "step" else cfg["gen"])
    name = case + (f" busy{load}" if load else "")
    return [(Result("model", name, impl, mode, dict(params), tokens=tokens), impl) for impl in impls_for(mode, impls)]


def _measure_rows(rows, why, xt, make, device, full) -> None:
    todo = []
    for r, impl in rows:
        if isinstance(why, str):
            r.status = "skipped: " + why
        elif impl == "x-transformers" and isinstance(xt, str):
            r.status = "skipped: " + xt
        else:
            todo.append((r, lambda impl=impl: make(impl)))
    measure_interleaved(todo, device, quick=not full)


def count(device: str, full: bool, impls=None, modes=None, cases=None, busy=0) -> int:
    return len(cases or CASES) * sum(len(impls_for(m, impls)) for m in modes or MODES) * (2 if busy else 1)
