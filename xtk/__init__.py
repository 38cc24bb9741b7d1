"""xtk: fused kernels for x-transformers features behind a torch module API (SPEC §1)."""
import importlib

from . import bias
from .qk import QKNorm, Rotary
from .ops.attention import attention
from .ops.norm import rms_norm
from .ops.glu import glu

from . import backends as _backends

__version__ = "0.1.0"
_backends.preload()

# model classes load on first use (importing xtk stays cheap)
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
}

__all__ = ["attention", "bias", "QKNorm", "Rotary", "rms_norm", "glu", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtk' has no attribute {name!r}")
