"""``python -m xtk bench`` end to end on a tiny attention shape: table, JSON, markdown, plot."""
import json

from xtk.bench import cli


def test_cli_tiny_attention(benchmark, tmp_path, capsys):
    paths = {k: str(tmp_path / f"r.{k}") for k in ("json", "md", "png")}
    argv = ["--op", "attention", "--shape", "1,2,64,16", "--features", "none,alibi,topk8", "--no-progress",
            "--json", paths["json"], "--markdown", paths["md"], "--plot", paths["png"]]
    rc = benchmark.pedantic(cli.main, args=(argv,), rounds=1, iterations=1)
    assert rc == 0
    out = capsys.readouterr().out
    assert "== attention ==" in out and "xeager" in out
    data = json.load(open(paths["json"]))
    rows = data["results"]
    assert data["environment"]["torch"] and len(rows) == 2 * 2 * (5 + 4 + 4)  # causal x mode x impls
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows)
    assert {r["impl"] for r in rows if r["status"] == "ok"} == {"xtk", "eager", "sdpa", "sdpa-nobias", "flex"}
    flex = {(r["case"], r["params"]["causal"], r["mode"]): r["status"] for r in rows if r["impl"] == "flex"}
    assert flex[("alibi", True, "fwd")] == "ok" and "no backward on CPU" in flex[("alibi", True, "fwd+bwd")]
    assert "quick CPU sweep" in flex[("alibi", False, "fwd")] and "top-k" in flex[("topk8", True, "fwd")]
    assert "| alibi |" in open(paths["md"]).read()
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "r.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in out
    # bad arguments: exit code 2 and a message naming the option
    assert cli.main(["--shape", "1,2"]) == 2
    assert "--shape" in capsys.readouterr().err
    assert cli.main(["--features", "nope"]) == 2
    assert cli.main(["--model-shape", "depth=2,nope=3"]) == 2
    assert "--model-shape" in capsys.readouterr().err


def test_model_shape_override():
    from xtk.bench import bench_model
    shape = bench_model.parse_shape("depth=1,seq=32,vocab=64")
    cfg = bench_model.config("cpu", False, shape)
    assert cfg["depth"] == 1 and cfg["seq"] == 32 and cfg["vocab"] == 64 and cfg["gen"] == 16
    assert bench_model.config("cpu", False)["vocab"] == bench_model.VOCAB
