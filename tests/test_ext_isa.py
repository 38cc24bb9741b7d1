"""The three copies of the extension's CPU loops (csrc/cpu/cpu_common.h): one at the baseline ISA,
one with AVX2 + FMA, one with AVX-512, picked once per process from the running CPU
(``xtk._C.cpu_isa``), never from the building machine's. ``XTK_CPU_ISA=baseline`` / ``avx2`` caps the
choice; it is read when xtk._C is imported, so those runs happen in subprocesses."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xtk import _ext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from csrc.build import CXX_FLAGS  # noqa: E402

try:
    _C = _ext.load()
except ImportError:  # reported by tests/test_rms_norm.py::test_extension_is_built
    _C = None
needs_ext = pytest.mark.skipif(_C is None, reason="xtk._C not built (tests/test_rms_norm.py::test_extension_is_built fails)")
X86 = platform.machine() in ("x86_64", "AMD64", "i686")
ACTS = ("gelu", "gelu_tanh", "silu", "relu", "relu_squared")
EXACT_ACTS = ("relu", "relu_squared")  # no a*b+c to contract into an FMA: the copies agree bit for bit
AVX512_FLAGS = {"avx512f", "avx512vl", "avx512bw", "avx512dq"}


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


def test_build_flags_do_not_target_the_building_cpu():
    """A wheel runs on other machines: -mavx2 / -march=native from the building CPU gave SIGILL."""
    bad = [f for f in CXX_FLAGS if re.match(r"-m(avx|fma|sse4|arch=native|tune=native|arch=)", f)]
    assert not bad, f"csrc/build.py CXX_FLAGS target the building CPU: {bad}"


@needs_ext
def test_the_running_cpu_picks_the_copy():
    flags = _cpu_flags() if X86 else set()
    want = "avx2+fma" if {"avx2", "fma"} <= flags else "baseline"
    if want == "avx2+fma" and AVX512_FLAGS <= flags:
        want = "avx512"
    capped = {"baseline": "baseline", "avx2": "avx2+fma"}.get(os.environ.get("XTK_CPU_ISA"))
    if capped and want != "baseline":
        want = capped
    assert _C.cpu_isa == want


@needs_ext
@pytest.mark.skipif(not X86, reason="the AVX2 copy exists on x86 only")
def test_only_the_avx2_and_avx512_copies_hold_avx_instructions():
    """Every function with a VEX/EVEX-encoded (AVX/AVX2/FMA/AVX-512) or BMI instruction is a run_avx2<...>
    or run_avx512<...> copy, which runs only after the CPU said it has those; the AVX2 copies hold no
    AVX-512 instruction (zmm or mask registers): nothing else can raise SIGILL."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to check xtk._C"
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    fn, with_avx, with_avx512 = None, set(), set()
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
        elif re.search(r"\t(v[a-z0-9]+|andn|bextr|blsi|blsr|bzhi|pdep|pext|sarx|shlx|shrx|k[a-z0-9]+)\s", line):
            with_avx.add(fn)
            if re.search(r"%zmm|%k[0-7]|\{%k", line):
                with_avx512.add(fn)
    outside = sorted(f for f in with_avx if "run_avx2" not in f and "run_avx512" not in f)
    assert not outside, f"AVX instructions outside the AVX2 / AVX-512 copies: {outside[:5]}"
    leaked = sorted(f for f in with_avx512 if "run_avx512" not in f)
    assert not leaked, f"AVX-512 instructions outside the AVX-512 copies: {leaked[:5]}"
    if _C.cpu_isa != "baseline":
        assert len([f for f in with_avx if "run_avx2" in f]) >= 6, "the AVX2 copies are not vectorized for AVX2"
        assert len(with_avx512) >= 6, "the AVX-512 copies hold no zmm / mask instruction: not vectorized for it"


_RUN_OPS = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("xtk._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)  # loads the library (registers torch.ops.xtk.*) and runs PyInit
torch.set_num_threads(2)
inputs = torch.load(sys.argv[2])
out = {"cpu_isa": C.cpu_isa}
for key, x in inputs.items():
    dt = str(x.dtype)
    for act in %(acts)r:
        out[(key, act, "glu_fwd")] = torch.ops.xtk.glu_fwd(x, act)
        out[(key, act, "glu_bwd")] = torch.ops.xtk.glu_bwd(x[..., ::2].contiguous(), x, act)
        out[(key, act, "act_bwd")] = torch.ops.xtk.activation_bwd(x * 0.5, x, act)
    w = torch.linspace(0.5, 1.5, x.shape[-1])
    y, s, norm = torch.ops.xtk.rms_norm_fwd(x, w, x.flip(0), 1e-6)
    out[(key, "rms_fwd")] = y
    out[(key, "rms_bwd")] = torch.ops.xtk.rms_norm_bwd(x, x, s, w, norm, True)
torch.save(out, sys.argv[3])
""" % {"acts": ACTS}


def _run_ops(tmp_path, name, isa):
    env = dict(os.environ, XTK_CPU_ISA=isa)
    out = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", _RUN_OPS, _C.__file__, str(tmp_path / "inputs.pt"), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@needs_ext
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_the_copies_agree_with_the_baseline(tmp_path, isa):
    """The same inputs through the baseline copy and another (the auto choice: AVX-512 or AVX2 where the
    CPU has them; the AVX2 copy forced): equal bits where no FMA can form, else the same result to the
    dtype's rounding."""
    if isa == "avx2" and _C.cpu_isa == "baseline":
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 copy cannot run here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 2 * 300, generator=g) * 3  # 300 columns: full 256-wide chunks and a tail
    torch.save({str(dt): x.to(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}, tmp_path / "inputs.pt")
    other, base = _run_ops(tmp_path, isa, isa), _run_ops(tmp_path, "baseline", "baseline")
    assert base.pop("cpu_isa") == "baseline"
    assert other.pop("cpu_isa") == (_C.cpu_isa if isa == "auto" else "avx2+fma")
    assert other.keys() == base.keys()
    for key in other:
        a, b = other[key], base[key]
        for i, (ta, tb) in enumerate(zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,))):
            if key[1] in EXACT_ACTS:
                assert torch.equal(ta, tb), (key, i)
            else:
                torch.testing.assert_close(ta, tb, msg=lambda m: f"{key}[{i}]: {m}")


@needs_ext
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_other_copies_pass_the_extension_accuracy_tests(isa):
    """The 2x-rule tests of the extension (tests/test_rms_norm.py, tests/test_glu.py) with a lesser copy
    forced: in-process they run the copy this CPU picks (AVX-512 here)."""
    if {"baseline": "baseline", "avx2": "avx2+fma"}[isa] == _C.cpu_isa:
        pytest.skip(f"this process already runs the {isa} copy: the tests themselves cover it")
    if isa == "avx2" and _C.cpu_isa == "baseline":
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 copy cannot run here")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "matches_reference",
                        "tests/test_rms_norm.py", "tests/test_glu.py"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, XTK_CPU_ISA=isa), timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@needs_ext
def test_unknown_xtk_cpu_isa_is_an_import_error():
    code = "import importlib.util as u, sys; u.module_from_spec(u.spec_from_file_location('xtk._C', sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", "import torch; " + code, _C.__file__], capture_output=True, text=True,
                       env=dict(os.environ, XTK_CPU_ISA="avx512"), timeout=300)
    assert r.returncode != 0 and "XTK_CPU_ISA: expected auto, avx2 or baseline, got 'avx512'" in r.stderr, r.stderr[-2000:]
