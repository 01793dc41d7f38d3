"""Nothing lost, nothing silently wrong: run folders, checkpoints and export under bad input, damage and kills.

One tiny finished run (2 epochs, several checkpoints) is trained once and copied where a test damages it.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_vib import information_loss, information_per_sample, training
from timm_vib.checkpoints import MANIFEST_NAME, verify_checkpoint
from timm_vib.estimators import mutual_information, qk_svd, repetition_probe
from timm_vib.files import atomic_write_text, umask_mode
from timm_vib.hub import export

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'vit_tiny_vib_b1', '--data', 'digits', '--batch-size', '16', '--seed', '0', '--no-progress',
        '--max-train-samples', '256', '--max-val-samples', '65', '--epochs', '2', '--checkpoint-every', '5',
        '--keep-checkpoints', '3',
        '--model-kwargs', 'depth=2', 'img_size=16', 'patch_size=4', 'embed_dim=48', 'num_heads=3', 'vib_dim=4']


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A finished run in a sweep folder beside another file, trained under umask 022."""
    old = os.umask(0o022)
    try:
        sweep = tmp_path_factory.mktemp('sweep')
        (sweep / 'notes.txt').write_text('the sweep folder holds more than this run\n')
        torch.set_num_threads(1)
        return training.train(training.parse_args([*TINY, '--output', str(sweep / 'b1')]))
    finally:
        os.umask(old)


def snapshot(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def unfinished_copy(run: Path, dest: Path) -> Path:
    """The run as it was before its final write: checkpoints, metrics, run_config; no summary, no weights."""
    shutil.copytree(run, dest)
    for name in ('summary.json', 'model.safetensors', 'config.json'):
        (dest / name).unlink()
    return dest


# --- 1, 2: export writes only its own files, and only weights that load ------------------------------

def test_export_never_deletes_what_it_did_not_write(run, tmp_path):
    sweep = run.parent
    before = snapshot(sweep)
    for dest in (sweep, run, sweep.parent):  # the run's own folder and its ancestors
        with pytest.raises(ValueError, match='parents'):
            export(run, dest)
    (tmp_path / 'afile').write_text('mine')
    with pytest.raises(ValueError, match='not a folder'):
        export(run, tmp_path / 'afile')
    assert (tmp_path / 'afile').read_text() == 'mine'
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'keep.txt').write_text('not written by export')
    with pytest.raises(ValueError, match='not an earlier export.*--overwrite'):
        export(run, other)
    assert sorted(p.name for p in other.iterdir()) == ['keep.txt']
    # --overwrite replaces export's own files, and leaves the rest alone
    export(run, other, overwrite=True)
    assert (other / 'keep.txt').read_text() == 'not written by export'
    assert (other / 'model.safetensors').read_bytes() == (run / 'model.safetensors').read_bytes()
    # an earlier export of this run is updated in place; of another run (other summary) it is refused
    hub = export(run, tmp_path / 'hub')
    export(run, hub)
    assert sorted(p.name for p in hub.iterdir()) == sorted(
        ['README.md', 'config.json', 'metrics.jsonl', 'model.safetensors', 'run_config.json', 'summary.json'])
    (hub / 'summary.json').write_text('{"val_top1": 1.0}\n')
    with pytest.raises(ValueError, match='not an earlier export'):
        export(run, hub)
    assert snapshot(sweep) == before


def test_export_refuses_weights_that_do_not_load(run, tmp_path):
    bad = tmp_path / 'sweep' / 'b1'
    shutil.copytree(run, bad)
    data = (bad / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(data[:100])
    with pytest.raises(ValueError, match='model.safetensors'):
        export(bad, tmp_path / 'hub')
    assert not (tmp_path / 'hub').exists()
    # a whole file of the wrong size for the recorded architecture
    (bad / 'model.safetensors').write_bytes(data)
    cfg = (bad / 'config.json').read_text()
    (bad / 'config.json').write_text(cfg.replace('"embed_dim": 48', '"embed_dim": 96'))
    with pytest.raises(ValueError, match='does not fit'):
        export(bad, tmp_path / 'hub')
    assert not (tmp_path / 'hub').exists()


# --- 11: files follow the umask -------------------------------------------------------------------

def test_run_and_export_files_follow_the_umask(run, tmp_path):
    for p in [run, *run.rglob('*')]:
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    old = os.umask(0o027)
    try:
        hub = export(run, tmp_path / 'hub')
        atomic_write_text(tmp_path / 'x.txt', 'x')
    finally:
        os.umask(old)
    for p in [hub, *hub.rglob('*')]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p
    assert stat.S_IMODE((tmp_path / 'x.txt').stat().st_mode) == 0o640


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reading the umask without setting it needs Linux')
def test_reading_the_umask_does_not_change_it(monkeypatch):
    """Setting the umask for an instant to read it would give a file another thread creates then the wrong
    mode (the sweep writes run markers from several threads); where Linux reports it, it is only read."""
    old = os.umask(0o027)
    try:
        def no_setting(mask):
            raise AssertionError('the umask was set to read it')
        monkeypatch.setattr(os, 'umask', no_setting)
        assert umask_mode() == 0o640 and umask_mode(directory=True) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


# --- 6, 7: damaged checkpoints, temporary files -------------------------------------------------------

def checkpoints_of(run: Path):
    return sorted(p for p in (run / 'checkpoints').glob('ckpt-*'))


@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'train_state.json'])
def test_a_truncated_checkpoint_file_is_named(run, tmp_path, name):
    ckpt = shutil.copytree(checkpoints_of(run)[-1], tmp_path / 'ckpt')
    assert verify_checkpoint(ckpt)['epoch'] == 2
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=name.replace('.', r'\.')):
        verify_checkpoint(ckpt)
    (ckpt / name).unlink()
    with pytest.raises(ValueError, match=f'{name}.* missing'):
        verify_checkpoint(ckpt)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_cleans_temporaries(run, tmp_path):
    b = unfinished_copy(run, tmp_path / 'b')
    newest, older = checkpoints_of(b)[-1], checkpoints_of(b)[-2]
    assert not older.name.endswith('-000000')  # mid-epoch 2: the rest of the epoch is trained again
    pkl = newest / 'random_states_0.pkl'
    pkl.write_bytes(pkl.read_bytes()[:-100])  # resumed silently to other weights before
    leftovers = [b / '.save-x1y2', b / '.metrics.jsonl.abc.tmp', b / 'checkpoints' / '.tmp-ckpt-000000099-00001-000000',
                 b / '.model.safetensors.tmp']
    leftovers[0].mkdir()
    (leftovers[0] / 'model.safetensors').write_bytes(b'x' * 1000)
    leftovers[1].write_text('{"epoch": 1')
    leftovers[2].mkdir()
    leftovers[3].write_bytes(b'x')
    with pytest.warns(UserWarning, match=f'{newest.name}.*random_states_0.pkl.*resuming from .*{older.name}'):
        training.train(training.parse_args([*TINY, '--output', str(b), '--resume']))
    a_w, b_w = load_file(run / 'model.safetensors'), load_file(b / 'model.safetensors')
    assert all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    assert (run / 'metrics.jsonl').read_text() == (b / 'metrics.jsonl').read_text()
    assert not any(p.exists() for p in leftovers)


def test_no_intact_checkpoint_fails_naming_the_files(run, tmp_path):
    b = unfinished_copy(run, tmp_path / 'b')
    for ckpt in checkpoints_of(b):
        (ckpt / 'optimizer.bin').write_bytes(b'')
    with pytest.raises(ValueError, match='no intact checkpoint.*optimizer.bin'):
        training.train(training.parse_args([*TINY, '--output', str(b), '--resume']))
    # an explicit checkpoint is verified too
    with pytest.raises(ValueError, match='optimizer.bin'):
        training.train(training.parse_args([*TINY, '--output', str(b), '--resume', str(checkpoints_of(b)[0])]))


def test_checkpoints_carry_a_manifest_written_last(run):
    for ckpt in checkpoints_of(run):
        files = sorted(p.name for p in ckpt.iterdir())
        assert MANIFEST_NAME in files
        written = (ckpt / MANIFEST_NAME).stat().st_mtime_ns
        assert all(p.stat().st_mtime_ns <= written for p in ckpt.iterdir())


# --- 8, 9, 10, 12: the model side -------------------------------------------------------------------

@pytest.mark.parametrize('kwargs', [dict(img_size=28), dict(img_size=18, patch_size=4), dict(img_size=(16, 18), patch_size=4)])
def test_patches_must_tile_the_image(kwargs):
    with pytest.raises(ValueError, match='not a multiple of patch_size'):
        timm.create_model('vit_tiny_vib', depth=1, **kwargs)
    # padded to the patch grid, it is fine: 18 px -> 5 x 5 patches of 4 px
    m = timm.create_model('vit_tiny_vib', depth=1, img_size=18, patch_size=4, dynamic_img_pad=True,
                          dynamic_img_size=True)
    assert m(torch.randn(1, 3, 18, 18), return_kl=True)[1].shape[-1] == 25


def test_training_refuses_an_image_the_default_patch_does_not_tile(tmp_path):
    args = training.parse_args(['--model', 'vit_tiny_vib_b1', '--epochs', '1', '--output', str(tmp_path / 'r'),
                                '--max-train-samples', '16', '--max-val-samples', '16',
                                '--model-kwargs', 'depth=1', 'img_size=28'])
    with pytest.raises(ValueError, match='28x28 is not a multiple of patch_size 16x16'):
        training.train(args)


def test_training_checks_the_patch_grid_as_the_model_does(tmp_path):
    """Refused before any data is read when the patches do not tile the image; accepted, as by the
    model, when the model pads the image to the patch grid."""
    argv = ['--model', 'vit_tiny_vib_b1', '--output', str(tmp_path / 'r'), '--model-kwargs', 'img_size=18', 'patch_size=4']
    with pytest.raises(ValueError, match='18x18 is not a multiple of patch_size 4x4'):
        training._resolve(training.parse_args(argv))
    _, _, img_size = training._resolve(training.parse_args(argv + ['dynamic_img_pad=True']))
    assert img_size == 18


def test_missing_pretrained_weights_say_where_weights_come_from(tmp_path):
    code = ('import timm, timm_vib\n'
            'try:\n'
            '    timm.create_model("vit_tiny_vib_b4", pretrained=True)\n'
            'except FileNotFoundError as e:\n'
            '    print(type(e).__name__, e)\n')
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf'), 'PYTHONPATH': str(ROOT),
           'OMP_NUM_THREADS': '1'}
    env.pop('TIMM_VIB_HUB_NAMESPACE', None)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    msg = out.stdout
    assert msg.startswith('LocalEntryNotFoundError')  # still what callers of timm catch
    for needed in ('timm-vib/vit_tiny_vib_b4.in100', 'TIMM_VIB_HUB_NAMESPACE', 'local-dir:', 'timm-vib sweep', 'push'):
        assert needed in msg, (needed, msg)


@pytest.mark.parametrize('name', ['vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap'])
@pytest.mark.parametrize('vib_hidden', [64, 0])
def test_a_batch_of_no_images_gives_an_empty_result(name, vib_hidden):
    m = timm.create_model(name, depth=2, img_size=16, patch_size=4, num_classes=7, vib_hidden=vib_hidden)
    x = torch.randn(3, 3, 16, 16)
    for fold in (True, False):
        for blk in m.blocks:
            if hasattr(getattr(blk, 'attn', None), 'fold_projections'):
                blk.attn.fold_projections = fold
        for mode in (True, False):
            m.train(mode)
            with torch.no_grad():
                assert m(x[:0]).shape == (0, 7)
                if name != 'vit_tiny_gap':
                    logits, kl = m(x[:0], return_kl=True)
                    assert logits.shape == (0, 7) and kl.shape == (0, 2, 3, 16)
                    assert m(x, return_kl=True)[1].shape == (3, 2, 3, 16)
    with pytest.raises(ValueError, match='0 images'):
        information_loss(torch.zeros(0, 2, 3, 16))
    assert information_per_sample(torch.zeros(0, 2, 3, 16)).shape == (0,)


@pytest.mark.parametrize('bad', [True, '2', [1.0]])
def test_beta_is_a_number_not_a_flag_or_a_string(bad):
    with pytest.raises(ValueError, match='beta must be a number'):
        timm.create_model('vit_tiny_vib', depth=1, img_size=16, patch_size=4, beta=bad)
    m = timm.create_model('vit_tiny_vib', depth=1, img_size=16, patch_size=4, beta=np.float32(0.5))
    assert m.beta == 0.5 and isinstance(m.beta, float)
    with pytest.raises(ValueError, match='beta must be a number'):
        m.beta = bad


def test_corrupt_weights_in_a_local_dir_are_named(run, tmp_path):
    folder = tmp_path / 'm'
    folder.mkdir()
    shutil.copy(run / 'config.json', folder / 'config.json')
    (folder / 'model.safetensors').write_bytes((run / 'model.safetensors').read_bytes()[:100])
    with pytest.raises(ValueError, match=f'{folder / "model.safetensors"}.*corrupt'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(ValueError, match='is a file'):
        training.train(training.parse_args(['--epochs', '1', '--output', str(tmp_path / 'f')]))
    assert (tmp_path / 'f').read_text() == 'x'


def test_qk_svd_of_a_model_without_transformer_blocks_is_a_clear_error():
    for model in (timm.create_model('resnet10t'), torch.nn.Linear(3, 3)):
        with pytest.raises(ValueError, match='no transformer blocks'):
            qk_svd(model)


def test_repetition_probe_indices():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_vib', vib_dim=4, img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    # negative layer / head count from the end, as in Python: the same as the positive ones
    torch.testing.assert_close(repetition_probe(m, x, [2, 7], [(-1, -1)], n_copies=(4,)),
                               repetition_probe(m, x, [2, 7], [(1, 2)], n_copies=(4,)), rtol=0, atol=0)
    assert repetition_probe(m, x, [2, 7], [(-1, -1)], n_copies=(4,)).shift.abs().sum() > 0
    with pytest.raises(ValueError, match='patch indices must be integers'):
        repetition_probe(m, x, [3.7, 1], [(0, 0)])
    with pytest.raises(ValueError, match='integers'):
        repetition_probe(m, x, [3, 1], [(0.5, 0)])
    assert repetition_probe(m, x, [3.0, 1.0], [(0, 0)], n_copies=(4,)).shift.shape == (2, 1, 1, 4)


@pytest.mark.parametrize('logvar', [-40.0, -50.0, -200.0])
def test_mutual_information_of_near_deterministic_heads_is_log_of_the_point_count(logvar):
    # well-separated points, vanishing noise: u identifies x, so I(X; U) = H(X) = log L
    torch.manual_seed(0)
    mu = torch.randn(50, 2) * 3
    est = mutual_information(mu, torch.full((50, 2), logvar), n_samples=1000)
    assert est.value == pytest.approx(np.log(50), abs=1e-9)


# --- 3: numeric options ------------------------------------------------------------------------------

@pytest.mark.parametrize('flag, value, match', [
    ('--clip-grad', '-1', 'clip-grad must be >0'), ('--clip-grad', '0', 'clip-grad must be >0'),
    ('--clip-grad', 'nan', 'clip-grad must be a finite'), ('--lr', 'inf', 'lr must be a finite'),
    ('--lr', 'nan', 'lr must be a finite'), ('--warmup-epochs', 'nan', 'warmup-epochs must be a finite'),
    ('--beta-warmup-epochs', 'nan', 'beta-warmup-epochs must be a finite'), ('--min-lr', '-1e-6', 'min-lr must be >= 0'),
    ('--min-lr', '1', 'above --lr'), ('--weight-decay', 'inf', 'weight-decay must be a finite'),
    ('--weight-decay', '-0.1', 'weight-decay must be >= 0'), ('--beta', 'nan', 'beta must be a finite'),
    ('--max-train-samples', '0', 'max-train-samples must be >= 1'), ('--seed', '-1', 'seed must be >= 0'),
    ('--seed', str(2 ** 32), 'seed must be < 2'), ('--warmup-epochs', '-1', 'warmup-epochs must be >= 0'),
])
def test_numeric_options_must_be_finite_and_in_range(tmp_path, flag, value, match):
    args = training.parse_args(['--epochs', '1', '--output', str(tmp_path / 'r'), f'{flag}={value}'])
    with pytest.raises(ValueError, match=match):
        training.train(args)
    assert not (tmp_path / 'r').exists()


# --- 5: --resume continues the same run, or says why not -----------------------------------------

def test_resume_with_other_arguments_is_an_error(run, tmp_path):
    before = snapshot(run)
    with pytest.raises(ValueError, match=r'--epochs 2 \(run\) vs 3 \(now\)'):
        training.train(training.parse_args([*TINY, '--output', str(run), '--resume', '--epochs', '3']))
    # the same arguments (where and how it reports may differ): the finished run as it is
    assert training.train(training.parse_args([*TINY, '--output', str(run), '--resume', '--log-interval', '3'])) == run
    assert snapshot(run) == before
    b = unfinished_copy(run, tmp_path / 'b')
    for extra, flag in ((['--clip-grad', '1'], '--clip-grad'), (['--min-lr', '1e-5'], '--min-lr'),
                        (['--beta-warmup-epochs', '0'], '--beta-warmup-epochs'), (['--eval-z', 'mean'], '--eval-z'),
                        (['--mixed-precision', 'bf16'], '--mixed-precision')):
        with pytest.raises(ValueError, match=f'differ.*{flag} '):
            training.train(training.parse_args([*TINY, '--output', str(b), '--resume', *extra]))
    assert (b / 'run_config.json').read_bytes() == (run / 'run_config.json').read_bytes()


# --- kill -9 at any moment: the next command completes exactly, or fails naming the problem ---------

KILLERS = {
    # mid-step: after the forward pass of update 23, before its backward (4 steps after the checkpoint of step 20)
    'mid-step': '''
import accelerate
_orig, _n = accelerate.Accelerator.backward, [0]
def _backward(self, loss, **kw):
    _n[0] += 1
    if _n[0] == 23:
        die()
    return _orig(self, loss, **kw)
accelerate.Accelerator.backward = _backward
''',
    # during a checkpoint write: half of the optimizer state of the second checkpoint (step 10) on disk
    'checkpoint-write': '''
import io, torch
_orig, _n = torch.save, [0]
def _save(obj, f, *a, **kw):
    if isinstance(f, (str, os.PathLike)) and str(f).endswith('optimizer.bin'):
        _n[0] += 1
        if _n[0] == 2:
            buf = io.BytesIO()
            _orig(obj, buf)
            open(f, 'wb').write(buf.getvalue()[:len(buf.getvalue()) // 2])
            die()
    return _orig(obj, f, *a, **kw)
torch.save = _save
''',
    # during the final write: the final weights written to the staging folder, not yet renamed into place
    'final-write': '''
import timm_vib.checkpoints as _c
_orig = _c.save_for_hf
def _save_for_hf(*a, **kw):
    _orig(*a, **kw)
    die()
_c.save_for_hf = _save_for_hf
''',
    # during export: the card half-written in the staging folder
    'export': '''
import huggingface_hub
def _card_save(self, path):
    open(path, 'w').write(str(self)[:100])
    die()
huggingface_hub.ModelCard.save = _card_save
''',
}


def killed(point: str, argv, cwd: Path):
    """Run ``timm-vib ARGV`` in a process that SIGKILLs itself at ``point``; returns the CompletedProcess."""
    code = ('import os, signal, sys\n'
            'def die():\n'
            '    os.kill(os.getpid(), signal.SIGKILL)\n'
            + KILLERS[point] +
            'from timm_vib.cli import main\n'
            f'sys.exit(main({[str(a) for a in argv]!r}))\n')
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def outside(root: Path, *inside: Path):
    return {k: v for k, v in snapshot(root).items() if not any((root / k).is_relative_to(p) for p in inside)}


@pytest.mark.parametrize('point', ['mid-step', 'checkpoint-write', 'final-write'])
def test_training_killed_at_any_point_resumes_exactly(run, tmp_path, point):
    (tmp_path / 'beside.txt').write_text('a file next to the run')
    b = tmp_path / 'b'
    before = outside(tmp_path, b)
    p = killed(point, ['train', *TINY, '--output', b], tmp_path)
    assert p.returncode == -9, p.stderr[-3000:]
    assert not (b / 'summary.json').exists()
    training.train(training.parse_args([*TINY, '--output', str(b), '--resume']))
    a_w, b_w = load_file(run / 'model.safetensors'), load_file(b / 'model.safetensors')
    assert a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    assert (run / 'metrics.jsonl').read_text() == (b / 'metrics.jsonl').read_text()
    # nothing of the interrupted writes is left, and nothing outside the run folder changed
    assert not [q for q in b.rglob('.*')], list(b.rglob('.*'))
    assert outside(tmp_path, b) == before


def test_export_killed_midway_is_completed_by_the_next_export(run, tmp_path):
    (tmp_path / 'beside.txt').write_text('a file next to the export')
    hub = tmp_path / 'hub'
    before_run, before = snapshot(run), outside(tmp_path, hub)
    p = killed('export', ['export', run, hub], tmp_path)
    assert p.returncode == -9, p.stderr[-3000:]
    assert not (hub / 'README.md').exists()  # the card never reaches the folder half-written
    export(run, hub)
    assert sorted(q.name for q in hub.iterdir()) == sorted(
        ['README.md', 'config.json', 'metrics.jsonl', 'model.safetensors', 'run_config.json', 'summary.json'])
    assert (hub / 'model.safetensors').read_bytes() == (run / 'model.safetensors').read_bytes()
    assert snapshot(run) == before_run and outside(tmp_path, hub) == before


def test_json_files_hold_null_for_non_finite_numbers(tmp_path):
    from timm_vib.files import atomic_write_json, json_line
    obj = {'loss': float('nan'), 'nested': [1.5, float('inf'), {'x': -float('inf')}], 'n': 3}
    atomic_write_json(tmp_path / 'a.json', obj)
    text = (tmp_path / 'a.json').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text) == {'loss': None, 'nested': [1.5, None, {'x': None}], 'n': 3}
    assert json.loads(json_line(obj)) == json.loads(text) and json_line(obj).count('\n') == 1


# --- 4: non-finite training stops, naming the step and the last good checkpoint ---------------------

def test_non_finite_loss_stops_training_naming_step_and_checkpoint(tmp_path):
    out = tmp_path / 'r'
    args = training.parse_args([*TINY, '--lr', '1e6', '--output', str(out), '--checkpoint-every', '1',
                                '--log-interval', '4'])
    with pytest.raises(training.NonFiniteLossError, match=r'non-finite.* at optimizer step (\d+) .*last good checkpoint is') as e:
        training.train(args)
    step = int(re.search(r'optimizer step (\d+)', str(e.value)).group(1))
    last = re.search(r'checkpoint is (\S+) ', str(e.value)).group(1)
    # checkpoints are written every step while the loss is finite: the last one is the step before
    assert Path(last).name.startswith(f'ckpt-{step - 1:09d}-')
    assert [p.name for p in checkpoints_of(out)][-1] == Path(last).name
    assert not (out / 'summary.json').exists() and not (out / 'model.safetensors').exists()
    for ckpt in checkpoints_of(out):  # no checkpoint holds diverged weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / 'model.safetensors').values())
    # the CLI says the same in one line
    p = subprocess.run([sys.executable, '-m', 'timm_vib.cli', 'train', *TINY, '--lr', '1e6', '--output',
                        str(tmp_path / 'cli')], env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and 'non-finite' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]


def test_analyze_writes_a_whole_report_or_none(run, tmp_path, monkeypatch):
    from timm_vib import report
    small = dict(max_images=32, batch_size=32, nmi_samples=200, nmi_points=64, probe_patches=4, progress=False)
    out = tmp_path / 'report'

    def broken(*a, **kw):
        raise RuntimeError('an estimator failed half-way')

    with monkeypatch.context() as m:
        m.setattr(report, 'fig_survival', broken)
        with pytest.raises(RuntimeError, match='half-way'):
            report.analyze([run], out, **small)
    assert list(out.iterdir()) == []  # no partial report (and no staging folder) left
    index = report.analyze([run], out, **small)
    assert index == out / 'index.html' and index.is_file()
    before = snapshot(out)
    assert 'captions.json' in {p.name for p in out.iterdir()} and not [p for p in out.iterdir() if p.name.startswith('.')]
    with monkeypatch.context() as m:
        m.setattr(report, 'fig_survival', broken)
        with pytest.raises(RuntimeError, match='half-way'):
            report.analyze([run], out, **small)
    assert snapshot(out) == before  # the previous report, whole


def test_analyze_refuses_missing_devices_and_diverged_runs(run, tmp_path):
    from timm_vib import report
    with pytest.raises(ValueError, match='not a torch device'):
        report.analyze([run], tmp_path / 'r', device='gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='no CUDA device'):
            report.analyze([run], tmp_path / 'r', device='cuda')
    bad = shutil.copytree(run, tmp_path / 'sweep' / 'diverged')
    summary = json.loads((bad / 'summary.json').read_text())
    (bad / 'summary.json').write_text(json.dumps({**summary, 'val_top1': None}))
    with pytest.raises(ValueError, match='diverged.*diverged'):
        report.analyze([bad], tmp_path / 'r')
    assert not (tmp_path / 'r').exists()
    with pytest.raises(ValueError, match='no finite val_top1'):
        export(bad, tmp_path / 'hub')
    assert not (tmp_path / 'hub').exists()
