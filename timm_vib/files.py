"""Writing files so that a crash at any moment leaves either the old file or the new one."""
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ['atomic_write', 'atomic_write_json', 'atomic_write_text']

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = 'w', **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
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


def atomic_write_json(path: PathLike, obj: Any, **dump_kwargs: Any) -> None:
    dump_kwargs.setdefault('indent', 2)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + '\n')
