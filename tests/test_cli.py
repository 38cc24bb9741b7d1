"""``python -m xtk info``: versions, device, extension status and the backend auto picks per op, with reasons."""
import os
import subprocess
import sys


def run(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "xtk", *args], capture_output=True, text=True, env=e, timeout=300)


def test_info_reports_versions_and_backend_choice():
    r = run("info")
    assert r.returncode == 0, r.stderr
    for needle in ("torch", "triton", "C++/CUDA extension", "attention: auto ->", "rms_norm: auto ->", "glu: auto ->"):
        assert needle in r.stdout, (needle, r.stdout)
    # every backend not chosen comes with a reason, and the chosen one says ok
    assert "eager   ok" in r.stdout


def test_info_model_lists_full_matrix_layers():
    r = run("info", "--model", "Decoder(dim=32, depth=2, heads=2, attn_talking_heads=True)")
    assert r.returncode == 0, r.stderr
    assert "need the eager path: 2" in r.stdout, r.stdout
    r = run("info", "--model", "Decoder(dim=32, depth=1, heads=2, alibi_pos_bias=True)")
    assert r.returncode == 0, r.stderr
    assert "need the eager path: 0" in r.stdout, r.stdout
