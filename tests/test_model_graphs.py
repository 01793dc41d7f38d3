"""The models under timm's graph tools: FX (feature extraction, AttentionExtract), TorchScript,
torch.export, torch.compile, and attention masks through every block type."""
import pytest
import timm
import torch
from timm.models import create_feature_extractor
from timm.utils import AttentionExtract

import timm_vib
from timm_vib.estimators import capture

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)  # 16 tokens, 3 heads of 64
NAMES = ['vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap']


def small(name='vit_tiny_vib', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kw)).eval()


def images(b=2, size=32, seed=1, chans=3):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', NAMES)
def test_fx_graph_matches_eager_and_keeps_the_input_checks(name):
    m = small(name)
    x = images()
    graph = create_feature_extractor(m, return_nodes=['head'])
    torch.testing.assert_close(graph(x)['head'], m(x), rtol=1e-4, atol=1e-5)
    # the checks are a leaf of the graph: same messages as the eager model
    with pytest.raises(ValueError, match='3 input channels'):
        graph(images(chans=1))
    with pytest.raises(ValueError, match=r'32x32 images, got 48x48'):
        graph(images(size=48))


def test_fx_graph_refuses_return_kl():
    graph = torch.fx.symbolic_trace(small())  # every forward argument becomes a graph input
    x = images()
    torch.testing.assert_close(graph(x), small()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match='computes logits only'):
        graph(x, return_kl=True)


@pytest.mark.parametrize('name', NAMES)
def test_torchscript_matches_eager_and_the_model_keeps_its_fused_kernel(name, monkeypatch):
    m = small(name)
    x = images()
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x), rtol=1e-4, atol=1e-5)
    if name != 'vit_tiny_noattn':
        # the eager model without hooks or tracing runs scaled_dot_product_attention, not softmax
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                            lambda *a, **k: calls.append(1) or sdpa(*a, **k))
        m(x)
        assert len(calls) == 2  # one per block


def test_attention_extract_fx_and_hook_match_capture():
    for name in ('vit_tiny_vib', 'vit_tiny_gap'):
        m = small(name)
        x = images()
        with capture(m, attention=True) as rec:
            logits = m(x)
        expected = rec.attention  # [B, depth, heads, N, N]
        for method in ('fx', 'hook'):
            maps = AttentionExtract(m, method=method)(x)
            assert len(maps) == 2, (name, method, list(maps))
            got = torch.stack(list(maps.values()), 1)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=f'{name} {method}')
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))
        # the explicit path the maps came from computes the same logits as the fused kernel
        torch.testing.assert_close(m(x), logits)


def test_attention_extract_finds_nothing_in_the_attention_free_model():
    with pytest.raises(RuntimeError, match='No node names'):
        AttentionExtract(small('vit_tiny_noattn'), method='fx')


@pytest.mark.parametrize('name', NAMES)
def test_torch_export_matches_eager(name):
    m = small(name)
    x = images()
    exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), m(x), rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager_with_and_without_kl():
    m = small()
    x = images()
    compiled = torch.compile(m, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    logits, kl = compiled(x, return_kl=True)
    ref_logits, ref_kl = m(x, return_kl=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-5)


def _isolating_mask(n=16):
    return torch.eye(n, dtype=torch.bool)  # each token attends only to itself


@pytest.mark.parametrize('name', NAMES)
def test_attn_mask_reaches_every_block_type(name):
    """With an identity mask no token hears another: a change to patch 0 stays in token 0."""
    m = small(name)
    x = images()
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0
    a = m.forward_features(x, attn_mask=_isolating_mask())
    b = m.forward_features(x2, attn_mask=_isolating_mask())
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
    assert m(x, attn_mask=_isolating_mask()).shape == (2, 5)


def test_gap_attn_mask_matches_timm_vit():
    """vit_tiny_gap with a mask computes what timm's own VisionTransformer does with the same weights."""
    gap = small('vit_tiny_gap')
    vit = timm.create_model('vit_tiny_patch16_224', class_token=False, global_pool='avg', fc_norm=False, **SMALL).eval()
    vit.load_state_dict(gap.state_dict())
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    mask |= torch.eye(16, dtype=torch.bool)
    x = images()
    torch.testing.assert_close(gap(x, attn_mask=mask), vit(x, attn_mask=mask), rtol=1e-4, atol=1e-5)


def test_vibified_vit_takes_attn_mask_with_and_without_kl():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', **SMALL).eval()
    x = images()
    mask = torch.ones(17, 17, dtype=torch.bool)
    mask[1:, 1:] = torch.eye(16, dtype=torch.bool)  # patches hear only themselves and the class token
    ref = vit(x, attn_mask=mask)
    timm_vib.vibify(vit, vib_dim=64).eval()  # wide identity init: same function
    torch.testing.assert_close(vit(x, attn_mask=mask), ref, rtol=1e-4, atol=1e-4)
    logits, kl = vit(x, attn_mask=mask, return_kl=True)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert kl.shape == (2, 2, 3, 17)
