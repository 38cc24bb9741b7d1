"""Input checks shared by the ops: each error names the argument, what was expected and what came."""
from __future__ import annotations

import torch


def tensor(name: str, x, ndim=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")


def floating(name: str, x) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def same(name: str, x, ref_name: str, ref) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")


def broadcastable(name: str, x, shape) -> None:
    try:
        out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    except RuntimeError:
        out = None
    if out != tuple(shape):
        raise ValueError(f"{name}: expected a shape broadcastable to {tuple(shape)}, got {tuple(x.shape)}")


def integer(name: str, value, minimum=None) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def int32_list(name: str, t, shape, device) -> list:
    """An int32 index tensor of ``shape`` (None: any size there) on ``device``, read to the host."""
    int32_tensor(name, t, shape, device)
    return t.tolist()


def int32_tensor(name: str, t, shape, device) -> None:
    """An int32 index tensor of ``shape`` (None: any size there) on ``device``: its metadata only
    (no read of its values)."""
    tensor(name, t, ndim=len(shape))
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected an int32 tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (q's), got {t.device}")
    if any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {tuple('*' if s is None else s for s in shape)}, got {tuple(t.shape)}")
