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
