"""``AutoregressiveWrapper``: next-token loss and sampling around a decoder ``TransformerWrapper``.

Mirrors x-transformers 2.31.10's wrapper (names, arguments, return values): ``forward(x)`` gives
the next-token cross entropy (with ``mask_prob > 0`` a random subset of the input tokens is
hidden from self-attention, as in "Forgetful Causal Masking"), ``generate(prompts, seq_len, ...)``
samples ``seq_len`` new tokens. With ``cache_kv=True`` the network gets the KV cache of the
previous step and computes only the newest token, so each new token costs O(n), not a re-run.

The wrapped network is duck-typed: it must take ``(tokens, return_intermediates=True,
cache=...)`` and return ``(logits, intermediates)`` with logits for the new tokens only, and
expose ``max_seq_len`` and ``can_cache_kv`` (xtk's ``TransformerWrapper`` does). Its cache goes
back to it as is; where decoding must change the cache (trim it to a window past
``max_seq_len``, reorder it for beam search) it uses the ``xtk.models.cache.KVCache`` methods,
and a cache of another type is dropped there (the window is recomputed).

Layout: the logit filters; prompt checks; the decoding loop ``decode`` with its window
(``sliding_window``), shared with ``ContinuousAutoregressiveWrapper``; how one step picks its
token (``_Sampler``, ``_Contrastive``, ``_BeamCandidates``); the wrapper.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from math import ceil
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _check
from .cache import KVCache, trimmed_or_none

__all__ = ["AutoregressiveWrapper", "top_k", "top_p", "top_a", "min_p", "FILTER_LOGITS_FN", "align_right",
           "contrastive_decode_fn"]


# ---------------------------------------------------------------- logit filters (x-transformers names)

def top_k(logits: torch.Tensor, frac_num_tokens: float = 0.1, k: Optional[int] = None) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (default ``ceil(frac_num_tokens * num_tokens)``), -inf elsewhere."""
    num_tokens = logits.shape[-1]
    if k is None:
        k = ceil(frac_num_tokens * num_tokens)
    k = max(1, min(int(k), num_tokens))
    val, ind = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, ind, val)


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their cumulative probability exceeds
    ``thres`` (the token that crosses it is kept, so at least one token always survives)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum_probs > thres
    remove = F.pad(remove, (1, -1), value=False)  # shift right: keep the token that crosses thres
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return sorted_logits.scatter(-1, sorted_indices, sorted_logits)


def top_a(logits: torch.Tensor, min_p_pow: float = 2.0, min_p_ratio: float = 0.02) -> torch.Tensor:
    """Drop tokens whose probability is below ``max_prob ** min_p_pow * min_p_ratio``."""
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True).pow(min_p_pow) * min_p_ratio
    return logits.masked_fill(probs < limit, float("-inf"))


def min_p(logits: torch.Tensor, min_p: float = 0.1) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max_prob`` (arXiv 2407.01082)."""
    probs = logits.softmax(dim=-1)
    limit = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


FILTER_LOGITS_FN = dict(top_k=top_k, top_p=top_p, top_a=top_a, min_p=min_p)


def _identity(t, **kwargs):
    return t


def contrastive_decode_fn(expert_logits, amateur_logits, alpha: float = 0.1, beta: float = 0.5):
    """Contrastive decoding (Li et al. 2210.15097; O'Brien & Lewis 2309.09117, Algorithm 2): keep the
    tokens whose expert logit is within ``log(alpha)`` of the best one, scored
    ``(1 + beta) * expert - beta * amateur``."""
    cutoff = math.log(alpha) + expert_logits.amax(dim=-1, keepdim=True)
    diffs = (1 + beta) * expert_logits - beta * amateur_logits
    return diffs.masked_fill(expert_logits < cutoff, -torch.finfo(expert_logits.dtype).max)


# ---------------------------------------------------------------- prompts and arguments

def align_right(t: torch.Tensor, lens: torch.Tensor, pad_id=0) -> torch.Tensor:
    """Move each row's first ``lens[b]`` entries to the right end (left padding with ``pad_id``)."""
    batch, seq_len = t.shape[:2]
    pad_lens = seq_len - lens
    idx = torch.arange(seq_len, device=t.device)[None, :] - pad_lens[:, None]  # source index per slot
    valid = idx >= 0
    gathered = t.gather(1, idx.clamp(min=0).view(batch, seq_len, *([1] * (t.dim() - 2))).expand_as(t))
    fill = torch.full_like(t, pad_id)
    return torch.where(valid.view(batch, seq_len, *([1] * (t.dim() - 2))), gathered, fill)


def _check_tokens(name: str, x, ndim):
    _check.tensor(name, x, ndim=ndim)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of token ids, got dtype {x.dtype}")


def check_temperature(temperature, what: str = "") -> None:
    """ValueError unless ``temperature`` is a number >= 0 (``what`` says what 0 means)."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a float >= 0{what}, got {temperature!r}")


def _batched_prompts(prompts):
    """Checks ``prompts``, integer token ids ``(n,)`` or ``(b, n)`` with ``n >= 1``; returns
    ``(prompts as (b, n), no_batch)`` where ``no_batch`` says a batch dim of 1 was added."""
    _check_tokens("prompts", prompts, (1, 2))
    no_batch = prompts.dim() == 1
    if no_batch:
        prompts = prompts[None]
    if prompts.shape[1] < 1:
        raise ValueError(f"prompts: expected at least one token per row, got shape {tuple(prompts.shape)}")
    return prompts, no_batch


def _check_prompt_lens(prompt_lens, b: int, t: int) -> None:
    _check_tokens("prompt_lens", prompt_lens, 1)
    if prompt_lens.shape[0] != b:
        raise ValueError(f"prompt_lens: expected shape ({b},) (one length per prompt), got {tuple(prompt_lens.shape)}")
    if bool((prompt_lens < 1).any()) or bool((prompt_lens > t).any()):
        raise ValueError(f"prompt_lens: expected lengths in [1, {t}], got {prompt_lens.tolist()}")


def _check_prompt_mask(mask, b: int, t: int) -> None:
    if mask is None:
        return
    _check.tensor("mask", mask, ndim=2)
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, t):
        raise ValueError(f"mask: expected a bool tensor of shape {(b, t)} (the prompts'), "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _filter_fn(filter_logits_fn):
    """``filter_logits_fn`` given by name (a key of ``FILTER_LOGITS_FN``) -> the function; else as is."""
    if isinstance(filter_logits_fn, str):
        if filter_logits_fn not in FILTER_LOGITS_FN:
            raise ValueError(f"filter_logits_fn: expected one of {', '.join(FILTER_LOGITS_FN)} or a callable, "
                             f"got {filter_logits_fn!r}")
        filter_logits_fn = FILTER_LOGITS_FN[filter_logits_fn]
    return filter_logits_fn


def _resolve_filter(filter_logits_fn, filter_kwargs, filter_thres):
    """``(filter function, its kwargs)`` from ``generate``'s arguments; ``filter_thres`` (the older
    argument) becomes ``top_k``'s ``frac_num_tokens = 1 - filter_thres`` or ``top_p``'s ``thres``."""
    filter_logits_fn = _filter_fn(filter_logits_fn)
    if not callable(filter_logits_fn):
        raise TypeError(f"filter_logits_fn: expected a callable or a name, got {type(filter_logits_fn).__name__}")
    filter_kwargs = dict(filter_kwargs or {})
    if filter_thres is not None:
        if filter_logits_fn is top_k:
            filter_kwargs.setdefault("frac_num_tokens", 1. - filter_thres)
        elif filter_logits_fn is top_p:
            filter_kwargs.setdefault("thres", filter_thres)
        else:
            raise ValueError("filter_thres: only understood with filter_logits_fn top_k or top_p; "
                             "pass filter_kwargs for other filters")
    return filter_logits_fn, filter_kwargs


# ---------------------------------------------------------------- the decoding loop (shared with continuous.py), one step

@contextmanager
def eval_mode(*modules: nn.Module):
    """Run the block with every module in eval mode; each gets its own mode back afterwards."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def cache_flags(net, cache_kv) -> tuple:
    """``(can_cache, cache_outside)``: whether decoding hands ``net`` its KV cache (asked for and
    supported), and whether that cache may be trimmed to a window past ``max_seq_len`` (no
    absolute positional embedding)."""
    return (bool(cache_kv) and bool(getattr(net, "can_cache_kv", False)),
            bool(getattr(net, "can_cache_kv_outside_max_seq_len", False)))


def sliding_window(seq, mask, cache, max_seq_len, cache_outside):
    """The inputs of one decoding step: ``(seq, mask, cache)`` as given while ``seq`` ``(b, n, ...)``
    fits ``max_seq_len`` (or ``max_seq_len`` is 0/None); past it, the last ``max_seq_len``
    positions of ``seq`` and of ``mask`` ``(b, n)``, and the cache trimmed to its last
    ``max_seq_len - 1`` positions (``trimmed_or_none``: None, recompute the window, when the
    network's positions do not allow it)."""
    if not max_seq_len or seq.shape[1] <= max_seq_len:
        return seq, mask, cache
    if mask is not None:
        mask = mask[:, -max_seq_len:]
    return seq[:, -max_seq_len:], mask, trimmed_or_none(cache, max_seq_len - 1, cache_outside)


def preallocate(cache, steps_left: int):
    """The cache of the next decoding step: after the prompt step an xtk ``KVCache`` moves into
    preallocated stores with room for ``steps_left`` more positions (each later step writes its
    keys in place, ``xtk.models.cache.extend_kv``); a cache already preallocated, or of another
    type, or with nothing left to decode, as it is."""
    if not isinstance(cache, KVCache) or steps_left <= 0 or cache.is_preallocated():
        return cache
    return cache.preallocated(cache.kv_length + steps_left)


def decode(net: nn.Module, out: torch.Tensor, steps: int, *, next_from: Callable, mask=None, kwargs: dict,
           max_seq_len=None, cache_kv=True, before_step: Optional[Callable] = None, done: Optional[Callable] = None):
    """The decoding loop of both autoregressive wrappers: ``steps`` times, ``net`` on the window of
    ``out`` ``(b, n, ...)`` (``sliding_window``) with its KV cache, then ``next_from(window,
    net_output)`` -> the next item ``(b, 1, ...)`` appended to ``out`` on dim 1, and ``mask``
    ``(b, n)`` (given to ``net`` in ``kwargs``) grown by True. ``before_step(n)`` runs before each
    step, ``done(out)`` True stops early. Returns ``(out (b, n + steps, ...), the last cache)``."""
    can_cache, cache_outside = cache_flags(net, cache_kv)
    cache = None
    for step in range(steps):
        x, step_mask, cache = sliding_window(out, mask, cache, max_seq_len, cache_outside)
        if before_step is not None:
            before_step(out.shape[1])
        if step_mask is not None:
            kwargs["mask"] = step_mask
        net_out, new_cache = net(x, return_intermediates=True, cache=cache, **kwargs)
        cache = preallocate(new_cache, steps - step - 1) if can_cache else None
        out = torch.cat((out, next_from(x, net_out)), dim=1)
        if mask is not None:
            mask = F.pad(mask, (0, 1), value=True)
        if done is not None and done(out):
            break
    return out, cache


@dataclass
class _Sampler:
    """Picks the next token from the last logits ``(b, num_tokens)`` -> ``(b, 1)``: the argmax at
    temperature 0, else a draw from ``softmax(filter_fn(logits, **filter_kwargs) / temperature)``."""

    temperature: float
    filter_fn: Callable
    filter_kwargs: dict

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0.:
            return logits.argmax(dim=-1, keepdim=True)
        return self.draw(F.softmax(self.filter_fn(logits, **self.filter_kwargs) / self.temperature, dim=-1))

    @staticmethod
    def draw(probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` ``(b, num_tokens)`` -> ``(b, 1)``."""
        return torch.multinomial(probs, 1)


class _Contrastive:
    """Contrastive decoding's amateur networks (none: logits pass unchanged), their
    ``contrastive_decode_fn`` kwargs and their KV caches."""

    def __init__(self, amateur_model, contrastive_decode_kwargs, cache_kv):
        self.nets, self.kwargs, self.caches, self.cache_kv = (), (), [], cache_kv
        if amateur_model is None:
            return
        nets = amateur_model if isinstance(amateur_model, (tuple, list)) else (amateur_model,)
        cd_kwargs = contrastive_decode_kwargs
        cd_kwargs = tuple(cd_kwargs) if isinstance(cd_kwargs, (tuple, list)) else (cd_kwargs,) * len(nets)
        if len(cd_kwargs) != len(nets):
            raise ValueError(f"contrastive_decode_kwargs: expected one dict per amateur model ({len(nets)}), "
                             f"got {len(cd_kwargs)}")
        nets = tuple(a.net if isinstance(a, AutoregressiveWrapper) else a for a in nets)
        for a in nets:
            if not isinstance(a, nn.Module):
                raise TypeError(f"amateur_model: expected a network (nn.Module), got {type(a).__name__}")
        self.nets, self.kwargs, self.caches = nets, cd_kwargs, [None] * len(nets)

    def slide(self, n: int, max_seq_len) -> None:
        """Past ``max_seq_len`` (a window of a sequence of ``n``): each amateur's cache trimmed to
        ``max_seq_len - 1`` positions, or dropped (``sliding_window``)."""
        if max_seq_len and n > max_seq_len:
            self.caches = [trimmed_or_none(c, max_seq_len - 1, getattr(a, "can_cache_kv_outside_max_seq_len", False))
                           for a, c in zip(self.nets, self.caches)]

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The expert's last logits ``(b, num_tokens)`` after every amateur's, on the same window ``x``."""
        for i, (net, cd_kwargs) in enumerate(zip(self.nets, self.kwargs)):
            a_logits, a_cache = net(x, return_intermediates=True, cache=self.caches[i], **kwargs)
            a_logits = a_logits[:, -1]
            if a_logits.shape != logits.shape:
                raise ValueError(f"amateur_model: expected logits shaped like the model's {tuple(logits.shape)}, "
                                 f"got {tuple(a_logits.shape)}")
            logits = contrastive_decode_fn(logits, a_logits, **cd_kwargs)
            self.caches[i] = a_cache if self.cache_kv and getattr(net, "can_cache_kv", False) else None
        return logits


@dataclass
class _BeamCandidates:
    """Beam search's choice per step: the ``k = min(beams, num_tokens)`` best next tokens of every
    beam (with Gumbel noise on the filtered logits when ``stochastic``)."""

    beams: int
    stochastic: bool
    temperature: float
    filter_fn: Callable
    filter_kwargs: dict

    def __call__(self, logits: torch.Tensor, scores: torch.Tensor):
        """logits ``(B, num_tokens)``, the beams' summed log-probabilities ``scores`` ``(B,)`` ->
        ``(tokens (B, k), their summed log-probabilities (B, k))``."""
        log_probs = logits.log_softmax(dim=-1)
        if self.stochastic:
            logits = self.filter_fn(logits, **self.filter_kwargs)
            u = torch.rand_like(logits).clamp(min=1e-20)
            logits = logits / self.temperature - (-u.log()).clamp(min=1e-20).log()
        samples = logits.topk(min(self.beams, logits.shape[-1]), dim=-1).indices
        return samples, scores[:, None] + log_probs.gather(-1, samples)


def _widen_beams(cache, kwargs: dict, rows: torch.Tensor):
    """After the first step every prompt row becomes ``k`` beams: the cache and the kwargs that
    carry one row per prompt (context, its mask, seq_start_pos, mems) follow ``rows`` ``(b * k,)``."""
    if cache is not None:
        cache.index(rows)
    for key in ("context", "context_mask", "seq_start_pos", "mems"):
        val = kwargs.get(key)
        if val is not None:
            kwargs[key] = [m[rows] for m in val] if isinstance(val, (list, tuple)) else val[rows]
    return cache


def _best_beams(out, cand_scores, cache, batch: int, beams: int, k: int):
    """Keep the ``beams`` best of each prompt's candidates. ``out`` ``(B * k, n)`` holds every beam
    followed by each of its ``k`` candidates, ``cand_scores`` ``(B, k)`` their scores, ``cache``
    the ``B`` beams' cache. Returns ``(out, scores (batch * beams,), cache)`` reordered alike."""
    cand_scores = cand_scores.reshape(batch, -1)                   # (b, prev_beams * k)
    per_row_cands = cand_scores.shape[-1]
    if per_row_cands > beams:
        cand_scores, order = cand_scores.sort(dim=-1, descending=True)
        cand_scores, order = cand_scores[:, :beams], order[:, :beams]
        flat = (order + torch.arange(batch, device=out.device)[:, None] * per_row_cands).reshape(-1)
        out = out[flat]
        if cache is not None:
            cache.index(flat // k)
    return out, cand_scores.reshape(-1), cache


class AutoregressiveWrapper(nn.Module):
    """Next-token training and sampling for a decoder-only ``TransformerWrapper``.

    Args:
        net: the network (``TransformerWrapper`` with a ``Decoder``).
        ignore_index: target value skipped by the loss (also marks padding in ``x``).
        pad_value: token fed to the network where ``x`` holds ``ignore_index``, and written
            after ``eos_token`` by ``generate``.
        mask_prob: fraction of input tokens hidden from self-attention during training
            (the first token never is); 0 turns it off. Must be in [0, 1).
    """

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0, mask_prob: float = 0.):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected a torch.nn.Module (a TransformerWrapper), got {type(net).__name__}")
        if not hasattr(net, "max_seq_len"):
            raise TypeError(f"net: expected a network with a max_seq_len attribute (a TransformerWrapper), "
                            f"got {type(net).__name__}")
        if not isinstance(mask_prob, (int, float)) or not 0. <= mask_prob < 1.:
            raise ValueError(f"mask_prob: expected a float in [0, 1), got {mask_prob!r}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.mask_prob = float(mask_prob)

    # ------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompts,
        seq_len: int,
        eos_token: Optional[int] = None,
        temperature: float = 1.,
        prompt_lens: Optional[torch.Tensor] = None,
        filter_logits_fn: str | Callable = top_k,
        restrict_to_max_seq_len: bool = True,
        filter_kwargs: Optional[dict] = None,
        filter_thres: Optional[float] = None,
        amateur_model=None,
        contrastive_decode_kwargs=dict(beta=0.5, alpha=0.1),
        cache_kv: bool = True,
        return_intermediates: bool = False,
        cuda_graph: bool = False,
        **kwargs,
    ):
        """Sample ``seq_len`` tokens after ``prompts`` and return only the new ones.

        ``prompts``: ``(b, n)`` or ``(n,)`` integer tensor, or a list of 1-D tensors of different
        lengths (left-aligned internally, as ``prompt_lens`` does). ``temperature=0.`` is greedy.
        ``filter_logits_fn``: ``top_k`` (default), ``top_p``, ``top_a``, ``min_p``, their names, or
        any callable ``(logits, **filter_kwargs) -> logits``. ``filter_thres`` is the older
        x-transformers argument: for ``top_k`` it keeps the ``1 - filter_thres`` fraction of the
        vocabulary, for ``top_p`` it is the nucleus threshold. ``eos_token``: stop once every row
        has produced it; everything after a row's first eos becomes ``pad_value``.
        ``mask`` (in kwargs): a ``(b, n)`` prompt key mask, extended with True for new tokens.
        ``amateur_model`` (a network or wrapper, or a tuple of them, with ``contrastive_decode_kwargs``
        one dict per amateur): contrastive decoding, which replaces the filter.
        Other kwargs go to the network on every step (e.g. ``context``, ``context_mask``).
        Returns ``(b, seq_len')`` (or ``(seq_len',)`` for a 1-D prompt); with
        ``return_intermediates=True`` also the last cache.
        ``cuda_graph=True`` (CUDA only; ValueError on other devices before any work): after the prompt,
        one decode step with fixed shapes is captured in a CUDA graph and replayed
        (``xtk.models.static_decode``: same tokens as without for greedy decoding; eos checked on the
        host every 16 steps). Calls it cannot serve (variable prompt lengths, masks, contrastive
        decoding, a window past ``max_seq_len``, memory key/values, ...) raise a ValueError naming why.
        """
        if cuda_graph:
            from .static_decode import generate_static   # (it imports this module)
            return generate_static(self, prompts, seq_len, eos_token, temperature, prompt_lens, filter_logits_fn,
                                   restrict_to_max_seq_len, filter_kwargs, filter_thres, amateur_model, cache_kv,
                                   return_intermediates, **kwargs)
        seq_len = _check.integer("seq_len", seq_len, minimum=1)
        check_temperature(temperature, " (0 = greedy)")
        if eos_token is not None:
            eos_token = _check.integer("eos_token", eos_token)
        prompts, prompt_lens = self._list_prompts(prompts, prompt_lens)
        prompts, no_batch = _batched_prompts(prompts)
        sampler = _Sampler(temperature, *_resolve_filter(filter_logits_fn, filter_kwargs, filter_thres))
        if prompt_lens is not None:  # variable length prompts are aligned right; the network masks the left padding
            _check_prompt_lens(prompt_lens, *prompts.shape)
            prompts = self._left_pad(prompts, prompt_lens, kwargs)
        mask = kwargs.pop("mask", None)
        _check_prompt_mask(mask, *prompts.shape)
        contrastive = _Contrastive(amateur_model, contrastive_decode_kwargs, cache_kv)
        if contrastive.nets:
            sampler.filter_fn, sampler.filter_kwargs = _identity, {}
        t, max_seq_len = prompts.shape[1], self.max_seq_len if restrict_to_max_seq_len else None
        with eval_mode(self, *contrastive.nets):
            out, cache = decode(
                self.net, prompts, seq_len, mask=mask, kwargs=kwargs, max_seq_len=max_seq_len, cache_kv=cache_kv,
                next_from=lambda x, logits: sampler(contrastive(x, logits[:, -1], kwargs)),
                before_step=lambda n: contrastive.slide(n, max_seq_len),
                done=None if eos_token is None else lambda out: bool((out[:, t:] == eos_token).any(dim=-1).all()))
        out = self._pad_after_eos(out[:, t:], eos_token)
        if no_batch:
            out = out[0]
        return (out, cache) if return_intermediates else out

    def _list_prompts(self, prompts, prompt_lens):
        """A list of 1-D prompts -> ``(prompts (b, longest) padded with pad_value, their lengths (b,))``;
        other prompts -> ``(prompts, prompt_lens)`` as given."""
        if not isinstance(prompts, (list, tuple)):
            return prompts, prompt_lens
        if len(prompts) == 0:
            raise ValueError("prompts: expected a non-empty list of 1-D token tensors, got an empty list")
        if prompt_lens is not None:
            raise ValueError("prompt_lens: must be None when prompts is a list (the lengths come from the list)")
        for i, p in enumerate(prompts):
            _check_tokens(f"prompts[{i}]", p, 1)
            if p.shape[0] < 1:
                raise ValueError(f"prompts[{i}]: expected at least one token, got an empty tensor")
        prompt_lens = torch.tensor([p.shape[0] for p in prompts], device=prompts[0].device)
        return nn.utils.rnn.pad_sequence(list(prompts), batch_first=True, padding_value=self.pad_value), prompt_lens

    def _left_pad(self, prompts: torch.Tensor, prompt_lens: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Each row's first ``prompt_lens[b]`` tokens moved to the right end of ``prompts`` ``(b, t)``
        (left padding with ``pad_value``); ``kwargs["seq_start_pos"]`` ``(b,)`` tells the network
        where each row starts."""
        lens = prompt_lens.to(prompts.device)
        kwargs["seq_start_pos"] = prompts.shape[1] - lens
        return align_right(prompts, lens, pad_id=self.pad_value)

    def _pad_after_eos(self, out: torch.Tensor, eos_token) -> torch.Tensor:
        """Everything after the first ``eos_token`` of a row of ``out`` ``(b, n)`` becomes ``pad_value``
        (the eos itself stays)."""
        if eos_token is None:
            return out
        after = F.pad(out == eos_token, (1, -1), value=False).cumsum(dim=-1) > 0
        return out.masked_fill(after, self.pad_value)

    @torch.no_grad()
    def beam_search(
        self,
        prompts: torch.Tensor,
        seq_len: int,
        beams: int = 4,
        return_beams_and_scores: bool = False,
        eos_token: Optional[int] = None,
        temperature: float = 1.,
        stochastic: bool = False,
        prompt_lens: Optional[torch.Tensor] = None,
        filter_logits_fn: str | Callable = _identity,
        restrict_to_max_seq_len: bool = True,
        filter_kwargs: Optional[dict] = None,
        cache_kv: bool = True,
        **kwargs,
    ):
        """Beam search as x-transformers: keep the ``beams`` continuations with the highest summed
        log-probability. Returns the best beam ``(b, seq_len)`` (``(seq_len,)`` for a 1-D prompt),
        or with ``return_beams_and_scores`` all beams ``(beams, b, seq_len)`` and their scores
        ``(beams, b)``, best first. ``stochastic=True`` picks the candidates with Gumbel noise on
        the filtered logits (``temperature > 0``). ``context``/``context_mask`` kwargs (an
        encoder's output) follow their beams. ``eos_token`` is not supported (as in x-transformers).
        A network whose cache is not an xtk ``KVCache`` runs without a cache here (the cache must
        follow the beams)."""
        if eos_token is not None:
            raise ValueError("eos_token: not supported by beam_search (as in x-transformers); expected None")
        seq_len = _check.integer("seq_len", seq_len, minimum=1)
        beams = _check.integer("beams", beams, minimum=1)
        check_temperature(temperature)
        prompts, no_batch = _batched_prompts(prompts)
        batch, t = prompts.shape
        candidates = _BeamCandidates(beams, stochastic and temperature != 0., temperature, _filter_fn(filter_logits_fn),
                                     dict(filter_kwargs or {}))
        if prompt_lens is not None:
            _check_tokens("prompt_lens", prompt_lens, 1)
            prompts = self._left_pad(prompts, prompt_lens, kwargs)
        with eval_mode(self):
            out, scores = self._beam_loop(prompts, seq_len, candidates, cache_kv, restrict_to_max_seq_len, kwargs)
        n_beams = out.shape[0] // batch
        out = out[:, t:].reshape(batch, n_beams, -1)
        scores = scores.reshape(batch, n_beams)
        if not return_beams_and_scores:
            best = out[:, 0]
            return best[0] if no_batch else best
        out, scores = out.transpose(0, 1), scores.transpose(0, 1)
        return (out[:, 0], scores[:, 0]) if no_batch else (out, scores)

    def _beam_loop(self, prompts, seq_len, candidates: _BeamCandidates, cache_kv, restrict_to_max_seq_len, kwargs):
        """``seq_len`` beam-search steps from ``prompts`` ``(b, t)``. Returns the beams
        ``(b * beams, t + seq_len)``, each prompt's beams together, best first, and their scores."""
        batch = prompts.shape[0]
        can_cache, cache_outside = cache_flags(self.net, cache_kv)
        max_seq_len = self.max_seq_len if restrict_to_max_seq_len else None
        out, cache, scores = prompts, None, torch.zeros(batch, device=prompts.device)
        for i in range(seq_len):
            x, _, cache = sliding_window(out, None, cache, max_seq_len, cache_outside)
            logits, new_cache = self.net(x, return_intermediates=True, cache=cache, **kwargs)
            cache = preallocate(new_cache, seq_len - i - 1) if can_cache and isinstance(new_cache, KVCache) else None
            samples, cand_scores = candidates(logits[:, -1], scores)         # (B, k) each
            k = samples.shape[-1]
            out = torch.cat((out.repeat_interleave(k, dim=0), samples.reshape(-1, 1)), dim=-1)  # (B*k, n+1)
            if i == 0:
                cache = _widen_beams(cache, kwargs, torch.arange(batch, device=prompts.device).repeat_interleave(k))
            out, scores, cache = _best_beams(out, cand_scores, cache, batch, candidates.beams, k)
        return out, scores

    # ------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, return_outputs: bool = False, prepend_embeds=None, lens=None, **kwargs):
        """Mean next-token cross entropy of ``x`` ``(b, n)``, ignoring targets equal to ``ignore_index``.

        ``lens``: ``(b,)`` valid lengths (the rest is ignored). ``prepend_embeds``: ``(b, m, dim)``
        embeddings put before the tokens (no loss on them). Other kwargs (``mask``, ``context``,
        ``mems``...) go to the network. ``return_outputs=True`` returns ``(loss, (logits, intermediates))``.
        """
        _check_tokens("x", x, 2)
        b, seq = x.shape
        if seq < 2:
            raise ValueError(f"x: expected at least 2 tokens per row (an input and a target), got shape {tuple(x.shape)}")

        if lens is not None:
            _check_tokens("lens", lens, 1)
            if lens.shape[0] != b:
                raise ValueError(f"lens: expected shape ({b},), got {tuple(lens.shape)}")
            keep = torch.arange(seq, device=x.device)[None, :] < lens[:, None]
            x = x.masked_fill(~keep, self.ignore_index)

        inp, target = x, x[:, 1:]
        inp = torch.where(inp == self.ignore_index, torch.full_like(inp, self.pad_value), inp)

        if self.mask_prob > 0.:
            # hide a random mask_prob fraction of the tokens from self-attention (never the first)
            rand = torch.randn(inp.shape, device=x.device)
            rand[:, 0] = -torch.finfo(rand.dtype).max
            num_mask = min(int(seq * self.mask_prob), seq - 1)
            indices = rand.topk(num_mask, dim=-1).indices
            kv_mask = ~torch.zeros_like(inp, dtype=torch.bool).scatter(1, indices, True)
            kwargs["self_attn_kv_mask"] = kv_mask

        if prepend_embeds is not None:
            kwargs["prepend_embeds"] = prepend_embeds

        if return_outputs:
            logits, cache = self.net(inp, return_intermediates=True, **kwargs)
        else:
            logits, cache = self.net(inp, **kwargs), None

        if prepend_embeds is not None:
            logits = logits[:, prepend_embeds.shape[1]:]
        logits = logits[:, :-1]

        if getattr(self.net, "output_is_log_prob", False):
            loss = F.nll_loss(logits.transpose(1, 2), target, ignore_index=self.ignore_index)
        else:
            loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)

        if not return_outputs:
            return loss
        return loss, (logits, cache)
