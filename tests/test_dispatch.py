"""Honest dispatch (issue 13): the bias descriptor is the interface, and a forced backend that
cannot run raises with its reasons while ``auto`` moves on -- never a silent drop.

Three silent failures this file pins (each failed on the code before the descriptor interface):
- a subclass of ``xtk.bias.Alibi`` (and of the other kinds) passed validation, but the ``chunked``
  backend looked its kind up by exact ``type()`` and ran attention with no bias at all;
- the Triton adapter's ``isinstance`` chain ended without an ``else``: an unknown kind ran unbiased;
- ``backend="triton"`` (or ``"chunked"``) together with ``hooks`` silently ran eager.
"""
import dataclasses
import os

import pytest
import torch

import xtk
from xtk import backends
from xtk.bias import Alibi, Bias, Dense, DistanceTable, T5
from xtk.reference.attention import ScoreHooks

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["eager", "chunked"] + (["triton"] if TRITON else [])
B, H, NQ, NK, D = 2, 4, 5, 7, 16


def qkv(dtype=torch.float32, d=D):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, d, generator=g).to(DEV, dtype) for n in (NQ, NK, NK)]


def kinds():
    g = torch.Generator().manual_seed(1)
    return {"alibi": (Alibi, dict(slopes=torch.tensor([0.5, 0.25, 0.125]))),
            "t5": (T5, dict(table=torch.randn(16, H, generator=g), num_buckets=16, max_distance=20)),
            "dt": (DistanceTable, dict(table=torch.randn(2 * 8 - 1, H, generator=g))),
            "dense": (Dense, dict(tensor=torch.randn(1, H, NQ, NK, generator=g)))}


def subclass_of(cls):
    """A user's subclass: a new name and an extra field, nothing overridden."""
    return dataclasses.make_dataclass("My" + cls.__name__, [("note", str, dataclasses.field(default="mine"))],
                                      bases=(cls,), frozen=True, eq=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["alibi", "t5", "dt", "dense"])
def test_subclass_of_a_kind_runs_as_that_kind(kind, backend):
    cls, fields = kinds()[kind]
    fields = {n: t.to(DEV) if isinstance(t, torch.Tensor) else t for n, t in fields.items()}
    q, k, v = qkv()
    want = xtk.attention(q, k, v, is_causal=True, bias=cls(**fields), backend=backend)
    got = xtk.attention(q, k, v, is_causal=True, bias=subclass_of(cls)(**fields), backend=backend)
    unbiased = xtk.attention(q, k, v, is_causal=True, backend=backend)
    assert (want - unbiased).abs().max() > 1e-2, "the case must be sensitive to the bias"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class Hump(Bias):
    """A user's new kind with only what the eager path needs: +1 on the diagonal p_i = p_j."""

    def validate(self, b, h, nq, nk, q_offset, k_prefix, device):
        pass

    def materialize(self, h, nq, nk, q_offset, k_prefix):
        pi = torch.arange(nq) + q_offset
        pj = torch.arange(nk) - k_prefix
        return (pi[:, None] == pj[None, :]).float().to(DEV)


def test_a_new_kind_runs_eager_and_the_others_say_why_not():
    q, k, v = qkv()
    got = xtk.attention(q, k, v, bias=Hump())  # auto moves on to eager
    want = xtk.attention(q, k, v, attn_mask=Hump().materialize(H, NQ, NK, 0, 0), backend="eager")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for backend in BACKENDS[1:]:
        with pytest.raises(RuntimeError, match=f"backend '{backend}'.*Hump"):
            xtk.attention(q, k, v, bias=Hump(), backend=backend)


class DuckAlibi:
    """Looks like an ALiBi descriptor, is not one."""

    def __init__(self, slopes):
        self.slopes = slopes

    def materialize(self, h, nq, nk, q_offset, k_prefix):
        raise AssertionError("never reached")


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_a_duck_typed_descriptor_is_refused(backend):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"bias: expected xtk.bias.Alibi.*got DuckAlibi"):
        xtk.attention(q, k, v, bias=DuckAlibi(torch.ones(H)), backend=backend)


def _pairs():
    """(backend, feature name, call kwargs) for every backend that cannot run a feature."""
    hooks = ScoreHooks("talking heads", pre_bias=lambda s: s)
    pairs = [(b, "hooks", dict(hooks=hooks)) for b in ("chunked", "triton")]
    pairs += [(b, "custom bias kind", dict(bias=Hump())) for b in ("chunked", "triton")]
    pairs += [("chunked", "dropout", dict(dropout_p=0.1)),
              ("triton", "float64", dict(dtype=torch.float64)),
              ("triton", "head dim 320", dict(d=320)),
              ("triton", "top-k 200", dict(topk=200, nk=256))]
    return [p for p in pairs if p[0] in BACKENDS]


@pytest.mark.parametrize("backend,feature,kw", _pairs(), ids=lambda x: x if isinstance(x, str) else "")
def test_forced_backend_that_cannot_run_raises(backend, feature, kw):
    kw = dict(kw)
    dtype, d, nk = kw.pop("dtype", torch.float32), kw.pop("d", D), kw.pop("nk", NK)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, NQ, d, generator=g).to(DEV, dtype)
    k, v = (torch.randn(B, H, nk, d, generator=g).to(DEV, dtype) for _ in range(2))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' was requested but cannot run"):
        xtk.attention(q, k, v, backend=backend, **kw)
    chosen = backends.pick("attention", xtk.ops.attention._validate(
        q, k, v, None, kw.get("dropout_p", 0.0), False, None, False, kw.get("bias"), kw.get("topk"), None, None,
        None, 0, kw.get("hooks")))
    assert chosen.name != backend  # auto moved on


def test_hooks_go_through_pick():
    q, k, v = qkv()
    seen = []
    hooks = ScoreHooks("a test hook", pre_bias=lambda s: seen.append(s.shape) or s * 2)
    out = xtk.attention(q, k, v, hooks=hooks)
    assert seen, "auto must pick a backend that runs the hook (eager)"
    torch.testing.assert_close(out, xtk.attention(q, k, v, scale=2 * D ** -0.5, backend="eager"))
    seen.clear()
    xtk.attention(q, k, v, hooks=hooks, backend="eager")
    assert seen


def test_the_old_backend_name_says_what_it_became(monkeypatch):
    """'sdpa' named xtk's chunked CPU backend, easy to mistake for torch's SDPA: the name is refused
    with the new one, as a call argument and in XTK_BACKEND."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend: expected one of .* got 'sdpa': .* now called 'chunked'"):
        xtk.attention(q, q, q, backend="sdpa")
    monkeypatch.setenv("XTK_BACKEND", "sdpa")
    with pytest.raises(ValueError, match="XTK_BACKEND: .* now called 'chunked'"):
        xtk.attention(q, q, q)
    monkeypatch.setenv("XTK_BACKEND", "chunked")
    assert torch.equal(xtk.attention(q, q, q), xtk.attention(q, q, q, backend="chunked"))
