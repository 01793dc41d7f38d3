"""The run folder: what it holds, how to find finished runs, and how to read them.

Training writes a run folder, sweeps and the demo lay many of them out, the report and the Hub
export read them; all of them go through this module.

Run folder:
  run_config.json   every choice: resolved arguments, model, beta, KL convention, data, world size, versions
  metrics.jsonl     one JSON object per epoch, appended (train / val loss, CE, top-1 / top-5 in %, nats, per-head KL)
  model.safetensors + config.json   final weights in timm's Hub format (``timm_vib.checkpoints.load_model``)
  checkpoints/      Accelerate states (model, optimizer, RNGs, sampler) + train_state.json
  summary.json      written last: its presence means the run finished

Sweep folder (``timm-vib sweep``; the demo's ``OUTPUT/runs``): one sub-folder per seed, ``seed<S>``,
holding one run folder per model of the spectrum (``vit_tiny_noattn``, ``vit_tiny_vib_b1``, ...,
``vit_tiny_gap``), plus ``sweep.json`` / ``sweep.md`` (the table, one row per run with its seed),
``logs/seed<S>/<model>.log`` (runs trained in their own process; ``.pid`` beside it while one is
training) and, for Slurm, ``jobs.json`` (job ids and logs of every attempt) and ``jobs/`` (submitit's).
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

from .files import atomic_write_text, json_line

__all__ = ['SUMMARY', 'METRICS', 'RUN_CONFIG', 'RUN_FILES', 'seed_folder', 'is_finished', 'find_runs',
           'read_json', 'read_summary', 'run_top1', 'read_metrics', 'append_metrics', 'truncate_metrics']

PathLike = Union[str, os.PathLike]
SUMMARY, METRICS, RUN_CONFIG = 'summary.json', 'metrics.jsonl', 'run_config.json'
RUN_FILES = (METRICS, RUN_CONFIG, SUMMARY)  # the run's own records, published beside the weights


def seed_folder(seed: int) -> str:
    """Name of a seed's sub-folder in a sweep folder: 'seed0'."""
    return f'seed{int(seed)}'


def is_finished(run_dir: PathLike) -> bool:
    """A run is finished once its summary.json exists (written last, atomically)."""
    return (Path(run_dir) / SUMMARY).is_file()


def find_runs(folder: PathLike) -> List[Path]:
    """Finished runs inside ``folder``: run folders directly in it (one seed's sweep) and in its
    ``seed<S>`` sub-folders (a sweep over seeds), sorted by path."""
    folder = Path(folder)
    found = set(folder.glob(f'*/{SUMMARY}')) | set(folder.glob(f'seed*/*/{SUMMARY}'))
    return sorted(p.parent for p in found)


def read_json(path: PathLike) -> Dict[str, Any]:
    """A JSON file, with clear errors when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f'{path} is missing') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is corrupt (not valid JSON: {e})') from None


def read_summary(run_dir: PathLike) -> Dict[str, Any]:
    """The run's summary.json (FileNotFoundError naming the folder when the run is not finished)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f'{run_dir} has no {SUMMARY}: the run is not finished (or this is not a run folder)')
    return read_json(path)


def run_top1(summary: Dict[str, Any]) -> float:
    """A run's validation top-1 (%): the mean over its K sampled validation passes when it made them (the
    paper's numbers are such means), else its last validation."""
    st = summary.get('stochastic_eval') or {}
    return float(st['top1_mean'] if st.get('top1_mean') is not None else summary['val_top1'])


def _rows(path: Path) -> Iterator[Dict[str, Any]]:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a write cut short by a kill: the epoch is redone on resume
                return
            raise ValueError(f'{path} line {i + 1} is corrupt (not valid JSON)') from None


def read_metrics(run_dir_or_file: PathLike) -> List[Dict[str, Any]]:
    """Rows of metrics.jsonl (a run folder or the file itself); [] if there is none yet."""
    path = Path(run_dir_or_file)
    path = path / METRICS if path.is_dir() else path
    return list(_rows(path)) if path.is_file() else []


def append_metrics(path: PathLike, row: Dict[str, Any]) -> None:
    """Append one epoch's row to metrics.jsonl: one write of one line, flushed to disk, so a
    1000-epoch run does not rewrite its history every epoch. A kill mid-write can only cut the last
    line, which :func:`read_metrics` skips."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json_line(row))
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: PathLike, last_epoch: int) -> None:
    """Keep the rows up to ``last_epoch`` (rewritten atomically): on resume, the epochs after the
    checkpoint are trained again and must not be listed twice."""
    kept = [r for r in read_metrics(path) if r['epoch'] <= last_epoch]
    atomic_write_text(path, ''.join(json_line(r) for r in kept))
