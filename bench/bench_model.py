"""A whole model: TransformerWrapper + Decoder (the seeds' GPT-like 512-dim config:
``dim=512, depth=12, heads=8, num_tokens=20000, max_seq_len=1024``) with ALiBi, T5 relative
bias, dynamic position bias, or none; a training step (forward, next-token cross entropy,
backward) and KV-cached generation in tokens/s; xtk's auto backends vs ``XTK_BACKEND=eager``
on the same model and inputs. The quick sweep uses depth 2, shorter sequences. Generation also
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

from .common import Result, measure

IMPLS = ["xtk", "eager", "xtk-cat"]
CASES = {"none": {}, "alibi": {"alibi_pos_bias": True}, "t5": {"rel_pos_bias": True},
         "dynamic": {"dynamic_pos_bias": True}}
MODES = ["step", "generate"]


VOCAB = 20000
SHAPE_KEYS = ("depth", "batch", "seq", "prompt", "gen", "vocab")


def config(device: str, full: bool, override: dict | None = None) -> dict:
    """The sweep's model size; ``override`` (``--model-shape``) replaces any of SHAPE_KEYS."""
    if full:
        cfg = dict(depth=12, batch=4 if device == "cuda" else 1, seq=1024, prompt=64, gen=256)
    elif device == "cuda":
        cfg = dict(depth=12, batch=4, seq=1024, prompt=64, gen=128)
    else:
        cfg = dict(depth=2, batch=1, seq=128, prompt=8, gen=16)
    cfg["vocab"] = VOCAB
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


def build(case: str, cfg: dict, device: str, dtype):
    TW, Dec, AR = classes()
    torch.manual_seed(0)
    model = TW(num_tokens=cfg["vocab"], max_seq_len=max(1024, cfg["seq"], cfg["prompt"] + cfg["gen"]),
               attn_layers=Dec(dim=512, depth=cfg["depth"], heads=8, **CASES[case]))
    return model.to(device=device, dtype=dtype), AR


def make_call(impl, case, mode, cfg, device, dtype, model, AR):
    g = torch.Generator().manual_seed(0)
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


def run(device: str, full: bool, dtype, impls=None, modes=None, cases=None, progress=None, shape=None):
    results = []
    cfg = config(device, full, shape)
    why = classes()
    for case in cases or CASES:
        model = AR = None
        if not isinstance(why, str):
            model, AR = build(case, cfg, device, dtype)
        for mode in modes or MODES:
            for impl in impls_for(mode, impls):
                params = dict(cfg, dim=512, heads=8, dtype=str(dtype).replace("torch.", ""))
                tokens = cfg["batch"] * (cfg["seq"] if mode == "step" else cfg["gen"])
                r = Result("model", case, impl, mode, params, tokens=tokens)
                if isinstance(why, str):
                    r.status = "skipped: " + why
                else:
                    measure(r, lambda: make_call(impl, case, mode, cfg, device, dtype, model, AR), device, quick=not full)
                results.append(r)
                if progress:
                    progress()
        del model
    return results


def count(device: str, full: bool, impls=None, modes=None, cases=None) -> int:
    return len(cases or CASES) * sum(len(impls_for(m, impls)) for m in modes or MODES)
