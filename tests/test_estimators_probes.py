"""Repetition probe: the copies land where they should, shifts equal a hand-made augmented pass."""
import pytest
import timm
import torch

from timm_vib.estimators import capture, copy_patch, repetition_probe
from timm_vib.estimators.probes import probe_generator

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def cells(x):
    return x.reshape(x.shape[0], 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], 16, -1)


def test_copy_patch_places_n_copies():
    x = torch.randn(3, 3, 32, 32)
    p = torch.tensor([0, 5, 15])
    out = copy_patch(x, p, 6, (8, 8), torch.Generator().manual_seed(0))
    c, co = cells(x), cells(out)
    for i in range(3):
        changed = ~(co[i] == c[i]).all(-1)
        assert int(changed.sum()) == 6 and not changed[p[i]]
        assert torch.equal(co[i][changed], c[i, p[i]].expand(6, -1))
    again = copy_patch(x, p, 6, (8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match='n_copies'):
        copy_patch(x, p, 16, (8, 8))
    with pytest.raises(IndexError, match='grid'):
        copy_patch(x, torch.tensor([0, 5, 16]), 2, (8, 8))


def test_repetition_probe_matches_manual_augmentation():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_vib', vib_dim=4, **SMALL).eval()
    x = torch.randn(3, 3, 32, 32)
    p = torch.tensor([2, 7, 9])
    lh = [(1, 0), (0, 2)]
    shifts = repetition_probe(m, x, p, lh, n_copies=(0, 4, 15), seed=3).shift
    assert shifts.shape == (3, 3, 2, 4)
    assert torch.all(shifts[:, 0] == 0)  # no copies, no shift
    with torch.no_grad(), capture(m) as rec:
        m(x)
        mu0 = rec.mu
        for j, n in enumerate((0, 4, 15)):
            # each image's locations from its own generator, seeded by (seed, its index)
            m(torch.cat([copy_patch(x[i:i + 1], p[i:i + 1], n, (8, 8), probe_generator(3, i)) for i in range(3)]))
            for k, (layer, head) in enumerate(lh):
                expected = rec.mu[torch.arange(3), layer, head, p] - mu0[torch.arange(3), layer, head, p]
                torch.testing.assert_close(shifts[:, j, k], expected)
    assert shifts[:, 2].abs().sum() > 0
    assert torch.equal(repetition_probe(m, x, p, lh, (0, 4, 15), seed=3).shift, shifts)  # reproducible
    assert not torch.equal(repetition_probe(m, x, p, lh, (0, 4, 15), seed=4).shift, shifts)
    # the batch size does not move the locations (it did with one generator for the whole stream)
    torch.testing.assert_close(repetition_probe(m, x, p, lh, (0, 4, 15), seed=3, batch_size=1).shift, shifts)
    # nested: an image's 4 copy cells are among its 8
    one = torch.zeros(1, 3, 32, 32)
    marked = one + torch.arange(16.).reshape(1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    copies = [copy_patch(marked, torch.tensor([5]), n, (8, 8), probe_generator(3, 0)) for n in (4, 8)]
    changed = [set((c[0, 0, ::8, ::8].flatten() == 5).nonzero().flatten().tolist()) - {5} for c in copies]
    assert len(changed[0]) == 4 and len(changed[1]) == 8 and changed[0] <= changed[1]


def test_repetition_probe_bad_input():
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_vib', vib_dim=4, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(IndexError, match='layer'):
        repetition_probe(m, x, [0, 1], [(2, 0)])
    with pytest.raises(IndexError, match='head'):
        repetition_probe(m, x, [0, 1], [(0, 3)])
    with pytest.raises(IndexError, match='grid'):
        repetition_probe(m, x, [0, 16], [(0, 0)])
    with pytest.raises(ValueError, match='does not fit'):
        repetition_probe(m, x, [0, 1], [(0, 0)], n_copies=(64,))
    with pytest.raises(ValueError, match='one patch index per image'):
        repetition_probe(m, x, [0], [(0, 0)])
