"""Every code example of the three seed READMEs (/work/shared/seeds), run with xtk's classes.

One test per example, in README order: ``test_s002_*`` (newest README), ``test_s000_*`` (older),
``test_s004_*`` (the oldest). Sizes are shrunk (width 16, 2 layers unless the feature needs the
seed's depth, vocabulary 64, sequences of 12, images 16x16 in 4x4 patches); ``.cuda()`` calls
are dropped (CPU CI). Each test runs the example's own statements and checks what its comments
promise (output shapes, a loss that backpropagates), plus a forward pass where the example only
builds the model.
"""
import pytest
import torch

from xtk import (TransformerWrapper, Encoder, Decoder, CrossAttender, XTransformer, ViTransformerWrapper,
                 ContinuousTransformerWrapper, ContinuousAutoregressiveWrapper, AutoregressiveWrapper)

NUM_TOKENS = 64     # seeds: 20000 / 256
MAX_SEQ_LEN = 16    # seeds: 1024
SEQ = 12            # seeds: 1024 (not a power of two on purpose)
DIM = 16            # seeds: 512
IMAGE, PATCH = 16, 4  # seeds: 256, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n=SEQ, num_tokens=NUM_TOKENS, batch=1):
    return torch.randint(0, num_tokens, (batch, n))


def _check_lm(model, mask=None, **kwargs):
    """Run a token model as the seeds do and check the (b, n, num_tokens) logits and gradients."""
    x = _tokens()
    logits = model(x, mask=mask, **kwargs) if mask is not None else model(x, **kwargs)
    assert logits.shape == (1, SEQ, NUM_TOKENS)
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    return logits


def _check_loss(loss):
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


# ====================================================================== seed 002 (newest README)

def test_s002_01_full_encoder_decoder():
    model = XTransformer(
        dim=DIM,
        enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN,
        tie_token_emb=True,  # tie embeddings of encoder and decoder
    )
    assert model.decoder.net.token_emb is model.encoder.token_emb
    src = _tokens()
    src_mask = torch.ones_like(src).bool()
    tgt = _tokens()
    loss = model(src, tgt, mask=src_mask)
    _check_loss(loss)


def test_s002_02_decoder_only_gpt_like():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_03_gpt3_shape():
    gpt3 = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                              attn_layers=Decoder(dim=32, depth=2, heads=4, attn_dim_head=8))
    _check_lm(gpt3)


def test_s002_04_encoder_only_bert_like():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    mask = torch.ones_like(x).bool()
    assert model(x, mask=mask).shape == (1, SEQ, NUM_TOKENS)


def test_s002_05_image_classification():
    model = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH, num_classes=10,
                                 attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    img = torch.randn(1, 3, IMAGE, IMAGE)
    assert model(img).shape == (1, 10)


def test_s002_06_image_to_caption():
    encoder = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH,
                                   attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    decoder = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                                 attn_layers=Decoder(dim=DIM, depth=2, heads=2, cross_attend=True))
    img = torch.randn(1, 3, IMAGE, IMAGE)
    caption = torch.randint(0, NUM_TOKENS, (1, SEQ))
    encoded = encoder(img, return_embeddings=True)
    assert encoded.shape == (1, (IMAGE // PATCH) ** 2, DIM)
    assert decoder(caption, context=encoded).shape == (1, SEQ, NUM_TOKENS)


def test_s002_07_pali():
    vit = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    pali = XTransformer(
        dim=DIM,
        enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN,
    )
    img = torch.randn(1, 3, IMAGE, IMAGE)
    prompt = torch.randint(0, NUM_TOKENS, (1, SEQ))
    prompt_mask = torch.ones(1, SEQ).bool()
    output_text = torch.randint(0, NUM_TOKENS, (1, SEQ))
    img_embeds = vit(img, return_embeddings=True)
    loss = pali(prompt, output_text, mask=prompt_mask, src_prepend_embeds=img_embeds)
    _check_loss(loss)
    assert vit.patch_to_embedding[1].weight.grad is not None  # the image encoder trains through PaLI


def test_s002_08_dropouts():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, emb_dropout=0.1,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, layer_dropout=0.1,
                                                   attn_dropout=0.1, ff_dropout=0.1))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    out = model(x)
    assert out.shape == (1, SEQ, NUM_TOKENS)
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # no dropout in eval


def test_s002_09_memory_key_values():
    enc = Encoder(dim=DIM, depth=2, heads=2, attn_num_mem_kv=16)
    x = torch.randn(1, SEQ, DIM)
    assert enc(x).shape == (1, SEQ, DIM)


def test_s002_10_memory_tokens():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, num_memory_tokens=20,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    _check_lm(model)


def test_s002_11_scalenorm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, use_scalenorm=True))
    _check_lm(model)


def test_s002_12_l2norm_embed():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, l2norm_embed=True,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    _check_lm(model)


def test_s002_13_post_emb_norm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, post_emb_norm=True,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    _check_lm(model)


def test_s002_14_rmsnorm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, use_rmsnorm=True))
    _check_lm(model)


def test_s002_15_ff_glu():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_glu=True))
    _check_lm(model)


def test_s002_16_ff_swish_glu():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_swish=True, ff_glu=True))
    _check_lm(model)


def test_s002_17_ff_no_bias():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_no_bias=True))
    _check_lm(model)


def test_s002_18_ff_relu_squared():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_relu_squared=True))
    _check_lm(model)


def test_s002_19_sparse_topk():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_sparse_topk=8))
    _check_lm(model)


def test_s002_20_talking_heads():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_talking_heads=True))
    _check_lm(model)


def test_s002_21_one_kv_head():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=4, attn_one_kv_head=True))
    _check_lm(model)


def test_s002_22_attn_on_attn():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, attn_on_attn=True))
    _check_lm(model)


def test_s002_23_gate_values():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, attn_gate_values=True))
    _check_lm(model)


def test_s002_24_sandwich_coef():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=6, heads=2, sandwich_coef=6))
    _check_lm(model)


def test_s002_25_macaron():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, macaron=True))
    _check_lm(model)


def test_s002_26_t5_rel_pos_bias():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, rel_pos_bias=True))
    _check_lm(model)


def test_s002_27_residual_attn():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, pre_norm=False, residual_attn=True))
    _check_lm(model)


def test_s002_28_cross_residual_attn():
    model = XTransformer(
        dim=DIM,
        enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN,
        dec_cross_residual_attn=True,
    )
    _check_loss(model(_tokens(), _tokens()))


def test_s002_29_deepnorm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(deepnorm=True, dim=DIM, depth=2, heads=2))
    _check_lm(model)


def test_s002_30_transformer_xl_recurrence():
    model_xl = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=8, max_mem_len=20,
                                  attn_layers=Decoder(dim=DIM, depth=2, heads=2, rel_pos_bias=True))
    seg1, seg2, seg3 = (torch.randint(0, NUM_TOKENS, (1, 8)) for _ in range(3))
    logits1, mems1 = model_xl(seg1, return_mems=True)
    logits2, mems2 = model_xl(seg2, mems=mems1, return_mems=True)
    logits3, mems3 = model_xl(seg3, mems=mems2, return_mems=True)
    assert logits3.shape == (1, 8, NUM_TOKENS)
    assert len(mems1) == 2 and mems1[0].shape == (1, 8, DIM)
    assert mems2[0].shape == (1, 16, DIM) and mems3[0].shape == (1, 20, DIM)  # capped at max_mem_len
    # the memories matter
    assert not torch.allclose(logits2, model_xl(seg2))


def test_s002_31_enhanced_recurrence_shift_mem_down():
    model_xl = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=8, max_mem_len=20, shift_mem_down=1,
                                  attn_layers=Decoder(dim=DIM, depth=2, heads=2, rotary_pos_emb=True))
    seg1, seg2, seg3 = (torch.randint(0, NUM_TOKENS, (1, 8)) for _ in range(3))
    logits1, mems1 = model_xl(seg1, return_mems=True)
    logits2, mems2 = model_xl(seg2, mems=mems1, return_mems=True)
    assert logits2.shape == (1, 8, NUM_TOKENS) and len(mems2) == 2


def test_s002_32_gated_residual():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, max_mem_len=20,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=4, gate_residual=True))
    _check_lm(model)


def test_s002_33_rotary():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, rotary_pos_emb=True))
    _check_lm(model)


def test_s002_34_rotary_xpos():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, rotary_xpos=True))
    _check_lm(model)


def test_s002_35_dynamic_pos_bias():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, dynamic_pos_bias=True,
                                                   dynamic_pos_bias_log_distance=False))
    _check_lm(model)


def test_s002_36_alibi():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=4, alibi_pos_bias=True, alibi_num_heads=2))
    _check_lm(model)


def test_s002_37_shift_tokens():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, shift_tokens=1))
    _check_lm(model)


def test_s002_38_shift_tokens_per_block():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=6, heads=2,
                                                   shift_tokens=(1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)))
    _check_lm(model)


def test_s002_39_sandwich_norm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, sandwich_norm=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_40_normformer_head_scale():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_head_scale=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_41_normformer_ff_post_act_ln():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_post_act_ln=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_42_normformer_scale_residual():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, scale_residual=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_43_qk_norm_groups():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_qk_norm=True,
                                                   attn_qk_norm_groups=8))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_44_qk_norm_scale():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_qk_norm=True,
                                                   attn_qk_norm_scale=10))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_45_qk_norm_dim_scale():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_qk_norm=True,
                                                   attn_qk_norm_dim_scale=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_46_no_abs_pos_emb():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, use_abs_pos_emb=False,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s002_47_autoregressive_mask_prob():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    model = AutoregressiveWrapper(model, mask_prob=0.15)
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    loss = model(x)
    _check_loss(loss)


def test_s002_48_cross_attention():
    enc = Encoder(dim=DIM, depth=2)
    model = CrossAttender(dim=DIM, depth=2)
    nodes = torch.randn(1, 1, DIM)
    node_masks = torch.ones(1, 1).bool()
    neighbors = torch.randn(1, 5, DIM)
    neighbor_masks = torch.ones(1, 5).bool()
    encoded_neighbors = enc(neighbors, mask=neighbor_masks)
    out = model(nodes, context=encoded_neighbors, mask=node_masks, context_mask=neighbor_masks)
    assert out.shape == (1, 1, DIM)


def test_s002_49_continuous_values():
    model = ContinuousTransformerWrapper(dim_in=32, dim_out=100, max_seq_len=MAX_SEQ_LEN,
                                         attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    x = torch.randn((1, SEQ, 32))
    assert model(x).shape == (1, SEQ, 100)


def test_s002_50_continuous_autoregressive():
    model = ContinuousTransformerWrapper(dim_in=7, dim_out=7, max_seq_len=MAX_SEQ_LEN,
                                         attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    model = ContinuousAutoregressiveWrapper(model)
    x = torch.randn((1, SEQ, 7))
    mask = torch.ones(1, SEQ).bool()
    loss = model(x, mask=mask)
    loss.backward
    _check_loss(loss)
    start_emb = torch.randn(1, 7)
    generated = model.generate(start_emb, 5)
    assert generated.shape == (5, 7)


# ====================================================================== seed 000 (older README)

def test_s000_01_full_encoder_decoder_src_tgt_masks():
    model = XTransformer(
        dim=DIM,
        enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN,
        tie_token_emb=True,
    )
    src = _tokens()
    src_mask = torch.ones_like(src).bool()
    tgt = _tokens()
    tgt_mask = torch.ones_like(tgt).bool()
    loss = model(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)
    _check_loss(loss)
    torch.testing.assert_close(loss, model(src, tgt, mask=src_mask))  # all-True masks change nothing


def test_s000_02_decoder_only_gpt_like():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s000_03_gpt3_shape():
    gpt3 = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                              attn_layers=Decoder(dim=32, depth=2, heads=4, attn_dim_head=8))
    _check_lm(gpt3)


def test_s000_04_encoder_only_bert_like():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    mask = torch.ones_like(x).bool()
    assert model(x, mask=mask).shape == (1, SEQ, NUM_TOKENS)


def test_s000_05_image_classification():
    model = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH, num_classes=10,
                                 attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    img = torch.randn(1, 3, IMAGE, IMAGE)
    assert model(img).shape == (1, 10)


def test_s000_06_image_to_caption():
    encoder = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH,
                                   attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    decoder = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                                 attn_layers=Decoder(dim=DIM, depth=2, heads=2, cross_attend=True))
    img = torch.randn(1, 3, IMAGE, IMAGE)
    caption = torch.randint(0, NUM_TOKENS, (1, SEQ))
    encoded = encoder(img, return_embeddings=True)
    assert decoder(caption, context=encoded).shape == (1, SEQ, NUM_TOKENS)


def test_s000_07_dropouts():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, emb_dropout=0.1,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_dropout=0.1, ff_dropout=0.1))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s000_08_memory_key_values():
    enc = Encoder(dim=DIM, depth=2, heads=2, attn_num_mem_kv=16)
    assert enc(torch.randn(1, SEQ, DIM)).shape == (1, SEQ, DIM)


def test_s000_09_memory_tokens():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, num_memory_tokens=20,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2))
    _check_lm(model)


def test_s000_10_scalenorm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, use_scalenorm=True))
    _check_lm(model)


def test_s000_11_ff_glu():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_glu=True))
    _check_lm(model)


def test_s000_12_ff_relu_squared():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_relu_squared=True))
    _check_lm(model)


def test_s000_13_rezero():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, use_rezero=True))
    _check_lm(model)


def test_s000_14_sparse_topk():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_sparse_topk=8))
    _check_lm(model)


def test_s000_15_entmax15():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_use_entmax15=True))
    _check_lm(model)


def test_s000_16_talking_heads():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_talking_heads=True))
    _check_lm(model)


def test_s000_17_collaborative_heads():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_collab_heads=True,
                                                   attn_collab_compression=.3))
    _check_lm(model)


def test_s000_18_attn_on_attn():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, attn_on_attn=True))
    _check_lm(model)


def test_s000_19_gate_values_old_name():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, gate_values=True))
    _check_lm(model)


def test_s000_20_sandwich_coef():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=6, heads=2, sandwich_coef=6))
    _check_lm(model)


def test_s000_21_macaron():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, macaron=True))
    _check_lm(model)


def test_s000_22_t5_rel_pos_bias():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, rel_pos_bias=True))
    _check_lm(model)


def test_s000_23_position_infused_attn():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, position_infused_attn=True))
    _check_lm(model)


def test_s000_24_residual_attn():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Encoder(dim=DIM, depth=2, heads=2, pre_norm=False, residual_attn=True))
    _check_lm(model)


def test_s000_25_cross_residual_attn():
    model = XTransformer(
        dim=DIM,
        enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN,
        dec_cross_residual_attn=True,
    )
    _check_loss(model(_tokens(), _tokens()))


def test_s000_26_transformer_xl_recurrence():
    model_xl = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=8, max_mem_len=20,
                                  attn_layers=Decoder(dim=DIM, depth=2, heads=2, rel_pos_bias=True))
    seg1, seg2, seg3 = (torch.randint(0, NUM_TOKENS, (1, 8)) for _ in range(3))
    logits1, mems1 = model_xl(seg1, return_mems=True)
    logits2, mems2 = model_xl(seg2, mems=mems1, return_mems=True)
    logits3, mems3 = model_xl(seg3, mems=mems2, return_mems=True)
    assert logits3.shape == (1, 8, NUM_TOKENS) and mems3[0].shape == (1, 20, DIM)


def test_s000_27_enhanced_recurrence_shift_mem_down():
    model_xl = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=8, max_mem_len=20, shift_mem_down=1,
                                  attn_layers=Decoder(dim=DIM, depth=2, heads=2, rotary_pos_emb=True))
    seg1, seg2, seg3 = (torch.randint(0, NUM_TOKENS, (1, 8)) for _ in range(3))
    logits1, mems1 = model_xl(seg1, return_mems=True)
    logits2, mems2 = model_xl(seg2, mems=mems1, return_mems=True)
    assert logits2.shape == (1, 8, NUM_TOKENS)


def test_s000_28_gated_residual():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, max_mem_len=20,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=4, gate_residual=True))
    _check_lm(model)


def test_s000_29_rotary():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, rotary_pos_emb=True))
    _check_lm(model)


def test_s000_30_alibi_old_name():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=4, alibi_pos_emb=True, alibi_num_heads=2))
    _check_lm(model)


def test_s000_31_shift_tokens():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, shift_tokens=1))
    _check_lm(model)


def test_s000_32_shift_tokens_per_block():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=6, heads=2,
                                                   shift_tokens=(1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)))
    _check_lm(model)


def test_s000_33_sandwich_norm():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, sandwich_norm=True))
    _check_lm(model)


def test_s000_34_normformer_head_scale():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, attn_head_scale=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s000_35_normformer_ff_post_act_ln():
    model = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, ff_post_act_ln=True))
    x = torch.randint(0, NUM_TOKENS, (1, SEQ))
    assert model(x).shape == (1, SEQ, NUM_TOKENS)


def test_s000_36_cross_attention():
    enc = Encoder(dim=DIM, depth=2)
    model = CrossAttender(dim=DIM, depth=2)
    nodes = torch.randn(1, 1, DIM)
    node_masks = torch.ones(1, 1).bool()
    neighbors = torch.randn(1, 5, DIM)
    neighbor_masks = torch.ones(1, 5).bool()
    encoded_neighbors = enc(neighbors, mask=neighbor_masks)
    assert model(nodes, context=encoded_neighbors, mask=node_masks, context_mask=neighbor_masks).shape == (1, 1, DIM)


def test_s000_37_continuous_values_with_mask():
    model = ContinuousTransformerWrapper(dim_in=32, dim_out=100, max_seq_len=MAX_SEQ_LEN,
                                         attn_layers=Decoder(dim=DIM, depth=2, heads=2))
    x = torch.randn((1, SEQ, 32))
    mask = torch.ones(1, SEQ).bool()
    assert model(x, mask=mask).shape == (1, SEQ, 100)


# ====================================================================== seed 004 (oldest README)

def test_s004_01_xtransformer_oldest_signature():
    model = XTransformer(num_tokens=NUM_TOKENS, dim=DIM, depth=2, heads=2, max_seq_len=MAX_SEQ_LEN)
    src = torch.randint(0, NUM_TOKENS, (1, SEQ))
    tgt = torch.randint(0, NUM_TOKENS, (1, SEQ))
    out = model(src, tgt)
    # that version returned the decoder's logits over the target vocabulary
    assert out.shape == (1, SEQ, NUM_TOKENS)
    out.mean().backward()
    assert model.encoder.token_emb.emb.weight.grad is not None


# ====================================================================== the seed wrappers vs x-transformers 2.31.10
# Same kwargs, the x-transformers weights loaded with xtk.load_x_transformers_weights, eval mode:
# outputs and input gradients must match (fp32).

import pytest  # noqa: E402

try:  # the oracle: CI installs it (.ci/run); the GPU image has none, and the examples above still run there
    import x_transformers as xt  # noqa: E402
except ImportError:
    xt = None
requires_xt = pytest.mark.skipif(xt is None, reason="x_transformers is not installed (the oracle of this test)")

import xtk  # noqa: E402


def _load(ours, ref):
    xtk.load_x_transformers_weights(ours, ref.state_dict())
    return ours.eval(), ref.eval()


@requires_xt
@pytest.mark.parametrize("kw", [
    dict(num_classes=10),
    dict(),                                                      # pooled embedding, no head
    dict(num_classes=4, channels=2, num_register_tokens=2, post_emb_norm=True),
])
def test_parity_vit(kw):
    torch.manual_seed(0)
    layers = dict(dim=DIM, depth=2, heads=2, rotary_pos_emb=False)
    ref = xt.ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH, attn_layers=xt.Encoder(**layers), **kw)
    ours = ViTransformerWrapper(image_size=IMAGE, patch_size=PATCH, attn_layers=Encoder(**layers), **kw)
    ours, ref = _load(ours, ref)
    img = torch.randn(2, kw.get("channels", 3), IMAGE, IMAGE, requires_grad=True)
    a, b = ours(img), ref(img)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ga, = torch.autograd.grad(a.square().sum(), img)
    gb, = torch.autograd.grad(b.square().sum(), img)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(img, return_embeddings=True), ref(img, return_embeddings=True), rtol=1e-4, atol=1e-4)


@requires_xt
@pytest.mark.parametrize("kw", [
    dict(dim_in=5, dim_out=7),
    dict(dim_in=5, dim_out=3, num_memory_tokens=2, post_emb_norm=True),
    dict(dim_in=5, dim_out=3, probabilistic=True, scaled_sinu_pos_emb=True),
    dict(dim_in=5, dim_out=4, average_pool_embed=True, use_abs_pos_emb=False),
])
def test_parity_continuous(kw):
    torch.manual_seed(0)
    layers = dict(dim=DIM, depth=2, heads=2)
    ref = xt.ContinuousTransformerWrapper(max_seq_len=MAX_SEQ_LEN, attn_layers=xt.Decoder(**layers), **kw)
    ours = ContinuousTransformerWrapper(max_seq_len=MAX_SEQ_LEN, attn_layers=Decoder(**layers), **kw)
    ours, ref = _load(ours, ref)
    x = torch.randn(2, SEQ, 5, requires_grad=True)
    mask = torch.ones(2, SEQ, dtype=torch.bool)
    mask[1, 9:] = False
    a, b = ours(x, mask=mask), ref(x, mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ga, = torch.autograd.grad(a.square().sum(), x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)
    if not kw.get("average_pool_embed"):
        torch.testing.assert_close(ours(x, return_embeddings=True), ref(x, return_embeddings=True), rtol=1e-4, atol=1e-4)
        (_, attn), (_, ref_attn) = ours(x, mask=mask, return_attn=True), ref(x, mask=mask, return_attn=True)
        assert len(attn) == len(ref_attn) == 2
        torch.testing.assert_close(attn[1], ref_attn[1], rtol=1e-4, atol=1e-5)


@requires_xt
def test_parity_continuous_autoregressive_loss():
    torch.manual_seed(0)
    layers = dict(dim=DIM, depth=2, heads=2, rotary_pos_emb=True)
    for kw, wkw in [(dict(), dict()), (dict(), dict(use_l1_loss=True, equal_loss_weight_batch=True)),
                    (dict(probabilistic=True), dict())]:
        ref = xt.ContinuousTransformerWrapper(dim_in=6, dim_out=6, max_seq_len=MAX_SEQ_LEN,
                                              attn_layers=xt.Decoder(**layers), **kw)
        ours = ContinuousTransformerWrapper(dim_in=6, dim_out=6, max_seq_len=MAX_SEQ_LEN,
                                            attn_layers=Decoder(**layers), **kw)
        ours, ref = _load(ours, ref)
        x = torch.randn(2, SEQ, 6)
        mask = torch.ones(2, SEQ, dtype=torch.bool)
        mask[0, 7:] = False
        a = ContinuousAutoregressiveWrapper(ours, **wkw)(x, mask=mask)
        b = xt.ContinuousAutoregressiveWrapper(ref, **wkw)(x, mask=mask)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_xt
@pytest.mark.parametrize("kw", [
    dict(tie_token_emb=True),
    dict(enc_num_memory_tokens=3, dec_rotary_pos_emb=True, enc_attn_kv_heads=1, enc_heads=4),
    dict(dec_cross_residual_attn=True, enc_use_abs_pos_emb=False, enc_rel_pos_bias=True),
])
def test_parity_xtransformer(kw):
    torch.manual_seed(0)
    base = dict(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
                dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN)
    base.update(kw)
    ref = xt.XTransformer(**base)
    ours = XTransformer(**base)
    ours, ref = _load(ours, ref)
    src, tgt = _tokens(batch=2), _tokens(batch=2)
    mask = torch.ones_like(src).bool()
    mask[1, 8:] = False
    prepend = torch.randn(2, 3, DIM)
    torch.testing.assert_close(ours(src, tgt, mask=mask), ref(src, tgt, mask=mask), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(src, tgt, mask=mask, src_prepend_embeds=prepend),
                               ref(src, tgt, mask=mask, src_prepend_embeds=prepend), rtol=1e-4, atol=1e-5)


def test_xtransformer_oldest_signature_shares_kwargs_and_prefixed_override():
    model = XTransformer(num_tokens=NUM_TOKENS, dim=DIM, depth=1, heads=2, max_seq_len=MAX_SEQ_LEN, dec_depth=2)
    assert len(model.encoder.attn_layers.layers) != len(model.decoder.net.attn_layers.layers)
    assert model.encoder.num_tokens == model.decoder.net.num_tokens == NUM_TOKENS
    src, tgt = _tokens(), _tokens()
    assert model(src, tgt).shape == (1, SEQ, NUM_TOKENS)              # oldest: logits
    loss = XTransformer(num_tokens=NUM_TOKENS, dim=DIM, depth=1, heads=2, max_seq_len=MAX_SEQ_LEN,
                        return_tgt_loss=True)(src, tgt)
    assert loss.dim() == 0


def test_xtransformer_cross_attn_tokens_dropout_trains():
    model = XTransformer(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_max_seq_len=MAX_SEQ_LEN,
                         dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_max_seq_len=MAX_SEQ_LEN,
                         cross_attn_tokens_dropout=0.5)
    src, tgt = _tokens(batch=2), _tokens(batch=2)
    mask = torch.ones_like(src).bool()
    mask[0, 4:] = False
    _check_loss(model(src, tgt, mask=mask))


# ====================================================================== bad input to the seed wrappers

def test_vit_errors():
    enc = Encoder(dim=DIM, depth=1, heads=2)
    with pytest.raises(ValueError, match="patch_size.*divisor of image_size 16.*got 5"):
        ViTransformerWrapper(image_size=16, patch_size=5, attn_layers=enc)
    with pytest.raises(ValueError, match="attn_layers.*causal"):
        ViTransformerWrapper(image_size=16, patch_size=4, attn_layers=Decoder(dim=DIM, depth=1))
    vit = ViTransformerWrapper(image_size=16, patch_size=4, attn_layers=enc, num_classes=3)
    with pytest.raises(ValueError, match=r"img: expected shape \(batch, 3, 16, 16\).*\(1, 3, 32, 32\)"):
        vit(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="img.*4-D"):
        vit(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="img.*floating"):
        vit(torch.zeros(1, 3, 16, 16, dtype=torch.long))


def test_continuous_errors():
    net = ContinuousTransformerWrapper(dim_in=5, dim_out=5, max_seq_len=8, attn_layers=Decoder(dim=DIM, depth=1))
    with pytest.raises(ValueError, match="x: expected last dimension 5"):
        net(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="x: sequence length 9 exceeds max_seq_len 8"):
        net(torch.randn(1, 9, 5))
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 4\)"):
        net(torch.randn(1, 4, 5), mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask.*bool"):
        net(torch.randn(1, 4, 5), mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="dim_in, project_in"):
        ContinuousTransformerWrapper(dim_in=5, project_in=torch.nn.Identity(), attn_layers=Decoder(dim=DIM, depth=1))
    wrapper = ContinuousAutoregressiveWrapper(
        ContinuousTransformerWrapper(dim_in=5, dim_out=3, max_seq_len=8, attn_layers=Decoder(dim=DIM, depth=1)))
    with pytest.raises(ValueError, match="dim_out == dim_in"):
        wrapper(torch.randn(1, 6, 5))
    with pytest.raises(ValueError, match="seq_len"):
        wrapper.generate(torch.randn(1, 2, 5), 0)


def test_xtransformer_errors():
    base = dict(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_max_seq_len=MAX_SEQ_LEN,
                dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(TypeError, match="enc_.*foo"):
        XTransformer(**base, enc_foo=1)
    with pytest.raises(TypeError, match="dec_max_seq_len"):
        XTransformer(**{k: v for k, v in base.items() if k != "dec_max_seq_len"})
    with pytest.raises(TypeError, match="enc_dim"):
        XTransformer(**base, enc_dim=32)
    with pytest.raises(ValueError, match="tie_token_emb.*64 and 65"):
        XTransformer(**{**base, "dec_num_tokens": 65}, tie_token_emb=True)
    model = XTransformer(**base)
    src = _tokens()
    with pytest.raises(ValueError, match="mask, src_mask"):
        model(src, src, mask=src > -1, src_mask=src > -1)


@requires_xt
def test_parity_continuous_xl_memories():
    torch.manual_seed(0)
    kw = dict(dim_in=4, dim_out=4, max_seq_len=0)
    layers = dict(dim=DIM, depth=2, heads=2, rel_pos_bias=True)
    for max_mem_len in (6, 16):
        ref = xt.ContinuousTransformerWrapper(max_mem_len=max_mem_len, attn_layers=xt.Decoder(**layers), **kw)
        ours = ContinuousTransformerWrapper(max_mem_len=max_mem_len, attn_layers=Decoder(**layers), **kw)
        ours, ref = _load(ours, ref)
        s1, s2, s3 = torch.randn(3, 2, 6, 4)
        o1, m1 = ours(s1, return_mems=True)
        o2, m2 = ours(s2, mems=m1, return_mems=True)
        o3, m3 = ours(s3, mems=m2, return_mems=True)
        r1, q1 = ref(s1, return_mems=True)
        r2, q2 = ref(s2, mems=list(q1), return_mems=True)
        torch.testing.assert_close(o1, r1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o2, r2, rtol=1e-4, atol=1e-5)
        assert len(m3) == 2 and m3[0].shape == (2, min(max_mem_len, 18), DIM)
        if max_mem_len == 6:  # memories no longer than a segment: the same as x-transformers
            _, q3 = ref(s3, mems=list(q2), return_mems=True)
            torch.testing.assert_close(m3[0], q3[0], rtol=1e-4, atol=1e-5)
        else:  # longer: xtk keeps the older memories (x-transformers' continuous wrapper drops them)
            torch.testing.assert_close(m3[0][:, :10], m2[0][:, 2:])  # m2 holds 12 positions, m3 keeps 16


@requires_xt
def test_parity_xtransformer_older_signatures():
    # the oldest signature builds the same modules as the enc_/dec_ form: x-transformers 2.31 weights
    # load, and its logits are the 2.31 decoder's logits; the 000 README's tgt_mask is the decoder mask
    torch.manual_seed(0)
    ref = xt.XTransformer(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=2, enc_heads=2, enc_max_seq_len=MAX_SEQ_LEN,
                          dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=MAX_SEQ_LEN)
    oldest = XTransformer(num_tokens=NUM_TOKENS, dim=DIM, depth=2, heads=2, max_seq_len=MAX_SEQ_LEN)
    oldest, ref = _load(oldest, ref)
    src, tgt = _tokens(batch=2), _tokens(batch=2)
    src_mask = torch.ones_like(src).bool()
    src_mask[0, 7:] = False
    tgt_mask = torch.ones_like(tgt).bool()
    tgt_mask[1, 9:] = False
    enc = ref.encoder(src, mask=src_mask, return_embeddings=True)
    expected = ref.decoder.net(tgt, context=enc, context_mask=src_mask)
    torch.testing.assert_close(oldest(src, tgt, src_mask=src_mask), expected, rtol=1e-4, atol=1e-5)
    oldest.return_tgt_loss = True
    expected_loss = ref.decoder(tgt, context=enc, context_mask=src_mask, mask=tgt_mask)
    torch.testing.assert_close(oldest(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask), expected_loss,
                               rtol=1e-4, atol=1e-5)
