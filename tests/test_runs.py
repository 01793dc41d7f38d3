"""The run folder module: metrics appended (not rewritten), kills mid-write tolerated, runs found in
seed sub-folders, clear errors for corrupt files."""
import json
import os

import pytest

from timm_vib.runs import append_metrics, find_runs, read_metrics, read_summary, seed_folder, truncate_metrics


def test_metrics_are_appended_in_place(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    append_metrics(path, {'epoch': 1, 'val_top1': 10.0})
    before, inode = path.read_bytes(), os.stat(path).st_ino
    append_metrics(path, {'epoch': 2, 'val_top1': 20.0})
    # the same file grown by one line: earlier epochs are not rewritten
    assert os.stat(path).st_ino == inode and path.read_bytes().startswith(before)
    assert path.read_bytes()[len(before):].count(b'\n') == 1
    assert [r['epoch'] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_line_cut_by_a_kill_is_skipped_and_truncate_drops_later_epochs(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    for e in (1, 2, 3):
        append_metrics(path, {'epoch': e})
    with open(path, 'a') as f:
        f.write('{"epoch": 4, "val_')  # a write cut short
    assert [r['epoch'] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 2)
    assert [r['epoch'] for r in read_metrics(path)] == [1, 2]
    assert path.read_text().endswith('\n') and not list(tmp_path.glob('.*tmp*'))
    # a corrupt line that is not the last is not a cut write: named, not skipped
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match='line 2 is corrupt'):
        read_metrics(path)
    assert read_metrics(tmp_path / 'nowhere') == []


def test_find_runs_in_seed_folders_and_unfinished_runs_are_named(tmp_path):
    for folder in ('a', f'{seed_folder(0)}/b', f'{seed_folder(1)}/b', f'{seed_folder(1)}/unfinished'):
        (tmp_path / folder).mkdir(parents=True)
        if 'unfinished' not in folder:
            (tmp_path / folder / 'summary.json').write_text(json.dumps({'seed': 0}))
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == ['a', 'seed0/b', 'seed1/b']
    with pytest.raises(FileNotFoundError, match='not finished'):
        read_summary(tmp_path / 'seed1' / 'unfinished')
    (tmp_path / 'a' / 'summary.json').write_text('{"seed": ')
    with pytest.raises(ValueError, match='corrupt'):
        read_summary(tmp_path / 'a')
