"""Launch and addressing hazards of the Triton attention kernels (issue 11, "Found" 3-5).

- Grid limits: CUDA caps grid axes 1 and 2 at 65,535; every launch folds (blocks x batch*heads)
  onto axis 0 (``attention_op.launch_grids``), checked at b*h = 2048*32 and n up to 2^24.
- int64 addressing: views whose row offsets pass 2^31 elements (a packed qkv with an enormous row
  stride, a dense bias/mask with an enormous row stride), built with ``as_strided`` on one large
  *virtual* buffer (``torch.empty`` commits no memory; only the few rows the view holds are
  touched), run in the interpreter, values and gradients against eager by the 2x rule.
- Device guard: every launch runs under ``attention_op._device_guard(q.device)``.
- Dropout seed on the device: drawn with torch's generator on q's device, loaded by the kernels
  from a pointer, kept on the device for the backward (no ``.item()``); explicit seeds give the
  same Philox streams as before.
- ``do_not_specialize`` for the integers that change every decode step, and the AOT signature
  mapping that follows it.
"""
import contextlib
import hashlib
import os

import pytest
import torch

import xtk
from xtk.bias import Dense
from xtk.reference.attention import attention as reference

from launch_spy import spy_launches
from tolerance import check_against_oracle

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless overridden)",
                allow_module_level=True)

from xtk.kernels import attention_op  # noqa: E402  (after the interpreter switch)

AXIS0_MAX, AXIS12_MAX = 2 ** 31 - 1, 65535


# ----------------------------------------------------------------------------- grid limits

@pytest.mark.parametrize("b,h,hk,nq,nk", [(2048, 32, 8, 1, 4096), (2048, 32, 32, 16, 32768),
                                          (1, 1, 1, 2 ** 24, 2 ** 24), (4096, 64, 1, 1, 65),
                                          (3, 5, 5, 70000 * 16, 17)])
def test_launch_grids_within_cuda_limits(b, h, hk, nq, nk):
    """Every launch's grid: axis 0 <= 2^31-1, axes 1 and 2 <= 65,535, and the programs cover
    exactly (blocks x batch*heads) of each kernel, for decode batches (b*h = 65,536, past the
    65,535 of axes 1/2) and sequences of 2^24 (2^20 query blocks, past 65,535 too)."""
    tiles = dict(fwd=(16, 32), thr=(16, 32), dkdv=(16, 16), dq=(16, 16), mask=(32, 32))
    grids = attention_op.launch_grids(b, h, hk, nq, nk, tiles)
    cdiv = lambda a, c: -(-a // c)  # noqa: E731
    want = dict(fwd=cdiv(nq, 16) * b * h, thr=cdiv(nq, 16) * b * h, dkdv=cdiv(nk, 16) * b * hk,
                dq=cdiv(nq, 16) * b * h, mask=cdiv(nq, 32) * b * h)
    for kind, grid in grids.items():
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert grid[0] <= AXIS0_MAX and grid[1] <= AXIS12_MAX and grid[2] <= AXIS12_MAX, (kind, grid)
        assert grid[0] * grid[1] * grid[2] == want[kind], (kind, grid, want[kind])


def test_launch_grid_refuses_more_programs_than_axis0_holds():
    with pytest.raises(ValueError, match="programs"):
        attention_op.launch_grids(2 ** 20, 2 ** 10, 1, 2 ** 20, 1, dict(fwd=(16, 16)))


@pytest.mark.parametrize("feature", ["gqa", "causal_table", "mask_dense_grad"])
def test_many_heads_small_case_matches_eager(feature):
    """The folded program index (query block, batch*head) decodes to the right tile: b*h = 15
    programs' worth of heads over 3 query blocks, GQA 5 -> 1, values and gradients against eager."""
    b, h, hk, nq, nk, d = 3, 5, 1 if feature == "gqa" else 5, 70, 45, 16
    inputs = dict(q=torch.randn(b, h, nq, d, device=DEV), k=torch.randn(b, hk, nk, d, device=DEV),
                  v=torch.randn(b, hk, nk, d, device=DEV))
    names = ["q", "k", "v"]
    kw = dict(enable_gqa=hk != h)
    if feature == "causal_table":
        inputs["table"] = torch.randn(2 * (nq + nk) - 1, h, device=DEV)
        names.append("table")
        kw.update(is_causal=True, q_offset=nk - nq + 3)
    if feature == "mask_dense_grad":
        inputs["dense"] = torch.randn(b, 1, nq, nk, device=DEV)
        inputs["mask"] = torch.rand(1, h, nq, nk, device=DEV) > 0.3
        names.append("dense")

    def kernel(q, k, v, table=None, dense=None, mask=None):
        return xtk.attention(q, k, v, backend="triton", **_extra(kw, table, dense, mask))

    def eager(q, k, v, table=None, dense=None, mask=None):
        a = _extra(kw, table, dense, mask)
        a.pop("enable_gqa")
        return reference(q, k, v, **a)

    check_against_oracle(kernel, eager, inputs, torch.float32, grad_names=names)


def _extra(kw, table, dense, mask):
    from xtk.bias import DistanceTable
    out = dict(kw)
    if table is not None:
        out["bias"] = DistanceTable(table)
    if dense is not None:
        out["bias"] = Dense(dense)
    if mask is not None:
        out["attn_mask"] = mask
    return out


# ----------------------------------------------------------------------------- int64 addressing

BIG_ROW = 2 ** 27 + 64  # elements: row 16 of a view sits past 2^31 (an int32 offset wraps there)
BIG_BASE = 2 ** 31  # the views start here, so a wrapped (negative) int32 offset still lands inside the
#                     buffer (on untouched zeros) and shows up as a wrong value, not a crash


@contextlib.contextmanager
def virtual_buffer(numel, dtype):
    """A CPU tensor of ``numel`` elements whose pages are only committed where written (torch.empty
    does not touch memory); skips when the OS refuses the address space."""
    if CUDA:
        pytest.skip("the virtual-buffer trick is for CPU (on a GPU the buffer would be real memory)")
    try:
        buf = torch.empty(numel, dtype=dtype)
    except RuntimeError as e:  # overcommit refused
        pytest.skip(f"cannot reserve {numel * torch.finfo(dtype).bits // 8 / 2 ** 30:.1f} GiB of address space: {e}")
    try:
        yield buf
    finally:
        del buf


def strided_views(buf, b, n, heads, d, row, base, slot, nslots):
    """A (b, heads, n, d) view of a packed (b, n, nslots, heads, d) layout with row stride ``row``
    starting at element ``base``: slot ``slot`` of the packed qkv a fused projection gives."""
    size = (b, heads, n, d)
    stride = (n * row, d, row, 1)
    return buf.as_strided(size, stride, base + slot * heads * d)


def test_packed_qkv_with_row_offsets_past_2_31():
    """q/k/v (and a dense float bias) whose row offsets pass 2^31 elements: rows 16.. of every
    view wrap an int32 offset. fp16 so that the buffer is 8 GiB of address space, not 16."""
    b, h, n, d = 1, 2, 20, 16
    assert (n - 1) * BIG_ROW >= 2 ** 31 > BIG_ROW
    numel = BIG_BASE + (n - 1) * BIG_ROW + 4 * h * d + n
    with virtual_buffer(numel, torch.float16) as buf:
        q, k, v = (strided_views(buf, b, n, h, d, BIG_ROW, BIG_BASE, s, 3) for s in range(3))
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape))
        # a (1, 1, n, n) additive bias with the same enormous row stride (its rows wrap too)
        dense = buf.as_strided((1, 1, n, n), (0, 0, BIG_ROW, 1), BIG_BASE + 3 * h * d)
        dense.copy_(torch.randn(dense.shape))
        inputs = dict(q=q, k=k, v=v, dense=dense)

        def kernel(q, k, v, dense):
            return xtk.attention(q, k, v, is_causal=True, bias=Dense(dense), backend="triton")

        def eager(q, k, v, dense):
            return reference(q, k, v, is_causal=True, bias=Dense(dense))

        check_against_oracle(kernel, eager, inputs, torch.float16, grad_names=["q", "k", "v", "dense"])


def test_feature_strides_past_2_23_are_copied_before_launch():
    """Column offsets stay int32 in the kernels (head dim < 256 times the feature stride): the
    launcher copies a q/k/v/dO whose feature stride reaches 2^23, and leaves every other view as is."""
    buf = torch.zeros(3 * 2 ** 23 + 8, device=DEV)
    wide = buf.as_strided((1, 1, 2, 3), (0, 0, 1, 2 ** 23))
    narrow = buf.as_strided((1, 1, 2, 3), (0, 0, 1, 2 ** 23 - 1))
    assert attention_op._narrow_cols(wide).stride(-1) == 1
    assert attention_op._narrow_cols(narrow) is narrow
    q, k, v = (torch.zeros_like(buf).as_strided(wide.shape, wide.stride()) for _ in range(3))
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape))
    want = reference(q.double(), k.double(), v.double())
    assert (xtk.attention(q, k, v, backend="triton").double() - want).abs().max() < 1e-5


def test_dense_bool_mask_with_row_offsets_past_2_31():
    """A boolean keep-mask (the ``attn_mask`` slot) whose rows sit 2^27 bytes apart: rows 16..
    pass 2^31; contiguous fp32 q/k/v."""
    b, h, nq, nk, d = 1, 2, 20, 24, 16
    numel = BIG_BASE + (nq - 1) * BIG_ROW + nk
    with virtual_buffer(numel, torch.bool) as buf:
        mask = buf.as_strided((1, 1, nq, nk), (0, 0, BIG_ROW, 1), BIG_BASE)
        keep = torch.rand(nq, nk) > 0.4
        keep[:, 0] = True
        mask.copy_(keep)
        inputs = dict(q=torch.randn(b, h, nq, d), k=torch.randn(b, h, nk, d), v=torch.randn(b, h, nk, d))

        def kernel(q, k, v):
            return xtk.attention(q, k, v, attn_mask=mask, backend="triton")

        def eager(q, k, v):
            return reference(q, k, v, attn_mask=keep)

        check_against_oracle(kernel, eager, inputs, torch.float32, grad_names=["q", "k", "v"])


# ----------------------------------------------------------------------------- device guard

KERNELS = ("_attn_topk_threshold", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_dropout_mask_kernel", "_qk_rows")


def test_device_guard_is_the_tensors_device():
    guard = attention_op._device_guard(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(attention_op._device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    """Each of the six kernels (QK-norm on: the row kernel too) is launched inside ``_device_guard(q.device)`` (spied: the guard
    records the device it is entered for, each kernel's launch records the guards it runs under)."""
    active, launches = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(attention_op, "_device_guard", guard)
    spy_launches(monkeypatch, attention_op, KERNELS, lambda name, args, kwargs: launches.append((name, list(active))))
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEV, requires_grad=True) for _ in range(3))
    out = torch.ops.xtk.attention_fwd(q, k, v, None, None, None, None, 0.25, True, 0, 0, 3, 0.2, 5, groups=2)[0]
    out.sum().backward()
    attention_op.dropout_keep_mask(5, 1, 2, 9, 9, 0.2, DEV)  # a device string: the guard takes the resolved device
    assert sorted({n for n, _ in launches}) == sorted(KERNELS), launches  # (and the NaN-rule guard twins)
    for name, guards in launches:
        assert guards == [q.device], (name, guards)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    args = [torch.randn(2, 4, 70, 64, device="cuda:1", requires_grad=True) for _ in range(3)]
    out = xtk.attention(*args, is_causal=True, backend="triton")
    out.square().sum().backward()
    ref = [t.detach().to("cuda:0").requires_grad_() for t in args]
    want = xtk.attention(*ref, is_causal=True, backend="triton")
    want.square().sum().backward()
    torch.testing.assert_close(out.to("cuda:0"), want)
    for a, r in zip(args, ref):
        torch.testing.assert_close(a.grad.to("cuda:0"), r.grad)


# ----------------------------------------------------------------------------- dropout seed on the device

# sha256 of dropout_keep_mask(seed, 2, 3, 45, 70, 0.3) as the host-seeded kernels drew it (commit
# 22a355f): explicit seeds keep their Philox streams now that the seed is loaded from the device
KEEP_SHA = {7: "76cd0a2d3c30cace770bad3c8b524da78cfa93e346498908e0d4a1577d26afde",
            2 ** 30 - 1: "c891bf2cb737bd59339f25ee9acd330c118fdf593981cd44dce73437612fd862"}


@pytest.mark.parametrize("seed", sorted(KEEP_SHA))
def test_explicit_seed_streams_unchanged(seed):
    keep = attention_op.dropout_keep_mask(seed, 2, 3, 45, 70, 0.3, DEV)
    assert hashlib.sha256(keep.cpu().numpy().tobytes()).hexdigest() == KEEP_SHA[seed]
    as_tensor = attention_op.dropout_keep_mask(torch.tensor(seed, device=DEV), 2, 3, 45, 70, 0.3, DEV)
    assert torch.equal(as_tensor, keep)


def _fwd(q, k, v, p, seed):
    return torch.ops.xtk.attention_fwd(q, k, v, None, None, None, None, 0.25, False, 0, 0, 0, p, seed)


def test_seed_is_drawn_on_the_device_with_torchs_generator():
    """seed < 0: a 0-d int64 seed on q's device drawn by torch.randint there (so torch.manual_seed
    replays it and, on CUDA, graph capture advances its Philox offset per replay); the output is
    the reference fed that seed's keep-mask. seed >= 0: returned as given, same output twice."""
    q, k, v = (torch.randn(1, 2, 33, 16, device=DEV) for _ in range(3))
    torch.manual_seed(11)
    out, _, _, seed = _fwd(q, k, v, 0.4, -1)
    assert seed.device == q.device and seed.dtype == torch.int64 and seed.dim() == 0
    torch.manual_seed(11)
    assert torch.equal(seed, torch.randint(0, 2 ** 30, (), dtype=torch.int64, device=DEV))
    again = _fwd(q, k, v, 0.4, -1)[3]
    assert not torch.equal(again, seed)  # the generator advanced: a fresh seed per call
    keep = attention_op.dropout_keep_mask(seed, 1, 2, 33, 33, 0.4, DEV)
    want = reference(q.double(), k.double(), v.double(), dropout_p=0.4, dropout_mask=keep, scale=0.25)
    assert (out.double() - want).abs().max() < 1e-5
    fixed = [_fwd(q, k, v, 0.4, 1234) for _ in range(2)]
    assert torch.equal(fixed[0][0], fixed[1][0]) and int(fixed[0][3]) == 1234
    assert fixed[0][3].device == q.device


HOST_READS = ("item", "tolist", "__int__", "__index__", "__float__", "__bool__")


def test_dropout_forward_backward_never_read_a_tensor_on_the_host(monkeypatch):
    """No tensor value read on the host (``.item()``, ``int(t)``..., each a device -> host sync
    that CUDA-graph capture forbids) in a dropout forward (seed drawn) + backward (seed used):
    every host read of a Tensor is spied on while they run."""
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append((name, tuple(self.shape), self.dtype))
            return real(self, *args, **kwargs)
        return read

    q, k, v = (torch.randn(1, 2, 17, 16, device=DEV, requires_grad=True) for _ in range(3))
    _fwd(q, k, v, 0.3, -1)  # warm every lazy import / first-call path outside the spy
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    out = _fwd(q, k, v, 0.3, -1)[0]
    out.sum().backward()
    monkeypatch.undo()
    assert q.grad is not None and not reads, reads


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for seed in (-1, 5):  # compile before capture
            _fwd(q, k, v, 0.5, seed)
    torch.cuda.current_stream().wait_stream(side)
    for seed, fresh in ((-1, True), (5, False)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _fwd(q, k, v, 0.5, seed)[0]
        graph.replay()
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first) != fresh, (seed, fresh)


# ----------------------------------------------------------------------------- do_not_specialize

def _not_specialized(kernel):
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's wrapper keeps the jit kwargs
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    return {kernel.arg_names[x] if isinstance(x, int) else x for x in names or ()}


@pytest.mark.parametrize("name", KERNELS)
def test_decode_step_integers_are_not_specialized(name):
    """nk, q_offset, the table center and rotary's max_half change every decode step; specialized
    (== 1, % 16) they would compile several variants of each kernel in a decode loop. (nq and
    k_prefix stay fixed through one: they keep their specialization, see DECODE_INTS.)"""
    kernel = getattr(attention_op, name)
    wanted = {"NK", "q_offset", "tab_center", "max_half"} & set(kernel.arg_names)
    assert wanted and wanted <= _not_specialized(kernel), (name, _not_specialized(kernel))


@pytest.mark.parametrize("name", [k for k in KERNELS if k not in ("_dropout_mask_kernel", "_qk_rows")] + ["_decode_split"])
def test_table_row_stride_is_not_specialized(name):
    """The launchers pass a distance table head-major (stab_l = 1): specialized, that 1 would be a
    constant and the kernels another code than the AOT set compiles (ptxas's spills moved in 10
    table specializations when it was); the table's values and strides are the caller's business."""
    from xtk.kernels import attention_decode
    kernel = getattr(attention_op, name, None) or getattr(attention_decode, name)
    assert "stab_l" in kernel.arg_names and "stab_l" in _not_specialized(kernel), name


def test_head_major_keeps_values_and_makes_each_head_contiguous():
    table = torch.randn(9, 4)
    for t in (table, table.t().contiguous().t(), torch.randn(9, 1).expand(9, 4), table[:, :1]):
        got = attention_op.head_major(t)
        assert torch.equal(got, t) and got.stride(0) == 1 and got.t().is_contiguous()
        assert torch.zeros_like(got).stride() == got.stride()  # the table gradient's buffer: the same layout
    assert attention_op.head_major(None) is None


def test_aot_signature_follows_do_not_specialize():
    """The AOT build gives the decode-step integers no divisibility hint (the JIT gives none) and
    the device seed an int64 pointer (run without the interpreter, as the AOT tool must)."""
    import subprocess
    import sys
    code = (
        "from xtk.kernels import aot\n"
        "seen = set()\n"
        "for s in aot.spec_set('ci'):\n"
        "    if s['kind'] in seen or not s['switches'].get('HAS_DROPOUT', 0) and s['kind'] != 'thr':\n"
        "        continue\n"
        "    seen.add(s['kind'])\n"
        "    fn, sig, cx, attrs = aot.build(s)[:4]\n"
        "    for name in ('NK', 'q_offset', 'tab_center', 'max_half'):\n"
        "        if name in fn.arg_names:\n"
        "            assert (fn.arg_names.index(name),) not in attrs, (s['kind'], name)\n"
        "            assert sig[name] == 'i32', (s['kind'], name, sig[name])\n"
        "    if 'SEED' in fn.arg_names:\n"
        "        assert sig['SEED'] == '*i64', sig['SEED']\n"
        "assert seen == {'fwd', 'thr', 'dkdv', 'dq'}, seen\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
