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


def test_info_model_patch_reports_hf_and_x_transformers_models():
    import pytest
    pytest.importorskip("transformers")
    pytest.importorskip("x_transformers")
    bloom = "transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=100))"
    r = run("info", "--model", bloom, "--patch")
    assert r.returncode == 0, r.stderr
    assert "xtk patch of BloomForCausalLM: 2 swapped, 0 kept" in r.stdout, r.stdout
    assert "transformer.h.1.self_attention: attention: xtk.attention, ALiBi in-kernel" in r.stdout, r.stdout
    r = run("info", "--model", bloom)
    assert "attn_implementation" in r.stdout and "not patched" in r.stdout, r.stdout
    xt = ("x_transformers.TransformerWrapper(num_tokens=10, max_seq_len=16, attn_layers=x_transformers.Decoder("
          "dim=32, depth=1, heads=2, alibi_pos_bias=True, attn_pre_talking_heads=True))")
    r = run("info", "--model", xt, "--patch")
    assert r.returncode == 0, r.stderr
    assert "xtk patch of TransformerWrapper: 0 swapped" in r.stdout and "talking heads" in r.stdout, r.stdout
    r = run("info", "--model", "Decoder(dim=32, depth=1, heads=2)", "--patch")
    assert r.returncode == 2 and "--patch: Decoder is neither an x-transformers nor a Hugging Face model" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("info", "--model", "Nope(1)")
    assert r.returncode == 2 and "NameError" in r.stderr and "Traceback" not in r.stderr


def test_model_report_of_a_model_in_hand_follows_patch_and_unpatch():
    import pytest
    transformers = pytest.importorskip("transformers")
    import xtk
    from xtk.integrations import hf
    from xtk.introspect import model_report
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    assert "not patched" in model_report(model)[0]
    hf.patch(model)
    lines = model_report(model)
    assert lines[0].startswith("xtk patch of T5ForConditionalGeneration") and any("T5" in x for x in lines[1:])
    hf.unpatch(model)
    assert "not patched" in model_report(model)[0]
    assert xtk.__name__ == "xtk"
