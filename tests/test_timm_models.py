"""timm's own per-model tests on every registered timm_vib name.

The test functions come from ``tests/test_models.py`` of the source distribution of the installed timm
version, fetched once with pip into a cache (``$TIMM_VIB_CACHE``, default ``~/.cache/timm-vib``) and
imported, not copied into this repository. Each upstream function runs on each of our names:
forward, backward, default cfgs (timm lists ``vit_*`` names under its non-standard cfg test), TorchScript,
FX forward / backward / TorchScript, ``forward_intermediates`` and ``features_only`` (timm selects those
two by model module, so it would not pick up ours by itself). Only ``test_model_load_pretrained`` is left
out: it downloads weights from the Hub. An upstream ``pytest.skip`` fails here: nothing is skipped silently.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch

from timm_vib import MODEL_NAMES

UPSTREAM_TESTS = (
    'test_model_forward',
    'test_model_backward',
    'test_model_default_cfgs_non_std',
    'test_model_forward_torchscript',
    'test_model_forward_fx',
    'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
    'test_model_forward_intermediates',
    'test_model_forward_intermediates_features',
)
# upstream parametrizes its cfg tests over the pretrained tags (list_models(include_tags=True))
TAGGED = {'test_model_default_cfgs_non_std'}


def _cache_dir() -> Path:
    default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm-vib'
    return Path(os.environ.get('TIMM_VIB_CACHE', default))


def fetch_timm_test_models(version: str = timm.__version__) -> Path:
    """Path of ``tests/test_models.py`` of timm ``version``'s sdist, downloaded by pip on first use."""
    dest = _cache_dir() / f'timm-{version}' / 'test_models.py'
    if dest.exists():
        return dest
    sdist_dir = _cache_dir() / 'sdist'
    sdist = sdist_dir / f'timm-{version}.tar.gz'
    if not sdist.exists():
        cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', str(sdist_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not sdist.exists():
            raise RuntimeError(
                f'could not fetch the timm {version} source distribution (needed for timm\'s own model tests) '
                f'with `{" ".join(cmd)}`:\n{done.stdout}{done.stderr}')
    with tarfile.open(sdist) as tf:
        text = tf.extractfile(f'timm-{version}/tests/test_models.py').read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f'.tmp{os.getpid()}')
    tmp.write_bytes(text)
    tmp.replace(dest)
    return dest


def _jit_profiling():
    # (executor, mode): each setter returns the previous value, so read by setting and setting back
    executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(executor)
    mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(mode)
    return executor, mode


@contextmanager
def upstream_module():
    """timm's test module, imported; its import switches TorchScript's profiling mode off for the whole
    process, which is given back on exit so that later test modules run with the settings they expect."""
    path = fetch_timm_test_models()
    spec = importlib.util.spec_from_file_location('timm_upstream_test_models', path)
    module = importlib.util.module_from_spec(spec)
    executor, mode = _jit_profiling()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)  # timm's markers live in its pyproject
            spec.loader.exec_module(module)
        yield module
    finally:
        torch._C._jit_set_profiling_executor(executor)
        torch._C._jit_set_profiling_mode(mode)


@pytest.fixture(scope='module')
def upstream():
    with upstream_module() as module:
        yield module


def test_upstream_import_gives_back_the_torchscript_settings():
    before = _jit_profiling()
    with upstream_module():
        assert _jit_profiling() == (True, False)  # what timm's module sets at import
    assert _jit_profiling() == before


def _batch_size(fn) -> int:
    for mark in getattr(fn, 'pytestmark', []):
        if mark.name == 'parametrize' and mark.args[0] == 'batch_size':
            return mark.args[1][0]
    raise AssertionError(f'{fn.__name__} has no batch_size parametrization upstream')


def test_upstream_lists_our_models(upstream):
    """timm's own parametrization picks up our names (registered on import) for its per-name tests."""
    forward = next(m.args[1] for m in upstream.test_model_forward.pytestmark if m.args[0] == 'model_name')
    cfgs = next(m.args[1] for m in upstream.test_model_default_cfgs_non_std.pytestmark if m.args[0] == 'model_name')
    assert set(MODEL_NAMES) <= set(forward)
    assert {f'{n}.in100' for n in MODEL_NAMES} <= set(cfgs)


@pytest.mark.parametrize('model_name', MODEL_NAMES)
@pytest.mark.parametrize('test_name', UPSTREAM_TESTS)
def test_timm_model_suite(upstream, test_name, model_name):
    fn = getattr(upstream, test_name)
    name = f'{model_name}.in100' if test_name in TAGGED else model_name
    kwargs = dict(model_name=name, batch_size=_batch_size(fn))
    if test_name in TAGGED:
        kwargs['cfg_device'] = 'meta' if upstream._HAS_DEVICE_CONTEXT else upstream.torch_device
    try:
        fn(**kwargs)
    except pytest.skip.Exception as e:
        pytest.fail(f'timm\'s {test_name} skipped {name}: {e}')
