"""``ViTransformerWrapper``: an image classifier / image encoder over patches (x-transformers 2.31.10).

Same constructor and forward arguments and the same parameter names as x-transformers
(``pos_embedding``, ``patch_to_embedding.{0,1,2}``, ``register_tokens``, ``mlp_head``), so its
checkpoints load.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..modules.norms import LayerNorm
from ..ops import _check

__all__ = ["ViTransformerWrapper"]


class ViTransformerWrapper(nn.Module):
    """Split ``(b, channels, image_size, image_size)`` images into ``patch_size`` squares, embed them
    (LayerNorm -> Linear -> LayerNorm), add learned positions, run ``attn_layers`` (an Encoder).

    ``forward(img)`` returns the class logits ``(b, num_classes)`` from the mean-pooled patch
    embeddings; without ``num_classes`` it returns the pooled embedding ``(b, dim)`` (as
    x-transformers does). ``return_embeddings=True`` returns the patch embeddings ``(b, patches, dim)``,
    ``return_logits_and_embeddings=True`` both.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        attn_layers: nn.Module,
        channels: int = 3,
        num_classes: Optional[int] = None,
        post_emb_norm: bool = False,
        num_register_tokens: int = 0,
        emb_dropout: float = 0.,
    ):
        super().__init__()
        image_size = _check.integer("image_size", image_size, minimum=1)
        patch_size = _check.integer("patch_size", patch_size, minimum=1)
        channels = _check.integer("channels", channels, minimum=1)
        num_register_tokens = _check.integer("num_register_tokens", num_register_tokens, minimum=0)
        if num_classes is not None:
            num_classes = _check.integer("num_classes", num_classes, minimum=1)
        if image_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size {image_size}, got {patch_size}")
        if not isinstance(attn_layers, nn.Module) or not hasattr(attn_layers, "dim"):
            raise TypeError(f"attn_layers: expected an Encoder (AttentionLayers) module, got {type(attn_layers).__name__}")
        if getattr(attn_layers, "causal", False):
            raise ValueError("attn_layers: expected a non-causal Encoder for image patches, got a causal Decoder")

        dim = attn_layers.dim
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size ** 2

        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, dim))
        self.has_register_tokens = num_register_tokens > 0
        if self.has_register_tokens:
            self.register_tokens = nn.Parameter(torch.randn(num_register_tokens, dim))
        self.patch_to_embedding = nn.Sequential(LayerNorm(patch_dim), nn.Linear(patch_dim, dim), LayerNorm(dim))
        self.post_emb_norm = LayerNorm(dim) if post_emb_norm else nn.Identity()
        self.dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes is not None else nn.Identity()

    def forward(self, img: torch.Tensor, return_embeddings: bool = False, return_logits_and_embeddings: bool = False):
        _check.tensor("img", img, ndim=4)
        _check.floating("img", img)
        c, s, p = self.channels, self.image_size, self.patch_size
        if tuple(img.shape[1:]) != (c, s, s):
            raise ValueError(f"img: expected shape (batch, {c}, {s}, {s}) (channels, image_size, image_size), "
                             f"got {tuple(img.shape)}")
        if return_embeddings and return_logits_and_embeddings:
            raise ValueError("return_embeddings, return_logits_and_embeddings: expected at most one, got both")
        b = img.shape[0]

        # (b, c, h*p1, w*p2) -> (b, h*w, p1*p2*c): patch pixels in (p1, p2, c) order, as x-transformers
        x = img.unflatten(2, (s // p, p)).unflatten(4, (s // p, p))    # b c h p1 w p2
        x = x.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)       # b (h w) (p1 p2 c)
        x = self.patch_to_embedding(x)
        x = x + self.pos_embedding[:, :x.shape[1]]
        x = self.post_emb_norm(x)
        x = self.dropout(x)

        n = x.shape[1]
        if self.has_register_tokens:
            x = torch.cat((x, self.register_tokens[None].expand(b, -1, -1)), dim=1)
        embed = self.attn_layers(x)
        embed = embed[:, :n]

        if return_embeddings:
            return embed
        logits = self.mlp_head(embed.mean(dim=-2))
        if return_logits_and_embeddings:
            return logits, embed
        return logits
