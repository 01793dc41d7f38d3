"""Writing files so that a crash at any moment leaves either the old file or the new one."""
import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ['atomic_write', 'atomic_write_json', 'atomic_write_text', 'umask_mode', 'apply_umask', 'finite_or_null',
           'json_line', 'staging_folder', 'move_into']

PathLike = Union[str, os.PathLike]


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # Linux reports the umask without changing it; os.umask can only read it by setting it, and a file
    # another thread creates in that instant would get the temporary mask, so that path is the fallback
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` give a new file (0o666) or folder (0o777) under the user's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def apply_umask(path: PathLike) -> None:
    """Give ``path`` (and everything under it, for a folder) the mode of an ordinary new file or folder.

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 whatever the umask; a file renamed into
    place from one must not stay private when the user's other files are not.
    """
    path = Path(path)
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
    else:
        os.chmod(path, file_mode)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = 'w', **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.chmod(tmp, umask_mode())  # mkstemp's 0600, not the umask
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, 'w', encoding='utf-8') as f:
        f.write(text)


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float (at any depth) replaced by None: JSON has no NaN, and
    Python's ``json`` would write a bare ``NaN`` that other readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_line(obj: Any) -> str:
    """One line of JSON Lines: valid JSON (non-finite numbers as null), newline-terminated."""
    return json.dumps(finite_or_null(obj), allow_nan=False) + '\n'


def atomic_write_json(path: PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as valid JSON (non-finite numbers as null), atomically."""
    dump_kwargs.setdefault('indent', 2)
    atomic_write_text(path, json.dumps(finite_or_null(obj), allow_nan=False, **dump_kwargs) + '\n')


@contextlib.contextmanager
def staging_folder(folder: PathLike, prefix: str) -> Iterator[Path]:
    """A fresh folder inside ``folder`` (created if needed) to write a set of files into before
    :func:`move_into` renames them into place; removed on exit, whatever happened. Staging folders
    under ``prefix`` that a killed process left are removed first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f'{prefix}*'):
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(staging: PathLike, folder: PathLike, last: str) -> None:
    """Rename every file of ``staging`` into ``folder`` (same file system: each rename is atomic), the
    file named ``last`` last, each with the mode of an ordinary new file."""
    for p in sorted(Path(staging).iterdir(), key=lambda p: p.name == last):
        apply_umask(p)
        os.replace(p, Path(folder) / p.name)
