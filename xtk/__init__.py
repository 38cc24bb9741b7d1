"""xtk: fused kernels for x-transformers features behind a torch module API (SPEC §1)."""
from . import bias
from .qk import QKNorm, Rotary
from .ops.attention import attention
from .ops.norm import rms_norm
from .ops.glu import glu

__version__ = "0.1.0"

__all__ = ["attention", "bias", "QKNorm", "Rotary", "rms_norm", "glu"]
