"""Query-key SVD: closed-form cosines, reconstruction of attention logits, invariance to the head basis."""
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_vib
from timm_vib.estimators import capture, optimal_attention_images, qk_maps, qk_svd

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def small(name='vit_tiny_vib', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kw)).eval()


def qk_rows(attn):
    A = attn.num_heads * attn.head_dim
    return attn.qkv.weight.data[:A], attn.qkv.weight.data[A:2 * A]


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_tied_query_and_key_give_cosine_plus_minus_one(sign):
    m = small('vit_tiny_gap')
    for blk in m.blocks:
        q, k = qk_rows(blk.attn)
        k.copy_(sign * q)
    svd = qk_svd(m)
    assert svd.cosine.shape == (2, 3, 64)
    torch.testing.assert_close(svd.cosine, torch.full((2, 3, 64), sign), atol=1e-4, rtol=0)
    # a true weighted mean: all cosines equal sign gives sign (not sign / head_dim)
    torch.testing.assert_close(svd.head_weighted_mean, torch.full((2, 3), sign), atol=1e-4, rtol=0)
    torch.testing.assert_close(svd.layer_weighted_mean, torch.full((2,), sign), atol=1e-4, rtol=0)


def test_modes_reconstruct_bias_free_attention_logits():
    m = small(vib_dim=4)
    attn = m.blocks[1].attn
    with torch.no_grad():
        attn.qkv.bias.zero_()
    svd = qk_svd(m)
    x = torch.randn(7, 192, dtype=torch.float64)
    q, k = qk_rows(attn)
    H, D = 3, 64
    logits = torch.einsum('hdc,nc,hde,me->hnm', q.double().reshape(H, D, 192), x, k.double().reshape(H, D, 192), x)
    s, u, v = svd.singular_values[1].double(), svd.u[1].double(), svd.v[1].double()
    xu = torch.einsum('nc,hck->hnk', x, u)
    xv = torch.einsum('nc,hck->hnk', x, v)
    modes = torch.einsum('hk,hnk,hmk->hnm', s, xu, xv)
    torch.testing.assert_close(modes, logits, rtol=1e-4, atol=1e-4)
    # unit singular vectors, descending singular values
    torch.testing.assert_close(svd.u.norm(dim=2), torch.ones(2, 3, 64), atol=1e-5, rtol=0)
    assert torch.all(svd.singular_values[..., :-1] >= svd.singular_values[..., 1:])


def test_orthogonal_change_of_head_basis_leaves_modes_unchanged():
    m = small('vit_tiny_gap')
    ref = qk_svd(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in m.blocks:
            q, k = qk_rows(blk.attn)
            for h in range(3):
                o = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q.float()
                q[h * 64:(h + 1) * 64] = o @ q[h * 64:(h + 1) * 64]
                k[h * 64:(h + 1) * 64] = o @ k[h * 64:(h + 1) * 64]
    new = qk_svd(m)
    torch.testing.assert_close(new.singular_values, ref.singular_values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(new.cosine, ref.cosine, rtol=0, atol=1e-4)
    # each singular vector is the same up to the pair's joint sign
    torch.testing.assert_close((new.u * ref.u).sum(2).abs(), torch.ones(2, 3, 64), atol=1e-3, rtol=0)
    torch.testing.assert_close(new.head_mean, ref.head_mean, atol=1e-5, rtol=0)


def test_means_and_folded_norm_scale():
    m = small(vib_dim=4)
    svd = qk_svd(m)
    w = svd.singular_values / svd.singular_values.sum(-1, keepdim=True)
    torch.testing.assert_close(svd.head_weighted_mean, (w * svd.cosine).sum(-1))
    torch.testing.assert_close(svd.layer_mean, svd.cosine.mean((1, 2)))
    with torch.no_grad():
        m.blocks[0].norm1.weight.copy_(torch.rand(192) + 0.5)
    folded = qk_svd(m, fold_norm_scale=True)
    g = m.blocks[0].norm1.weight.double()
    q, k = qk_rows(m.blocks[0].attn)
    M = torch.diag(g) @ q[:64].double().T @ k[:64].double() @ torch.diag(g)
    rebuilt = folded.u[0, 0].double() @ torch.diag(folded.singular_values[0, 0].double()) @ folded.v[0, 0].double().T
    torch.testing.assert_close(rebuilt, M, rtol=1e-4, atol=1e-5)


def test_query_key_maps_and_optimal_images():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_patch16_224', **SMALL).eval()  # plain timm ViT with a class token
    svd = qk_svd(m)
    x = torch.randn(5, 3, 32, 32)
    qm, km = qk_maps(m, x, layer=1, head=2, mode=3, svd=svd)
    assert qm.shape == km.shape == (5, 4, 4)
    with torch.no_grad(), capture(m, inputs=True) as rec:
        m(x)
    tokens = rec.inputs[:, 1, 1:]
    torch.testing.assert_close(qm.reshape(5, 16), tokens @ svd.u[1, 2, :, 3])
    best = optimal_attention_images(m, DataLoader(TensorDataset(x), batch_size=2), 1, 2, 3, k=2, svd=svd)
    for sign in (1, -1):
        score = (sign * qm).amax((1, 2)) * (sign * km).amax((1, 2))
        top = score.topk(2)
        v, i = best['+' if sign == 1 else '-']
        torch.testing.assert_close(v, top.values)
        assert torch.equal(i, top.indices)


def test_bad_input():
    m = small(vib_dim=4)
    with pytest.raises(IndexError, match='layer'):
        qk_maps(m, torch.randn(1, 3, 32, 32), layer=5, head=0, mode=0)
    with pytest.raises(IndexError, match='mode'):
        qk_maps(m, torch.randn(1, 3, 32, 32), layer=0, head=0, mode=64)
    with pytest.raises(ValueError, match='no attention'):
        qk_svd(small('vit_tiny_noattn'))


def test_layer_weighted_mean_normalises_within_heads_as_the_authors():
    """Independent re-implementation of DissectingViT's cosine_similarity.ipynb: numpy SVD of each head's
    full embed x embed M, first head_dim modes, S / S.sum(head), mean over modes and heads of S * cos."""
    import numpy as np
    m = small('vit_tiny_gap')
    with torch.no_grad():  # head 0 of every layer 100x larger: it must not dominate
        for blk in m.blocks:
            blk.attn.qkv.weight[:64].mul_(100.0)
    svd = qk_svd(m)
    theirs = []
    for blk in m.blocks:
        q, k = (t.double().numpy() for t in qk_rows(blk.attn))
        per_head = []
        for h in range(3):
            U, S, Vt = np.linalg.svd(q[h * 64:(h + 1) * 64].T @ k[h * 64:(h + 1) * 64])
            U, S, Vt = U[:, :64], S[:64], Vt[:64]
            cos = np.einsum('ki,ki->k', U.T, Vt)  # as the notebook: rows of U^T . rows of Vt
            per_head.append(cos * S / S.sum())
        theirs.append(np.mean(per_head))
    torch.testing.assert_close(svd.layer_weighted_mean / 64, torch.tensor(theirs, dtype=torch.float32), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(svd.layer_weighted_mean, svd.head_weighted_mean.mean(-1))
    # scaling one head changes the pooled mean (its weights dominate) but not the per-head one
    ref = qk_svd(small('vit_tiny_gap'))
    torch.testing.assert_close(svd.layer_weighted_mean, ref.layer_weighted_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(svd.layer_pooled_weighted_mean, ref.layer_pooled_weighted_mean, atol=1e-3)
    torch.testing.assert_close(svd.layer_pooled_weighted_mean, svd.head_weighted_mean[:, 0], rtol=0, atol=1e-3)


def test_folded_maps_project_the_tokens_before_the_gain():
    """With the gain folded into M, the modes reconstruct the bias-free logits from the tokens before
    norm1's affine map; the maps project exactly those (LayerNorm without affine of the block input)."""
    m = small('vit_tiny_gap')
    with torch.no_grad():
        for blk in m.blocks:
            blk.norm1.weight.copy_(torch.rand(192) * 2 + 0.5)
            blk.norm1.bias.copy_(torch.randn(192) * 0.1)
    plain, folded = qk_svd(m), qk_svd(m, fold_norm_scale=True)
    assert folded.norm_scale_folded and not plain.norm_scale_folded
    x = torch.randn(3, 3, 32, 32)
    residual = []
    hook = m.blocks[1].norm1.register_forward_pre_hook(lambda mod, args: residual.append(args[0]))
    with torch.no_grad():
        qm, km = qk_maps(m, x, layer=1, head=0, mode=2, svd=folded)
        qp, _ = qk_maps(m, x, layer=1, head=0, mode=2, svd=plain)
    hook.remove()
    xhat = torch.nn.functional.layer_norm(residual[0], (192,))  # no gain, no bias
    torch.testing.assert_close(qm.reshape(3, 16), xhat @ folded.u[1, 0, :, 2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(km.reshape(3, 16), xhat @ folded.v[1, 0, :, 2], rtol=1e-4, atol=1e-4)
    y = m.blocks[1].norm1(residual[0])
    torch.testing.assert_close(qp.reshape(3, 16), y @ plain.u[1, 0, :, 2], rtol=1e-4, atol=1e-4)
    # the folded modes pair with xhat: sum_k s_k (xhat u_k)(xhat v_k) = (g xhat)^T W_q^T W_k (g xhat)
    q, k = qk_rows(m.blocks[1].attn)
    gx = (xhat * m.blocks[1].norm1.weight).double()
    logits = (gx @ q[:64].double().T) @ (gx @ k[:64].double().T).transpose(-1, -2)
    xu = xhat.double() @ folded.u[1, 0].double()
    xv = xhat.double() @ folded.v[1, 0].double()
    modes = (xu * folded.singular_values[1, 0].double()) @ xv.transpose(-1, -2)
    torch.testing.assert_close(modes, logits, rtol=1e-3, atol=1e-3)


def test_optimal_attention_images_ignore_images_whose_maps_never_reach_the_sign():
    """A '+' image must have tokens projecting positively on both the query and the key vector: an image whose
    maps are negative everywhere scored high before (a product of two negative maxima)."""
    torch.manual_seed(0)
    m = small('vit_tiny_vib').eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 6)[:, None, None, None]
    svd = qk_svd(m)
    with torch.no_grad(), capture(m, inputs=True) as rec:
        m(x)
    d = rec.inputs[:, 1].mean((0, 1))
    svd.u[1, 0, :, 0] = svd.v[1, 0, :, 0] = -d / d.norm()  # a mode most tokens project negatively on
    qm, km = qk_maps(m, x, 1, 0, 0, svd=svd)
    top_q, top_k = qm.flatten(1).amax(1), km.flatten(1).amax(1)
    expected = (top_q.clamp_min(0) * top_k.clamp_min(0)).topk(3)
    assert (top_q < 0).any()  # the case: some image never reaches '+'
    best = optimal_attention_images(m, [x], 1, 0, 0, k=3, svd=svd)
    torch.testing.assert_close(best['+'][0], expected.values)
    assert all(top_q[i] > 0 and top_k[i] > 0 for i in best['+'][1][best['+'][0] > 0].tolist())
