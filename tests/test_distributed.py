"""Distributed training with torch's own engines, and tensor-parallel head shards.

- Head shards: the query heads ``[h0, h1)`` of a model (and their kv heads) through
  ``xtk.attention(..., head_offset=h0)`` with the whole model's bias give the unsharded model's output
  rows and gradients for those heads: ALiBi slopes (also fewer slopes than heads), T5 and distance
  tables and a dense bias index the global head. Without ``head_offset`` (slopes computed from the
  shard's own head count, FlashInfer's mistake under tensor parallelism) the shard is wrong.
- DDP and FSDP2 (``fully_shard``): 2 CPU processes (gloo), each half the batch, give the gradients
  of one process on the whole batch (xtk models with ALiBi / T5 / dynamic bias, and x-transformers
  models patched in place by ``xtk.patch``; DDP and FSDP2 also under ``torch.compile``).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes

H, HK, N, D = 8, 4, 24, 16


def _biases():
    g = torch.Generator().manual_seed(3)
    return {"alibi": Alibi(torch.tensor(alibi_slopes(H))),
            "alibi6": Alibi(torch.tensor(alibi_slopes(6))),          # x-transformers' alibi_num_heads < heads
            "t5": T5(torch.randn(32, H, generator=g), num_buckets=32, max_distance=64, causal=True),
            "dtable": DistanceTable(torch.randn(2 * N - 1, H, generator=g)),
            "dense": Dense(torch.randn(1, H, N, N, generator=g))}


def _run(q, k, v, bias, backend, head_offset=None):
    return xtk.attention(q, k, v, is_causal=True, enable_gqa=True, bias=bias, backend=backend, head_offset=head_offset)


@pytest.mark.parametrize("backend", ["eager", "chunked"])
@pytest.mark.parametrize("kind", list(_biases()))
def test_head_shards_equal_the_unsharded_model(kind, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, hh, N, D, generator=g).requires_grad_() for hh in (H, HK, HK))
    bias = _biases()[kind]
    learned = bias.learned.requires_grad_()
    go = torch.randn(2, H, N, D, generator=g)
    full = _run(q, k, v, bias, backend)
    grads_full = torch.autograd.grad(full, (q, k, v, learned), go, allow_unused=True)
    shards, parts = 2, []
    for s in range(shards):   # query heads [4s, 4s + 4) read kv heads [2s, 2s + 2) ('interleave' order)
        hq, hk = H // shards, HK // shards
        out = _run(q[:, s * hq:(s + 1) * hq], k[:, s * hk:(s + 1) * hk], v[:, s * hk:(s + 1) * hk], bias, backend,
                   head_offset=s * hq)
        parts.append(out)
    sharded = torch.cat(parts, 1)
    torch.testing.assert_close(sharded, full, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(sharded, (q, k, v, learned), go, allow_unused=True)
    for name, a, b in zip(("q", "k", "v", "bias"), grads, grads_full):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
    if kind != "dense":   # the shard with its own head count's slopes / tables computes another function
        wrong = _run(q[:, H // 2:], k[:, HK // 2:], v[:, HK // 2:], _local(bias, H // 2), backend)
        assert not torch.allclose(wrong, full[:, H // 2:], atol=1e-4)


def _local(bias, h):
    """What a library that ignores the global head would use on the second shard."""
    if isinstance(bias, Alibi):
        return Alibi(torch.tensor(alibi_slopes(h)))
    return bias.with_learned(bias.learned.detach()[:, :h])


def test_head_offset_errors():
    q, k = torch.randn(1, 4, N, D), torch.randn(1, 4, N, D)
    t5 = _biases()["t5"]
    with pytest.raises(ValueError, match=r"bias.table: holds 8 heads, fewer than head_offset \+ heads = 6 \+ 4"):
        xtk.attention(q, k, k, bias=t5, head_offset=6)
    with pytest.raises(ValueError, match="head_offset: expected an int >= 0, got -1"):
        xtk.attention(q, k, k, bias=t5, head_offset=-1)
    with pytest.raises(ValueError, match=r"bias.tensor: holds 8 heads \(dim -3\)"):
        xtk.attention(q, k, k, bias=_biases()["dense"], head_offset=5)


# ---------------------------------------------------------------------------------------------- DDP / FSDP2
V, B = 32, 4
CONFIGS = {"alibi": dict(alibi_pos_bias=True), "t5": dict(rel_pos_bias=True),
           "dynamic": dict(dynamic_pos_bias=True, attn_kv_heads=2)}


def _model(cfg: str):
    """An xtk model, or ('xt-' prefix) an x-transformers model patched in place by ``xtk.patch``."""
    torch.manual_seed(0)
    if cfg.startswith("xt-"):
        import x_transformers as xt
        model = xt.TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=xt.Decoder(
            dim=32, depth=2, heads=4, attn_dim_head=8, **CONFIGS[cfg[3:]]))
        xtk.patch(model)
        return model
    return xtk.TransformerWrapper(num_tokens=V, max_seq_len=32,
                                  attn_layers=xtk.Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, **CONFIGS[cfg]))


def _batch():
    return torch.randint(0, V, (B, 17), generator=torch.Generator().manual_seed(1))


def _loss(model, x):
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:])


def _worker(rank, world, port, engine, cfg, path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(cfg)
        if engine.startswith("ddp"):
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(model)
            if engine == "ddp+compile":
                wrapped = torch.compile(wrapped)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for norms, block, residual in model.attn_layers.layers:   # x-transformers' layer layout
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
            if engine == "fsdp2+compile":
                wrapped = torch.compile(wrapped)
        x = _batch()[rank * (B // world):(rank + 1) * (B // world)]
        _loss(wrapped, x).backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in model.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save(grads, path)
        torch.distributed.barrier()   # no rank tears gloo down while the other still talks to it
    finally:
        torch.distributed.destroy_process_group()
    # Done and saved: leave without the interpreter's teardown, where a gloo / FSDP worker thread still
    # being destroyed aborted a finished process ("terminate called without an active exception") in
    # about one run of the file in four.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine,cfg", [("ddp", "alibi"), ("ddp", "t5"), ("fsdp2", "dynamic"), ("fsdp2", "t5"),
                                        ("ddp+compile", "alibi"), ("fsdp2+compile", "t5"), ("ddp", "xt-t5"),
                                        ("fsdp2", "xt-alibi"), ("ddp+compile", "xt-alibi")])
def test_two_processes_give_the_single_process_gradients(engine, cfg, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    if cfg.startswith("xt-"):
        pytest.importorskip("x_transformers")   # the patched model's own library (in the test extras)
    path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), engine, cfg, path), nprocs=2, join=True)
    got = torch.load(path)
    model = _model(cfg)
    _loss(model, _batch()).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
