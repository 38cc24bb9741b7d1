"""Helpers shared by the model tests."""
import torch


def perturb(model, seed=0):
    """Move every parameter off its init (zero-init gates, unit-offset norms, dirac talking heads ...)
    so that parity tests compare trained-looking weights; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
