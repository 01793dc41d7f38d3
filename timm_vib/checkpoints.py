"""Model folders: ``model.safetensors`` + timm's ``config.json``, the format of the Hugging Face Hub.

A folder written by :func:`save_model` loads with ``timm.create_model("local-dir:FOLDER")`` (after
``import timm_vib``) or :func:`load_model`, and is what a Hub repo of a timm model holds.
"""
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from timm.models import create_model, is_model
from timm.models._hub import save_for_hf

from .files import apply_umask, atomic_write_json

__all__ = ['save_model', 'load_model', 'read_config', 'copy_model', 'WEIGHTS_NAME', 'CONFIG_NAME', 'MANIFEST_NAME',
           'write_manifest', 'verify_checkpoint', 'remove_temporaries']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
MANIFEST_NAME = 'manifest.json'
TRAIN_STATE_NAME = 'train_state.json'
# what an interrupted write leaves: save_model's staging folders, atomic_write's and copy_model's
# temporary files, Checkpoints' half-written and set-aside checkpoints
TEMPORARIES = ('.save-*', '.*.tmp', 'checkpoints/.tmp-ckpt-*', 'checkpoints/.old-ckpt-*')


def save_model(
        model: torch.nn.Module,
        folder: Union[str, os.PathLike],
        model_args: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        architecture: Optional[str] = None,
        tag: Optional[str] = '',
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (timm's Hub format) into ``folder``.

    Args:
        model: a timm model created through ``timm.create_model`` (its factory kwargs are recorded).
        model_args: extra / replacement kwargs for ``timm.create_model`` (e.g. ``{'beta': 2.0}``).
        data_config: preprocessing of the weights (mean, std, input_size, crop_pct, interpolation).
        architecture: registered name to record instead of the one the model was created with.
        tag: the pretrained tag to record (timm's ``name.tag``: what the weights were trained on); ``None`` records
            none, ``''`` keeps the model's (the registered configs say ``in100``, which a run on other data is not).

    Each file is written to a temporary name and renamed, so an interruption leaves the previous
    files intact. Returns the folder.
    """
    from .vision_transformer_vib import VisionTransformerVIB
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, VisionTransformerVIB) and model.has_bottleneck:
        # recorded even when they were the defaults, so the folder reloads whatever later defaults are
        model_args = {'vib_dim': model.vib_dim, 'vib_hidden': model.vib_hidden, **(model_args or {})}
    with tempfile.TemporaryDirectory(prefix='.save-', dir=folder) as tmp:
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True, data_config=data_config)
        if architecture or tag != '':  # save_for_hf keeps the model's own name and tag
            cfg_path = Path(tmp) / CONFIG_NAME
            cfg = json.loads(cfg_path.read_text())
            if architecture:  # the recorded name must match the args
                cfg['architecture'] = architecture
            if tag != '':
                cfg.get('pretrained_cfg', {}).pop('tag', None)
                if tag:
                    cfg.setdefault('pretrained_cfg', {})['tag'] = tag
            cfg_path.write_text(json.dumps(cfg, indent=2))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(Path(tmp) / name, 'rb+') as f:
                os.fsync(f.fileno())
            apply_umask(Path(tmp) / name)  # safetensors writes 0600
            os.replace(Path(tmp) / name, folder / name)
    return folder


def read_config(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``config.json`` of a model folder, with clear errors for a missing or corrupt one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'model folder {folder} does not exist')
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f'{folder} has no {CONFIG_NAME}: not a model folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})')
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is corrupt (not valid JSON: {e})') from None
    if not isinstance(cfg, dict) or 'architecture' not in cfg:
        raise ValueError(f'{path} is not a timm model config (no "architecture" field)')
    return cfg


def load_model(folder: Union[str, os.PathLike], **kwargs: Any) -> torch.nn.Module:
    """Rebuild the model saved in ``folder`` with its weights (``timm.create_model('local-dir:...')``).

    Extra kwargs go to ``timm.create_model``. Errors name the problem: missing folder or files,
    corrupt config or weights, an architecture that is not registered (is ``timm_vib`` imported?),
    weights of another architecture.
    """
    import timm_vib  # noqa: F401  (registers the architectures)
    folder = Path(folder)
    cfg = read_config(folder)
    arch = cfg['architecture']
    if not is_model(arch):
        raise ValueError(f'{folder}: architecture {arch!r} is not registered with timm')
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f'{folder} has no {WEIGHTS_NAME}')
    if 'vib_hidden' not in (cfg.get('model_args') or {}) and 'vib_hidden' not in kwargs and _linear_layout(weights):
        kwargs['vib_hidden'] = 0  # saved before vib_hidden existed (timm_vib 0.1): linear bottlenecks
    try:
        return create_model(f'local-dir:{folder}', pretrained=True, **kwargs)
    except SafetensorError as e:
        raise ValueError(f'{weights} is corrupt ({e})') from None
    except RuntimeError as e:
        if 'size mismatch' in str(e) or 'Missing key' in str(e) or 'Unexpected key' in str(e):
            first = str(e).strip().splitlines()[:3]
            raise ValueError(f'{weights} does not fit {arch} as configured in {CONFIG_NAME}: ' + ' '.join(first)) from None
        raise


def _linear_layout(weights: Path) -> bool:
    """True if the file holds bottlenecks with linear encoders (no ``enc_out_weight``), read from its header."""
    try:
        with safe_open(str(weights), 'pt') as f:
            keys = list(f.keys())
    except SafetensorError as e:
        raise ValueError(f'{weights} is corrupt ({e})') from None
    return any(k.endswith('.vib.enc_weight') for k in keys) and not any(k.endswith('.vib.enc_out_weight') for k in keys)


def copy_model(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> Path:
    """Copy the two files of a model folder (e.g. a run's final weights into a Hub folder)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(Path(src) / name, dst / f'.{name}.tmp')
        os.replace(dst / f'.{name}.tmp', dst / name)
    return dst


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Union[str, os.PathLike]) -> Path:
    """Record size and SHA-256 of every file of a checkpoint folder in ``manifest.json``.

    Written last, so a checkpoint with a manifest is complete, and any later damage (truncation,
    a disk error) shows up in :func:`verify_checkpoint`."""
    folder = Path(folder)
    files = {p.name: {'bytes': p.stat().st_size, 'sha256': _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    atomic_write_json(folder / MANIFEST_NAME, {'files': files})
    return folder / MANIFEST_NAME


def verify_checkpoint(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check a checkpoint folder before it is used; returns its ``train_state.json``.

    Every file listed in the manifest must be present with its size and checksum; without a manifest
    (checkpoints of timm_vib <= 0.2) the train state must parse and the weights' header must read.
    Raises ValueError naming the damaged or missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'checkpoint {folder} does not exist')
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())['files']
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{manifest} is corrupt ({e})') from None
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                raise ValueError(f'{path} is missing (listed in {MANIFEST_NAME})')
            if path.stat().st_size != want['bytes']:
                raise ValueError(f'{path} is damaged: {path.stat().st_size} bytes, {want["bytes"]} written (truncated?)')
            if _sha256(path) != want['sha256']:
                raise ValueError(f'{path} is damaged: its checksum differs from the one written in {MANIFEST_NAME}')
    else:
        for path in folder.glob('*.safetensors'):
            try:
                with safe_open(str(path), 'pt') as f:
                    f.keys()
            except SafetensorError as e:
                raise ValueError(f'{path} is corrupt ({e})') from None
    path = folder / TRAIN_STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f'{path} is missing') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is corrupt (not valid JSON: {e})') from None
    missing = {'epoch', 'batch', 'step'} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f'{path} is not a train state (no {", ".join(sorted(missing))})')
    return state


def remove_temporaries(run_dir: Union[str, os.PathLike]) -> List[Path]:
    """Delete what interrupted writes left in a run folder (staging folders, ``.*.tmp`` files,
    half-written checkpoints); returns what was removed. Call it only while no write is under way."""
    removed = []
    for pattern in TEMPORARIES:
        for name in glob.glob(os.path.join(glob.escape(str(run_dir)), pattern)):
            p = Path(name)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
