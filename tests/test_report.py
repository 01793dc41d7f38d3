"""Report helpers that need no trained model."""
import json

import pytest

from timm_vib.report import _copies, fmt_nats, fmt_top1, load_runs


def test_formats():
    assert fmt_top1(93.61111) == '93.6%'
    assert fmt_nats(0.13559) == '0.136' and fmt_nats(144.73) == '145' and fmt_nats(None) == '-'


def test_copies_fit_the_grid():
    assert _copies(196) == (4, 16, 64)  # the paper's, on a 14x14 grid
    assert _copies(16) == (1, 4, 15)
    assert all(n <= 3 for n in _copies(4))


def test_load_runs_orders_the_spectrum(tmp_path):
    for name, mode, beta in (('gap', 'plain', 0.0), ('b1', 'vib', 1.0), ('noattn', 'none', 0.0), ('b4', 'vib', 4.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'summary.json').write_text(json.dumps({'model': name, 'attn_mode': mode, 'beta': beta}))
    assert [r.dir.name for r in load_runs([tmp_path])] == ['noattn', 'b4', 'b1', 'gap']
    with pytest.raises(FileNotFoundError, match='neither a finished run'):
        load_runs([tmp_path / 'missing'])


def test_seeds_are_reported_as_mean_and_std(tmp_path):
    """Two seeds per model: the accuracy caption, the figure and the table give mean ± std (ddof 1)
    over seeds per model, in spectrum order."""
    import numpy as np
    from timm_vib.report import _table_rows, fig_accuracy, seed_groups
    top1 = {('none', 0.0): (80.0, 82.0), ('vib', 4.0): (81.0, 84.0), ('vib', 0.1): (88.0, 89.5), ('plain', 0.0): (90.0, 91.0)}
    nats = {4.0: (0.5, 0.7), 0.1: (40.0, 50.0)}
    for (mode, beta), accs in top1.items():
        for seed, acc in enumerate(accs):
            d = tmp_path / f'seed{seed}' / f'{mode}{beta:g}'
            d.mkdir(parents=True)
            vib = mode == 'vib'
            d.joinpath('summary.json').write_text(json.dumps({
                'model': f'{mode}{beta:g}', 'attn_mode': mode, 'beta': beta, 'seed': seed, 'val_top1': acc,
                'nats_per_image': nats[beta][seed] if vib else (0.0 if mode == 'none' else None),
                'nats_per_patch': nats[beta][seed] / 16 if vib else None,
                'active_heads': ['0.0', '0.1'][:seed + 1] if vib else None}))
    runs = load_runs([tmp_path])
    groups = seed_groups(runs)
    assert [(g[0].mode, g[0].beta, [r.seed for r in g]) for g in groups] == [
        ('none', 0.0, [0, 1]), ('vib', 4.0, [0, 1]), ('vib', 0.1, [0, 1]), ('plain', 0.0, [0, 1])]
    caption = fig_accuracy(runs, tmp_path / 'fig.png')
    assert (tmp_path / 'fig.png').read_bytes()[:4] == b'\x89PNG'
    assert 'mean ± std over seeds 0, 1' in caption
    for (mode, beta), accs in top1.items():
        m, sd = np.mean(accs), np.std(accs, ddof=1)
        text = f'{fmt_top1(m)} ± {sd:.1f}'
        if mode == 'vib':
            text += f' at {fmt_nats(np.mean(nats[beta]))} ± {fmt_nats(np.std(nats[beta], ddof=1))} nats/image'
        assert text in caption, (text, caption)
    rows = _table_rows(runs)
    assert len(rows) == 4 and [r['seeds'] for r in rows] == ['0, 1'] * 4
    assert rows[0]['top-1'] == f'{fmt_top1(81.0)} ± {np.std([80, 82], ddof=1):.1f}'
    assert rows[1]['top-1'] == f'{fmt_top1(82.5)} ± {np.std([81, 84], ddof=1):.1f}'
    assert rows[1]['active heads'] == f'1.5 ± {np.std([1, 2], ddof=1):.2g} (1, 2)'


def test_curve_stats_over_seeds():
    """Per-epoch mean and std (ddof 1) over runs equal numpy's, over the epochs every run logged a finite value
    for: a run that stopped early or skipped a value shortens the curve, never shifts it."""
    import numpy as np
    from timm_vib.figures import curve_stats
    a = [{'epoch': e, 'val_top1': v} for e, v in zip(range(1, 6), (10., 20., 30., 40., 50.))]
    b = [{'epoch': e, 'val_top1': v} for e, v in zip(range(1, 6), (12., None, 33., 41., 55.))]
    c = [{'epoch': e, 'val_top1': v} for e, v in zip(range(1, 5), (11., 25., float('nan'), 43.))]
    epochs, mean, sd = curve_stats([a, b, c])
    assert epochs.tolist() == [1, 4]
    np.testing.assert_allclose(mean, [np.mean([10, 12, 11]), np.mean([40, 41, 43])])
    np.testing.assert_allclose(sd, [np.std([10, 12, 11], ddof=1), np.std([40, 41, 43], ddof=1)])
    epochs, mean, sd = curve_stats([a])
    assert epochs.tolist() == [1, 2, 3, 4, 5] and mean.tolist() == [10., 20., 30., 40., 50.] and sd is None
    epochs, mean, sd = curve_stats([a, [{'epoch': 9, 'val_top1': 1.0}]])  # no epoch in common
    assert len(epochs) == 0 and len(mean) == 0
    with pytest.raises(ValueError, match='no runs'):
        curve_stats([])


def test_learning_curves_caption(tmp_path):
    """The learning-curve caption gives each model's mean over seeds at the middle and the last epoch, read
    from the runs' metrics.jsonl (not from their summaries), and how the bottlenecks were validated."""
    import numpy as np
    from timm_vib.figures import beta_colors
    from timm_vib.report import fig_curves
    curves = {('none', 0.0): [[5., 9., 20., 30.], [7., 9., 22., 34.]],
              ('vib', 1.0): [[6., 12., 25., 40.], [8., 14., 27., 41.]],
              ('plain', 0.0): [[9., 20., 35., 60.], [11., 21., 38., 62.]]}
    for (mode, beta), per_seed in curves.items():
        for seed, vals in enumerate(per_seed):
            d = tmp_path / f'seed{seed}' / f'{mode}{beta:g}'
            d.mkdir(parents=True)
            d.joinpath('summary.json').write_text(json.dumps({
                'model': f'{mode}{beta:g}', 'attn_mode': mode, 'beta': beta, 'seed': seed, 'val_top1': -1.0,
                'eval_z': 'sample' if mode == 'vib' else None}))
            d.joinpath('metrics.jsonl').write_text(
                ''.join(json.dumps({'epoch': e + 1, 'val_top1': v}) + '\n' for e, v in enumerate(vals)))
    runs = load_runs([tmp_path])
    caption = fig_curves(runs, tmp_path / 'curves.png', beta_colors([1.0]))
    assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert caption.startswith('Validation top-1 after each epoch (z sampled in bottlenecks; mean over seeds 0, 1): ')
    for label, (mode, beta) in (('no attention', ('none', 0.0)), ('beta=1', ('vib', 1.0)), ('ViT (gap)', ('plain', 0.0))):
        m = np.mean(curves[mode, beta], axis=0)
        assert f'{label} {fmt_top1(m[1])} at epoch 2, {fmt_top1(m[3])} at epoch 4' in caption, (label, caption)
    assert fmt_top1(-1.0) not in caption


def test_top1_is_the_mean_of_sampled_passes(tmp_path):
    """Runs with K sampled validation passes are reported at the passes' mean (the paper's), in the captions,
    the figure and the table, over seeds too; runs without them at their last validation."""
    import numpy as np
    from timm_vib.report import _table_rows, fig_accuracy
    passes = {0: (60.0, 2.0), 1: (64.0, 1.0)}  # seed: (mean over K passes, std over them)
    for seed, (mean, sd) in passes.items():
        for mode, beta in (('vib', 1.0), ('none', 0.0)):
            d = tmp_path / f'seed{seed}' / mode
            d.mkdir(parents=True)
            vib = mode == 'vib'
            d.joinpath('summary.json').write_text(json.dumps({
                'model': mode, 'attn_mode': mode, 'beta': beta, 'seed': seed, 'val_top1': 50.0 + seed,
                'nats_per_image': 3.0 if vib else 0.0, 'nats_per_patch': 0.1 if vib else 0.0,
                'active_heads': ['0.0'] if vib else None,
                'stochastic_eval': {'k': 3, 'top1_mean': mean, 'top1_std': sd} if vib else None}))
    runs = load_runs([tmp_path])
    caption = fig_accuracy(runs, tmp_path / 'fig.png')
    assert f"beta=1: {fmt_top1(62.0)} ± {np.std([60, 64], ddof=1):.1f}" in caption
    assert f"no attention: {fmt_top1(50.5)} ± {np.std([50, 51], ddof=1):.1f}" in caption
    rows = _table_rows(runs)
    assert [r['top-1'] for r in rows] == [f'{fmt_top1(50.5)} ± {np.std([50, 51], ddof=1):.1f}',
                                          f'{fmt_top1(62.0)} ± {np.std([60, 64], ddof=1):.1f}']
    one = load_runs([tmp_path / 'seed0'])  # one seed: the passes' mean ± their std
    assert 'beta=1: 60.0% ± 2.0 over 3 sampled passes' in fig_accuracy(one, tmp_path / 'fig1.png')
    assert [r['top-1'] for r in _table_rows(one)] == ['50.0%', '60.0% ± 2.0']
