"""Sweeps over betas and seeds: the plan and its folder layout, handing a run to another process,
and two launchers end to end (this machine, --jobs 2; submitit's local executor, the Slurm path
without Slurm), each with a killed run that the next invocation resumes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_vib.cli import main
from timm_vib.sweep import parse_seeds, plan_runs, sweep_status, threads_per_job
from timm_vib.training import parse_args, to_argv

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model-kwargs', 'depth=1', 'img_size=16', 'patch_size=4', 'embed_dim=48', '--batch-size', '32',
        '--warmup-epochs', '1', '--max-train-samples', '64', '--max-val-samples', '32', '--epochs', '2',
        '--checkpoint-every', '1', '--stochastic-eval', '2']
TWO_RUNS = ['sweep', '--betas', '1', '--no-ends', '--seeds', '0,1', *TINY]
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1')


def run_cli(*argv):
    """``timm-vib`` in a fresh process: submitit's local executor is run as a user would, apart from
    the libraries other tests load into this one (TensorFlow's logging under pytest's capture)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, '-m', 'timm_vib.cli', *argv], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_plan_lays_out_seeds_and_models():
    plan = plan_runs([4, 0.1, 2], [0, 3])
    assert [r.folder for r in plan[:5]] == ['seed0/vit_tiny_noattn', 'seed0/vit_tiny_vib_b4', 'seed0/vit_tiny_vib_b0p1',
                                            'seed0/vit_tiny_vib_beta2', 'seed0/vit_tiny_gap']
    assert [r.seed for r in plan] == [0] * 5 + [3] * 5
    assert (plan[3].model, plan[3].beta) == ('vit_tiny_vib', 2.0) and plan[1].beta is None
    assert parse_seeds('0, 1,2') == [0, 1, 2]
    for bad, match in (('0,x', 'integers'), ('', 'no seed'), ('1,1', 'twice'), ('-1', '>= 0')):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
    assert threads_per_job(2, 2) == 1 and threads_per_job(4, 2) == 1 and threads_per_job(2, 8) == 4


def test_to_argv_parses_back_to_the_same_arguments():
    a = parse_args(['--model', 'vit_tiny_vib', '--beta', '0.3', '--model-kwargs', 'depth=2', 'global_pool=avg',
                    'img_size=32', '--lr', '1e-3', '--cpu', '--log-with', 'tensorboard', '--resume',
                    '--beta-warmup-epochs', '2.5', '--output', 'x y/z'])
    assert vars(parse_args(to_argv(a))) == vars(a)
    assert vars(parse_args(to_argv(parse_args([])))) == vars(parse_args([]))


def _summary(d: Path) -> dict:
    return json.loads((d / 'summary.json').read_text())


def _check_two_finished(root: Path):
    runs = [root / 'seed0' / 'vit_tiny_vib_b1', root / 'seed1' / 'vit_tiny_vib_b1']
    assert [_summary(r)['seed'] for r in runs] == [0, 1]
    for r in runs:
        assert [json.loads(ln)['epoch'] for ln in (r / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
    table = json.loads((root / 'sweep.json').read_text())
    assert [(t['run'], t['seed']) for t in table] == [('seed0/vit_tiny_vib_b1', 0), ('seed1/vit_tiny_vib_b1', 1)]
    # top-1 in the table: the mean of the sampled validation passes (as the report's), with their std
    md = (root / 'sweep.md').read_text()
    for t, r in zip(table, runs):
        st = _summary(r)['stochastic_eval']
        assert t['top1'] == st['top1_mean'] and t['stochastic_k'] == 2
        assert f"| {st['top1_mean']:.2f} ± {st['top1_std']:.2f} (2 passes) |" in md
    # the seed reaches the run: different initialisations, so different final weights
    from safetensors.torch import load_file
    a, b = (load_file(r / 'model.safetensors') for r in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    return runs


def test_local_launcher_runs_two_jobs_and_resumes_a_killed_sweep(tmp_path, capsys):
    argv = [*TWO_RUNS, '--jobs', '2', '--threads', '2', '--output', str(tmp_path)]
    assert main([*argv, '--kill-at-step', '3']) == 2  # both runs SIGKILL themselves in epoch 2
    err = capsys.readouterr().err
    assert 'seed0/vit_tiny_vib_b1: killed by signal 9' in err and 'seed1/vit_tiny_vib_b1: killed by signal 9' in err
    rows = sweep_status(tmp_path, plan_runs([1.0], [0, 1], ends=False))
    assert [(r['state'], r['epoch']) for r in rows] == [('unfinished', 1), ('unfinished', 1)]
    assert main(argv) == 0
    runs = _check_two_finished(tmp_path)
    for seed in (0, 1):  # each run went on from its checkpoint, in its own process with its own log
        log = (tmp_path / 'logs' / f'seed{seed}' / 'vit_tiny_vib_b1.log').read_text()
        assert 'resumed from' in log and 'step 3' in log
    stamps = [(r / 'summary.json').stat().st_mtime_ns for r in runs]
    assert main(argv) == 0 and 'already finished' in capsys.readouterr().out
    assert [(r / 'summary.json').stat().st_mtime_ns for r in runs] == stamps
    # the same folder with other settings: refused, naming them, nothing trained or tabulated
    assert main([*argv, '--epochs', '3']) == 2
    err = capsys.readouterr().err
    assert 'other settings' in err and "--epochs 2 (run) vs 3 (now)" in err and 'seed1/vit_tiny_vib_b1' in err, err
    assert [(r / 'summary.json').stat().st_mtime_ns for r in runs] == stamps
    rows = sweep_status(tmp_path, plan_runs([1.0], [0, 1], ends=False))
    assert [r['state'] for r in rows] == ['finished'] * 2
    # a finished run's top-1 is the sweep table's (the mean of its sampled passes), not its last epoch's pass
    assert [r['top1'] for r in rows] == [t['top1'] for t in json.loads((tmp_path / 'sweep.json').read_text())]
    assert [r['top1'] for r in rows] == [_summary(r)['stochastic_eval']['top1_mean'] for r in runs]


def test_submitit_local_executor_records_jobs_and_resumes_a_killed_sweep(tmp_path):
    pytest.importorskip('submitit')
    argv = [*TWO_RUNS, '--launcher', 'submitit-local', '--threads', '2', '--output', str(tmp_path)]
    p = run_cli(*argv, '--kill-at-step', '3')
    assert p.returncode == 2 and 'seed0/vit_tiny_vib_b1: job' in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    first = json.loads((tmp_path / 'jobs.json').read_text())
    assert set(first) == {'seed0/vit_tiny_vib_b1', 'seed1/vit_tiny_vib_b1'}
    assert all(Path(rec['log']).is_file() for rec in first.values())
    p = run_cli(*argv)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    runs = _check_two_finished(tmp_path)
    jobs = json.loads((tmp_path / 'jobs.json').read_text())
    for run, rec in jobs.items():  # a new job per resumed run; the killed one stays on record
        assert rec['job_id'] != first[run]['job_id'] and rec['earlier'][0]['job_id'] == first[run]['job_id']
        assert 'resumed from' in Path(rec['log']).read_text()
    rows = sweep_status(tmp_path, plan_runs([1.0], [0, 1], ends=False))
    assert [(r['state'], r['job']) for r in rows] == [('finished', jobs[r.folder]['job_id'])
                                                      for r in plan_runs([1.0], [0, 1], ends=False)]
    stamps = [(r / 'summary.json').stat().st_mtime_ns for r in runs]
    assert run_cli(*argv).returncode == 0  # nothing left to submit
    assert json.loads((tmp_path / 'jobs.json').read_text()) == jobs
    assert [(r / 'summary.json').stat().st_mtime_ns for r in runs] == stamps


@pytest.mark.parametrize('extra, match', [
    (['--jobs', '0'], 'jobs must be >= 1'),
    (['--seeds', '0,a'], 'integers'),
    (['--slurm-args', 'constraint'], 'KEY=VALUE'),
    (['--betas', '1,x'], 'numbers'),
])
def test_bad_sweep_arguments_are_named(tmp_path, capsys, extra, match):
    assert main([*TWO_RUNS, '--output', str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_submitit_job_with_two_tasks_trains_one_run_on_two_processes(tmp_path):
    """--gpus-per-job 2 (here on the CPU): submitit starts two tasks, whose environment becomes
    torch.distributed's, and Accelerate trains one run on both (gloo), as on a 2-GPU Slurm node."""
    pytest.importorskip('submitit')
    argv = ['sweep', '--launcher', 'submitit-local', '--gpus-per-job', '2', '--cpu', '--betas', '1', '--no-ends',
            *TINY, '--max-train-samples', '128', '--epochs', '1', '--threads', '2', '--output', str(tmp_path)]
    p = run_cli(*argv)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = _summary(tmp_path / 'seed0' / 'vit_tiny_vib_b1')
    assert s['world_size'] == 2 and s['steps'] == 2  # 128 images / (2 processes x 32) per step


def test_a_run_trained_by_a_live_process_is_shown_running_and_left_alone(tmp_path, capsys):
    import subprocess
    import sys
    from timm_vib.sweep import local_pid, running_marker
    run = plan_runs([1.0], [0], ends=False)[0]
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        with running_marker(tmp_path, run, other.pid):
            assert local_pid(tmp_path, run) == other.pid
            assert [(r['state'], r['job']) for r in sweep_status(tmp_path, [run])] == [('running', f'pid {other.pid}')]
            assert main([*TWO_RUNS, '--seeds', '0', '--output', str(tmp_path)]) == 0
            assert f'process {other.pid}' in capsys.readouterr().out
            assert not (tmp_path / run.folder / 'run_config.json').exists()  # not trained a second time
            other.kill()
            other.wait()
            assert local_pid(tmp_path, run) is None  # a dead process's marker does not count
        assert not list((tmp_path / 'logs').rglob('*.pid'))
    finally:
        other.kill()


def test_a_slurm_job_requeues_itself_to_resume():
    """submitit's requeue hook (time limit, pre-emption) gives back the same training, resuming."""
    pytest.importorskip('submitit')
    from timm_vib.sweep import TrainJob
    argv = to_argv(parse_args(['--model', 'vit_tiny_vib_b4', '--epochs', '7', '--output', 'runs/x']))
    again = TrainJob().checkpoint(argv, 3)
    assert isinstance(again.function, TrainJob) and again.args[1] == 3
    resumed = parse_args(again.args[0])
    assert resumed.resume == 'latest' and (resumed.model, resumed.epochs, resumed.output) == ('vit_tiny_vib_b4', 7, 'runs/x')


@pytest.mark.parametrize('extra, match', [
    (['--model-kwargs', 'img_size=18', 'patch_size=4'], 'not a multiple of patch_size'),
    (['--data', 'no_such_folder'], 'data folder no_such_folder does not exist'),
    (['--data', 'fashion-mnist:no_such_folder'], 'Fashion-MNIST IDX files not found'),
])
def test_bad_data_or_patch_grid_is_named_before_any_run_starts(tmp_path, capsys, extra, match):
    """Checked for every run before any is launched: with --jobs 2 the error is one line from the sweep
    (and the demo), not N failed processes whose logs hold it."""
    assert main([*TWO_RUNS, '--jobs', '2', '--output', str(tmp_path / 'sweep'), *extra]) == 2
    assert match in capsys.readouterr().err
    assert main(['demo', '--smallest', '--jobs', '2', '--output', str(tmp_path / 'demo'), '--no-progress',
                 *(['--img-size', '18', '--patch-size', '4'] if 'patch_size=4' in extra else extra)]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / 'sweep').exists() and not (tmp_path / 'demo').exists()


def test_a_run_that_refuses_its_data_in_its_process_says_why(tmp_path, capsys):
    """A problem found only when the data are read (here a truncated Fashion-MNIST file) fails each run's
    process; the sweep's error carries the run's own one-line error, not only its exit code."""
    from timm_vib.data import write_idx
    rng = np.random.default_rng(0)
    for split, n in (('train', 64), ('t10k', 32)):
        write_idx(tmp_path / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f'{split}-labels-idx1-ubyte', np.arange(n) % 10)
    images = tmp_path / 'train-images-idx3-ubyte'
    images.write_bytes(images.read_bytes()[:-100])
    assert main([*TWO_RUNS, '--jobs', '2', '--data', f'fashion-mnist:{tmp_path}', '--output',
                 str(tmp_path / 'sweep')]) == 2
    err = capsys.readouterr().err
    for seed in (0, 1):
        assert f'seed{seed}/vit_tiny_vib_b1: exit code 2 (' in err and 'is truncated or corrupt' in err, err
