"""``xtk.patch`` / ``xtk.unpatch``: x-transformers model objects run xtk's ops, in place.

``report = xtk.patch(model)`` takes a model of the PyPI package ``x-transformers`` (2.31.x):
``TransformerWrapper``, ``XTransformer``, ``Encoder`` / ``Decoder`` / ``CrossAttender`` /
``AttentionLayers``, ``ViTransformerWrapper``, or any module holding them (``AutoregressiveWrapper``,
your own). The model keeps its objects and its ``Parameter`` objects (an optimizer built before
keeps working); nothing is copied or reloaded. ``xtk.unpatch(model)`` restores it exactly.

Mechanism: an instance ``forward`` on the modules xtk can run (the class's own ``forward`` is
remembered, never edited), so the module tree, the parameter names and the state_dict stay as
they were:

- ``Attend`` (the score / softmax / value part of each ``Attention``): ``xtk.attention`` with the
  layer's mask, causality (bottom-right, as x-transformers), GQA in x-transformers' head order,
  memory key/values as position-less prefix keys, top-k, dropout, and the relative position of the
  ``AttentionLayers`` as an in-kernel descriptor built each call from that module's own parameters
  (ALiBi: its slopes; T5: its ``relative_attention_bias`` table gathered per signed distance with
  x-transformers' own bucket function; dynamic position bias: the table its MLP gives for the
  call's distances), so gradients land in the original parameters; rotary/xpos in-kernel as
  ``xtk.Rotary`` from the layers' ``RotaryEmbedding`` buffers when x-transformers derives the
  positions itself (its positions are then the kernel's: queries last, memory key/values without
  position; a call given ``pos`` / ``rotary_pos_emb`` / ``context_pos``, cross-attention, partial
  or decoupled rope keep x-transformers' rotation of q/k). ``Attention`` gets a thin ``forward``
  that hands these modules to its ``Attend`` instead of letting x-transformers expand the bias into
  ``(h, n, n)`` and rotate q/k; ``AttentionLayers`` with rotary one that notes whether the call
  gave custom positions. Projections, QK-norm (x-transformers caches the normalized keys, so it
  stays there), value gates and everything around the score part stay x-transformers' own code,
  on q/k/v before and on the output after the kernel.
- ``RMSNorm``, ``ScaleNorm``, ``SimpleRMSNorm``: ``xtk.rms_norm`` with ``g + unit_offset``.
- ``GLU`` feed-forward input (gelu, gelu tanh, silu, relu, relu squared gates): ``xtk.glu`` on its
  own projection.

What xtk cannot run exactly stays on its original path and is listed in the report with the
reason (talking heads, residual attention, other attention functions, ...). Like x-transformers'
``flash=True``, a swapped attention does not form the attention matrix: its intermediates carry
no ``pre_softmax_attn`` / ``post_softmax_attn`` (``return_attn=True`` needs ``xtk.unpatch``).
Two differences of xtk's attention (SPEC §2.8), by design: a query with no key left to attend to
(a left-padded position under ``seq_start_pos``: padding before it, causality after) outputs zeros
where x-transformers averages over the masked keys -- a padding position, which no other
position reads; attention dropout in training draws its keep-mask in-kernel (same rate, another
random stream than ``nn.Dropout``). The patched forwards pass per-call state through the module
(not thread-safe: one forward at a time per model object, as for training); ``torch.compile``
traces it without a graph break (``fullgraph=True`` works).
"""
from __future__ import annotations

import inspect
import types
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import backends
from ..bias import Alibi, Dense, DistanceTable
from ..ops.attention import attention as xattention
from ..ops.glu import glu as xglu
from ..ops.rms_norm import rms_norm as xrms_norm
from ..qk import Rotary
from .report import PatchReport

__all__ = ["patch", "unpatch"]

_ORIGINAL = "_xtk_original_forward"   # on each patched module: its instance forward before, or _CLASS
_CLASS = "class"                      # there was none: the class's forward runs again after unpatch
_BACKEND = "_xtk_backend"
_CALL = "_xtk_call"                   # on a patched Attend, during one Attention call: what to run
_POSITIONS = "_xtk_standard_positions"  # on a patched AttentionLayers, during a call without custom positions
_ROOT = "_xtk_patched_root"           # on the model xtk.patch was given (even when nothing was swapped)


def _xt():
    """The x-transformers modules (imported on first use: xtk does not depend on the package)."""
    try:
        import x_transformers.attend as attend
        import x_transformers.x_transformers as xt
    except ImportError as e:   # pragma: no cover - the caller passed an x-transformers model
        raise TypeError("xtk.patch: x-transformers is not installed, so this cannot be one of its models") from e
    return xt, attend


# --------------------------------------------------------------------------- attention
_FALLBACK = object()       # _CALL value: this call has a feature xtk does not run: the original path


class _Call(NamedTuple):
    """_CALL value: what the patched ``Attention`` hands its ``Attend`` for one call (the modules,
    not their expansions)."""
    rel_pos: Optional[nn.Module] = None   # an x-transformers relative-position module
    rotary: Optional[nn.Module] = None    # the layers' RotaryEmbedding, when the kernel applies it


def _attend_reasons(attend, xt, attend_mod) -> list[str]:
    """Why xtk cannot run this ``Attend``'s score part exactly (empty: it can)."""
    why = []
    if any(getattr(attend, n, None) is not None for n in
           ("pre_softmax_talking_heads", "post_softmax_talking_heads", "pre_scale_post_talking_heads")):
        why.append("talking heads (mix the heads' score matrices)")
    if _topk_of(attend, attend_mod) is None and not _is_softmax(attend.attn_fn):
        why.append(f"attention function {_fn_name(attend.attn_fn)} (xtk runs softmax and sparse top-k)")
    flags = (("l2_distance", "l2-distance logits"), ("add_zero_kv", "a zero key/value"),
             ("head_learned_sink", "a learned attention sink"), ("softclamp_logits", "logit soft-clamping"),
             ("cog_signed", "signed (cog) attention"), ("selective", "selective attention"),
             ("inverted_attention", "inverted attention"), ("flash_pack_seq", "flash-attn packed sequences"))
    why += [what for name, what in flags if getattr(attend, name, False)]
    if getattr(attend, "cope", None) is not None:
        why.append("contextual position encoding (CoPE reads the scores)")
    return why


def _is_softmax(fn) -> bool:
    return isinstance(fn, partial) and fn.func is torch.nn.functional.softmax and fn.keywords.get("dim") == -1 \
        and not fn.args


def _topk_of(attend, attend_mod):
    """The ``k`` of a sparse top-k ``Attend`` that xtk's top-k equals (no straight-through), else None."""
    fn = attend.attn_fn
    if isinstance(fn, partial) and fn.func is attend_mod.sparse_topk_attn and not fn.args \
            and fn.keywords.get("dim") == -1 and not fn.keywords.get("straight_through", False):
        return int(fn.keywords["sparse_topk"])
    return None


def _fn_name(fn) -> str:
    f = fn.func if isinstance(fn, partial) else fn
    return getattr(f, "__qualname__", None) or type(f).__name__


def _rel_pos_kind(rel_pos, xt) -> str | None:
    """'ALiBi' | 'T5' | 'dynamic position bias' for the relative-position modules xtk runs, else None."""
    return {xt.AlibiPositionalBias: "ALiBi", xt.RelativePositionBias: "T5 relative position",
            xt.DynamicPositionBias: "dynamic position bias"}.get(type(rel_pos))


def _descriptor(rel_pos, L: int):
    """The in-kernel bias of ``rel_pos`` (an x-transformers relative-position module) for ``L``
    positional keys, computed from the module's own tensors so that gradients reach them."""
    xt, _ = _xt()
    if isinstance(rel_pos, xt.AlibiPositionalBias):
        return Alibi(rel_pos.slopes.reshape(-1))
    dist = torch.arange(-(L - 1), L, device=rel_pos.device)   # p_i - p_j, the DistanceTable's rows
    if isinstance(rel_pos, xt.RelativePositionBias):
        bucket = rel_pos._relative_position_bucket(-dist, causal=rel_pos.causal, num_buckets=rel_pos.num_buckets,
                                                   max_distance=rel_pos.max_distance)
        return DistanceTable(rel_pos.relative_attention_bias(bucket) * rel_pos.scale)
    # DynamicPositionBias: its MLP over the signed distances, as its forward (fp32 input there)
    pos = dist.float()[:, None]
    if rel_pos.log_distance:
        pos = torch.sign(pos) * torch.log(pos.abs() + 1)
    for layer in rel_pos.mlp:
        pos = layer(pos)
    return DistanceTable(pos)


def _attend_forward(self, q, k, v, mask=None, attn_bias=None, prev_attn=None, attn_delta=None, row_mask=None,
                    flash_pack_seq_kwargs=None, causal=None):
    """A patched ``Attend.forward``: x-transformers' arguments, ``xtk.attention`` inside."""
    call = self.__dict__.get(_CALL, _Call())
    if call is _FALLBACK or prev_attn is not None or attn_delta is not None or flash_pack_seq_kwargs is not None:
        return _original(self)(q, k, v, mask=mask, attn_bias=attn_bias, prev_attn=prev_attn, attn_delta=attn_delta,
                               row_mask=row_mask, flash_pack_seq_kwargs=flash_pack_seq_kwargs, causal=causal)
    _, attend_mod = _xt()
    q, k, v = _one_dtype(q, k, v)
    causal = self.causal if causal is None else causal
    n, nk = q.shape[-2], k.shape[-2]
    k_prefix = self._xtk_k_prefix
    L = nk - k_prefix   # keys that carry a position (x-transformers' j)
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    bias = None
    if call.rel_pos is not None:
        bias = _descriptor(call.rel_pos, L)
    elif attn_bias is not None:
        bias = Dense(attn_bias)
    scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
    out = xattention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                     is_causal=bool(causal), scale=float(scale), enable_gqa=k.shape[1] != q.shape[1], bias=bias,
                     topk=_topk_of(self, attend_mod), rotary=_rotary(call.rotary), q_offset=L - n,
                     k_prefix=k_prefix, gqa_order="repeat", backend=self.__dict__[_BACKEND])
    return out, attend_mod.Intermediates()


def _one_dtype(q, k, v):
    """q, k, v in one dtype, the one x-transformers' einsums compute in: autocast's when it is on
    (fp32 memory key/values or QK-norm dim scales promote k or q to fp32 under bf16 autocast),
    else their promoted dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def _rotary(module) -> Optional[Rotary]:
    """x-transformers' ``RotaryEmbedding`` as ``xtk.Rotary`` (its own buffers), or None."""
    if module is None:
        return None
    return Rotary(2 * module.inv_freq.shape[0], module.inv_freq, xpos_scale=module.scale,
                  xpos_scale_base=getattr(module, "scale_base", 512), interpolation_factor=module.interpolation_factor)


def _attention_forward(self, *args, **kwargs):
    """A patched ``Attention.forward``: hands ``rel_pos`` (and, at the standard positions, the rotary
    module) to the patched ``Attend``, which builds their in-kernel forms, instead of letting
    x-transformers expand the bias to ``(h, n, n)`` and rotate q/k. Calls with a feature xtk does
    not run (``prev_attn``, ``attn_delta``, ``additional_key_values``, custom ALiBi positions) run
    the original path whole."""
    a = _keywords(self, args, kwargs)
    rel_pos = a.get("rel_pos")
    per_call = [name for name in ("prev_attn", "attn_delta", "additional_key_values", "flash_pack_seq_kwargs")
                if a.get(name) is not None]
    if rel_pos is not None and a.get("pos") is not None:
        per_call.append("pos (custom ALiBi positions)")
    if rel_pos is not None and _rel_pos_kind(rel_pos, _xt()[0]) is None:
        per_call.append(f"rel_pos {type(rel_pos).__name__} (no xtk bias descriptor)")
    attend = self.attend
    if per_call:
        backends.warn_once(f"xtk.patch:{id(self)}:{per_call}",
                           f"xtk.patch: an Attention called with {', '.join(per_call)} runs x-transformers' own path")
        attend.__dict__[_CALL] = _FALLBACK
    else:
        rotary = None
        owner = self.__dict__.get("_xtk_owner")
        if a.get("rotary_pos_emb") is not None and self.__dict__.get("_xtk_fuse_rotary") and a.get("context") is None \
                and owner is not None and owner.__dict__.get(_POSITIONS, False):
            rotary = owner.rotary_pos_emb   # the positions x-transformers derived are the kernel's (module docstring)
            a["rotary_pos_emb"] = None
        attend.__dict__[_CALL] = _Call(rel_pos, rotary)
        a["rel_pos"] = None
    try:
        return _original(self)(**a)
    finally:
        attend.__dict__.pop(_CALL, None)


_CUSTOM_POSITIONS = ("pos", "rotary_pos_emb", "context_pos", "polar_pos_emb")


def _layers_forward(self, *args, **kwargs):
    """A patched ``AttentionLayers.forward`` (layers with rotary): marks the call whose rotary
    positions x-transformers derives itself (no ``pos`` / ``rotary_pos_emb`` / ``context_pos`` given),
    so that its attentions may apply rotary in-kernel; otherwise x-transformers rotates q/k as before."""
    a = _keywords(self, args, kwargs)
    standard = all(a.get(n) is None for n in _CUSTOM_POSITIONS)
    previous = self.__dict__.get(_POSITIONS)
    self.__dict__[_POSITIONS] = standard
    try:
        return _original(self)(**a)
    finally:
        if previous is None:
            self.__dict__.pop(_POSITIONS, None)
        else:
            self.__dict__[_POSITIONS] = previous


# --------------------------------------------------------------------------- norms, GLU
def _rms_norm_forward(self, x):
    """``RMSNorm`` / ``ScaleNorm`` (``g``, unit offset) and ``SimpleRMSNorm`` (no weight) by ``xtk.rms_norm``."""
    g = getattr(self, "g", None)
    weight = None if g is None else g + float(self.unit_offset)
    return xrms_norm(x, weight, backend=self.__dict__[_BACKEND])


def _glu_activation(act, xt) -> str | None:
    """xtk's name of a GLU gate activation, or None when xtk has no exact match."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {nn.SiLU: "silu", nn.ReLU: "relu", xt.ReluSquared: "relu_squared"}.get(type(act))


def _glu_forward(self, x):
    """x-transformers' ``GLU``: ``up * act(gate) * mult_bias`` with ``up, gate = proj(x).chunk(2)``."""
    out = xglu(self.proj(x), self._xtk_activation, backend=self.__dict__[_BACKEND])
    return out * self.mult_bias if isinstance(self.mult_bias, torch.Tensor) else out


# --------------------------------------------------------------------------- install / restore
def _original(module):
    """The forward the module had before the patch (bound)."""
    prev = module.__dict__[_ORIGINAL]
    return type(module).forward.__get__(module) if prev is _CLASS else prev


def _op_backend(op: str, backend: str) -> str:
    """``patch``'s ``backend`` for ``op``: forced where the op has it, else 'auto' (as ``XTK_BACKEND``)."""
    return backend if backend == "auto" or backend in backends.names(op) else "auto"


def _install(module, forward, op: str, backend: str, **attrs) -> None:
    d = module.__dict__
    d[_ORIGINAL] = d.get("forward", _CLASS)
    d[_BACKEND] = _op_backend(op, backend)
    for name, value in attrs.items():
        d[name] = value
    d["forward"] = types.MethodType(forward, module)


def _restore(module) -> None:
    d = module.__dict__
    if _ORIGINAL in d:
        prev = d.pop(_ORIGINAL)
        if prev is _CLASS:
            d.pop("forward", None)
        else:
            d["forward"] = prev
    for name in [n for n in d if n.startswith("_xtk_")]:
        del d[name]


def _is_patched(module) -> bool:
    return _ORIGINAL in module.__dict__ or _ROOT in module.__dict__


# --------------------------------------------------------------------------- the walk
def _attention_owners(model, xt) -> dict:
    """``{id(Attention): (AttentionLayers, layer type 'a' | 'c')}`` for every attention of every
    ``AttentionLayers`` in the tree."""
    owners = {}
    for layers in (m for m in model.modules() if isinstance(m, xt.AttentionLayers)):
        for layer_type, (_, block, _) in zip(layers.layer_types, layers.layers):
            for m in block.modules():
                if isinstance(m, xt.Attention):
                    owners[id(m)] = (layers, layer_type)
    return owners


def _attention_reasons(attn, layers, layer_type, xt, attend_mod) -> list[str]:
    """Why this ``Attention`` stays on its original path (empty: xtk runs its score part)."""
    why = _attend_reasons(attn.attend, xt, attend_mod)
    if layers is not None:
        if (layer_type == "a" and layers.residual_attn) or (layer_type == "c" and layers.cross_residual_attn):
            why.append("residual attention (the next layer adds this layer's pre-softmax scores)")
        rel_pos = layers.rel_pos if layer_type == "a" else None
        if rel_pos is not None and _rel_pos_kind(rel_pos, xt) is None:
            why.append(f"relative position {type(rel_pos).__name__} (no xtk bias descriptor)")
        if isinstance(rel_pos, xt.AlibiPositionalBias) and (layers.rotary_pos_emb is not None
                                                            or getattr(layers, "polar_pos_emb", None) is not None):
            why.append("ALiBi with rotary/polar positions (x-transformers computes ALiBi from the positions it passes)")
    if attn.data_dependent_alibi is not None:
        why.append("data-dependent ALiBi (a bias computed from the tokens)")
    if getattr(attn, "rel_proj_pos_bias", None) is not None:
        why.append("relative projection position bias (a bias computed from the tokens)")
    return why


def _parameter_names(method) -> tuple[str, ...]:
    """The names of an unbound method's positional-or-keyword parameters, without ``self``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    return tuple(p.name for p in list(inspect.signature(method).parameters.values())[1:] if p.kind in kinds)


def _keywords(module, args, kwargs) -> dict:
    """A patched forward's arguments, all by name (``_xtk_names``: the original's parameter names);
    a plain zip rather than ``inspect`` at call time, which torch.compile traces without a break."""
    names = module._xtk_names
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward: takes {len(names)} positional arguments, got {len(args)}")
    clash = [n for n in names[:len(args)] if n in kwargs]
    if clash:
        raise TypeError(f"{type(module).__name__}.forward: got multiple values for argument {clash[0]!r}")
    return {**dict(zip(names, args)), **kwargs}


def _fuses_rotary(attn, layers, layer_type, xt) -> bool:
    """Whether the kernel applies this self-attention's rotary/xpos (else x-transformers rotates q/k
    before it, as unpatched): the layers' plain ``RotaryEmbedding`` on every head, no decoupled
    (multi-latent) rope sub-heads, no polar embedding after it."""
    return (layers is not None and layer_type == "a" and type(layers.rotary_pos_emb) is xt.RotaryEmbedding
            and attn.rotate_num_heads == attn.heads and getattr(attn, "to_rotateable_k", None) is None
            and getattr(layers, "polar_pos_emb", None) is None)


def _attention_summary(attn, layers, layer_type, xt, attend_mod, fuse_rotary) -> str:
    attend = attn.attend
    parts = []
    rel_pos = layers.rel_pos if layers is not None and layer_type == "a" else None
    if rel_pos is not None:
        parts.append(f"{_rel_pos_kind(rel_pos, xt)} in-kernel (the module's own tensors)")
    if attend.causal:
        parts.append("causal")
    if attn.kv_heads != attn.heads:
        parts.append(f"GQA {attn.heads}/{attn.kv_heads} heads")
    if attn.num_mem_kv:
        parts.append(f"{attn.num_mem_kv} memory key/values")
    topk = _topk_of(attend, attend_mod)
    if topk is not None:
        parts.append(f"top-{topk}")
    if fuse_rotary:
        parts.append("rotary/xpos in-kernel")
    rotary_outside = not fuse_rotary and layers is not None and layers.rotary_pos_emb is not None
    around = [w for w, on in (("QK-norm", attn.qk_norm), ("rotary/xpos", rotary_outside)) if on]
    if layer_type == "c":
        parts.insert(0, "cross-attention")
    text = "attention: xtk.attention" + (f" ({', '.join(parts)})" if parts else "")
    if around:
        text += f"; {' and '.join(around)} by x-transformers on q/k before it"
    return text


def _norm_kind(m, xt) -> str | None:
    kinds = {xt.RMSNorm: "RMSNorm", xt.ScaleNorm: "ScaleNorm", xt.SimpleRMSNorm: "SimpleRMSNorm"}
    return kinds.get(type(m))


_KEPT_NORMS = ("LayerNorm", "AdaptiveLayerNorm", "AdaptiveRMSNorm", "MultiheadRMSNorm", "DynamicTanh", "Derf")


def patch(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Swap, in place, the parts of an x-transformers model that xtk runs exactly (see the module
    docstring); -> the ``PatchReport`` (also logged, logger ``xtk.patch``). ``backend`` is forced on
    every xtk op that has it ('triton': attention; 'ext': norms and GLU), the others pick 'auto', as
    with ``XTK_BACKEND`` (which applies when 'auto'). A model already patched raises ValueError
    (``xtk.unpatch`` it first); a model without x-transformers attention layers raises TypeError."""
    backends.requested(backend)   # raises on an unknown name, before anything is touched
    if not isinstance(model, nn.Module):
        raise TypeError(f"xtk.patch: expected an x-transformers model (an nn.Module), got {type(model).__name__}")
    xt, attend_mod = _xt()
    if not any(isinstance(m, (xt.AttentionLayers, xt.Attention)) for m in model.modules()):
        raise TypeError(f"xtk.patch: {type(model).__name__} is not an x-transformers model (expected "
                        f"TransformerWrapper, XTransformer, Encoder/Decoder/AttentionLayers, ViTransformerWrapper "
                        f"or a module holding one)")
    if any(_is_patched(m) for m in model.modules()):
        raise ValueError(f"xtk.patch: this {type(model).__name__} is already patched; call xtk.unpatch(model) first")

    report = PatchReport(type(model).__name__)
    owners = _attention_owners(model, xt)
    names = _parameter_names(xt.Attention.forward)
    for path, m in model.named_modules():
        if type(m) is xt.Attention:
            layers, layer_type = owners.get(id(m), (None, "a"))
            why = _attention_reasons(m, layers, layer_type, xt, attend_mod)
            if why:
                report.keep(path, "attention: " + "; ".join(why))
                continue
            fuse_rotary = _fuses_rotary(m, layers, layer_type, xt)
            _install(m.attend, _attend_forward, "attention", backend, _xtk_k_prefix=m.num_mem_kv)
            _install(m, _attention_forward, "attention", backend, _xtk_names=names, _xtk_owner=layers,
                     _xtk_fuse_rotary=fuse_rotary)
            if fuse_rotary and not _is_patched(layers):
                _install(layers, _layers_forward, "attention", backend,
                         _xtk_names=_parameter_names(xt.AttentionLayers.forward))
            report.swap(path, _attention_summary(m, layers, layer_type, xt, attend_mod, fuse_rotary))
        elif isinstance(m, xt.Attention):
            report.keep(path, f"attention: {type(m).__name__}, a subclass of x-transformers' Attention "
                              f"(its forward may differ)")
        elif _norm_kind(m, xt):
            _install(m, _rms_norm_forward, "rms_norm", backend)
            report.swap(path, f"{_norm_kind(m, xt)}: xtk.rms_norm")
        elif type(m).__name__ in _KEPT_NORMS and type(m) is getattr(xt, type(m).__name__, None):
            report.keep(path, f"{type(m).__name__}: xtk has no op for this norm")
        elif type(m) is xt.GLU:
            act = _glu_activation(m.act, xt)
            if act is None or m.up_softclamp_value is not None:
                what = ("soft-clamped GLU" if m.up_softclamp_value is not None
                        else f"GLU gate activation {_fn_name(m.act)}")
                report.keep(path, f"feed-forward: {what} (xtk.glu has gelu, gelu_tanh, silu, relu, relu_squared)")
                continue
            _install(m, _glu_forward, "glu", backend, _xtk_activation=act)
            report.swap(path, f"GLU: xtk.glu ({act})")
    model.__dict__[_ROOT] = True
    report.attach(model).log()
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``xtk.patch`` on every module of ``model``: the original forwards run again (outputs
    bit-identical to before the patch). Returns ``model``; raises ValueError when nothing in it is
    patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"xtk.unpatch: expected an nn.Module, got {type(model).__name__}")
    patched = [m for m in model.modules() if _is_patched(m)]
    if not patched:
        raise ValueError(f"xtk.unpatch: nothing in this {type(model).__name__} is patched by xtk.patch")
    for m in patched:
        _restore(m)
    PatchReport.detach(model)
    return model
