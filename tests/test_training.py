"""Training through Accelerate on CPU: learning, run files, exact resume after a SIGKILL, two gloo
processes, the sweep, the data readers and clear errors for bad input."""
import gzip
import math
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_vib.checkpoints import load_model
from timm_vib.data import build_datasets, load_run_dataset, read_class_list, read_idx, write_idx
from timm_vib.sweep import run_sweep
from timm_vib.training import parse_args, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model-kwargs', 'depth=1', 'img_size=16', 'patch_size=4', 'embed_dim=48',
        '--batch-size', '32', '--warmup-epochs', '1', '--no-progress']
SMALL_DATA = ['--max-train-samples', '256', '--max-val-samples', '65']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1')


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: more threads only contend
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*argv, check=True):
    p = subprocess.run([sys.executable, '-m', 'timm_vib.cli', *argv], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('run') / 'b0p01'
    args = parse_args(['--model', 'vit_tiny_vib_b0p01', *TINY, '--batch-size', '16', '--lr', '2e-3', '--epochs', '5',
                       '--stochastic-eval', '2', '--checkpoint-every', '20', '--output', str(out)])
    torch.set_num_threads(1)
    return train(args)


def test_tiny_model_learns_digits_and_writes_every_file(digits_run):
    out = digits_run
    for name in ('run_config.json', 'metrics.jsonl', 'model.safetensors', 'config.json', 'summary.json'):
        assert (out / name).is_file(), name
    assert len(list((out / 'checkpoints').glob('ckpt-*'))) == 2  # latest 2 kept
    assert not list((out / 'checkpoints').glob('.tmp-*'))
    rows = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2, 3, 4, 5]
    for key in ('step', 'lr', 'train_loss', 'train_ce', 'val_loss', 'val_ce', 'val_top1', 'val_top5', 'nats_per_image',
                'nats_per_patch', 'head_kl', 'active_heads', 'stochastic_top1_mean', 'stochastic_top1_std'):
        assert key in rows[-1], key
    s = json.loads((out / 'summary.json').read_text())
    assert s['val_top1'] > 30, s['val_top1']  # chance is 10% (about 40% after these 5 short epochs)
    assert rows[-1]['val_count'] == 360
    assert np.array(s['head_kl']).shape == (1, 3)
    assert s['nats_per_patch'] == pytest.approx(s['nats_per_image'] / 16, rel=1e-5)
    assert s['num_active_heads'] == len(s['active_heads'])
    assert s['stochastic_eval']['k'] == 2 and s['train_samples_per_second'] > 0
    assert (s['beta'], s['attn_mode'], s['depth'], s['num_heads'], s['vib_dim'], s['world_size']) == (0.01, 'vib', 1, 3, 32, 1)
    cfg = json.loads((out / 'run_config.json').read_text())
    # beta warm-up: 10% of the epochs by default (the reference script: 100 of 1000), linear
    assert cfg['kl_reduction'] == 'mean' and cfg['beta_warmup_epochs'] == 0.5 and cfg['num_classes'] == 10
    assert cfg['beta_schedule'] == 'linear' and [r['beta'] for r in rows] == [0.01] * 5
    # the sampled validation passes run after the last epoch only
    assert 'stochastic_top1_mean' in rows[-1] and not any('stochastic_top1_mean' in r for r in rows[:-1])
    # --mixed-precision auto, as documented: off on the CPU, bf16 on a GPU that has it, else fp16
    if cfg['device'] == 'cpu':
        assert cfg['mixed_precision'] == 'no'
    else:
        assert cfg['device'].startswith('cuda')
        assert cfg['mixed_precision'] == ('bf16' if torch.cuda.is_bf16_supported() else 'fp16')
    assert cfg['world_size'] == 1
    # the final weights reload, with the data config of digits
    m = load_model(out).eval()
    assert m.beta == 0.01 and tuple(m.pretrained_cfg['mean']) == (0.5, 0.5, 0.5)
    val = load_run_dataset(out, 'val', normalize=False)
    x, y = val[0]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1 and len(val) == 360


def test_resume_after_sigkill_mid_epoch_gives_identical_weights(tmp_path):
    common = ['train', '--model', 'vit_tiny_vib_b1', *TINY, *SMALL_DATA, '--epochs', '3', '--checkpoint-every', '5',
              '--stochastic-eval', '1']
    run_cli(*common, '--output', str(tmp_path / 'a'))
    one_pass = json.loads((tmp_path / 'a' / 'summary.json').read_text())['stochastic_eval']
    assert one_pass['k'] == 1 and one_pass['top1_std'] is None and one_pass['nats_per_image_std'] is None  # no spread
    killed = run_cli(*common, '--output', str(tmp_path / 'b'), '--kill-at-step', '13', check=False)
    assert killed.returncode == -9  # a real SIGKILL, 3 steps after the checkpoint of step 10 (mid-epoch 2)
    assert not (tmp_path / 'b' / 'summary.json').exists()
    # without --resume an unfinished run is refused
    p = run_cli(*common, '--output', str(tmp_path / 'b'), check=False)
    assert p.returncode == 2 and '--resume' in p.stderr
    run_cli(*common, '--output', str(tmp_path / 'b'), '--resume')
    a, b = load_file(tmp_path / 'a' / 'model.safetensors'), load_file(tmp_path / 'b' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / 'a' / 'metrics.jsonl').read_text() == (tmp_path / 'b' / 'metrics.jsonl').read_text()


def test_bf16_autocast_on_cpu_trains_and_resumes_exactly(tmp_path):
    """--mixed-precision bf16 --cpu (Accelerate's CPU autocast): finite losses, the KL in float32 while
    the rest of the model runs in bfloat16, and a SIGKILL mid-run resumed to the same weights."""
    import timm
    model = timm.create_model('vit_tiny_vib_b1', num_classes=10, depth=1, img_size=16, patch_size=4, embed_dim=48)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, kl = model(torch.randn(2, 3, 16, 16), return_kl=True)
    assert logits.dtype == torch.bfloat16 and kl.dtype == torch.float32  # autocast is on, the KL stays exact
    common = ['train', '--model', 'vit_tiny_vib_b1', *TINY, *SMALL_DATA, '--epochs', '2', '--checkpoint-every', '3',
              '--mixed-precision', 'bf16', '--cpu']
    run_cli(*common, '--output', str(tmp_path / 'a'))
    killed = run_cli(*common, '--output', str(tmp_path / 'b'), '--kill-at-step', '5', check=False)
    assert killed.returncode == -9
    run_cli(*common, '--output', str(tmp_path / 'b'), '--resume')
    cfg = json.loads((tmp_path / 'a' / 'run_config.json').read_text())
    assert cfg['mixed_precision'] == 'bf16' and cfg['device'] == 'cpu'
    rows = [json.loads(ln) for ln in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    assert all(math.isfinite(r[k]) for r in rows for k in ('train_loss', 'val_loss', 'nats_per_image'))
    a, b = load_file(tmp_path / 'a' / 'model.safetensors'), load_file(tmp_path / 'b' / 'model.safetensors')
    assert all(v.dtype == torch.float32 for v in a.values())  # autocast computes in bf16, keeps float32 weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / 'a' / 'metrics.jsonl').read_text() == (tmp_path / 'b' / 'metrics.jsonl').read_text()


def test_the_loop_reads_the_device_per_epoch_not_per_step(tmp_path, monkeypatch):
    """No host synchronisation per step: the number of device reads (.item(), .tolist(), float(),
    bool()) of a run does not grow with its number of steps per epoch (progress off)."""
    # not counted: reads of tensors that live on the host by design (augmentation parameters sampled
    # in the data pipeline, and Adam's step counter, which torch keeps on the CPU)
    host_side = ('/torchvision/transforms/', '/torch/utils/data/', '/torch/optim/', '/timm_vib/data.py')
    reads = {'n': 0}
    for name in ('item', 'tolist', '__float__', '__bool__', '__int__'):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            f = sys._getframe(1)
            while f is not None and not any(h in f.f_code.co_filename for h in host_side):
                f = f.f_back
            reads['n'] += f is None
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def run(samples):
        reads['n'] = 0
        train(parse_args(['--model', 'vit_tiny_vib_b1', *TINY, '--max-train-samples', str(samples),
                          '--max-val-samples', '32', '--epochs', '2', '--output', str(tmp_path / str(samples))]))
        return reads['n']

    few, many = run(64), run(320)  # 2 and 10 steps per epoch
    assert few == many, (few, many)


def test_on_a_gpu_machine_auto_precision_follows_the_device_and_too_many_processes_are_refused(tmp_path, monkeypatch):
    """As on a machine with one GPU (torch.cuda answers so; nothing reaches a device): --mixed-precision
    auto is bf16 on a GPU that has it, fp16 on one that does not, off with --cpu; and more processes on
    the node than GPUs stop with a message naming both counts, before NCCL would."""
    from timm_vib import training
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    for bf16, expected in ((True, 'bf16'), (False, 'fp16')):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
        assert training._mixed_precision('auto', cpu=False) == expected
        assert training._mixed_precision('auto', cpu=True) == 'no'
        assert training._mixed_precision('fp16', cpu=False) == 'fp16'  # an explicit choice stays
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun --nproc_per_node 2
    with pytest.raises(ValueError, match=r'2 processes on this node but 1 GPU\(s\).*--cpu'):
        train(parse_args(['--model', 'vit_tiny_vib_b1', *TINY, '--max-train-samples', '64', '--epochs', '1',
                          '--output', str(tmp_path / 'gpu')]))
    training._check_processes_per_gpu(cpu=True)  # CPU processes (gloo) need no GPU
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    training._check_processes_per_gpu(cpu=False)


def test_cpu_processes_meet_at_a_barrier_that_names_no_gpu(monkeypatch):
    """Between CPU processes (gloo) the trainer's barrier passes no GPU index: Accelerate's own passes the
    process's, and where CUDA is present (an H100 machine, torch 2.11) torch ran it on that GPU, which
    failed for process 1 of 2 on a one-GPU machine. Other set-ups keep Accelerate's barrier."""
    from accelerate.utils import DistributedType
    from timm_vib import training
    calls = []
    monkeypatch.setattr(torch.distributed, 'barrier', lambda *a, **k: calls.append(('torch', a, k)))

    class Acc:
        def wait_for_everyone(self):
            calls.append(('accelerate',))
    acc = Acc()
    acc.distributed_type = DistributedType.MULTI_CPU
    training._wait_for_everyone(acc)
    acc.distributed_type = DistributedType.MULTI_GPU
    training._wait_for_everyone(acc)
    assert calls == [('torch', (), {}), ('accelerate',)]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one device and precision per process: these tests change them, so each starts
    and leaves a clean state, passing or failing (Accelerate's own tests reset it the same way)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield AcceleratorState._reset_state
    AcceleratorState._reset_state(True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_on_a_gpu_every_precision_trains_and_cpu_stays_on_the_cpu(tmp_path, fresh_accelerate_state):
    """On a real GPU: auto (bf16 where supported), fp16 with Accelerate's gradient scaling and float32 all
    learn digits with finite losses and KL, at the settings with which the CPU run of digits_run passes 30%;
    --cpu on the same machine trains on the CPU without autocast."""
    tops = {}
    for mp in ('auto', 'fp16', 'no'):
        fresh_accelerate_state(True)
        out = train(parse_args(['--model', 'vit_tiny_vib_b0p01', *TINY, '--batch-size', '16', '--lr', '2e-3',
                                '--epochs', '5', '--mixed-precision', mp, '--output', str(tmp_path / mp)]))
        cfg = json.loads((out / 'run_config.json').read_text())
        assert cfg['device'].startswith('cuda')
        assert cfg['mixed_precision'] == {'auto': 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'}.get(mp, mp)
        rows = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
        assert all(math.isfinite(r[k]) for r in rows for k in ('train_loss', 'val_loss', 'nats_per_image'))
        tops[mp] = json.loads((out / 'summary.json').read_text())['val_top1']
        assert all(v.dtype == torch.float32 for v in load_file(out / 'model.safetensors').values())
    assert min(tops.values()) > 30, tops  # chance is 10%
    fresh_accelerate_state(True)
    out = train(parse_args(['--model', 'vit_tiny_vib_b1', *TINY, *SMALL_DATA, '--epochs', '1', '--cpu',
                            '--output', str(tmp_path / 'cpu')]))
    cfg = json.loads((out / 'run_config.json').read_text())
    assert (cfg['device'], cfg['mixed_precision']) == ('cpu', 'no')


def test_two_gloo_processes_with_torchrun(tmp_path):
    out = tmp_path / 'ddp'
    p = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29613',
         'examples/train.py', '--model', 'vit_tiny_vib_b1', *TINY, *SMALL_DATA, '--epochs', '2',
         '--checkpoint-every', '3', '--cpu', '--output', str(out)],  # --cpu: gloo also where a GPU is
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['steps'] == 8  # 256 images / (2 x 32) per step, 2 epochs
    rows = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all(r['val_count'] == 65 for r in rows)  # 65 images on 2 processes: none counted twice
    ckpt = sorted((out / 'checkpoints').glob('ckpt-*'))[-1]
    assert {f.name for f in ckpt.glob('random_states_*.pkl')} == {'random_states_0.pkl', 'random_states_1.pkl'}


def test_sweep_trains_the_spectrum_and_skips_finished_runs(tmp_path):
    from timm_vib.cli import build_parser
    argv = ['sweep', '--betas', '0,2', *TINY, '--max-train-samples', '64', '--max-val-samples', '32',
            '--epochs', '1', '--output', str(tmp_path)]
    args = build_parser().parse_args(argv)
    runs = run_sweep(args)
    assert [r.name for r in runs] == ['vit_tiny_noattn', 'vit_tiny_vib_b0', 'vit_tiny_vib_beta2', 'vit_tiny_gap']
    table = json.loads((tmp_path / 'sweep.json').read_text())
    assert [t['nats_per_image'] is None for t in table] == [False, False, False, True]
    assert table[0]['nats_per_image'] == 0 and table[0]['num_active_heads'] == 0
    md = (tmp_path / 'sweep.md').read_text()
    assert md.count('\n') == 6
    # the ends have no beta (the report's '-'); beta 0 is a bottlenecked model's
    assert '| seed0/vit_tiny_noattn | 0 | - |' in md and '| seed0/vit_tiny_gap | 0 | - |' in md, md
    assert '| seed0/vit_tiny_vib_b0 | 0 | 0 |' in md, md
    # beta 2 is not a registered name: recorded as vit_tiny_vib(beta=2) so the folder reloads with it
    assert load_model(runs[2]).beta == 2.0
    stamp = (runs[1] / 'summary.json').stat().st_mtime_ns
    run_sweep(build_parser().parse_args(argv))
    assert (runs[1] / 'summary.json').stat().st_mtime_ns == stamp


# --- data ---------------------------------------------------------------------------------------

def test_idx_reader_and_fashion_mnist_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('t10k', 5)):
        write_idx(tmp_path / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        labels = tmp_path / f'{split}-labels-idx1-ubyte'
        write_idx(labels, np.arange(n) % 10)
    # gzip works too
    raw = (tmp_path / 't10k-labels-idx1-ubyte').read_bytes()
    (tmp_path / 't10k-labels-idx1-ubyte').unlink()
    (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / 't10k-labels-idx1-ubyte.gz').tolist() == [0, 1, 2, 3, 4]
    sets, spec = build_datasets(f'fashion-mnist:{tmp_path}', 16)
    assert (len(sets['train']), len(sets['val']), spec.num_classes) == (12, 5, 10)
    x, y = sets['val'][3]
    assert x.shape == (3, 16, 16) and y == 3
    (tmp_path / 'bad').write_bytes(b'\x00\x00\x08\x01\x00\x00\x00\x09abc')
    with pytest.raises(ValueError, match='truncated'):
        read_idx(tmp_path / 'bad')
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
        build_datasets(f'fashion-mnist:{tmp_path / "nowhere"}', 16)


def test_write_idx_refuses_values_uint8_cannot_hold_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / 'labels-idx1-ubyte'
    write_idx(path, np.arange(5))
    before = path.read_bytes()
    for bad in (np.array([0, 256]), np.array([-1, 3]), np.array([1.5, 2.0]), np.array([np.nan, 1.0])):
        with pytest.raises(ValueError, match='integers 0-255'):
            write_idx(path, bad)
    assert path.read_bytes() == before
    write_idx(path, np.array([0.0, 255.0]))  # integer-valued floats are exact in uint8
    assert read_idx(path).tolist() == [0, 255]
    # a write that fails part-way leaves the old file and no temporary beside it
    before = path.read_bytes()
    import timm_vib.data as data

    def fail(*a):
        raise OSError('disk full')

    # data's own name for the module: patching struct.pack itself would also cut pytest-xdist's channel
    monkeypatch.setattr(data, 'struct', type('FailingStruct', (), {'pack': staticmethod(fail)}))
    with pytest.raises(OSError, match='disk full'):
        write_idx(path, np.arange(7))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_fashion_mnist_from_debian_package_when_installed():
    from timm_vib.data import find_fashion_mnist
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip('dataset-fashion-mnist is not installed')
    sets, spec = build_datasets('fashion-mnist', 28, max_train_samples=10, max_val_samples=10)
    assert spec.num_classes == 10 and sets['train'][0][0].shape == (3, 28, 28)


def make_folder(root, classes, n=2):
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (20, 20), (i * 50, 0, 0)).save(root / split / c / f'{i}.png')


def test_image_folder_with_class_list(tmp_path, monkeypatch):
    make_folder(tmp_path / 'in', ['n01', 'n02', 'n03'])
    (tmp_path / 'two.txt').write_text('n03\nn01\n')
    sets, spec = build_datasets(str(tmp_path / 'in'), 16, class_list=str(tmp_path / 'two.txt'))
    assert spec.classes == ['n03', 'n01'] and len(sets['train']) == 4 and len(sets['val']) == 4
    assert sorted({y for _, y in sets['val']}) == [0, 1]
    # imagenet100: the shipped list, read without any network access
    def offline(*args, **kwargs):
        raise AssertionError('the ImageNet-100 list must not be fetched')
    monkeypatch.setattr('urllib.request.urlopen', offline)
    ids = read_class_list('imagenet100')
    assert len(ids) == len(set(ids)) == 100 and all(re.fullmatch(r'n\d{8}', i) for i in ids)
    assert ids[:2] == ['n02869837', 'n01749939']  # the published order (bonnet, green mamba)
    shared = Path('/work/shared/data/imagenet100.txt')  # the list as published, where this checkout has it
    if shared.is_file():
        assert ids == shared.read_text().split()
    with pytest.raises(ValueError, match='lacks 100 class'):
        build_datasets(str(tmp_path / 'in'), 16, class_list='imagenet100')


def test_photo_folders_get_the_reference_codes_augmentation(tmp_path):
    """The reference's train.py: RandomResizedCrop(0.08-1, bicubic), RandomHorizontalFlip, torchvision's
    RandAugment(num_ops=2, magnitude=9), ToTensor, Normalize(ImageNet), in that order; not timm's 'rand-m9-n2'
    (other ops, each with probability 0.5, three times the magnitude) and no colour jitter."""
    from timm.data import IMAGENET_DEFAULT_MEAN
    from timm.data.auto_augment import RandAugment as TimmRandAugment
    from torchvision import transforms
    make_folder(tmp_path / 'in', ['n01', 'n02'])
    sets, spec = build_datasets(str(tmp_path / 'in'), 16, seed=3)
    steps = sets['train'].transform.transforms
    names = [type(t).__name__ for t in steps]
    assert names == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'MaybeToTensor',
                     'Normalize'], names
    crop, flip, ra, _, norm = steps
    assert crop.scale == (0.08, 1.0) and str(crop.interpolation).lower().endswith('bicubic') and flip.p == 0.5
    assert isinstance(ra, transforms.RandAugment) and not isinstance(ra, TimmRandAugment)
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (2, 9, 31)
    assert torch.allclose(norm.mean, torch.tensor(IMAGENET_DEFAULT_MEAN))
    assert spec.augmentation['rand_augment'] == {'implementation': 'torchvision', 'num_ops': 2, 'magnitude': 9}
    assert spec.augmentation['auto_augment'] is None and spec.augmentation['color_jitter'] is None
    # torchvision's RandAugment draws from torch's generator, which the dataset seeds per (seed, epoch, index)
    train = sets['train']
    first = [train[i][0] for i in range(4)]
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(first))
    train.set_epoch(1)
    assert not all(torch.equal(a, train[i][0]) for i, a in enumerate(first))
    # the built-in grey sets keep the crop and the colour jitter they have always had (timm's default 0.4)
    grey, gspec = build_datasets('digits', 16, seed=0)
    assert [type(t).__name__ for t in grey['train'].transform.transforms] == [
        'RandomResizedCropAndInterpolation', 'ColorJitter', 'MaybeToTensor', 'Normalize']
    assert gspec.augmentation['color_jitter'] == 0.4 and 'rand_augment' not in gspec.augmentation


def test_resume_refuses_a_run_trained_with_another_augmentation(tmp_path):
    from timm_vib.training import _check_same_augmentation
    make_folder(tmp_path / 'in', ['n01', 'n02'])
    now = {'data': build_datasets(str(tmp_path / 'in'), 16)[1].to_dict()}
    before = json.loads(json.dumps(now))
    before['data']['augmentation'] = {'scale': [0.08, 1.0], 'ratio': [0.75, 4 / 3], 'hflip': 0.5,
                                      'auto_augment': 'rand-m9-n2'}  # what photo runs recorded until 2026-11-24
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'run_config.json').write_text(json.dumps(before))
    with pytest.raises(ValueError, match="auto_augment: 'rand-m9-n2' then, None now"):
        _check_same_augmentation(tmp_path / 'run', now)
    (tmp_path / 'run' / 'run_config.json').write_text(json.dumps(now))
    _check_same_augmentation(tmp_path / 'run', now)
    # a grey run recorded before the colour jitter was written down resumes: it had the same jitter
    grey = {'data': build_datasets('digits', 16)[1].to_dict()}
    older = json.loads(json.dumps(grey))
    del older['data']['augmentation']['color_jitter']
    (tmp_path / 'run' / 'run_config.json').write_text(json.dumps(older))
    _check_same_augmentation(tmp_path / 'run', grey)


# --- bad input: clear errors before anything is trained ------------------------------------------

@pytest.mark.parametrize('extra, error, match', [
    (['--data', '/nonexistent/imagenet'], FileNotFoundError, 'does not exist'),
    (['--batch-size', '0'], ValueError, 'batch-size must be >= 1'),
    (['--model', 'vit_tiny_vib_b7'], ValueError, 'unknown model'),
    (['--model', 'vit_tiny_gap', '--beta', '1'], ValueError, 'no information bottleneck'),
    (['--model-kwargs', 'img_size=18', 'patch_size=4'], ValueError, 'multiple of patch_size'),
])
def test_bad_input_fails_before_training(tmp_path, extra, error, match):
    out = tmp_path / 'run'
    args = parse_args([*TINY, '--epochs', '1', '--output', str(out), *extra])
    with pytest.raises(error, match=match):
        train(args)
    assert not (out / 'metrics.jsonl').exists()


def test_missing_classes_and_empty_split_are_named(tmp_path):
    make_folder(tmp_path / 'in', ['n01', 'n02'])
    (tmp_path / 'list.txt').write_text('n01\nn09\nn08\n')
    args = parse_args([*TINY, '--data', str(tmp_path / 'in'), '--class-list', str(tmp_path / 'list.txt'),
                       '--output', str(tmp_path / 'run')])
    with pytest.raises(ValueError, match='lacks 2 class.*n09, n08'):
        train(args)
    (tmp_path / 'empty' / 'train' / 'n01').mkdir(parents=True)
    (tmp_path / 'empty' / 'val' / 'n01').mkdir(parents=True)
    with pytest.raises(ValueError, match='empty'):
        build_datasets(str(tmp_path / 'empty'), 16)
    p = run_cli('train', *TINY, '--batch-size', '0', '--output', str(tmp_path / 'r'), check=False)
    assert p.returncode == 2 and 'batch-size must be >= 1' in p.stderr and 'Traceback' not in p.stderr


def test_lr_follows_timm_cosine_with_warmup_per_update(digits_run):
    """Epoch-end learning rates equal the closed form: linear warmup from min_lr over the first epoch,
    then cosine from lr to min_lr over the whole run, stepped per update."""
    import math
    cfg = json.loads((digits_run / 'run_config.json').read_text())
    lr, min_lr, per_epoch = cfg['args']['lr'], cfg['args']['min_lr'], cfg['schedule']['updates_per_epoch']
    total = per_epoch * cfg['args']['epochs']
    for row in (json.loads(ln) for ln in (digits_run / 'metrics.jsonl').read_text().splitlines()):
        t = row['step']
        expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))
        assert row['lr'] == pytest.approx(expected, rel=1e-6)
    assert row['lr'] == pytest.approx(min_lr)


def test_beta_warmup_schedules_closed_form():
    """The reference code's ramps: linear to beta, and geometric from 1e-8 (log-linear in the update)."""
    from timm_vib.training import beta_at
    assert [beta_at(4.0, u, 4) for u in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert beta_at(4.0, 0, 10, 'log') == pytest.approx(1e-8)
    assert beta_at(4.0, 5, 10, 'log') == pytest.approx((1e-8 * 4.0) ** 0.5, rel=1e-9)  # half way: geometric mean
    logs = [math.log(beta_at(4.0, u, 10, 'log')) for u in range(10)]
    assert np.allclose(np.diff(logs), (math.log(4.0) - math.log(1e-8)) / 10)
    assert beta_at(4.0, 10, 10, 'log') == 4.0 and beta_at(0.0, 3, 10, 'log') == 0.0 and beta_at(4.0, 0, 0) == 4.0
    with pytest.raises(ValueError, match='schedule'):
        beta_at(1.0, 0, 5, 'cosine')
    for bad in ((-1.0, 0, 5), (float('nan'), 0, 5), (1.0, -1, 5), (1.0, 0, -5)):  # was beta, 0 or -beta/5
        with pytest.raises(ValueError, match='>= 0'):
            beta_at(*bad)


def test_log_beta_schedule_and_sqrt_reduction_are_recorded(tmp_path):
    out = tmp_path / 'run'
    train(parse_args(['--model', 'vit_tiny_vib_b1', *TINY, *SMALL_DATA, '--epochs', '2', '--beta-warmup-epochs', '2',
                      '--beta-schedule', 'log', '--kl-reduction', 'sqrt', '--output', str(out)]))
    cfg = json.loads((out / 'run_config.json').read_text())
    rows = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    per_epoch = cfg['schedule']['updates_per_epoch']
    assert (cfg['beta_schedule'], cfg['kl_reduction'], cfg['beta_warmup_updates']) == ('log', 'sqrt', 2 * per_epoch)
    # epoch 1 ends half way through the ramp: the geometric mean of 1e-8 and 1, one update short
    assert rows[0]['beta'] == pytest.approx(math.exp(math.log(1e-8) * (1 - (per_epoch - 1) / (2 * per_epoch))))
    s = json.loads((out / 'summary.json').read_text())
    assert (s['beta_schedule'], s['kl_reduction'], s['vib_hidden']) == ('log', 'sqrt', 64)
    assert math.isfinite(rows[-1]['val_loss'])


def test_evaluate_restores_the_callers_stochastic_eval(fresh_accelerate_state):
    from accelerate import Accelerator
    import timm
    from timm_vib.training import evaluate
    m = timm.create_model('vit_tiny_vib', img_size=16, patch_size=8, depth=1, num_classes=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    acc = Accelerator(cpu=True)  # on a GPU machine too: the fixture cleared the state an earlier GPU run left
    for callers in (True, False):
        for stochastic in (True, False):
            m.stochastic_eval = callers
            res = evaluate(m, [(x, y)], acc, beta=1.0, stochastic=stochastic)
            assert res['val_count'] == 4 and m.stochastic_eval == callers

    def broken():
        assert m.stochastic_eval  # evaluate set the sampling it was asked for
        yield x, y
        raise RuntimeError('loader failed')
    m.stochastic_eval = False
    with pytest.raises(RuntimeError, match='loader failed'):
        evaluate(m, broken(), acc, beta=1.0, stochastic=True)
    assert m.stochastic_eval is False


def test_timm_dataset_names_through_data(tmp_path):
    """--data torch/mnist:ROOT goes through timm's dataset factory (torchvision's MNIST reading the
    IDX files in ROOT/MNIST/raw): grey digits as RGB, labels and class names as torchvision has them;
    streaming names and missing data are named errors."""
    rng = np.random.default_rng(0)
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for split, n in (('train', 12), ('t10k', 5)):
        write_idx(raw / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f'{split}-labels-idx1-ubyte', (np.arange(n) * 3) % 10)
    sets, spec = build_datasets(f'torch/mnist:{tmp_path}', 16)
    assert (len(sets['train']), len(sets['val']), spec.num_classes) == (12, 5, 10)
    assert spec.classes[3] == '3 - three' and spec.name == f'torch/mnist:{tmp_path}'
    x, y = sets['val'][2]
    assert x.shape == (3, 16, 16) and y == 6
    grey, _ = build_datasets(f'torch/mnist:{tmp_path}', 16, normalize=False)[0]['val'][2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and grey.max() > 0  # grey replicated
    out = tmp_path / 'run'
    train(parse_args(['--model', 'vit_tiny_vib_b1', *TINY, '--epochs', '1', '--data', f'torch/mnist:{tmp_path}',
                      '--output', str(out)]))
    assert json.loads((out / 'summary.json').read_text())['dataset'] == f'torch/mnist:{tmp_path}'
    assert len(load_run_dataset(out, 'val')) == 5
    with pytest.raises(ValueError, match='not supported yet'):
        build_datasets('wds/imagenet:/data/shards', 16)
    with pytest.raises(ValueError, match='nothing is downloaded'):
        build_datasets(f'torch/cifar10:{tmp_path}', 16)
