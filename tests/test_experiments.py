"""The experiment scripts behind docs/spectrum.md's tables: the data sets they build, the loaders they patch, and
that every one still starts against the current package."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / 'docs' / 'experiments'
sys.path.insert(0, str(EXPERIMENTS))

import fashion_mnist_as_digits  # noqa: E402
import gated_pairs  # noqa: E402
import translated  # noqa: E402
from timm_vib import data  # noqa: E402

# branch_rms.py has no options: it runs its measurement (about a minute) whatever the arguments
SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob('*.py') if p.name != 'branch_rms.py')


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_starts(script):
    """Each script parses its options against the package as it is now (an import or option that rotted fails)."""
    r = subprocess.run([sys.executable, str(EXPERIMENTS / script), '--help'], capture_output=True, text=True,
                       cwd=EXPERIMENTS, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'usage:' in r.stdout


def test_gated_pairs_puts_each_image_in_its_marked_half():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(50, 8, 8), dtype=np.uint8)  # all distinct, no zero pixel
    out = gated_pairs.gated_pairs(images, np.random.default_rng(1))
    assert out.shape == (50, 16, 16) and out.dtype == np.uint8
    partners = []
    for i, composite in enumerate(out):
        top, bottom = composite[0:8, 4:12], composite[8:16, 4:12]
        marker_rows = [r for r in range(16) if (composite[r, [0, 1, 14, 15]] == 255).all()]
        assert marker_rows in ([3, 4], [11, 12])
        marked, other = (top, bottom) if marker_rows == [3, 4] else (bottom, top)
        np.testing.assert_array_equal(marked, images[i])
        partner = [j for j in range(50) if (images[j] == other).all()]
        assert len(partner) == 1 and partner[0] != i
        partners.append(partner[0])
        margins = composite[:, [2, 3, 12, 13]].sum() + np.delete(composite[:, [0, 1, 14, 15]], marker_rows, 0).sum()
        assert margins == 0  # nothing but the marker outside the two images
    assert len(set(partners)) > 25  # random partners, not a fixed shift


def test_gated_pairs_leaves_nothing_behind_on_a_missing_source(tmp_path):
    out = tmp_path / 'pairs'
    r = subprocess.run([sys.executable, str(EXPERIMENTS / 'gated_pairs.py'), str(out), '--source',
                        str(tmp_path / 'missing')], capture_output=True, text=True, cwd=EXPERIMENTS, timeout=120)
    assert r.returncode != 0 and 'not found' in r.stderr
    assert not out.exists()


def test_as_digits_matches_block_means_on_17_levels():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(6, 8, 8))
    images = np.kron(levels, np.ones((4, 4))).astype(np.uint8)  # 32x32, constant 4x4 blocks: exact box means
    expected = np.round(np.round(levels / 255 * 16) * 255 / 16)
    got = fashion_mnist_as_digits.as_digits(images)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) <= {round(k * 255 / 16) for k in range(17)}


def test_translated_places_the_image_whole_on_its_canvas():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(20, 8, 8), dtype=np.uint8)
    base = data.ArrayDataset(images, np.arange(20) % 10, [str(k) for k in range(10)])

    def offset(ds, i):
        img, label = ds[i]
        a = np.asarray(img)[..., 0]
        assert a.shape == (12, 12) and label == i % 10
        rows, cols = np.nonzero(a)
        dy, dx = rows.min(), cols.min()
        np.testing.assert_array_equal(a[dy:dy + 8, dx:dx + 8], images[i])
        assert a.sum() == int(images[i].sum())  # nothing else on the canvas
        return dy, dx

    val = translated.Translated(base, 12, train=False)
    val_offsets = [offset(val, i) for i in range(20)]
    assert val_offsets == [offset(val, i) for i in range(20)]  # validation: one fixed offset per image
    assert len(set(val_offsets)) > 5
    train = translated.Translated(base, 12, train=True)
    assert len({offset(train, 0) for _ in range(40)}) > 5  # training: a new offset at every draw
    with pytest.raises(ValueError, match='smaller than the images'):
        translated.Translated(base, 7, train=True)


def test_z_samples_repeats_each_image_k_times_in_a_row(monkeypatch):
    monkeypatch.setenv('K', '3')
    sys.modules.pop('z_samples', None)
    import z_samples

    class Loader:
        collate_fn = staticmethod(lambda items: (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))

    monkeypatch.setattr(z_samples, '_create_loaders', lambda *a, **k: (Loader(), 'val', 'spec'))
    train, val, spec = z_samples.create_loaders()
    items = [(torch.full((2,), float(i)), i) for i in range(4)]
    x, y = train.collate_fn(items)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert x[:, 0].tolist() == [float(v) for v in y.tolist()]
    assert (val, spec) == ('val', 'spec')
    sys.modules.pop('z_samples', None)
