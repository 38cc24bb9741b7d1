"""The README's install, as a newcomer runs it: a fresh virtualenv (no --system-site-packages), torch
from the same wheel as this process's, the newest setuptools and ``wheel`` present, then
``pip install --no-build-isolation -e .`` on a copy of this tree. Also: an environment without
setuptools stops with one clear message, a build without torch says so, the extension's absence
is warned about once at the first fallback, and the version is written once.

pip shows a build backend's output only with -v; the status line reaches a user through the
terminal (csrc/build_backend.py), so the installs here run in a pseudo-terminal and read what a
user sees. About 2 minutes on 2 cores (torch into the venv ~25 s, the build ~30-60 s).
"""
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import xtk

ROOT = Path(__file__).resolve().parents[1]
BUILT = "xtk: built the C++/CUDA extension xtk._C"
NOT_BUILT = "xtk: the C++/CUDA extension xtk._C was NOT built"
# Runs argv in a new pseudo-terminal (the controlling terminal of the pip there) and prints what it wrote.
_IN_PTY = r"""
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
out = bytearray()
while True:
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # EIO once the child side is closed
        break
    if not chunk:
        break
    out += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(bytes(out))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _env(venv_dir=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XTK_NO_EXT", "XTK_CPU_ISA", "XTK_BACKEND")}
    env.update(MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    if venv_dir is not None:
        env.update(VIRTUAL_ENV=str(venv_dir), PATH=f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(cmd, venv_dir=None, cwd=None, tty=False, timeout=600):
    """(returncode, what the user sees: stdout and stderr together, terminal control characters removed)."""
    argv = [sys.executable, "-c", _IN_PTY, *cmd] if tty else cmd
    r = subprocess.run(argv, cwd=cwd, env=_env(venv_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    text = r.stdout.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|.\x08", "", text).replace("\r\n", "\n")
    return r.returncode, text


def _lines(text, start):
    return [line.strip() for line in text.splitlines() if line.strip().startswith(start)]


def _new_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)  # never --system-site-packages
    return path


def _source_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "xtk-src"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "wip"))
    return dst


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new virtualenv with this process's torch (same version, so the same wheel: pip's cache or the
    CI's wheel folder), then the newest setuptools and wheel."""
    path = _new_venv(tmp_path_factory.mktemp("venv") / "v")
    py = str(path / "bin" / "python")
    rc, out = _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__}"], path)
    assert rc == 0, f"installing torch=={torch.__version__} into a fresh venv failed:\n{out[-3000:]}"
    rc, out = _run([py, "-m", "pip", "install", "-q", "-U", "setuptools", "wheel"], path)
    assert rc == 0, out[-3000:]
    rc, out = _run([py, "-c", "import setuptools, wheel; print(setuptools.__version__)"], path)
    assert rc == 0 and int(out.split()[-1].split(".")[0]) >= 80, f"the issue's case needs setuptools >= 80: {out}"
    return path


def test_readme_install_builds_the_extension_and_says_so(fresh_venv, tmp_path):
    src = _source_copy(tmp_path)
    py = str(fresh_venv / "bin" / "python")
    rc, out = _run(["pip", "install", "--no-build-isolation", "-e", "."], fresh_venv, cwd=src, tty=True)
    assert rc == 0, out[-5000:]
    assert len(_lines(out, BUILT)) == 1, f"no single status line in what pip showed:\n{out[-3000:]}"
    check = ("import importlib.metadata as m, xtk; from xtk import _ext; "
             "print('isa', _ext.load().cpu_isa, m.version('xtk') == xtk.__version__)")
    rc, out = _run([py, "-c", check], fresh_venv, cwd=tmp_path)
    assert rc == 0 and re.search(r"^isa \S+ True$", out, re.M), out[-3000:]
    assert "ExtensionMissingWarning" not in out
    # numpy is not a dependency: info says it is missing instead of printing torch's warning
    rc, out = _run([py, "-m", "xtk", "info"], fresh_venv)
    assert rc == 0, out[-3000:]
    assert "C++/CUDA extension  built (CPU loops:" in out, out
    has_numpy = _run([py, "-c", "import numpy"], fresh_venv)[0] == 0
    assert "Failed to initialize NumPy" not in out and (has_numpy or re.search(r"numpy +not installed", out)), out


def test_isolated_install_says_the_extension_was_not_built(fresh_venv, tmp_path):
    """The silent failure of the issue: pip's default build isolation has no torch. The install goes on
    (pure Python, eager backends) but its output says why xtk._C is missing and what to run."""
    src = _source_copy(tmp_path)
    rc, out = _run(["pip", "install", "--no-deps", "-e", "."], fresh_venv, cwd=src, tty=True)
    assert rc == 0, out[-5000:]
    said = _lines(out, NOT_BUILT)
    assert len(said) == 1 and "torch is not importable" in said[0] and "--no-build-isolation" in said[0], out[-3000:]


def test_install_without_setuptools_stops_with_one_clear_message(tmp_path):
    """A Python 3.12+ virtualenv has no setuptools, and --no-build-isolation builds with what is there;
    a 3.10/3.11 one has setuptools 65 without wheel, too old to build a wheel."""
    path = _new_venv(tmp_path / "v")
    py = str(path / "bin" / "python")
    src = _source_copy(tmp_path)
    rc, version = _run([py, "-c", "import setuptools; print(setuptools.__version__)"], path)
    if rc == 0 and tuple(int(p) for p in version.split(".")[:2]) < (70, 1):  # a Python 3.10/3.11 venv's own
        rc, out = _run([py, "-m", "pip", "install", "--no-build-isolation", "-e", "."], path, cwd=src)
        assert rc != 0 and "needs the `wheel` package" in out and "Traceback" not in out, out
    _run([py, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], path)
    assert _run([py, "-c", "import setuptools"], path)[0] != 0
    rc, out = _run([py, "-m", "pip", "install", "--no-build-isolation", "-e", "."], path, cwd=src)
    assert rc != 0, out
    assert "xtk: cannot build: setuptools is not installed" in out and "pip install -U setuptools" in out, out
    assert "Traceback" not in out, out
    rc, out = _run([py, "setup.py", "develop"], path, cwd=src)  # the legacy route says the same
    assert rc != 0 and "xtk: cannot build: setuptools is not installed" in out and "Traceback" not in out, out


_FALLBACK = r"""
import sys, warnings
sys.modules["xtk._C"] = None  # as if the extension were not built
warnings.simplefilter("always")
import torch, xtk
from xtk.backends import ExtensionMissingWarning
x = torch.randn(4, 8)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    xtk.rms_norm(x, torch.ones(8), backend="eager")  # forced: the user's choice, no warning
    q = torch.randn(1, 2, 5, 8)
    xtk.backends.load("attention", "ext")  # as XTK_BACKEND=ext does: attention has no extension backend,
    xtk.attention(q, q, q)                  # so nothing falls back from one
    forced = len(seen)
    xtk.rms_norm(x, torch.ones(8))
    xtk.glu(x, "gelu")
    xtk.rms_norm(x, torch.ones(8))
n = sum(issubclass(w.category, ExtensionMissingWarning) for w in seen)
print("forced", forced, "auto", n)
print("message", [str(w.message) for w in seen if issubclass(w.category, ExtensionMissingWarning)])
"""


@pytest.mark.parametrize("xtk_backend", ["auto", "eager"])
def test_missing_extension_warns_once_at_the_first_fallback(xtk_backend):
    env = dict(os.environ, XTK_BACKEND=xtk_backend)
    r = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if xtk_backend == "eager":  # XTK_BACKEND=eager forces eager: no warning at all
        assert "forced 0 auto 0" in r.stdout, r.stdout
    else:
        assert "forced 0 auto 1" in r.stdout, r.stdout
        assert "falls back to the eager backend" in r.stdout and "--no-build-isolation" in r.stdout, r.stdout


def test_setup_py_has_no_version_of_its_own_and_no_unused_dependency():
    """The version lives in xtk/__init__.py only (the fresh install checks the metadata carries it);
    einops was a dependency nothing imports."""
    setup_py = (ROOT / "setup.py").read_text()
    assert xtk.__version__ not in setup_py and "version=_version()" in setup_py
    assert "einops" not in setup_py
