"""The core model: bottleneck maths, the timm surface, the two ends of the spectrum, bad input."""
import math

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import timm_vib
from timm_vib import HeadBottleneck, VIBAttention, gaussian_kl, information_loss, vibify

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)  # 16 tokens, 3 heads of 64


def small(name='vit_tiny_vib', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kw))


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def capture_posteriors(model, x):
    """mu, logvar per block via forward hooks on the bottlenecks (independent of the KL path)."""
    out = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(o[1:])) for b in model.bottlenecks()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


# --- KL ---------------------------------------------------------------------------------------

def test_gaussian_kl_matches_torch_distributions_and_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 7, 32, generator=g) * 3
    logvar = torch.rand(4, 7, 32, generator=g) * 20 - 10
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    kl = gaussian_kl(mu, logvar)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-4)
    assert (kl >= 0).all()
    # zero exactly at the prior, closed form for a hand-made case
    assert gaussian_kl(torch.zeros(3), torch.zeros(3)).item() == 0.0
    m, lv = torch.tensor([1.0, -2.0]), torch.tensor([0.0, math.log(4.0)])
    hand = 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - math.log(4.0)))
    assert gaussian_kl(m, lv).item() == pytest.approx(hand, rel=1e-6)


def test_gaussian_kl_is_float32_under_autocast():
    mu, logvar = torch.randn(8, 32).bfloat16(), torch.full((8, 32), -8.0).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        kl = gaussian_kl(mu, logvar)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, gaussian_kl(mu.float(), logvar.float()))


def test_information_loss_conventions():
    kl = torch.rand(3, 2, 3, 16)
    assert information_loss(kl).item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert information_loss(kl, 'sum').item() == pytest.approx(kl.sum().item() / 3, rel=1e-6)
    assert information_loss(kl, 'sum').item() == pytest.approx(information_loss(kl).item() * 2 * 3 * 16, rel=1e-5)
    with pytest.raises(ValueError, match='reduction'):
        information_loss(kl, 'median')
    with pytest.raises(ValueError, match='batch, depth, heads, tokens'):
        information_loss(kl[0])


def test_sqrt_reduction_is_the_reference_codes_sqrt_kl():
    """murphyka/vit_ib --sqrt-kl: sqrt(clamp(kl, 0).mean(tokens) + 1e-8).mean() over [B, layers x heads]."""
    kl = torch.rand(3, 2, 3, 16) * 4
    kl[0, 1, 2] = 0.0  # a silent head: sqrt(1e-8), finite gradient
    hand = torch.tensor([[math.sqrt(kl[b, l, h].mean().item() + 1e-8) for l in range(2) for h in range(3)]
                         for b in range(3)], dtype=torch.float64)
    assert information_loss(kl, 'sqrt').item() == pytest.approx(hand.mean().item(), rel=1e-6)
    torch.testing.assert_close(timm_vib.information_per_sample(kl, 'sqrt'), hand.mean(1).float())
    # concave: one head sending 4x costs less than four heads sending x each
    one = torch.zeros(1, 1, 4, 8)
    one[0, 0, 0] = 4.0
    four = torch.ones(1, 1, 4, 8)
    assert information_loss(one, 'sqrt') < information_loss(four, 'sqrt')
    assert information_loss(one, 'mean') == information_loss(four, 'mean')
    g = kl.clone().requires_grad_()
    information_loss(g, 'sqrt').backward()
    assert torch.isfinite(g.grad).all()


def test_model_kl_equals_closed_form_of_its_posteriors():
    m = small().eval()
    x = images()
    _, kl = m(x, return_kl=True)
    assert kl.shape == (2, 2, 3, 16) and kl.dtype == torch.float32
    post = capture_posteriors(m, x)
    expected = torch.stack([0.5 * (lv.exp() + mu ** 2 - 1 - lv).sum(-1) for mu, lv in post], dim=1)
    torch.testing.assert_close(kl, expected)
    assert (kl >= 0).all()
    # the log-variance is clamped to the reference code's range
    assert all(lv.min() >= -10 and lv.max() <= 10 for _, lv in post)


@pytest.mark.parametrize('vib_hidden', [0, 64])
def test_logvar_bias_initialised_to_minus_six(vib_hidden):
    m = small(vib_dim=8, vib_hidden=vib_hidden)
    for b in m.bottlenecks():
        last = b.enc_out_bias if vib_hidden else b.enc_bias  # the layer that outputs (mu, logvar)
        assert last.shape == (3, 16)
        assert torch.all(last[:, 8:] == -6.0) and torch.all(last[:, :8] == 0)


def test_registered_models_use_the_reference_mlp_bottleneck():
    """murphyka/vit_ib's train_model.sh: --ib-mlp-hidden-dim 64, --attn-head-bottleneck-dim 32."""
    m = timm.create_model('vit_tiny_vib_b1', depth=1)
    b = m.bottlenecks()[0]
    assert (m.vib_hidden, m.vib_dim) == (64, 32)
    assert b.enc_weight.shape == (3, 64, 64) and b.enc_out_weight.shape == (3, 64, 64)
    assert b.dec_in_weight.shape == (3, 32, 64) and b.dec_weight.shape == (3, 64, 64)
    assert timm.create_model('vit_tiny_vib', vib_hidden=0, depth=1).vib_hidden == 0


# --- sampling -----------------------------------------------------------------------------------

def test_eval_is_deterministic_train_is_not_and_stochastic_eval_samples():
    m = small()
    x = images()
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    m.stochastic_eval = True
    assert not torch.equal(m(x), m(x))
    m.set_stochastic_eval(False)
    assert torch.equal(m(x), m(x))
    assert timm.create_model('vit_tiny_vib', stochastic_eval=True, **SMALL).stochastic_eval


def test_sampled_latent_has_posterior_statistics():
    b = HeadBottleneck(num_heads=2, head_dim=4, vib_dim=3).train()
    torch.manual_seed(0)
    mu = torch.randn(1, 2, 1, 3).expand(1, 2, 20000, 3)
    logvar = torch.tensor([-1.0, 0.0, 1.0]).expand(1, 2, 20000, 3)
    z, m, lv = b(torch.cat([mu, logvar], -1))
    torch.testing.assert_close(z.mean(2), mu[:, :, 0], atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(2), logvar[:, :, 0].exp(), atol=0.06, rtol=0.03)


# --- the fused path is the same function as the explicit reference --------------------------------

def reference_attention(attn: VIBAttention, x: torch.Tensor, z_noise=None):
    """Naive per-head loop: softmax(q k^T / sqrt(d)) v, per-head encoder (Linear, or Linear-GELU-Linear),
    decoder at the posterior mean, proj (as murphyka/vit_ib's HeadwiseVIBED in eval without noise)."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    vib = attn.vib
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.split(H * D, dim=-1)
    heads = []
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        qh, kh = attn.q_norm(q[..., sl]), attn.k_norm(k[..., sl])
        p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(D), dim=-1)
        delta = p @ v[..., sl]
        stats = delta @ vib.enc_weight[h] + vib.enc_bias[h]
        if vib.vib_hidden:
            stats = F.gelu(stats) @ vib.enc_out_weight[h] + vib.enc_out_bias[h]
        mu = stats[..., :vib.vib_dim]
        if vib.vib_hidden:
            mu = F.gelu(mu @ vib.dec_in_weight[h] + vib.dec_in_bias[h])
        heads.append(mu @ vib.dec_weight[h] + vib.dec_bias[h])
    out = attn.norm(torch.cat(heads, -1))
    if attn.gate is not None:
        out = out * torch.sigmoid(attn.gate(x))
    return attn.proj(out)


@pytest.mark.parametrize('vib_hidden', [0, 7])
@pytest.mark.parametrize('options', [{}, {'qk_norm': True}, {'gated': True}, {'scale_norm': True}, {'qkv_bias': False}])
def test_vib_attention_equals_naive_reference(options, vib_hidden):
    torch.manual_seed(0)
    attn = VIBAttention(24, num_heads=3, vib_dim=5, vib_hidden=vib_hidden, qkv_bias=options.pop('qkv_bias', True),
                        norm_layer=torch.nn.LayerNorm, **options).eval()
    with torch.no_grad():  # non-zero biases everywhere, so a bias applied in the wrong place shows
        for b in attn.vib._biases():
            b.add_(0.1 * torch.randn_like(b))
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    attn.fused_attn = False  # timm's explicit softmax path
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('vib_hidden', [0, 64])
def test_folded_and_explicit_paths_agree_in_value_kl_and_gradient(vib_hidden):
    m = small(vib_hidden=vib_hidden).train()
    assert all(blk.attn.can_fold for blk in m.blocks)  # heads of 64: neither width is wider, so it folds
    x = images()
    torch.manual_seed(3)
    logits_a, kl_a = m(x, return_kl=True)
    (logits_a.square().mean() + kl_a.mean()).backward()
    grads_a = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for blk in m.blocks:
        blk.attn.fold_projections = False
    torch.manual_seed(3)
    logits_b, kl_b = m(x, return_kl=True)
    (logits_b.square().mean() + kl_b.mean()).backward()
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_a, kl_b, rtol=1e-4, atol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads_a[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize('vib_hidden, vib_dim, embed_dim, folds', [
    (64, 32, 192, True),    # the registered ViT-Tiny: hidden 64 = head_dim 64
    (64, 8, 48, False),     # the demo: hidden 64 on heads of 16 would widen the attention 4x
    (16, 8, 48, True),      # hidden = head_dim
    (0, 8, 48, True),       # linear: encoder width 2r = 16 = head_dim
    (0, 12, 48, False),     # linear: 2r = 24 > 16
])
def test_projections_fold_only_where_no_width_grows(vib_hidden, vib_dim, embed_dim, folds):
    m = small(vib_hidden=vib_hidden, vib_dim=vib_dim, embed_dim=embed_dim).train()
    attn = m.blocks[0].attn
    assert attn.can_fold == folds
    # either way the layer computes the same function as the other path
    x = images()
    torch.manual_seed(3)
    a = m(x)
    for blk in m.blocks:
        blk.attn.fold_projections = not folds
    assert attn.can_fold != folds
    torch.manual_seed(3)
    torch.testing.assert_close(a, m(x), rtol=1e-4, atol=1e-5)


def test_attention_mask_is_respected():
    m = small().eval()
    x = images()
    n = 16
    allowed = torch.eye(n, dtype=torch.bool)  # each token sees only itself: no communication
    tokens = m.forward_features(x, attn_mask=allowed)
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0  # patch 0 only
    tokens2 = m.forward_features(x2, attn_mask=allowed)
    assert not torch.allclose(tokens[:, 0], tokens2[:, 0])
    torch.testing.assert_close(tokens[:, 1:], tokens2[:, 1:])


# --- the spectrum ---------------------------------------------------------------------------------

def patch_logits(model, x):
    return model.head(model.forward_features(x))  # [B, N, classes]: norm is per token


@pytest.mark.parametrize('name', ['vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap'])
def test_image_logits_are_mean_of_patch_logits(name):
    m = small(name).eval()
    x = images()
    torch.testing.assert_close(m(x), patch_logits(m, x).mean(1), rtol=1e-5, atol=1e-6)


def test_noattn_is_deepsets_and_vib_communicates():
    x = images()
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] = torch.randn(2, 3, 8, 8)  # patch (1, 2) = token 6
    changed = lambda m: (patch_logits(m, x) - patch_logits(m, x2)).abs().amax(dim=(0, 2)) > 1e-6  # noqa: E731
    noattn = small('vit_tiny_noattn').eval()
    assert changed(noattn).tolist() == [i == 6 for i in range(16)]
    _, kl = noattn(x, return_kl=True)
    assert kl.shape == (2, 2, 3, 16) and torch.all(kl == 0)
    vib = small('vit_tiny_vib', beta=0.0).eval()
    assert changed(vib).all()


@pytest.mark.parametrize('vib_hidden', [0, 128, 150])
def test_wide_bottleneck_without_noise_reproduces_plain_attention(vib_hidden):
    torch.manual_seed(0)
    plain = timm.create_model('vit_tiny_gap', **SMALL).eval()
    x = images()
    expected = plain(x)
    for r in (64, 80):  # head_dim and wider
        m = timm.create_model('vit_tiny_gap', **SMALL)
        m.load_state_dict(plain.state_dict())
        vibify(m, vib_dim=r, beta=0.5, vib_hidden=vib_hidden).eval()
        assert m.has_bottleneck and m.beta == 0.5 and m.vib_dim == r and m.vib_hidden == vib_hidden
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)
        _, kl = m(x, return_kl=True)
        assert kl.shape == (2, 2, 3, 16)


def test_narrow_identity_init_is_the_projection_on_its_directions():
    """With r < head_dim the identity init passes each head's output projected on k orthonormal
    directions: decoded = Q Q^T delta, for the linear and the MLP (GELU(t) - GELU(-t) = t) layouts."""
    torch.manual_seed(0)
    for vib_hidden in (0, 2 * 5, 64):
        b = HeadBottleneck(num_heads=2, head_dim=6, vib_dim=5, vib_hidden=vib_hidden).eval()
        b.init_identity(torch.Generator().manual_seed(1))
        q = b.enc_weight[:, :, :5].detach()  # [H, D, k]
        torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(5).expand(2, 5, 5), atol=1e-6, rtol=0)
        delta = torch.randn(3, 2, 4, 6)
        z, mu, logvar = b(b.encode(delta))
        expected = torch.einsum('bhnd,hdk,hek->bhne', delta, q, q)
        torch.testing.assert_close(b.decode(z), expected, rtol=1e-5, atol=1e-5)
        assert torch.all(logvar == -6.0)


def test_small_init_dec_starts_as_independent_patches():
    """The reference code's small_init_dec: decoders start at ~1e-4, so a patch's content barely
    reaches the others' logits until the model learns to communicate."""
    x = images()
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] = torch.randn(2, 3, 8, 8)  # token 6
    others = [i for i in range(16) if i != 6]
    shift = {}
    for small_init in (True, False):
        m = small(vib_small_init_dec=small_init).eval()
        shift[small_init] = (patch_logits(m, x) - patch_logits(m, x2))[:, others].abs().max().item()
        assert (m.bottlenecks()[0].dec_weight.abs().max() < 1e-3) == small_init
    assert 0 < shift[True] < 0.01 * shift[False]


@pytest.mark.parametrize('name', ['vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap'])
def test_sincos_pos_embed_init(name):
    """pos_embed_init='sincos': the learned position embedding starts at the 2-D sin-cos embedding, whose
    Gram matrix is a function of the offset between two patches only:
    <p(y, x), p(y', x')> = sum_k cos(w_k (y - y')) + cos(w_k (x - x')), w_k = 10000^(-k / (C / 4)).
    Every other weight is drawn exactly as with timm's init, and init_weights() keeps the choice."""
    kw = dict(img_size=(24, 40), patch_size=8, embed_dim=48, num_heads=3)  # a 3 x 5 grid
    base, sincos = small(name, **kw), small(name, pos_embed_init='sincos', **kw)
    b, s = base.state_dict(), sincos.state_dict()
    assert [k for k in b if not torch.equal(b[k], s[k])] == ['pos_embed']
    pe = sincos.pos_embed[0].detach().double()  # [15, 48]
    y, x = torch.div(torch.arange(15), 5, rounding_mode='floor'), torch.arange(15) % 5
    w = 10000.0 ** (-torch.arange(12, dtype=torch.float64) / 12)
    gram = (torch.cos(w * (y[:, None, None] - y[None, :, None])) + torch.cos(w * (x[:, None, None] - x[None, :, None]))).sum(-1)
    torch.testing.assert_close(pe @ pe.T, gram, rtol=0, atol=1e-5)
    assert base.pos_embed.std() < 0.05  # timm's: std 0.02; the sin-cos rows have norm sqrt(C / 2) (the diagonal)
    with torch.no_grad():
        sincos.pos_embed.zero_()
    sincos.init_weights()
    torch.testing.assert_close(sincos.pos_embed[0].double(), pe)
    assert sincos.pos_embed.requires_grad  # learned, only started there


def test_sincos_pos_embed_with_a_class_token_and_bad_values():
    m = small('vit_tiny_gap', pos_embed_init='sincos', class_token=True, global_pool='token', embed_dim=48, num_heads=3)
    ref = small('vit_tiny_gap', class_token=True, global_pool='token', embed_dim=48, num_heads=3)
    assert torch.equal(m.pos_embed[:, :1], ref.pos_embed[:, :1])  # the class token's row keeps timm's init
    assert not torch.allclose(m.pos_embed[:, 1:], ref.pos_embed[:, 1:])
    with pytest.raises(ValueError, match=r"pos_embed_init must be one of \('trunc_normal', 'sincos'\), got 'sin'"):
        small(pos_embed_init='sin')
    with pytest.raises(ValueError, match='embed_dim divisible by 4.*got 54'):
        small(pos_embed_init='sincos', embed_dim=54, num_heads=3)


def _reference_layout_state_dict(model, hidden):
    """What murphyka/vit_ib's ViTWithHeadIB.state_dict() holds for the same weights: the class-token ViT
    under vit.*, its blocks again under blocks.N.blk.*, one nn.Linear / Sequential(Linear, GELU, Linear)
    per head (weights [out, in])."""
    sd = {}
    for k, v in model.state_dict().items():
        if '.attn.vib.' in k:
            continue
        if k == 'pos_embed':
            v = torch.cat([torch.randn(1, 1, v.shape[-1]), v], 1)  # a class-token position, unused
        sd[f'vit.{k}'] = v
    sd['vit.cls_token'] = torch.randn(1, 1, model.embed_dim)
    layers = (('enc_list', '0', 'enc'), ('enc_list', '2', 'enc_out'), ('dec_list', '0', 'dec_in'), ('dec_list', '2', 'dec'))
    for i, blk in enumerate(model.blocks):
        vib = blk.attn.vib
        for lst, idx, ours in (layers if hidden else (('enc_list', None, 'enc'), ('dec_list', None, 'dec'))):
            for h in range(vib.num_heads):
                pre = f'blocks.{i}.attn.ib.{lst}.{h}.' + (f'{idx}.' if idx else '')
                sd[f'vit.{pre}weight'] = getattr(vib, f'{ours}_weight')[h].T.contiguous()
                sd[f'vit.{pre}bias'] = getattr(vib, f'{ours}_bias')[h].clone()
    for k in list(sd):
        if k.startswith('vit.blocks.'):
            i, rest = k[len('vit.blocks.'):].split('.', 1)
            sd[f'blocks.{i}.blk.{rest}'] = sd[k]
    return sd


@pytest.mark.parametrize('vib_hidden', [0, 64])
def test_reference_code_checkpoint_loads(vib_hidden, tmp_path):
    src = small(vib_hidden=vib_hidden).eval()
    with torch.no_grad():
        for b in src.bottlenecks():
            for p in b._biases():
                p.normal_()
    ref = _reference_layout_state_dict(src, vib_hidden)
    converted = timm_vib.convert_reference_state_dict(ref)
    assert set(converted) == set(src.state_dict())
    x = images()
    dst = timm.create_model('vit_tiny_vib', vib_hidden=vib_hidden, **SMALL).eval()
    dst.load_state_dict(converted)
    torch.testing.assert_close(dst(x), src(x))
    # through timm's pretrained path, as the reference saves it (a .pth of the state dict)
    torch.save(ref, tmp_path / 'model_beta1.0_epochs1000.pth')
    m = timm.create_model('vit_tiny_vib', pretrained=True, vib_hidden=vib_hidden,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'model_beta1.0_epochs1000.pth'), num_classes=5),
                          **SMALL)
    torch.testing.assert_close(m.eval()(x), src(x))
    # a plain state dict is left alone
    assert timm_vib.convert_reference_state_dict(src.state_dict()).keys() == src.state_dict().keys()


def test_linear_and_mlp_layouts_are_told_apart():
    linear, mlp = small(vib_hidden=0), small(vib_hidden=64)
    with pytest.raises(ValueError, match='vib_hidden=0'):
        mlp.load_state_dict(linear.state_dict())
    with pytest.raises(ValueError, match='MLP encoders'):
        linear.load_state_dict(mlp.state_dict())


def test_vibify_a_stock_timm_vit_keeps_its_weights():
    torch.manual_seed(0)
    vit = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=4).eval()
    x = images()
    before = vit(x)
    qkv = vit.blocks[0].attn.qkv.weight.clone()
    vibify(vit, vib_dim=vit.blocks[0].attn.head_dim)
    vit.eval()
    assert torch.equal(vit.blocks[0].attn.qkv.weight, qkv)
    torch.testing.assert_close(vit(x), before, rtol=1e-4, atol=1e-5)
    logits, kl = vit(x, return_kl=True)
    assert kl.shape == (2, 2, 6, 17)  # class token included
    assert all(n in vit.no_weight_decay() for n, _ in vit.named_parameters() if '.vib.' in n)
    with pytest.raises(TypeError, match='VisionTransformer'):
        vibify(torch.nn.Linear(2, 2))


def test_gradients_reach_every_parameter():
    for name in ('vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap'):
        m = small(name).train()
        x = images()
        if m.attn_mode == 'plain':
            loss = m(x).logsumexp(-1).mean()
        else:
            logits, kl = m(x, return_kl=True)
            loss = logits.logsumexp(-1).mean() + 0.1 * information_loss(kl)
        loss.backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}: no gradient for {n}'


@pytest.mark.parametrize('name', timm_vib.MODEL_NAMES)
def test_every_registered_name(name):
    assert name in timm.list_models('vit_tiny_*')
    m = timm.create_model(name, depth=2)
    assert m.pretrained_cfg['classifier'] == 'head' and m.pretrained_cfg['first_conv'] == 'patch_embed.proj'
    assert m.pretrained_cfg['input_size'] == (3, 224, 224) and len(m.pretrained_cfg['mean']) == 3
    expected_beta = timm_vib.beta_from_name(name)
    if expected_beta is not None:
        assert m.beta == expected_beta
    x = torch.randn(2, 3, 224, 224)
    m.train()
    out = m(x)
    assert out.shape == (2, 100)
    out.sum().backward()
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    m = m.to(torch.bfloat16).eval()
    with torch.no_grad():
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7) and torch.isfinite(y).all()
    if m.attn_mode != 'plain':
        _, kl = m(x.bfloat16(), return_kl=True)
        assert kl.dtype == torch.float32 and kl.shape == (2, 2, 3, 196)


def test_beta_from_name_and_fixed_betas():
    assert timm_vib.beta_from_name('vit_tiny_vib_b0p01') == 0.01
    assert timm_vib.beta_from_name('vit_tiny_vib_b10.in100') == 10.0
    assert timm_vib.beta_from_name('vit_tiny_vib') is None
    assert timm.create_model('vit_tiny_vib', beta=2.5, depth=1).beta == 2.5
    with pytest.raises(ValueError, match='beta=4'):
        timm.create_model('vit_tiny_vib_b4', beta=1.0, depth=1)


def test_timm_conventions():
    m = small()
    x = images()
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 192)
    assert m.group_matcher()['blocks'][0][0].startswith('^blocks')
    # weight decay groups through timm's optimizer factory: bottleneck params never decay
    nwd = m.no_weight_decay()
    vib_params = [n for n, _ in m.named_parameters() if '.vib.' in n]
    assert len(vib_params) == 2 * 8 and set(vib_params) <= nwd and 'pos_embed' not in nwd  # 2 blocks x 4 layers
    opt = timm.optim.create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    named = dict(m.named_parameters())
    assert id(named['pos_embed']) in decayed and id(named['blocks.0.attn.qkv.weight']) in decayed
    assert not any(id(named[n]) in decayed for n in vib_params)
    # gradient checkpointing gives the same function
    m.eval()
    ref, ref_kl = m(x, return_kl=True)
    m.set_grad_checkpointing(True)
    out, kl = m(x, return_kl=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(kl, ref_kl)
    assert torch.allclose(m(x), ref)


def test_feature_extraction():
    m = small().eval()
    x = images()
    final, inter = m.forward_intermediates(x)
    assert len(inter) == 2 and inter[0].shape == (2, 192, 4, 4)
    torch.testing.assert_close(final, m.forward_features(x))
    fm = timm.create_model('vit_tiny_vib', features_only=True, out_indices=(0, 1), **SMALL)
    feats = fm(x)
    assert [f.shape for f in feats] == [(2, 192, 4, 4)] * 2


def test_dynamic_img_size_and_other_kwargs():
    m = small(dynamic_img_size=True, drop_path_rate=0.1, qk_norm=True).eval()
    _, kl = m(images(size=48), return_kl=True)
    assert kl.shape == (2, 2, 3, 36)


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize('beta', [-1.0, float('nan'), float('inf'), 'high'])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match='beta'):
        timm.create_model('vit_tiny_vib', beta=beta, depth=1)
    m = small()
    with pytest.raises(ValueError, match='beta'):
        m.beta = beta


@pytest.mark.parametrize('vib_dim', [0, -3, 2.5])
def test_bad_vib_dim(vib_dim):
    with pytest.raises(ValueError, match='vib_dim'):
        timm.create_model('vit_tiny_vib', vib_dim=vib_dim, depth=1)


@pytest.mark.parametrize('vib_hidden', [-1, 2.5, True, 'wide'])
def test_bad_vib_hidden(vib_hidden):
    with pytest.raises(ValueError, match='vib_hidden'):
        timm.create_model('vit_tiny_vib', vib_hidden=vib_hidden, depth=1)
    with pytest.raises(ValueError, match='vib_hidden'):
        vibify(timm.create_model('vit_tiny_gap', depth=1), vib_hidden=vib_hidden)


@pytest.mark.parametrize('logvar_init', [float('nan'), float('inf'), 20.0, -10.5, '0', True])
def test_bad_logvar_init(logvar_init):
    # outside the clamp [-10, 10] the log-variance would sit at its bound with no gradient, for good
    with pytest.raises(ValueError, match=r'vib_logvar_init .* within the clamp \[-10, 10\]'):
        timm.create_model('vit_tiny_vib', vib_logvar_init=logvar_init, depth=1)


@pytest.mark.parametrize('logvar_init', [-10, 10.0])
def test_logvar_init_at_the_clamps_bounds_is_accepted(logvar_init):
    m = small(vib_logvar_init=logvar_init).train()
    _, kl = m(images(), return_kl=True)
    # at logvar = l (mu ~ 0) each latent dimension costs (e^l - 1 - l) / 2 nats
    per_dim = (math.exp(logvar_init) - 1 - logvar_init) / 2
    assert kl.mean().item() == pytest.approx(m.vib_dim * per_dim, rel=0.05)


def test_bad_images():
    m = small()
    with pytest.raises(ValueError, match='floating-point images, got torch.uint8'):
        m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'32x32 images, got 48x48'):
        m(images(size=48))
    with pytest.raises(ValueError, match='3 input channels'):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='3 input channels'):
        m(torch.randn(2, 32, 32, 3))  # channels-last by mistake
    with pytest.raises(ValueError, match=r'\[batch, channels, height, width\]'):
        m(torch.randn(3, 32, 32))


def test_gap_has_no_kl_and_checkpoints_of_other_architectures_are_refused():
    gap, vib, noattn = small('vit_tiny_gap'), small('vit_tiny_vib'), small('vit_tiny_noattn')
    with pytest.raises(ValueError, match='no information bottleneck'):
        gap(images(), return_kl=True)
    with pytest.raises(ValueError, match='no bottleneck weights'):
        vib.load_state_dict(gap.state_dict())
    with pytest.raises(ValueError, match='belongs to a vit_tiny_vib'):
        gap.load_state_dict(vib.state_dict())
    with pytest.raises(ValueError, match='no attention'):
        noattn.load_state_dict(gap.state_dict())
    vib.load_state_dict(gap.state_dict(), strict=False)  # non-strict stays possible
    wide = small('vit_tiny_vib', vib_dim=16)
    with pytest.raises(RuntimeError, match='size mismatch'):
        vib.load_state_dict(wide.state_dict())


def test_name_for_beta_inverts_beta_from_name():
    for name in timm_vib.MODEL_NAMES:
        beta = timm_vib.beta_from_name(name)
        if beta is not None:
            assert timm_vib.name_for_beta(beta) == name
    assert timm_vib.beta_from_name(timm_vib.name_for_beta(2.5)) == 2.5
    with pytest.raises(ValueError, match='beta'):
        timm_vib.name_for_beta(-1)


def test_kl_of_nearly_collapsed_heads_is_nonnegative_and_accurate_in_float32():
    """Log-variances within 1e-3 of 0 and zero means: the float64 closed form is >= 0 and ~ lv^2 / 4 per
    dimension; exp(lv) - 1 - lv in float32 would cancel to negative values for many of them."""
    lv = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) * 1e-3
    mu = torch.zeros_like(lv)
    expected = 0.5 * (torch.expm1(lv.double()) - lv.double()).sum(-1)
    kl = gaussian_kl(mu, lv)
    assert kl.dtype == torch.float32 and (kl >= 0).all()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-3, atol=1e-12)
    # the same through autocast's half precision inputs
    assert (gaussian_kl(mu.bfloat16(), lv.bfloat16()) >= 0).all()
