"""Model folders: round trip through timm's local-dir loader, atomic writes, clear errors."""
import json

import pytest
import timm
import torch

import timm_vib
from timm_vib.checkpoints import load_model, save_model
from timm_vib.files import atomic_write

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


@pytest.mark.parametrize('name', ['vit_tiny_vib_b4', 'vit_tiny_noattn', 'vit_tiny_gap'])
def test_round_trip_through_timm_local_dir(tmp_path, name):
    model = timm.create_model(name, vib_dim=8, **SMALL).eval()
    save_model(model, tmp_path / 'm', data_config={'mean': (0.5,) * 3, 'std': (0.25,) * 3})
    assert sorted(p.name for p in (tmp_path / 'm').iterdir()) == ['config.json', 'model.safetensors']
    x = torch.randn(2, 3, 32, 32)
    for loaded in (load_model(tmp_path / 'm'), timm.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True)):
        loaded.eval()
        assert type(loaded) is type(model) and loaded.beta == model.beta
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert tuple(loaded.pretrained_cfg['mean']) == (0.5,) * 3


def test_the_recorded_tag_says_what_the_weights_were_trained_on(tmp_path):
    """The registered configs carry timm's tag 'in100'; save_model keeps it by default and records the tag it is
    given instead (None: none), and timm loads the folder either way."""
    model = timm.create_model('vit_tiny_vib_b4', vib_dim=8, **SMALL).eval()
    assert model.pretrained_cfg['tag'] == 'in100'
    for tag, expected in (('', 'in100'), (None, None), ('digits', 'digits')):
        folder = save_model(model, tmp_path / str(tag), tag=tag)
        assert json.loads((folder / 'config.json').read_text())['pretrained_cfg'].get('tag') == expected
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        torch.testing.assert_close(loaded(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)), rtol=0, atol=0)


def test_linear_checkpoints_of_timm_vib_0_1_still_load(tmp_path):
    """timm_vib 0.1 had linear bottlenecks and no vib_hidden in config.json: they load as vib_hidden=0;
    timm's own local-dir path, which builds the registered default (the MLP), says what to pass."""
    model = timm.create_model('vit_tiny_vib_b4', vib_dim=8, vib_hidden=0, **SMALL).eval()
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_args'].pop('vib_hidden') == 0
    (tmp_path / 'config.json').write_text(json.dumps(cfg))  # as 0.1 recorded it
    loaded = load_model(tmp_path).eval()
    assert loaded.vib_hidden == 0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='vib_hidden=0'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    mlp = timm.create_model('vit_tiny_vib_b4', vib_dim=8, **SMALL)
    save_model(mlp, tmp_path / 'mlp')
    assert json.loads((tmp_path / 'mlp' / 'config.json').read_text())['model_args']['vib_hidden'] == 64
    assert load_model(tmp_path / 'mlp').vib_hidden == 64


def test_beta_override_and_architecture_are_recorded(tmp_path):
    model = timm.create_model('vit_tiny_vib', beta=0.3, **SMALL)
    save_model(model, tmp_path, model_args={'beta': 2.0})
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['architecture'] == 'vit_tiny_vib' and cfg['model_args']['beta'] == 2.0
    assert load_model(tmp_path).beta == 2.0


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_model(tmp_path)
    model = timm.create_model('vit_tiny_vib_b1', **SMALL)
    save_model(model, tmp_path / 'a')
    (tmp_path / 'a' / 'model.safetensors').write_bytes(b'\x00garbage' * 10)
    with pytest.raises(ValueError, match='corrupt'):
        load_model(tmp_path / 'a')
    save_model(model, tmp_path / 'b')
    (tmp_path / 'b' / 'config.json').write_text('{"architecture": ')
    with pytest.raises(ValueError, match='corrupt'):
        load_model(tmp_path / 'b')
    # weights of another architecture under this config
    gap = timm.create_model('vit_tiny_gap', **SMALL)
    save_model(gap, tmp_path / 'c')
    save_model(model, tmp_path / 'd')
    (tmp_path / 'c' / 'model.safetensors').replace(tmp_path / 'd' / 'model.safetensors')
    with pytest.raises(ValueError, match='no bottleneck weights'):
        load_model(tmp_path / 'd')


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'f.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('half of the new')
            raise RuntimeError('killed')
    assert path.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['f.txt']
