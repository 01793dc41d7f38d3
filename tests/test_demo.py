"""The demo end to end at its smallest size: every figure is a valid PNG referenced by the report, and
the numbers in the captions and tables are the runs' own."""
import json
from html import escape as html_escape
import re
from pathlib import Path

import pytest
from PIL import Image

from timm_vib.cli import main
from timm_vib.report import FIGURES, fmt_nats, fmt_top1, load_runs

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    assert main(['demo', '--smallest', '--output', str(out), '--no-progress']) == 0
    return out


def _last_metrics(run: Path) -> dict:
    return json.loads((run / 'metrics.jsonl').read_text().strip().splitlines()[-1])


def test_figures_are_png_and_referenced(demo):
    report = demo / 'report'
    html = (report / 'index.html').read_text()
    md = (report / 'index.md').read_text()
    assert len(FIGURES) == 10
    for name in FIGURES:
        path = report / f'{name}.png'
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 50, (name, im.size)
        assert f'<img src="{name}.png"' in html, name
        assert f'({name}.png)' in md, name
    captions = json.loads((report / 'captions.json').read_text())['figures']
    assert [c['file'] for c in captions] == [f'{n}.png' for n in FIGURES]
    for c in captions:  # every caption is in both index files, under its figure
        assert c['caption'] and c['caption'] in md
        assert html_escape(c['caption']) in html


def test_captions_and_table_match_the_runs(demo):
    runs = load_runs([demo / 'runs'])
    assert [r.mode for r in runs] == ['none', 'vib', 'vib', 'plain']  # noattn, beta 1, beta 0.1, gap
    assert [r.beta for r in runs if r.mode == 'vib'] == [1.0, 0.1]
    captions = {c['file']: c['caption'] for c in json.loads((demo / 'report' / 'captions.json').read_text())['figures']}
    acc = captions['fig1_accuracy_vs_information.png']
    survival = captions['fig4_survival_active_heads.png']
    curves = captions['fig10_learning_curves.png']
    md = (demo / 'report' / 'index.md').read_text()
    for r in runs:
        last = _last_metrics(r.dir)
        assert r.summary['val_top1'] == last['val_top1']
        # a run's top-1 is the mean of its sampled validation passes where it made them (bottlenecks), as the paper's
        top1 = last['stochastic_top1_mean'] if r.mode == 'vib' else last['val_top1']
        assert f"{r.label}: {fmt_top1(top1)}" in acc
        assert f"| {fmt_top1(top1)} " in md
        if r.mode == 'vib':
            assert f"± {last['stochastic_top1_std']:.1f} over {last['stochastic_k']} sampled passes" in acc
        # the learning curve is the validation after each epoch; one epoch: the end only
        assert f"{r.label} {fmt_top1(last['val_top1'])} at epoch {last['epoch']}" in curves
        if r.mode == 'vib':
            assert f"{fmt_nats(last['nats_per_image'])} nats/image" in acc
            heads = last['active_heads']
            assert r.summary['active_heads'] == heads
            text = f'{r.label}: {len(heads)} active heads' + (f": {', '.join(heads)}" if heads else '')
            assert text in survival
            # the table's active heads: the same list
            assert re.search(rf"\| {re.escape(f'{r.beta:g}')} \|.*\| {len(heads)}", md)


def test_every_model_of_the_demo_starts_from_the_same_position_embedding(demo, tmp_path):
    """The preset's pos_embed_init reaches every run, the two ends included (the spectrum compares models
    that differ in attention only), and --pos-embed-init overrides it."""
    from timm_vib.checkpoints import load_model
    runs = sorted((demo / 'runs' / 'seed0').iterdir())
    assert len(runs) == 4
    for run in runs:
        cfg = json.loads((run / 'run_config.json').read_text())
        assert cfg['args']['model_kwargs']['pos_embed_init'] == 'sincos', run.name
        assert load_model(run).pos_embed_init == 'sincos'
    import argparse
    from timm_vib.demo import _settings, _train_argv, add_demo_args
    args = add_demo_args(argparse.ArgumentParser()).parse_args(['--smallest', '--pos-embed-init', 'trunc_normal'])
    assert 'pos_embed_init=trunc_normal' in _train_argv(_settings(args), args, 'vit_tiny_noattn', tmp_path)


def test_vib_hidden_reaches_the_bottlenecked_runs_only(tmp_path):
    """--vib-hidden sets the width of every bottleneck's MLPs; without it the runs build the registered
    models' default (the reference's 64), and the two ends, which have no bottleneck, are not given it."""
    import argparse
    from timm_vib import training
    from timm_vib.demo import _settings, _train_argv, add_demo_args

    def built(flags, model):
        args = add_demo_args(argparse.ArgumentParser()).parse_args(['--smallest', *flags])
        return training.build_model(training.parse_args(_train_argv(_settings(args), args, model, tmp_path)), 10)[0]

    assert {b.vib_hidden for b in built(['--vib-hidden', '16'], 'vit_tiny_vib_b1').bottlenecks()} == {16}
    assert {b.vib_hidden for b in built([], 'vit_tiny_vib_b1').bottlenecks()} == {64}
    for end in ('vit_tiny_noattn', 'vit_tiny_gap'):
        assert built(['--vib-hidden', '16'], end).vib_hidden is None


def test_demo_reuses_finished_runs(demo, capsys):
    from timm_vib import training
    from timm_vib.demo import PRESETS, _reusable, _train_argv, add_demo_args
    import argparse
    args = add_demo_args(argparse.ArgumentParser()).parse_args(['--smallest', '--output', str(demo)])
    s = PRESETS['smallest']
    out = demo / 'runs' / 'seed0' / 'vit_tiny_vib_b1'
    targs = training.parse_args(_train_argv(s, args, 'vit_tiny_vib_b1', out))
    targs.beta = None
    assert _reusable(out, targs)
    targs.epochs = 7  # other settings: refuse to reuse silently
    with pytest.raises(ValueError, match='other settings.*--epochs'):
        _reusable(out, targs)
    # every training option counts, not only a list of the demo's own
    targs.epochs, targs.weight_decay = s['epochs'], 0.01
    with pytest.raises(ValueError, match='--weight-decay'):
        _reusable(out, targs)


def test_analyze_command(demo, tmp_path):
    """``timm-vib analyze`` on two runs (no ends): the same report files."""
    runs = [str(demo / 'runs' / 'seed0' / 'vit_tiny_vib_b1'), str(demo / 'runs' / 'seed0' / 'vit_tiny_vib_b0p1')]
    assert main(['analyze', *runs, '--out', str(tmp_path / 'rep'), '--max-images', '32', '--nmi-samples', '500',
                 '--no-progress']) == 0
    for name in FIGURES:
        assert (tmp_path / 'rep' / f'{name}.png').read_bytes()[:8] == PNG_MAGIC
    assert 'ViT (gap)' not in (tmp_path / 'rep' / 'index.md').read_text()


def test_demo_two_seeds_two_jobs(tmp_path):
    """--seeds 0,1 --jobs 2: one process per run, runs in seed folders, the report in mean ± std over
    seeds, and the most restricted model's top head compared across seeds."""
    import numpy as np
    import torch
    out = tmp_path / 'demo'
    assert main(['demo', '--smallest', '--seeds', '0,1', '--jobs', '2', '--betas', '1', '--no-ends',
                 '--output', str(out), '--no-progress']) == 0
    runs = load_runs([out / 'runs'])
    assert [(r.dir.relative_to(out / 'runs').as_posix(), r.seed) for r in runs] == [
        ('seed0/vit_tiny_vib_b1', 0), ('seed1/vit_tiny_vib_b1', 1)]
    assert all((out / 'runs' / 'logs' / f'seed{s}' / 'vit_tiny_vib_b1.log').is_file() for s in (0, 1))
    captions = {c['file']: c['caption'] for c in json.loads((out / 'report' / 'captions.json').read_text())['figures']}
    top1 = [r.summary['val_top1'] for r in runs]
    assert f'beta=1: {fmt_top1(np.mean(top1))} ± {np.std(top1, ddof=1):.1f}' in captions['fig1_accuracy_vs_information.png']
    md = (out / 'report' / 'index.md').read_text()
    assert '| seeds |' in md and '| 0, 1 |' in md
    # a few seconds of training leave every head's latent nearly constant over the images (I(X;U) ~ 0.002 nats,
    # unresolved by the samples, though the KL is ~10 nats from the narrow posteriors): no matrix, and said so
    nmi = captions['fig7_nmi_matrix.png']
    assert nmi.startswith('No NMI matrix') and 'for 0;' in nmi and 'Across seeds' not in nmi, nmi
    # patch voting over both seeds: each seed's median inverse Simpson on the report's images (the first
    # max_images of the validation set), then mean ± std over seeds
    from timm_vib.data import load_run_dataset
    from timm_vib.demo import PRESETS
    from timm_vib.estimators import patch_voting
    ds = load_run_dataset(runs[0].dir)
    images = torch.utils.data.Subset(ds, range(min(len(ds), PRESETS['smallest']['max_images'])))
    medians = [float(np.median(patch_voting(r.model(), torch.utils.data.DataLoader(images, batch_size=16))[0].numpy()))
               for r in runs]
    voting = captions['fig2_patch_voting.png']
    assert 'mean ± std over seeds 0, 1' in voting
    assert f'beta=1: {np.mean(medians):.2f} ± {np.std(medians, ddof=1):.2f} / ' in voting, (medians, voting)
    # heads whose means spread over the images (the means' layer scaled up) carry information the samples resolve:
    # the matrix, and the most restricted model's top head compared across the two seeds
    from timm_vib.checkpoints import load_model, save_model
    for r in runs:
        m = load_model(r.dir)
        with torch.no_grad():
            for b in m.bottlenecks():
                b.stats_bias[:, :b.vib_dim].mul_(30.0)
                (b.enc_out_weight if b.is_mlp else b.enc_weight)[..., :b.vib_dim].mul_(30.0)
        save_model(m, r.dir, data_config=json.loads((r.dir / 'config.json').read_text())['pretrained_cfg'])
    assert main(['analyze', str(out / 'runs'), '--out', str(tmp_path / 'rep'), '--max-images', '32',
                 '--nmi-samples', '2000', '--no-progress']) == 0
    captions = {c['file']: c['caption'] for c in json.loads((tmp_path / 'rep' / 'captions.json').read_text())['figures']}
    nmi = captions['fig7_nmi_matrix.png']
    assert nmi.startswith('Normalised mutual information') and 'Across seeds' in nmi, nmi
    assert 'beta=1 seed 0, head' in nmi and 'beta=1 seed 1, head' in nmi, nmi


def test_demo_leaves_a_run_another_process_trains_and_marks_its_own(tmp_path, capsys, monkeypatch):
    """A second demo on the same folder stops, naming the run and the process, before training anything;
    with --jobs 1 the demo marks the run it trains (as the sweep does), so others leave it alone."""
    import argparse
    import os
    import subprocess
    import sys
    from timm_vib import training
    from timm_vib.demo import add_demo_args, run_demo
    from timm_vib.sweep import local_pid, plan_runs, running_marker
    out = tmp_path / 'demo'
    run = plan_runs([1.0], [0], ends=False)[0]
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        with running_marker(out / 'runs', run, other.pid):
            assert main(['demo', '--smallest', '--betas', '1', '--no-ends', '--jobs', '1', '--output', str(out),
                         '--no-progress']) == 2
    finally:
        other.kill()
        other.wait()
    err = capsys.readouterr().err
    assert f'seed0/vit_tiny_vib_b1 (process {other.pid}) being trained by another process' in err, err
    assert not list(out.rglob('run_config.json'))  # nothing trained

    class Stop(Exception):
        pass

    seen = []

    def fake_train(targs):
        seen.append(local_pid(out / 'runs', run))
        raise Stop

    monkeypatch.setattr(training, 'train', fake_train)
    args = add_demo_args(argparse.ArgumentParser()).parse_args(
        ['--smallest', '--betas', '1', '--no-ends', '--jobs', '1', '--output', str(out), '--no-progress'])
    with pytest.raises(Stop):
        run_demo(args)
    assert seen == [os.getpid()] and local_pid(out / 'runs', run) is None  # marked while training, not after


def test_negative_threads_is_named(tmp_path, capsys):
    assert main(['demo', '--smallest', '--threads', '-1', '--output', str(tmp_path / 'd'), '--no-progress']) == 2
    assert '--threads must be >= 0' in capsys.readouterr().err and not (tmp_path / 'd').exists()


@pytest.mark.parametrize('jobs', ['1', '2'])
def test_a_model_setting_the_model_refuses_is_named_before_any_run(tmp_path, capsys, jobs):
    """An embedding width the sin-cos start cannot use: one line, from the model itself, before any run starts
    (with --jobs 2 every run's process used to fail on it, with 'rerun the same command to resume them')."""
    out = tmp_path / 'd'
    assert main(['demo', '--smallest', '--embed-dim', '30', '--jobs', jobs, '--output', str(out), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert "pos_embed_init='sincos' needs embed_dim divisible by 4" in err and 'rerun' not in err
    assert not list(out.rglob('*.log')) and not list(out.rglob('run_config.json'))


@pytest.mark.parametrize('flag', ['--max-images', '--batch-size', '--nmi-samples'])
def test_analyze_names_a_count_below_one(demo, tmp_path, capsys, flag):
    run = str(demo / 'runs' / 'seed0' / 'vit_tiny_vib_b1')
    assert main(['analyze', run, '--out', str(tmp_path / 'rep'), flag, '0', '--no-progress']) == 2
    assert f'{flag} must be >= 1, got 0' in capsys.readouterr().err and not (tmp_path / 'rep').exists()
