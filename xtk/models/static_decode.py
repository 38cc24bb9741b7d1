"""A decode step that a CUDA graph can capture: ``AutoregressiveWrapper.generate(..., cuda_graph=True)``.

``generate`` runs each step as ``net(x, cache=cache)``: the cached keys are growing views and the
lengths Python ints, so shapes change every step. Here the prompt runs as in ``generate``; then every
self-attention layer's keys/values move into a store of fixed capacity (``StaticKV``) and one step
reads and writes fixed-shape device tensors only (``StaticState``): the last token in, its position
``seqlens`` on the device (the absolute positional embedding indexed there), every self-attention
layer through ``xtk.attention_with_kvcache`` (the new key/value written in place; the model's own
bias descriptors, QK-norm and rotary/xpos applied from the device positions), the final norm and
the logits, the next token sampled on the device into ``out``, ``seqlens`` advanced. No step reads
a device value on the host (tests/test_generate_static.py runs it under a guard that raises on
any such read), so ``_GraphedStep`` captures it once and replays it.

What the step cannot serve raises a ValueError naming the argument or feature and why
(``_refusals``); it never falls back to the uncached loop or drops a feature silently.

eos: the graph does not stop by itself. The host checks every ``EOS_CHECK_EVERY`` steps (one
synchronisation each) whether every row has produced ``eos_token`` and stops; the output is then
cut where ``generate`` stops (``_cut_at_eos``), so the tokens are the same, and up to
``EOS_CHECK_EVERY - 1`` steps past that point were computed for nothing.

Layout: the refusals; the state and the step; the sampler; the capture; ``generate_static``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..modules.attention import Attention
from ..modules.positional import AbsolutePositionalEmbedding
from ..ops import _check
from ..ops.attention_kvcache import debug_checks
from .autoregressive import (FILTER_LOGITS_FN, _batched_prompts, _identity, _resolve_filter, _Sampler,
                             check_temperature, eval_mode, top_k)
from .cache import KVCache, StaticKV
from .wrapper import TransformerWrapper

__all__ = ["StaticState", "static_state", "decode_step", "DeviceSampler", "generate_static"]

EOS_CHECK_EVERY = 16
WARMUP_STEPS = 2
_DEVICE_FILTERS = (*FILTER_LOGITS_FN.values(), _identity)


# ---------------------------------------------------------------- what the static step cannot serve

def _argument_refusals(prompts, prompt_lens, amateur_model, cache_kv, return_intermediates, temperature, filter_fn,
                       kwargs: dict) -> list:
    """Why ``generate``'s arguments rule the static step out, one reason each (empty: they do not)."""
    why = []
    if isinstance(prompts, (list, tuple)) or prompt_lens is not None:
        why.append("prompt_lens: prompts of different lengths are left-padded and masked, and the static step "
                   "gives every row the same positions and no key mask")
    if amateur_model is not None:
        why.append("amateur_model: contrastive decoding runs a second network with its own cache every step")
    if not cache_kv:
        why.append("cache_kv: the static step is a KV-cached step; cache_kv=False recomputes every position")
    if return_intermediates:
        why.append("return_intermediates: the static stores are not a KVCache that generate could continue")
    if temperature and filter_fn not in _DEVICE_FILTERS:
        why.append(f"filter_logits_fn: only the built-in filters ({', '.join(FILTER_LOGITS_FN)}) are known to run "
                   f"on the device without host reads; got {getattr(filter_fn, '__name__', filter_fn)!r}")
    for key, value in kwargs.items():
        if key != "context" and value is not None:
            why.append(f"{key}: " + _KWARG_REFUSALS.get(key, "not served by the static step (it takes the prompts "
                                                             "and an unmasked cross-attention context only)"))
    return why


_KWARG_REFUSALS = {
    "mask": "a prompt key mask needs a key padding mask every step, which attention_with_kvcache does not take",
    "context_mask": "masked cross attention needs a key padding mask, which attention_with_kvcache does not take",
    "mems": "Transformer-XL memories are keys before the cache, which the static stores do not hold",
    "seq_start_pos": "left-padded prompts need a key mask every step (see prompt_lens)",
}


def _model_refusals(net) -> list:
    """Why the static step cannot serve the network ``net`` (empty: it can)."""
    if not isinstance(net, TransformerWrapper):
        return [f"net: the static step runs xtk's TransformerWrapper, got {type(net).__name__}"]
    stack, why = net.attn_layers, []
    if net.num_memory_tokens:
        why.append("num_memory_tokens: memory tokens make generate recompute the whole sequence every step")
    if not stack.can_cache_kv:
        why.append("shift_tokens: token shift mixes each position with earlier inputs, which no KV cache keeps")
    if (net.to_logits is None and not net.tie_embedding) or net.average_pool_embed:
        why.append("return_only_embed / average_pool_embed: the network gives no per-position logits to sample")
    if stack.pia_pos_emb is not None:
        why.append("position_infused_attn: its sinusoids are added at host-side positions")
    why += [f"layers[{i}]: {reason} needs the whole score matrix, which attention_with_kvcache never forms"
            for i, reason in stack.full_matrix_layers()]
    for name, block in net.named_modules():
        if isinstance(block, Attention) and block.collab_heads:
            why.append(f"{name}: attn_collab_heads (one shared key head of another width) is not stored")
    return why


def _length_refusals(net, t: int, seq_len: int, restrict_to_max_seq_len: bool) -> list:
    """Why ``seq_len`` tokens after a prompt of ``t`` do not fit the static step (empty: they do)."""
    last, max_seq_len = t + seq_len - 1, net.max_seq_len
    if restrict_to_max_seq_len and max_seq_len and last > max_seq_len:
        return [f"seq_len: the prompt ({t}) and seq_len - 1 = {seq_len - 1} steps reach {last} positions, more than "
                f"max_seq_len = {max_seq_len}; generate then slides a window over the last max_seq_len positions "
                f"(trimming or recomputing the cache), which a fixed-capacity store does not. Use seq_len <= "
                f"{max_seq_len - t + 1}, or restrict_to_max_seq_len=False where the model has relative positions"]
    if isinstance(net.pos_emb, AbsolutePositionalEmbedding) and last > max_seq_len:
        return [f"seq_len: {last} positions exceed the {max_seq_len} of the absolute positional embedding"]
    return []


def _raise_if(why: list) -> None:
    if why:
        raise ValueError("generate(cuda_graph=True) cannot serve this call: " + "; ".join(why))


def _check_cuda(prompts) -> None:
    """ValueError unless the prompts (a tensor or a list of them) are on a CUDA device and the
    attention's host-side value checks (``XTK_DEBUG_CHECKS=1``) are off."""
    first = prompts[0] if isinstance(prompts, (list, tuple)) and prompts else prompts
    device = first.device if isinstance(first, Tensor) else None
    if device is None or device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need a CUDA device; got {getattr(device, 'type', device)} (the "
                         "prompts' device). Move the model and prompts to cuda, or pass cuda_graph=False")
    if debug_checks():
        raise ValueError("cuda_graph: XTK_DEBUG_CHECKS=1 reads the cache lengths on the host in every attention "
                         "call, which a CUDA graph cannot capture; unset it")


# ---------------------------------------------------------------- the state and the step

@dataclass(eq=False)
class StaticState:
    """What one static step reads and writes, all fixed-shape device tensors: ``token`` ``(b, 1)``
    int64, the last token (the step's input); ``seqlens`` ``(b,)`` int32, the positions every
    self-attention store holds (= the position of ``token``); ``layers``, one entry per attention
    layer: its ``StaticKV`` (self attention, sharing ``seqlens``; cross attention, the prompt call's
    projected context, read only); ``out`` ``(b, n)`` int64, the sampled tokens; ``index`` ``(1,)`` int64, where
    the next one goes in ``out``; ``k_prefix``: the memory key/values before every store's keys
    (``attn_num_mem_kv``), so that ``token`` sits at position ``seqlens - k_prefix``."""

    token: Tensor
    seqlens: Tensor
    layers: list
    out: Tensor
    index: Tensor
    k_prefix: int = 0


def static_state(net: TransformerWrapper, cache: KVCache, first: Tensor, seq_len: int,
                 backend: str = "auto") -> StaticState:
    """The state after the prompt step of ``net``: every self-attention layer's keys/values of
    ``cache`` (the prompt's ``t`` positions) copied into stores with room for ``seq_len - 1`` more
    positions; every cross-attention layer's projected context ``(b, hk, m, d)`` as a read-only
    store; each after its layer's memory key/values (``Attention._prepend_mem_kv``, as ``forward``
    puts them before the keys). ``first`` ``(b, 1)``, the token sampled from the prompt's logits,
    at ``out[:, 0]`` of ``seq_len`` and as the next input. ``backend``: ``attention_with_kvcache``'s."""
    b, t, dev = first.shape[0], cache.kv_length, first.device
    blocks = net.attn_layers.attention_blocks()
    k_prefix = blocks[0].num_mem_kv if blocks else 0   # (every layer gets the same attn_num_mem_kv)
    seqlens = torch.full((b,), k_prefix + t, dtype=torch.int32, device=dev)
    layers = []
    for block, inter in zip(blocks, cache.layer_caches()):
        k, v = block._prepend_mem_kv(*inter.cached_kv)
        if inter.layer_type == "c":
            held = torch.full((b,), k.shape[-2], dtype=torch.int32, device=dev)
            layers.append(StaticKV(k, v, held, backend, cross=True))
        else:
            layers.append(StaticKV.holding(k, v, k_prefix + t + seq_len - 1, seqlens, backend))
    out = torch.zeros(b, seq_len, dtype=torch.long, device=dev)
    out[:, :1] = first
    index = torch.ones(1, dtype=torch.long, device=dev)
    return StaticState(first.clone().long(), seqlens, layers, out, index, k_prefix)


def decode_step(net: TransformerWrapper, state: StaticState, sample: Callable) -> None:
    """One decode step in place, fixed shapes, no host reads: ``state.token`` at position
    ``state.seqlens - state.k_prefix`` through ``net.static_step`` -> logits ``(b, num_tokens)`` -> ``sample`` ->
    ``(b, 1)``, written at ``state.out[:, state.index]`` and as the next ``token``; ``index`` and
    ``seqlens`` advance by one (every store now holds the token's key/value)."""
    logits = net.static_step(state.token, state.seqlens[:, None] - state.k_prefix, state.layers)
    token = sample(logits)
    state.out.index_copy_(1, state.index, token)
    state.token.copy_(token)
    state.index.add_(1)
    state.seqlens.add_(1)


class DeviceSampler(_Sampler):
    """``generate``'s sampler (argmax at temperature 0, else the filtered, tempered softmax) with the
    draw on the device: ``argmax(probs / E)``, ``E ~ Exp(1)`` per token, the exponential race that
    picks token ``i`` with probability ``probs[i]`` (``torch.multinomial``'s one-sample draw on CPU,
    from the same random stream), with no host-side check of ``probs``."""

    @staticmethod
    def draw(probs: Tensor) -> Tensor:
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)


# ---------------------------------------------------------------- capture and the loop

class _GraphedStep:
    """``step`` (no arguments; it reads and writes only static tensors) as a CUDA graph. The first
    ``WARMUP_STEPS`` calls run it eagerly on a side stream (Triton compiles, the caching allocator
    settles: capture needs both done); these are real steps. The next call captures one step into a
    ``torch.cuda.CUDAGraph`` (capture records, it runs nothing) and replays it; every later call replays."""

    def __init__(self, step: Callable[[], None], warmup: int = WARMUP_STEPS):
        self.step, self.warmup, self.graph = step, warmup, None

    def __call__(self) -> None:
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
        self.graph.replay()


def _all_ended(out: Tensor, eos_token: int) -> bool:
    """Whether every row of ``out`` ``(b, n)`` holds ``eos_token`` (a host read)."""
    return bool((out == eos_token).any(dim=-1).all())


def _run_steps(step: Callable[[], None], state: StaticState, steps: int, eos_token) -> int:
    """``step()`` up to ``steps`` times; with ``eos_token`` the host looks every ``EOS_CHECK_EVERY``
    steps (and before the first) and stops once every row has produced it. -> tokens in ``state.out``."""
    done = 0
    while done < steps and not (eos_token is not None and _all_ended(state.out[:, :done + 1], eos_token)):
        n = min(EOS_CHECK_EVERY, steps - done)
        for _ in range(n):
            step()
        done += n
    return done + 1


def _cut_at_eos(out: Tensor, eos_token: int) -> Tensor:
    """``out`` ``(b, n)`` up to where ``generate`` stops: the first step after which every row has
    produced ``eos_token`` (all of ``out`` when that never happens)."""
    ended = ((out == eos_token).cumsum(dim=-1) > 0).all(dim=0)   # (n,): every row has ended by step i
    return out[:, :int(ended.int().argmax()) + 1] if bool(ended.any()) else out


# ---------------------------------------------------------------- generate

@torch.no_grad()
def generate_static(wrapper, prompts, seq_len: int, eos_token: Optional[int] = None, temperature: float = 1.,
                    prompt_lens=None, filter_logits_fn=top_k, restrict_to_max_seq_len: bool = True,
                    filter_kwargs: Optional[dict] = None, filter_thres: Optional[float] = None, amateur_model=None,
                    cache_kv: bool = True, return_intermediates: bool = False, *, capture: bool = True,
                    backend: str = "auto", **kwargs) -> Tensor:
    """``AutoregressiveWrapper.generate(..., cuda_graph=True)`` for ``wrapper``: the same arguments and
    return value (``(b, n)`` new tokens, ``(n,)`` for a 1-D prompt). The prompt runs as in
    ``generate``, then ``seq_len - 1`` static steps: with ``capture`` one step captured in a CUDA
    graph and replayed (CUDA only; the attention forced to the decode kernel, ``backend='triton'``,
    which raises with its reasons where it cannot run, rather than take the reference path that
    reads the lengths on the host); without, the same step run eagerly on any device with
    ``attention_with_kvcache``'s ``backend`` (how the tests check it on CPU)."""
    if capture:
        _check_cuda(prompts)
    seq_len = _check.integer("seq_len", seq_len, minimum=1)
    check_temperature(temperature, " (0 = greedy)")
    eos_token = None if eos_token is None else _check.integer("eos_token", eos_token)
    filter_fn, filter_kwargs = _resolve_filter(filter_logits_fn, filter_kwargs, filter_thres)
    _raise_if(_argument_refusals(prompts, prompt_lens, amateur_model, cache_kv, return_intermediates, temperature,
                                 filter_fn, kwargs) + _model_refusals(wrapper.net))
    prompts, no_batch = _batched_prompts(prompts)
    _raise_if(_length_refusals(wrapper.net, prompts.shape[1], seq_len, restrict_to_max_seq_len))
    with eval_mode(wrapper):
        logits, cache = wrapper.net(prompts, return_intermediates=True, **kwargs)
        first = _Sampler(temperature, filter_fn, filter_kwargs)(logits[:, -1])
        state = static_state(wrapper.net, cache, first, seq_len, "triton" if capture else backend)
        step = functools.partial(decode_step, wrapper.net, state, DeviceSampler(temperature, filter_fn, filter_kwargs))
        n = _run_steps(_GraphedStep(step) if capture else step, state, seq_len - 1, eos_token)
    out = state.out[:, :n]
    if eos_token is not None:
        out = wrapper._pad_after_eos(_cut_at_eos(out, eos_token), eos_token)
    return out[0] if no_batch else out
