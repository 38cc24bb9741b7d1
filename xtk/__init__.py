"""xtk: fused kernels for x-transformers features behind a torch module API (SPEC §1)."""
import importlib
import os
import sys
import warnings

__version__ = "0.1.0"  # the one place: setup.py reads it from here

_argv0 = (getattr(sys, "argv", None) or [""])[0]
if _argv0 == "-m" or os.path.basename(_argv0) == "xtk":
    # `python -m xtk` (sys.argv[0] is "-m" while it is located) or the `xtk` script: its table says
    # whether numpy is there; torch's "Failed to initialize NumPy" warning would only interrupt it.
    # Imported by a program, xtk leaves torch's warnings alone.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
        import torch  # noqa: F401
del _argv0

from . import bias
from .qk import QKNorm, Rotary
from .ops.attention import attention
from .ops.attention_kvcache import attention_with_kvcache
from .ops.attention_varlen import attention_varlen
from .kv_cache import KVCache, PagedKVCache
from .ops.rms_norm import rms_norm
from .ops.glu import glu

from . import backends as _backends

# every backend (triton and the Triton kernels included, when installed) is imported now, so that
# picking one inside torch.compile is a lookup: importing xtk costs the triton import
_backends.preload()

# model classes (and the x-transformers patch) load on first use
_LAZY = {
    "AttentionLayers": "xtk.models.layers",
    "Encoder": "xtk.models.layers",
    "Decoder": "xtk.models.layers",
    "CrossAttender": "xtk.models.layers",
    "TransformerWrapper": "xtk.models.wrapper",
    "ViTransformerWrapper": "xtk.models.vit",
    "ContinuousTransformerWrapper": "xtk.models.continuous",
    "ContinuousAutoregressiveWrapper": "xtk.models.continuous",
    "AutoregressiveWrapper": "xtk.models.autoregressive",
    "XTransformer": "xtk.models.xtransformer",
    "load_x_transformers_weights": "xtk.models.loader",
    "patch": "xtk.integrations.xtransformers",
    "unpatch": "xtk.integrations.xtransformers",
}

__all__ = ["attention", "attention_with_kvcache", "attention_varlen", "KVCache", "PagedKVCache", "bias", "QKNorm", "Rotary", "rms_norm", "glu", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtk' has no attribute {name!r}")
