"""Hub publishing, offline: a tiny trained sweep -> Hub folders -> loaded three ways; the card; push offline."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import timm_vib
from timm_vib import training
from timm_vib.hub import export, repo_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--data', 'digits', '--epochs', '1', '--batch-size', '64', '--seed', '0', '--stochastic-eval', '2',
        '--lr', '2e-3', '--warmup-epochs', '0.5', '--weight-decay', '0.02',  # not the defaults: the card must say them
        '--model-kwargs', 'depth=2', 'img_size=16', 'patch_size=4', 'embed_dim=48', 'num_heads=3', 'vib_dim=4']


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp('sweep')
    for model in ('vit_tiny_vib_b4', 'vit_tiny_noattn'):
        training.train(training.parse_args(['--model', model, '--output', str(root / model)] + TINY))
    return root


@pytest.fixture(scope='module')
def hub_folder(sweep, tmp_path_factory):
    return export(sweep / 'vit_tiny_vib_b4', tmp_path_factory.mktemp('hub') / 'b4', repo_id='testorg/vit_tiny_vib_b4.in100')


def run_python(code, env_extra, cwd):
    env = {**os.environ, **env_extra, 'PYTHONPATH': str(ROOT)}
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_hub_folder_contents_and_card(sweep, hub_folder):
    names = sorted(p.name for p in hub_folder.iterdir())
    assert names == ['README.md', 'accuracy_vs_information.png', 'config.json', 'metrics.jsonl',
                     'model.safetensors', 'run_config.json', 'summary.json']
    assert (hub_folder / 'accuracy_vs_information.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = json.loads((sweep / 'vit_tiny_vib_b4' / 'summary.json').read_text())
    cfg = json.loads((hub_folder / 'config.json').read_text())
    assert cfg['architecture'] == 'vit_tiny_vib_b4'
    assert {'mean', 'std', 'input_size', 'classifier', 'first_conv'} <= set(cfg['pretrained_cfg'])
    card = ModelCard.load(hub_folder / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert 'information-bottleneck' in card.data.tags and card.data.datasets == ['digits']
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    # the model-index's top-1 is the mean of the sampled validation passes (the paper's number), the card's
    # table gives the last single pass too, labelled as the run made it (z sampled by default)
    assert metrics['accuracy'] == pytest.approx(summary['stochastic_eval']['top1_mean'], abs=1e-3)
    assert metrics['information'] == pytest.approx(summary['nats_per_image'], abs=1e-3)
    assert card.data.timm_vib['num_active_heads'] == summary['num_active_heads']
    assert card.data.timm_vib['active_heads'] == summary['active_heads']
    text = card.text
    assert f"| top-1, one validation pass with z sampled | {summary['val_top1']:.2f}% |" in text and 'beta = 4' in text
    assert 'posterior mean' not in text
    assert f"over {summary['stochastic_eval']['k']} stochastic validation passes" in text
    assert 'Murphy' in text and 'accuracy_vs_information.png' in text
    assert repo_name(summary) == 'vit_tiny_vib_b4'


def test_card_names_how_the_run_validated(sweep, tmp_path):
    """A run validated with posterior means (--eval-z mean) is labelled so; one without a bottleneck plainly."""
    import shutil
    from timm_vib.hub import build_card
    run = tmp_path / 'b4'
    shutil.copytree(sweep / 'vit_tiny_vib_b4', run)
    summary = json.loads((run / 'summary.json').read_text())
    one = {'k': 1, 'top1_mean': summary['val_top1'], 'top1_std': None}  # what --stochastic-eval 1 records
    (run / 'summary.json').write_text(json.dumps({**summary, 'eval_z': 'mean', 'stochastic_eval': one}))
    text = build_card(run, 'testorg/b4').text
    assert f"| top-1, one validation pass in eval mode (posterior mean) | {summary['val_top1']:.2f}% |" in text
    assert f"| top-1 over 1 stochastic validation pass | {summary['val_top1']:.2f}% |" in text  # no spread of one
    plain = json.loads((sweep / 'vit_tiny_noattn' / 'summary.json').read_text())
    card = build_card(sweep / 'vit_tiny_noattn', 'testorg/noattn')
    assert f"| top-1 | {plain['val_top1']:.2f}% |" in card.text
    assert card.data.eval_results[0].metric_value == pytest.approx(plain['val_top1'], abs=1e-3)  # no sampled passes


def test_card_states_the_runs_recipe(sweep):
    """The recipe line gives the run's own lr, weight decay, warm-up, batch and augmentation (TINY's values)."""
    from timm_vib.hub import build_card
    text = build_card(sweep / 'vit_tiny_vib_b4', 'testorg/b4').text
    assert ('- recipe: AdamW, lr 0.002, weight decay 0.02 (none on biases, 1-D parameters and bottleneck parameters), '
            'cosine schedule with 0.5 warmup epochs, 1 epochs, batch 64 (all processes), seed 0') in text
    assert '- augmentation: RandomResizedCrop scale (0.7, 1.0), colour jitter 0.4\n' in text  # digits: no flips
    assert '(measured on the validation split of scikit-learn digits: 360 images)' in text
    assert '(10 classes, 16 px, 1437 training images)' in text
    assert '- information term: beta = 4 times the KL' in text
    # a model without a bottleneck had no information term and no beta warm-up
    plain = build_card(sweep / 'vit_tiny_noattn', 'testorg/noattn').text
    assert '- information term' not in plain and 'warm-up)' not in plain
    # a digits run is not the registered configs' ImageNet-100 weights
    assert 'tag' not in json.loads((sweep / 'vit_tiny_vib_b4' / 'config.json').read_text())['pretrained_cfg']


def test_card_follows_the_beta_the_run_trained_with(sweep, tmp_path):
    """`--model vit_tiny_vib_b4 --beta 1` records model vit_tiny_vib_b4 and beta 1: a beta-1 model, by title and
    by the default repo id."""
    import shutil
    from timm_vib.hub import build_card
    run = tmp_path / 'b4_at_1'
    shutil.copytree(sweep / 'vit_tiny_vib_b4', run)
    summary = json.loads((run / 'summary.json').read_text())
    (run / 'summary.json').write_text(json.dumps({**summary, 'beta': 1.0}))
    text = build_card(run, 'testorg/x').text
    assert '# testorg/x: ViT-Tiny, information-bottlenecked attention, beta = 1\n' in text
    assert 'beta = 4' not in text and 'beta = 1 times the KL' in text
    folder = export(run, tmp_path / 'hub')
    assert '# timm-vib/vit_tiny_vib_b1: ' in (folder / 'README.md').read_text()


def test_card_states_the_initial_weights(sweep, tmp_path):
    """How the weights started shapes what a short run learns (docs/spectrum.md): the card says it, from the
    config's model_args, with the constructor's defaults where they are left out."""
    import shutil
    from timm_vib.hub import build_card
    default = build_card(sweep / 'vit_tiny_vib_b4', 'testorg/b4').text
    assert ("- initial weights: posterior log-variance bias -6.0; position embedding timm's (truncated normal, "
            "std 0.02); timm's init otherwise") in default
    run = tmp_path / 'b4'
    shutil.copytree(sweep / 'vit_tiny_vib_b4', run)
    cfg = json.loads((run / 'config.json').read_text())
    cfg['model_args'].update(vib_logvar_init=0.0, vib_small_init_dec=True, pos_embed_init='sincos')
    (run / 'config.json').write_text(json.dumps(cfg))
    assert ("- initial weights: posterior log-variance bias 0.0, decoders' last layers near zero (the reference "
            "code's `small_init_dec`); position embedding started at the 2-D sin-cos embedding") in build_card(run, 'testorg/b4').text
    assert "- initial weights: position embedding timm's" in build_card(sweep / 'vit_tiny_noattn', 'testorg/n').text


def test_loaded_three_ways_gives_identical_logits_and_kl(hub_folder, tmp_path):
    # a temporary Hub cache holding the folder as the cached snapshot of testorg/vit_tiny_vib_b4.in100
    repo = tmp_path / 'cache' / 'models--testorg--vit_tiny_vib_b4.in100'
    snap = repo / 'snapshots' / ('0' * 40)
    snap.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    for f in hub_folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    code = f'''
import timm, torch, timm_vib
x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
out = {{}}
models = {{
    'local': timm.create_model('local-dir:{hub_folder}', pretrained=True),
    'hub': timm.create_model('hf-hub:testorg/vit_tiny_vib_b4.in100', pretrained=True),
    'pretrained': timm.create_model('vit_tiny_vib_b4', pretrained=True, depth=2, img_size=16, patch_size=4,
                                    embed_dim=48, num_heads=3, vib_dim=4, num_classes=10,
                                    pretrained_cfg_overlay=dict(num_classes=10)),
}}
for k, m in models.items():
    if k == 'pretrained':  # through timm's Hub download path, under the configured namespace
        assert m.pretrained_cfg['hf_hub_id'] == 'testorg/vit_tiny_vib_b4.in100'
    out[k] = m.eval()(x, return_kl=True)
torch.save(out, 'out.pt')
'''
    run_python(code, {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'cache'),
                      'TIMM_VIB_HUB_NAMESPACE': 'testorg'}, cwd=tmp_path)
    out = torch.load(tmp_path / 'out.pt')
    reference = timm_vib.checkpoints.load_model(hub_folder).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref_logits, ref_kl = reference(x, return_kl=True)
    for k, (logits, kl) in out.items():
        assert torch.equal(logits, ref_logits), k
        assert torch.equal(kl, ref_kl), k


def test_card_snippets_run_against_the_local_folder(hub_folder, tmp_path):
    text = (hub_folder / 'README.md').read_text()
    blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    assert len(blocks) == 3
    code = '\n'.join(blocks)
    code = code.replace('hf-hub:testorg/vit_tiny_vib_b4.in100', f'local-dir:{hub_folder}')
    code = code.replace('snapshot_download("testorg/vit_tiny_vib_b4.in100")', repr(str(hub_folder)))
    if 'from_timm' in code:
        pytest.importorskip('keras_vib')
    code += '\nprint("OK", probs.shape, votes.shape)\n'
    out = run_python(code, {'HF_HUB_OFFLINE': '1'}, cwd=tmp_path)
    assert 'OK torch.Size([1, 10]) torch.Size([1, 16])' in out.stdout


def test_push_fails_fast_offline_and_writes_nothing(sweep, tmp_path):
    run = sweep / 'vit_tiny_vib_b4'
    before = sorted(p.name for p in run.iterdir())
    for env in ({'HF_HUB_OFFLINE': '1'}, {'HF_HUB_OFFLINE': '0', 'HF_ENDPOINT': 'http://127.0.0.1:9'}):
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, '-m', 'timm_vib.cli', 'push', str(run), '--repo-id', 'testorg/x'],
            env={**os.environ, **env, 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert 'nothing was uploaded' in out.stderr and 'Traceback' not in out.stderr
        assert ('offline' in out.stderr) if env['HF_HUB_OFFLINE'] == '1' else ('cannot reach' in out.stderr)
        assert time.perf_counter() - t < 60
    assert sorted(p.name for p in run.iterdir()) == before


def test_push_dry_run_of_a_sweep_writes_every_folder(sweep, tmp_path):
    out = subprocess.run(
        [sys.executable, '-m', 'timm_vib.cli', 'push', str(sweep), '--namespace', 'testorg', '--suffix', '.digits',
         '--dry-run', '--folder', str(tmp_path / 'hub')],
        env={**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / 'hub').iterdir()) == ['vit_tiny_noattn.digits', 'vit_tiny_vib_b4.digits']
    card = ModelCard.load(tmp_path / 'hub' / 'vit_tiny_noattn.digits' / 'README.md')
    assert 'without attention' in card.text and '0 nats' in card.text


def test_bad_inputs(sweep, tmp_path):
    with pytest.raises(FileNotFoundError, match='summary.json'):
        export(tmp_path, tmp_path / 'out')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        export(tmp_path / 'missing', tmp_path / 'out')
    with pytest.raises(ValueError, match='ORG/NAME'):
        timm_vib.hub.push(sweep / 'vit_tiny_vib_b4', 'no-slash', dry_run=True)
    # a folder whose weights belong to another architecture
    bad = tmp_path / 'bad'
    export(sweep / 'vit_tiny_vib_b4', bad, repo_id='a/b')
    (sweep / 'vit_tiny_noattn' / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes((sweep / 'vit_tiny_noattn' / 'model.safetensors').read_bytes())
    with pytest.raises(ValueError, match='no bottleneck weights'):
        timm.create_model(f'local-dir:{bad}', pretrained=True)
    assert not list(tmp_path.glob('.*'))  # no staging folders left behind
