"""How a ``timm-vib`` sub-command reports bad input: one line on stderr and exit code 2.

Every sub-command module wraps its entry point with :func:`command`; ``cli.py`` only wires them up,
so nothing here imports a sub-command.
"""
import argparse
import sys
from typing import Any, Callable, Tuple

__all__ = ['command']


def command(fn: Callable[[argparse.Namespace], Any], errors: Tuple[type, ...] = ()) -> Callable[[argparse.Namespace], int]:
    """Wrap a sub-command: bad input (ValueError, FileNotFoundError, and ``errors``) becomes one line
    on stderr and exit code 2, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            fn(args)
        except (ValueError, FileNotFoundError, *errors) as e:
            print(f'timm-vib {args.command}: error: {e}', file=sys.stderr)
            return 2
        return 0
    return run
