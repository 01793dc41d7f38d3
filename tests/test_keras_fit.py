"""model.fit with the paper's recipe on scikit-learn's digits (through examples/keras_train.py): the loss
falls, accuracy is well above chance, the KL follows beta (higher beta, fewer nats), and the KL per head
is printed as the timm trainer reports it."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('sklearn')
EXAMPLE = Path(__file__).resolve().parents[1] / 'examples' / 'keras_train.py'


def _example():
    spec = importlib.util.spec_from_file_location('keras_train', EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(240)
def test_fit_on_digits_learns_and_kl_follows_beta(capsys):
    ex = _example()
    common = ['--epochs', '6', '--batch-size', '64', '--lr', '3e-3', '--warmup-epochs', '0.5', '--verbose', '0', '--seed', '0']
    low = ex.main(common + ['--beta', '0.001'])
    table = capsys.readouterr().out.split('KL per head (nats per patch, * active):\n')[1].splitlines()
    assert table[0].split() == ['layer', 'head', '0', 'head', '1'] and len(table) == 1 + 2  # 2 layers x 2 heads
    np.testing.assert_allclose([[float(v.rstrip('*')) for v in row.split()[1:]] for row in table[1:]],
                               low['head_kl'], atol=1e-4)
    assert low['head_kl'].mean() == pytest.approx(low['mean_kl'], rel=1e-5)
    high = ex.main(common + ['--beta', '0.1'])
    # both optimise CE + beta * KL: the loss falls
    for r in (low, high):
        assert r['loss'][-1] < 0.7 * r['loss'][0], r['loss']
    assert low['val_accuracy'] > 0.4, low  # chance: 0.1
    # a higher information cost transmits fewer nats
    assert high['mean_kl'] < 0.2 * low['mean_kl'], (low['mean_kl'], high['mean_kl'])
    print(f"\nbeta 0.001: acc {low['val_accuracy']:.3f}, KL {low['mean_kl']:.3f} nats/head-token; "
          f"beta 0.1: acc {high['val_accuracy']:.3f}, KL {high['mean_kl']:.3f}")
