"""timm_vib -> keras_vib weights: equal logits and KL (inference) for every architecture, from every
kind of source, the reverse direction, and clear errors for checkpoints that do not fit.

Tolerance: rtol 1e-4 with an absolute floor of 1e-5 x the largest magnitude of the compared tensor
(float32 sums of 192-768 terms round at ~1e-7 relative to the largest term, so entries near zero
can only be compared against that scale)."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import timm
from keras import ops
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

import timm_vib  # noqa: F401  (registers the timm models)
from keras_vib import from_timm, kl_and_latents, to_timm_state_dict, vit_tiny_vib

MAX_REL_ERR = {}
FIXTURE = Path(__file__).resolve().parent / 'data' / 'timm_vit_tiny_vib'


def timm_model(name='vit_tiny_vib', img_size=32, patch_size=8, depth=2, num_classes=5, seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(name, img_size=img_size, patch_size=patch_size, depth=depth, num_classes=num_classes, **kw)
    if m.attn_mode == 'vib':  # move the log-variances off their constant init so the KL is not trivial
        with torch.no_grad():
            for b in m.bottlenecks():
                for bias in b._biases():
                    bias.normal_(0, 0.5)
                b.stats_bias.normal_(0, 1.0)
                b.dec_bias.normal_(0, 0.1)
    return m.eval()


def nchw(m, b=3, seed=1):
    h, w = m.patch_embed.img_size
    return torch.randn(b, m.in_chans, h, w, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    floor = 1e-5 * max(np.abs(expected).max(), 1e-12)
    rel = (np.abs(actual - expected) / np.maximum(np.abs(expected), floor)).max()
    MAX_REL_ERR[what] = rel
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=floor, err_msg=what)


def check_equivalent(m, km, what):
    x = nchw(m)
    xk = x.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        if m.attn_mode == 'plain':
            logits, kl = m(x), None
        else:
            logits, kl = m(x, return_kl=True)
    assert_close(ops.convert_to_numpy(km(xk)), logits.numpy(), f'{what} logits')
    if kl is not None:
        out = kl_and_latents(km, xk)
        assert_close(out['kl'], kl.numpy(), f'{what} kl')
        assert_close(out['logits'], logits.numpy(), f'{what} logits (read-out)')


@pytest.mark.parametrize('name,img_size,patch_size,vib_dim', [
    ('vit_tiny_vib', 32, 8, 32),
    ('vit_tiny_vib', 32, 8, (32, 0)),     # (vib_dim, vib_hidden): linear encoders / decoders
    ('vit_tiny_vib', 48, 16, 8),
    ('vit_tiny_vib_b4', (32, 48), 8, 1),   # non-square grid
    ('vit_tiny_vib', 64, 16, 64),
    ('vit_tiny_noattn', 32, 8, None),
    ('vit_tiny_noattn', 48, 16, None),
    ('vit_tiny_gap', 32, 8, None),
    ('vit_tiny_gap', (48, 32), 16, None),
])
def test_from_timm_module_matches_timm(name, img_size, patch_size, vib_dim):
    kw = {} if vib_dim is None else {'vib_dim': vib_dim}
    if isinstance(vib_dim, tuple):
        kw = {'vib_dim': vib_dim[0], 'vib_hidden': vib_dim[1]}
    m = timm_model(name, img_size=img_size, patch_size=patch_size, **kw)
    km = from_timm(m)
    assert km.vib_hidden == m.vib_hidden or m.attn_mode != 'vib'
    assert km.beta == m.beta and km.attn_mode == m.attn_mode and km.depth == 2
    assert km.image_size == tuple(m.patch_embed.img_size)
    check_equivalent(m, km, f'{name} {img_size}/{patch_size} r={vib_dim}')


def test_from_state_dict_file_and_folders(tmp_path, monkeypatch):
    m = timm_model('vit_tiny_vib_b4', img_size=32, patch_size=8, vib_dim=16, in_chans=1)
    # a state dict (torch tensors): the shapes fix all but the image grid
    check_equivalent(m, from_timm(m.state_dict(), beta=4.0, image_size=32), 'state dict')
    # a lone safetensors file: shapes only; 16 tokens could be 4 x 4 or 2 x 8 patches, so no guess
    save_file(m.state_dict(), str(tmp_path / 'weights.safetensors'))
    with pytest.raises(ValueError, match=r'no config.json.*image_size=\(height, width\) \(16 tokens'):
        from_timm(tmp_path / 'weights.safetensors')
    km = from_timm(tmp_path / 'weights.safetensors', image_size=32)
    assert km.in_chans == 1 and km.image_size == (32, 32) and km.beta == 1.0 and km.num_heads == 3
    check_equivalent(m, km, 'safetensors file')
    # a folder as timm's save_for_hf (what timm_vib's Hub code writes)
    save_for_hf(m, str(tmp_path / 'hf'), model_args=dict(img_size=32, patch_size=8, depth=2, vib_dim=16, in_chans=1),
                safe_serialization=True)
    km = from_timm(tmp_path / 'hf')
    assert km.name == 'vit_tiny_vib_b4' and km.beta == 4.0
    check_equivalent(m, km, 'folder')
    # a Hub repo id resolves through huggingface_hub to such a folder
    import huggingface_hub
    seen = {}

    def fake_download(repo_id, **kw):
        seen['repo'] = repo_id
        return str(tmp_path / 'hf')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_download)
    km = from_timm('hf-hub:timm-vib/vit_tiny_vib_b4.digits')
    assert seen['repo'] == 'timm-vib/vit_tiny_vib_b4.digits' and km.beta == 4.0
    from_timm('timm-vib/vit_tiny_vib_b4.digits')
    assert seen['repo'] == 'timm-vib/vit_tiny_vib_b4.digits'


def test_hand_written_folder_with_beta_in_model_args(tmp_path):
    m = timm_model('vit_tiny_vib', img_size=32, patch_size=8, vib_dim=4, beta=2.5)
    save_file(m.state_dict(), str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps({
        'architecture': 'vit_tiny_vib', 'num_classes': 5,
        'model_args': {'img_size': 32, 'patch_size': 8, 'depth': 2, 'vib_dim': 4, 'beta': 2.5, 'drop_path_rate': 0.1},
        'pretrained_cfg': {'input_size': [3, 32, 32]}}))
    km = from_timm(tmp_path)
    assert km.beta == 2.5 and km.vib_dim == 4
    check_equivalent(m, km, 'hand-written folder')


def test_folder_of_a_run_with_an_init_option(tmp_path):
    """What `timm-vib train` writes for the demo's runs: model_args with vib_small_init_dec and pos_embed_init,
    options of the initial weights only, which the converted weights replace."""
    from timm_vib.checkpoints import save_model
    m = timm_model('vit_tiny_vib_b1', vib_dim=4, vib_small_init_dec=True, vib_logvar_init=0.0, pos_embed_init='sincos')
    save_model(m, tmp_path, model_args=dict(img_size=32, patch_size=8, depth=2, num_classes=5,
                                            vib_small_init_dec=True, vib_logvar_init=0.0, pos_embed_init='sincos'))
    km = from_timm(tmp_path)
    assert km.name == 'vit_tiny_vib_b1' and km.vib_dim == 4
    assert km.vib_small_init_dec and km.pos_embed_init == 'sincos'  # the config, as it was created
    check_equivalent(m, km, 'run folder')
    same = lambda cfg: {k: v for k, v in cfg.items() if k != 'name'}  # noqa: E731  (a module has no registered name)
    assert same(from_timm(m).get_config()) == same(km.get_config())


def test_sincos_table_is_timms():
    from timm.layers import build_sincos2d_pos_embed
    from keras_vib.layers import sincos_2d
    for grid, dim in (((4, 4), 48), ((3, 5), 32), ((1, 7), 8)):
        np.testing.assert_allclose(sincos_2d(grid, dim), build_sincos2d_pos_embed(list(grid), dim).numpy(), atol=1e-6)


def test_from_timm_refuses_to_guess_the_head_count():
    # the weights of attention without bottleneck are the same shapes for 2 or 3 heads (qkv [3C, C]):
    # built with 3, a 2-head model would load without error and predict differently
    m = timm_model('vit_tiny_gap', num_heads=2, embed_dim=64)
    with torch.no_grad():  # sharp attention, so that how the channels group into heads shows
        for b in m.blocks:
            b.attn.qkv.weight.normal_(0, 0.5)
    with pytest.raises(ValueError, match='pass num_heads'):
        from_timm(m.state_dict(), image_size=32)
    wrong = from_timm(m.state_dict(), image_size=32, num_heads=4)
    x = nchw(m)
    with torch.no_grad():
        ref = m(x).numpy()
    diff = np.abs(ops.convert_to_numpy(wrong(x.permute(0, 2, 3, 1).numpy())) - ref).max()
    assert diff > 0.05 * np.abs(ref).max(), diff
    check_equivalent(m, from_timm(m.state_dict(), image_size=32, num_heads=2), 'gap state dict, 2 heads')
    # a bottlenecked checkpoint says its heads ([heads, head_dim, ...] bottleneck weights)
    v = timm_model('vit_tiny_vib', num_heads=2, embed_dim=64, vib_dim=4)
    km = from_timm(v.state_dict(), image_size=32)
    assert km.num_heads == 2
    check_equivalent(v, km, 'vib state dict, 2 heads')
    # the module and a folder say everything: no argument needed
    assert from_timm(m).num_heads == 2


def test_bfloat16_safetensors_without_torch_reader(tmp_path, monkeypatch):
    m = timm_model('vit_tiny_vib', vib_dim=4)
    save_file({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, str(tmp_path / 'model.safetensors'))
    # read through numpy + ml_dtypes: safetensors' torch reader is not used
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, 'load_file', None)
    km = from_timm(tmp_path / 'model.safetensors', image_size=32)
    back = to_timm_state_dict(km)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(back[k], v.to(torch.bfloat16).float().numpy(), err_msg=k)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(ValueError, match='not a readable .safetensors file'):
        from_timm(tmp_path / 'bad' / 'model.safetensors', image_size=32)


def test_keras_weights_back_to_timm():
    m = timm_model('vit_tiny_vib', vib_dim=8)
    km = vit_tiny_vib(image_size=32, patch_size=8, depth=2, num_classes=5, vib_dim=8, seed=0)
    sd = to_timm_state_dict(km, as_torch=True)
    assert set(sd) == set(m.state_dict())
    m.load_state_dict(sd)
    check_equivalent(m, km, 'keras -> timm')
    # and the identity round trip timm -> keras -> timm
    m2 = timm_model('vit_tiny_gap', seed=5)
    back = to_timm_state_dict(from_timm(m2))
    for k, v in m2.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_checkpoints_that_do_not_fit(tmp_path):
    vib = timm_model('vit_tiny_vib', vib_dim=8)
    km = vit_tiny_vib(image_size=32, patch_size=8, depth=2, num_classes=5, vib_dim=8)
    with pytest.raises(ValueError, match='depth: checkpoint 3 vs model 2'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=8, depth=3), model=km)
    with pytest.raises(ValueError, match='vib_dim: checkpoint 16 vs model 8'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=16), model=km)
    with pytest.raises(ValueError, match='tokens: checkpoint 4 vs model 16'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=8, img_size=16).state_dict(), model=km)
    # what the source states beyond the shapes: the grid (and its orientation), the head count
    with pytest.raises(ValueError, match=r'image_size: VisionTransformerVIB \(16, 16\) vs model \(32, 32\)'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=8, img_size=16), model=km)
    with pytest.raises(ValueError, match=r'image_size: VisionTransformerVIB \(48, 32\) vs model \(32, 48\)'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=8, img_size=(48, 32)),
                  model=vit_tiny_vib(image_size=(32, 48), patch_size=8, depth=2, num_classes=5, vib_dim=8))
    with pytest.raises(ValueError, match='num_heads: VisionTransformerVIB 2 vs model 4'):
        from_timm(timm_model('vit_tiny_gap', embed_dim=64, num_heads=2),
                  model=keras_vib.vit_tiny_gap(image_size=32, patch_size=8, depth=2, num_classes=5, embed_dim=64,
                                               num_heads=4))
    with pytest.raises(ValueError, match='num_classes: checkpoint 7 vs model 5'):
        from_timm(timm_model('vit_tiny_vib', vib_dim=8, num_classes=7), model=km)
    with pytest.raises(ValueError, match='attention without bottleneck.*different architectures'):
        from_timm(timm_model('vit_tiny_gap'), model=km)
    with pytest.raises(ValueError, match='no attention'):
        from_timm(timm_model('vit_tiny_noattn').state_dict(), model=km)
    with pytest.raises(ValueError, match='bottleneck on every attention head'):
        from_timm(vib, model=keras_vib.vit_tiny_gap(image_size=32, patch_size=8, depth=2, num_classes=5))
    # not a timm_vib architecture, or timm options keras_vib does not implement
    with pytest.raises(ValueError, match='class / register token'):
        from_timm(timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32, patch_size=8).state_dict())
    with pytest.raises(TypeError, match='timm_vib model'):
        from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='qk_norm'):
        from_timm(timm_model('vit_tiny_vib', qk_norm=True))
    with pytest.raises(ValueError, match='MLP activation ReLU'):
        from_timm(timm_model('vit_tiny_vib', act_layer='relu'))
    with pytest.raises(ValueError, match='final_norm=False'):
        from_timm(timm_model('vit_tiny_vib', final_norm=False))
    # a model without attention: its weights do not show the head count its KL has
    with pytest.raises(ValueError, match='num_heads'):
        from_timm(timm_model('vit_tiny_noattn', embed_dim=48, num_heads=4).state_dict(), image_size=32)
    assert from_timm(timm_model('vit_tiny_noattn', embed_dim=48, num_heads=4).state_dict(), image_size=32,
                     num_heads=4).num_heads == 4
    # wrapped state dicts (DistributedDataParallel, torch.compile) load; the reference code's layout is named
    for prefix in ('module.', '_orig_mod.'):
        wrapped = {prefix + k: v for k, v in vib.state_dict().items()}
        np.testing.assert_array_equal(
            ops.convert_to_numpy(from_timm(wrapped, image_size=32).blocks[0].attn.vib.enc_weight),
            ops.convert_to_numpy(from_timm(vib.state_dict(), image_size=32).blocks[0].attn.vib.enc_weight))
    with pytest.raises(ValueError, match='convert_reference_state_dict'):
        from_timm({'vit.pos_embed': np.zeros((1, 17, 4)), 'vit.blocks.0.attn.ib.enc_list.0.weight': np.zeros((2, 2))})
    save_file(vib.state_dict(), str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'vit_small_patch16_224', 'model_args': {}}))
    with pytest.raises(ValueError, match='not a timm_vib model'):
        from_timm(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps(
        {'architecture': 'vit_tiny_vib', 'model_args': {'img_size': 32, 'patch_size': 8, 'depth': 2, 'class_token': True}}))
    with pytest.raises(ValueError, match='class_token'):
        from_timm(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'vit_tiny_gap', 'model_args': {}}))
    with pytest.raises(ValueError, match='config.json says vit_tiny_gap'):
        from_timm(tmp_path)
    with pytest.raises(FileNotFoundError, match='neither a file, a folder'):
        from_timm(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='has no model.safetensors'):
        from_timm(tmp_path / 'empty')


def test_report_max_relative_error():
    """Prints the largest relative error of the equivalence tests above (run with -s to see it)."""
    if MAX_REL_ERR:
        worst = max(MAX_REL_ERR, key=MAX_REL_ERR.get)
        print(f'\nmax relative error timm -> keras: {MAX_REL_ERR[worst]:.2e} ({worst})')


def test_committed_timm_fixture_is_timms_answer():
    """tests/data/timm_vit_tiny_vib (read by the torch-free tests) holds timm's logits and KL for its weights."""
    from safetensors.torch import load_file
    folder = FIXTURE
    cfg = json.loads((folder / 'config.json').read_text())
    m = timm.create_model(cfg['architecture'], **cfg['model_args']).eval()
    m.load_state_dict(load_file(str(folder / 'model.safetensors')))
    ref = np.load(folder / 'expected.npz')
    with torch.no_grad():
        logits, kl = m(torch.from_numpy(ref['images']), return_kl=True)
    # the module's tolerance (float32 rounding relative to the largest term): a fixture still timm's
    # answer after a change of summation order, not after a change of the model
    assert_close(logits.numpy(), ref['logits'], 'fixture logits')
    assert_close(kl.numpy(), ref['kl'], 'fixture kl')
    assert np.abs(ref['kl']).max() > 1e-2  # not a trivial KL


def test_initial_weights_are_distributed_as_timms():
    """Trained from scratch, a Keras model starts from timm's init: Linear weights N(0, 0.02) (timm's truncation
    at +-2 is no truncation), zero biases, the patch embedding torch's Conv2d default, uniform within
    1/sqrt(fan_in) for kernel and bias, the position embedding N(0, 0.02)."""
    from keras_vib.convert import _weight_table
    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=100, embed_dim=192, num_heads=3)
    tm = timm.create_model('vit_tiny_vib', **kw)
    km = vit_tiny_vib(image_size=32, patch_size=8, depth=2, num_classes=100, embed_dim=192, num_heads=3, seed=0)
    theirs = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    for name, var, _ in _weight_table(km):
        if '.vib.' in name or name.startswith('norm') or '.norm' in name:
            continue  # the bottleneck's init has its own tests; LayerNorms are ones and zeros in both
        ours, ref = ops.convert_to_numpy(var), theirs[name]
        assert ours.size == ref.size, name
        if ref.std() == 0:
            assert np.all(ours == ref.flat[0]), name
            continue
        # standard deviations within 10 %, and the same support (the uniform bound of the patch embedding)
        assert ours.std() == pytest.approx(ref.std(), rel=0.1), (name, ours.std(), ref.std())
        assert np.abs(ours).max() <= max(np.abs(ref).max() * 1.1, 4 * ref.std() * 1.5), name
    fan_in = 3 * 8 * 8
    proj = ops.convert_to_numpy(km.patch_embed.proj.kernel)
    assert np.abs(proj).max() <= fan_in ** -0.5 and proj.std() == pytest.approx(fan_in ** -0.5 / np.sqrt(3), rel=0.05)
