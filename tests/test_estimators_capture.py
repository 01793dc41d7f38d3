"""Capture: posteriors, KL, attention maps, per-patch logits; no hooks left behind; vibify-ed models."""
import pytest
import timm
import torch

import timm_vib
from timm_vib.estimators import capture

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def small(name='vit_tiny_vib', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kw)).eval()


def images(b=2, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_lazy_subpackage_attribute():
    assert timm_vib.estimators.capture is capture


def test_records_match_the_model_and_leave_no_hooks():
    m, x = small(vib_dim=8), images()
    before = hook_count(m)
    with capture(m) as rec:
        logits, kl = m(x, return_kl=True)
    assert hook_count(m) == before
    assert rec.mu.shape == rec.logvar.shape == (2, 2, 3, 16, 8)
    torch.testing.assert_close(rec.kl, kl.detach(), rtol=0, atol=0)
    assert rec.attention is None and rec.inputs is None
    # no class token, mean pooling: image logits are the mean of per-patch logits
    assert rec.logits.shape == (2, 16, 5)
    torch.testing.assert_close(rec.logits.mean(1), logits.detach(), rtol=1e-5, atol=1e-5)
    # a second pass replaces the record
    with capture(m) as rec:
        m(x)
        m(x[:1])
    assert rec.mu.shape[0] == 1


def test_attention_maps_reproduce_the_attention_output():
    m, x = small('vit_tiny_gap'), images()
    attn = m.blocks[1].attn
    outs = []
    h = attn.register_forward_hook(lambda mod, i, o: outs.append(o))
    with capture(m, attention=True, inputs=True) as rec:
        m(x)
    h.remove()
    a = rec.attention
    assert a.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 3, 16))
    # attention @ v through the output projection gives what the module returned
    inp = rec.inputs[:, 1]
    v = attn.qkv(inp).reshape(2, 16, 3, 3, 64)[:, :, 2].transpose(1, 2)  # [B, H, N, D]
    out = attn.proj((a[:, 1] @ v).transpose(1, 2).reshape(2, 16, 192))
    torch.testing.assert_close(out, outs[0].detach(), rtol=1e-4, atol=1e-5)
    assert rec.kl is None and rec.mu is None  # no bottleneck in the plain ViT


def test_vibified_timm_vit_with_class_token():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_patch16_224', **SMALL)
    timm_vib.vibify(m, vib_dim=4).eval()
    x = images()
    with capture(m, attention=True) as rec:
        _, kl = m(x, return_kl=True)
    assert rec.num_prefix_tokens == 1 and rec.grid_size == (4, 4)
    assert rec.mu.shape == (2, 2, 3, 17, 4) and rec.attention.shape == (2, 2, 3, 17, 17)
    torch.testing.assert_close(rec.kl, kl.detach(), rtol=0, atol=0)
    assert rec.logits.shape == (2, 17, 5)


def test_attention_free_model():
    m, x = small('vit_tiny_noattn'), images()
    with capture(m) as rec:
        m(x)
    assert torch.equal(rec.kl, torch.zeros(2, 2, 3, 16)) and rec.mu is None
    with pytest.raises(ValueError, match='no attention'):
        with capture(m, attention=True):
            pass
    assert hook_count(m) == 0


def test_capture_keeps_gradients_when_asked():
    m, x = small(vib_dim=4), images()
    with capture(m, detach=False) as rec:
        m(x)
    rec.mu.sum().backward()
    assert m.blocks[0].attn.vib.enc_weight.grad is not None


@pytest.mark.parametrize('return_kl', [False, True])
def test_gradient_checkpointing_records_each_layer_once(return_kl):
    """Non-reentrant checkpointing runs every block again in backward; the record keeps one entry per layer,
    and the same values and gradients as without checkpointing."""
    x = images()
    results = []
    for checkpointing in (False, True):
        m = small(vib_dim=8)
        m.set_grad_checkpointing(checkpointing)
        with capture(m, attention=True, inputs=True, detach=False) as rec:
            out = m(x, return_kl=True) if return_kl else m(x)
            logits = out[0] if return_kl else out
            logits.square().mean().backward()
            assert rec.mu.shape == (2, 2, 3, 16, 8) and rec.inputs.shape == (2, 2, 16, 192)
            assert rec.attention.shape == (2, 2, 3, 16, 16)
            results.append((rec.mu.detach(), rec.attention.detach(), m.blocks[0].attn.qkv.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_low_level_helpers_name_wrong_inputs():
    """patch_logits and attention_maps take tokens, not images: a batch of images (or tokens of another
    width) is named, not a matrix-shape error from inside torch."""
    from timm_vib.estimators import attention_maps, patch_logits
    m, x = small(vib_dim=8), images()
    with pytest.raises(ValueError, match=r'tokens \[B, N, 192\].*\(2, 3, 32, 32\)'):
        patch_logits(m, x)
    with pytest.raises(ValueError, match=r'\[B, N, 192\].*\(2, 16, 48\)'):
        attention_maps(m.blocks[0].attn, torch.randn(2, 16, 48))
    with pytest.raises(TypeError, match='attention module'):
        attention_maps(m, torch.randn(2, 16, 192))
    tokens = torch.randn(2, 16, 192)
    assert patch_logits(m, tokens).shape == (2, 16, 5)
    assert attention_maps(m.blocks[0].attn, tokens).shape == (2, 3, 16, 16)
