"""Switch values of the attention kernels (``BIAS_KIND``, ``MASK_KIND``, ``TOPK_PASS``), one definition shared by the
kernels (``attention_common``), their launcher, the AOT set, the tile classes and ``xtk.bias`` (each
bias descriptor names its kind). Plain ints, no triton import: ``xtk.bias`` reads this module."""

# BIAS_KIND: what the kernel expands for the bias slot
BIAS_NONE = 0
BIAS_ALIBI = 1         # one slope per head (0 for heads without one): -slope * |p_i - p_j|
BIAS_TABLE = 2         # one value per signed distance and head: tab[clamp(p_i - p_j, -C, C) + C, h] (T5, DistanceTable)
BIAS_DENSE_FLOAT = 3   # an additive float tensor broadcast to (b, h, nq, nk)
BIAS_DENSE_BOOL = 4    # a boolean keep-mask broadcast to (b, h, nq, nk)

# MASK_KIND: the attn_mask slot
MASK_NONE = 0
MASK_FLOAT = 1
MASK_BOOL = 2

# TOPK_PASS of the decode kernel: attention, the top-k pre-pass (logits to a scratch), attention
# masking the logits below each row's threshold
TOPK_NONE = 0
TOPK_LOGITS = 1
TOPK_MASK = 2

POSITIONAL_BIAS = (BIAS_ALIBI, BIAS_TABLE)
DENSE_BIAS = (BIAS_DENSE_FLOAT, BIAS_DENSE_BOOL)
