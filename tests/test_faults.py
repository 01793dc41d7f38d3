"""Nothing lost, nothing silently wrong: run folders, checkpoints and export under bad input, damage and kills.

One tiny finished run (2 epochs, several checkpoints) is trained once and copied where a test damages it.
"""
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_vib import training
from timm_vib.checkpoints import MANIFEST_NAME, verify_checkpoint
from timm_vib.files import atomic_write_text
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
