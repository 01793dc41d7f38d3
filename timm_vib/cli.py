"""The ``timm-vib`` console command: one sub-command per job.

Each sub-command lives with the code it drives; this module only wires them up.
"""
import argparse
import sys
from typing import List, Optional


def _tour(args: argparse.Namespace) -> int:
    """Build every registered model, run a batch, print its size and the nats its heads send."""
    import timm
    import torch
    from rich.console import Console
    from rich.table import Table

    import timm_vib

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    table = Table(title=f'timm_vib models, {args.img_size} px, untrained')
    for col in ('model', 'beta', 'params (M)', 'logits', 'nats / image', 'nats / patch'):
        table.add_column(col)
    for name in timm_vib.MODEL_NAMES:
        model = timm.create_model(name, img_size=args.img_size).eval()
        with torch.no_grad():
            if model.attn_mode == 'plain':
                logits, nats = model(x), None
            else:
                logits, kl = model(x, return_kl=True)
                nats = kl.sum(dim=(1, 2))  # [B, tokens]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        table.add_row(
            name, f'{model.beta:g}', f'{params:.2f}', str(tuple(logits.shape)),
            'unbounded' if nats is None else f'{nats.sum(-1).mean():.1f}',
            'unbounded' if nats is None else f'{nats.mean():.2f}')
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-vib', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)

    tour = sub.add_parser('tour', help='build every registered model and show what its heads send')
    tour.add_argument('--img-size', type=int, default=224)
    tour.add_argument('--batch-size', type=int, default=2)
    tour.add_argument('--seed', type=int, default=0)
    tour.set_defaults(func=_tour)

    from . import hub
    hub.add_commands(sub)
    from .training import register_cli as _register_training
    _register_training(sub)  # train
    from .sweep import register_cli as _register_sweep
    _register_sweep(sub)  # sweep
    from .demo import register_cli as _register_demo
    _register_demo(sub)  # demo, analyze
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
