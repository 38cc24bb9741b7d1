"""The shipped tile tables (kernels/tiles_sm80.json, tiles_sm90.json) run in the interpreter.

Under ``TRITON_INTERPRET=1`` the launcher runs 32x32 tiles (the interpreter's speed), so the
tiles a GPU runs were never executed by a test. Here ``XTK_INTERPRET_TILES=sm80|sm90`` makes the
launcher take that arch's shipped table, and a covering set of cases -- every specialization class
of the attention kernels (plain, posbias, dense, heavy; qk is the decode kernel's) at every padded
head dim (32..256), each class and each head
dim in every precision (fp32 with TF32 allowed, fp32 exact, 16 bit), on both tables -- runs
forward and backward against the eager reference by the 2x rule (tests/tolerance.py). Sizes are
small but never below the tiles: each launch covers at least two query blocks (one partial)
and several key blocks of the real tile sizes. The launcher's config calls are recorded and
checked against the table (class and precision reach ``tiles.config``).

Also here: the table files themselves (complete, well formed, fallback order) and the
``XTK_TILES`` override and its errors, which need no interpreter.
"""
import json
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, T5, alibi_slopes
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import attention as reference

from tolerance import check_against_oracle

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from xtk.kernels import attention_op, tiles  # noqa: E402  (after the interpreter switch)

DEV = "cuda" if CUDA else "cpu"
CLASSES = tiles.ATTN_CLASSES
DIMS = tiles.HEAD_DIMS
PRECISIONS = ("tf32", "ieee", "16bit")


# ----------------------------------------------------------------------------- the covering set

def covering_cases():
    """(arch, cls, d, precision): each class at each head dim; the precision rotates so that every
    class and every head dim meets all three; the two tables see different rotations."""
    cases = []
    for a, arch in enumerate((80, 90)):
        for i, cls in enumerate(CLASSES):
            for j, d in enumerate(DIMS):
                cases.append((arch, cls, d, PRECISIONS[(i + j + a) % 3]))
    return cases


def _dtype(precision, d):
    if precision != "16bit":
        return torch.float32
    return torch.float16 if d % 64 else torch.bfloat16  # both 16-bit types appear


def _sizes(arch, cls, d, precision):
    """nq, nk: past the largest BLOCK_M (two query blocks, one partial) and BLOCK_N of the launches."""
    cfgs = [tiles.lookup(kind, arch, d, precision, tiles.dq_class(cls, cls == "plain") if kind == "dq" else cls)[1]
            for kind in ("fwd", "dkdv", "dq")]
    bm = max(c[0] for c in cfgs)
    bn = max(max(c[1] for c in cfgs), max(c[0] for c in cfgs[1:2]))
    return bm + 5, max(2 * bn - 3, bm + 9)


def make(cls, d, nq, nk, dtype):
    """(inputs, grad names, kw builder) for one class: causal GQA 2->1 attention plus
    plain: grouped QK-norm with learned dim scales and a learned scale (whose gradient the dq
    kernel forms at the plain tile), rotary + xpos -- QK features leave the class as it is;
    posbias: top-k with learned ALiBi slopes (d 32/128) or a T5 table (d 64/256);
    dense: a dense float bias with grad and a bool key mask; heavy: top-k with ALiBi and a bool key mask.

    With top-k, q and k are small integers (scale 8/d, power-of-two slopes, T5 values multiples of
    1/4): every logit is exact, so the threshold pass and the passes that compare against it agree
    whatever their tiles (random logits computed under two tile shapes may differ in the last bit --
    the interpreter's numpy matmul blocks by shape -- and flip the key at the threshold itself)."""
    h, hk = 2, 1
    inputs = dict(q=torch.randn(1, h, nq, d, device=DEV), k=torch.randn(1, hk, nk, d, device=DEV),
                  v=torch.randn(1, hk, nk, d, device=DEV))
    if cls in ("posbias", "heavy"):  # top-k
        inputs["q"] = torch.randint(-2, 3, (1, h, nq, d), device=DEV).float()
        inputs["k"] = torch.randint(-2, 3, (1, hk, nk, d), device=DEV).float()
    grads = ["q", "k", "v"]
    t5 = cls == "posbias" and d in (64, 256)
    if cls in ("posbias", "heavy") and not t5:
        inputs["slopes"] = torch.tensor(alibi_slopes(h), device=DEV)
        if cls == "posbias":
            grads.append("slopes")
    if t5:
        inputs["t5table"] = torch.randint(-8, 9, (32, h), device=DEV).float() / 4
        grads.append("t5table")
    if cls == "dense":
        inputs["dense"] = torch.randn(1, h, nq, nk, device=DEV)
        grads.append("dense")
    if cls in ("dense", "heavy"):
        m = torch.rand(1, 1, 1, nk, device=DEV) > 0.2
        m[..., :3] = True
        inputs["keymask"] = m
    if cls == "plain":
        inputs["qs"] = torch.rand(h, 1, d, device=DEV) + 0.5
        inputs["ks"] = torch.rand(hk, 1, d, device=DEV) + 0.5
        inputs["lam"] = torch.tensor(4.0, device=DEV)
        grads += ["qs", "ks", "lam"]
    rd = min(d, 32)

    def kw(slopes=None, t5table=None, dense=None, keymask=None, qs=None, ks=None, lam=None):
        out = dict(is_causal=True, q_offset=nk - nq if nk > nq else 0, k_prefix=2)
        if slopes is not None:
            out["bias"] = Alibi(slopes)
        if t5table is not None:
            out["bias"] = T5(t5table, num_buckets=32, max_distance=64, causal=True, scale=0.5)
        if dense is not None:
            out["bias"] = Dense(dense)
        if keymask is not None:
            out["attn_mask"] = keymask
        if qs is not None:
            out["qk_norm"] = QKNorm(groups=2, scale=lam, q_dim_scale=qs, k_dim_scale=ks)
            out["rotary"] = Rotary(rd, rotary_inv_freq(rd, device=DEV), xpos_scale=xpos_scale(rd, device=DEV))
        if cls in ("posbias", "heavy"):
            out.update(topk=8, scale=8.0 / d)  # a power of two: logits stay exact, of size ~1 at every d
        return out

    return inputs, grads, kw


@pytest.fixture
def recorded(monkeypatch):
    """The launcher's config calls: list of (kind, arch, precision, cls, returned dict)."""
    calls = []
    real = attention_op.config

    def spy(kind, d, dv, arch=90, topk=0, precision="16bit", cls="plain"):
        cfg = real(kind, d, dv, arch, topk, precision=precision, cls=cls)
        calls.append((kind, precision, cls, cfg))
        return cfg
    monkeypatch.setattr(attention_op, "config", spy)
    return calls


@pytest.mark.skipif(CUDA, reason="the interpreter's tile override; on a GPU every test runs the shipped tiles")
@pytest.mark.parametrize("arch,cls,d,precision", covering_cases(),
                         ids=[f"sm{a}-{c}-d{d}-{p}" for a, c, d, p in covering_cases()])
def test_shipped_tiles_in_interpreter(arch, cls, d, precision, monkeypatch, recorded):
    monkeypatch.setenv("XTK_INTERPRET_TILES", f"sm{arch}")
    nq, nk = _sizes(arch, cls, d, precision)
    inputs, grads, kw = make(cls, d, nq, nk, _dtype(precision, d))

    def kernel(q, k, v, **extra):
        return xtk.attention(q, k, v, backend="triton", enable_gqa=True, **kw(**extra))

    def eager(q, k, v, **extra):
        return reference(q, k, v, **kw(**extra))

    allow = torch.backends.cuda.matmul.allow_tf32  # fp32 launches take PRECISION 'tf32' when allowed
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        check_against_oracle(kernel, eager, inputs, _dtype(precision, d), grad_names=grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    kinds = {c[0] for c in recorded}
    assert {"fwd", "dkdv", "dq"} <= kinds and ("thr" in kinds) == (cls in ("posbias", "heavy")), kinds
    for kind, prec, got_cls, cfg in recorded:
        want_cls = tiles.dq_class(cls, cls == "plain") if kind == "dq" else cls  # plain: a learned QK-norm scale
        assert (prec, got_cls) == (precision, want_cls), (kind, prec, got_cls)
        if kind != "thr":
            want = tiles.lookup(kind, arch, d, precision, want_cls)[1]
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]) == want, (kind, cfg, want)


def test_covering_set_meets_every_class_dim_and_precision():
    cases = covering_cases()
    for arch in (80, 90):
        sub = [c for c in cases if c[0] == arch]
        assert {(c, d) for _, c, d, _ in sub} == {(c, d) for c in CLASSES for d in DIMS}
    assert {(c, p) for _, c, _, p in cases} == {(c, p) for c in CLASSES for p in PRECISIONS}
    assert {(d, p) for _, _, d, p in cases} == {(d, p) for d in DIMS for p in PRECISIONS}


# ----------------------------------------------------------------------------- the tables themselves

def test_class_order_and_fallback():
    sc = tiles.spec_class
    assert sc(0, 0, False, False, False) == "plain"
    assert sc(1, 0, False, False, False) == sc(2, 0, False, False, False) == "posbias"
    assert sc(3, 0, False, False, False) == sc(4, 0, False, False, False) == sc(1, 2, False, False, False) == "dense"
    assert sc(0, 1, False, False, False) == "dense"
    assert sc(3, 1, False, False, True) == "qk"
    # top-k: posbias without a dense bias or mask (its tiles were picked with it), heavy with one
    assert sc(0, 0, True, False, False) == sc(1, 0, True, False, False) == sc(2, 0, True, False, False) == "posbias"
    assert sc(3, 0, True, False, False) == sc(0, 2, True, False, False) == sc(1, 1, True, False, False) == "heavy"
    assert sc(0, 0, False, True, True) == sc(1, 0, False, True, False) == sc(4, 2, True, True, True) == "heavy"
    with pytest.raises(tiles.TileConfigError):
        sc(9, 0, False, False, False)


@pytest.mark.parametrize("arch", [80, 90])
def test_shipped_tables_are_complete(arch):
    """Every key has an entry, with its evidence: all classes at 16 bit and TF32; exact fp32 (FMA
    tiles) holds plain and heavy, the classes between fall back to heavy; thr only for heavy."""
    table = tiles.shipped(arch)["tiles"]
    for prec in tiles.PRECISIONS:
        for bd in DIMS:
            for kind in ("fwd", "dkdv", "dq"):
                for cls in CLASSES:
                    if prec != "ieee" or cls in ("plain", "heavy"):
                        assert tiles.key(kind, cls, prec, bd) in table
                    else:
                        assert tiles.lookup(kind, arch, bd, prec, cls)[0] == tiles.key(kind, "heavy", prec, bd)
            for kind in ("thr", "thrwide"):
                assert tiles.key(kind, "heavy", prec, bd) in table
    path = os.path.join(os.path.dirname(tiles.__file__), f"tiles_sm{arch}.json")
    with open(path) as f:
        data = json.load(f)
    assert data["evidence"] and set(data.get("evidence_keys", {})) <= set(table)


def test_sm80_table_serves_99kb_archs_and_unsupported_archs_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for arch in (80, 86, 87, 89, 90):
        assert tiles.config("fwd", 64, 64, arch)["BLOCK_M"] >= 16
        assert tiles.unsupported_reason(arch) is None
    for k, v in tiles.shipped(80)["smem99"].items():
        kind, cls, prec, bd = k.split("/")
        topk = {"thr": 1, "thrwide": tiles.MAX_TOPK}.get(kind, 0)
        args = ("thr" if kind == "thrwide" else kind, int(bd[1:]), int(bd[1:]), 86, topk, prec, cls)
        if v is None:  # refused on 99 KB archs, with a reason the backend reports
            with pytest.raises(tiles.UnsupportedConfig, match="99 KB"):
                tiles.config(*args)
            assert "99 KB" in tiles.refusal(86, int(bd[1:]), int(bd[1:]), topk, prec)
            assert tiles.refusal(80, int(bd[1:]), int(bd[1:]), topk, prec) is None
            continue
        got = tiles.config(*args)
        assert (got["BLOCK_M"], got["BLOCK_N"], got["num_warps"], got["num_stages"]) == v
    for arch in (75, 70, 100, 120):
        with pytest.raises(tiles.UnsupportedArch, match=f"sm_{arch}"):
            tiles.config("fwd", 64, 64, arch)
        assert "sm_80" in tiles.unsupported_reason(arch)


def test_thr_takes_the_wide_entry_past_its_block(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for prec in tiles.PRECISIONS:
        narrow = tiles.config("thr", 64, 64, 90, 2, prec, "heavy")
        assert narrow["BLOCK_N"] >= 2
        wide = tiles.config("thr", 64, 64, 90, 128, prec, "heavy")
        assert wide["BLOCK_N"] >= 128
        assert (wide["BLOCK_M"], wide["BLOCK_N"]) == tuple(tiles.lookup("thrwide", 90, 64, prec, "heavy")[1][:2])


def test_xtk_tiles_override(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"arch": 90, "tiles": {"fwd/posbias/16bit/d128": [32, 16, 2, 1]}}))
    monkeypatch.setenv("XTK_TILES", str(path))
    assert tiles.config("fwd", 128, 128, 90, 0, "16bit", "posbias") == dict(BLOCK_M=32, BLOCK_N=16, num_warps=2,
                                                                            num_stages=1)
    shipped_plain = tiles.shipped(90)["tiles"]["fwd/plain/16bit/d128"]
    assert tuple(tiles.config("fwd", 128, 128, 90, 0, "16bit", "plain").values()) == shipped_plain
    # another arch's file does not apply here
    assert tuple(tiles.config("fwd", 128, 128, 80, 0, "16bit", "posbias").values()) == \
        tiles.shipped(80)["tiles"]["fwd/posbias/16bit/d128"]
    # a missing class entry falls back to a heavier class, never a lighter one
    assert tiles.lookup("thr", 90, 64, "tf32", "plain")[0] == "thr/heavy/tf32/d64"


@pytest.mark.parametrize("content,match", [
    ("{not json", "not JSON"),
    (json.dumps({"tiles": {}}), "key 'arch'"),
    (json.dumps({"arch": 75, "tiles": {}}), "key 'arch'"),
    (json.dumps({"arch": 90, "tiles": {"fwd/plain/16bit/d96": [64, 64, 4, 2]}}), "fwd/plain/16bit/d96"),
    (json.dumps({"arch": 90, "tiles": {"fwd/huge/16bit/d64": [64, 64, 4, 2]}}), "fwd/huge/16bit/d64"),
    (json.dumps({"arch": 90, "tiles": {"dq/plain/tf32/d64": [64, 48, 4, 2]}}), "dq/plain/tf32/d64"),
    (json.dumps({"arch": 90, "tiles": {"dq/plain/tf32/d64": [64, 64, 4]}}), "dq/plain/tf32/d64"),
    (json.dumps({"arch": 90, "tiles": {"thrwide/heavy/ieee/d64": [32, 64, 4, 1]}}), "thrwide/heavy/ieee/d64"),
    (json.dumps({"arch": 90, "tiles": []}), "key 'tiles'"),
])
def test_malformed_override_names_file_and_key(tmp_path, monkeypatch, content, match):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv("XTK_TILES", str(path))
    with pytest.raises(tiles.TileConfigError, match=match) as err:
        tiles.config("fwd", 64, 64, 90)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- packaging

def _load_tiles_from(path):
    """kernels/tiles.py of an installed tree, loaded as a module of a stand-in package (it needs only
    its json and kernels/kinds.py beside it)."""
    import importlib.util
    import sys
    import types
    pkg = types.ModuleType("installed_kernels")
    pkg.__path__ = [os.path.dirname(path)]
    sys.modules["installed_kernels"] = pkg
    try:
        spec = importlib.util.spec_from_file_location("installed_kernels.tiles", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("installed_kernels", None)
        sys.modules.pop("installed_kernels.kinds", None)
    return mod


def test_tables_install_with_the_package(tmp_path):
    """A regular (non-editable) install carries the json next to tiles.py (package_data), and the
    editable install in use reads them from kernels/."""
    import shutil
    import subprocess
    import sys
    import zipfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", "build", "tests", "__pycache__", "*.egg-info",
                                                             "results", "*.so"))
    env = dict(os.environ, XTK_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "whl"), str(src)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("xtk-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"xtk/kernels/tiles.py", "xtk/kernels/tiles_sm80.json", "xtk/kernels/tiles_sm90.json"} <= names, \
            sorted(n for n in names if n.startswith("xtk/kernels/"))
        z.extractall(tmp_path / "site")
    installed = _load_tiles_from(tmp_path / "site" / "xtk" / "kernels" / "tiles.py")
    for arch in (80, 90):
        assert installed.shipped(arch)["tiles"] == tiles.shipped(arch)["tiles"]
    assert os.path.exists(os.path.join(os.path.dirname(tiles.__file__), "tiles_sm90.json"))
