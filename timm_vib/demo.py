"""``timm-vib demo``: train a small spectrum (no attention, several betas, unrestricted ViT) on built-in
data, then dissect it with :func:`timm_vib.report.analyze` — the small case of the real workflow.

Runs go to ``OUTPUT/runs/seed<S>/<model>`` (the ``timm-vib sweep`` layout, so either command can
continue the other's runs), the report to ``OUTPUT/report``. Finished runs with the same settings are
reused. ``--seeds 0,1,2`` trains the spectrum once per seed (the report shows mean ± std over them);
``--jobs N`` trains N runs at a time, one process each, the ``--threads`` divided between them.
"""
import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .vision_transformer_vib import POS_EMBED_INITS

__all__ = ['PRESETS', 'add_demo_args', 'run_demo', 'register_cli', 'summary_table']

# Sized for ~10 minutes on 2 CPU cores, report included (measured; see README).
PRESETS: Dict[str, Dict[str, Any]] = {
    # 2x2-pixel patches of the 8x8 digits (64 tokens): at 4x4 patches an additive per-patch model already
    # beats the ViT, so attention would not matter (docs/spectrum.md). Decoders start near zero and the
    # posterior at the prior: the model starts as independent patches and pays for what it sends; the
    # reference's logvar -6 needs far more Adam steps than 15 epochs to relax (docs/spectrum.md). A one-pixel
    # token is told apart from the others by its position alone, and timm's position init (std 0.02, made for
    # 196 patches of 768 pixels) starts them nearly alike: every model starts from the 2-D sin-cos embedding
    # instead and learns 13 points more in the 15 epochs on digits, 4 on Fashion-MNIST (docs/spectrum.md, 4e).
    # vib_hidden None: the registered models' 64 (the reference's); 16 helps Fashion-MNIST and breaks digits (4f).
    'default': dict(img_size=16, patch_size=2, depth=4, embed_dim=48, num_heads=3, vib_dim=8, vib_hidden=None,
                    vib_logvar_init=0.0, vib_small_init_dec=True, pos_embed_init='sincos', epochs=15,
                    betas='0.01,1,10', batch_size=64, lr=3e-3, warmup_epochs=2, beta_warmup_epochs=1.5,
                    stochastic_eval=3, max_train_samples=None, max_val_samples=None, max_images=512, nmi_samples=20000,
                    seeds='0,1,2', jobs=2),
    # the test's preset: seconds per model, every figure still drawn. The reference's init (posteriors
    # nearly deterministic, full decoders) so that one epoch leaves heads active to draw
    'smallest': dict(img_size=8, patch_size=2, depth=2, embed_dim=24, num_heads=3, vib_dim=4, vib_hidden=None,
                     vib_logvar_init=-6.0, vib_small_init_dec=False, pos_embed_init='sincos', epochs=1,
                     betas='0.1,1', batch_size=64, lr=2e-3, warmup_epochs=0, beta_warmup_epochs=0, stochastic_eval=2,
                     max_train_samples=256, max_val_samples=64, max_images=64, nmi_samples=2000, seeds='0', jobs=1),
}


def add_demo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument('--preset', choices=sorted(PRESETS), default='default',
                   help='default: ~10 min on 2 CPU cores; smallest: seconds (tests)')
    p.add_argument('--smallest', dest='preset', action='store_const', const='smallest', help='= --preset smallest')
    p.add_argument('--output', default='runs/demo', help='runs go to OUTPUT/runs, the report to OUTPUT/report')
    p.add_argument('--data', default='digits', help='digits (built in) or fashion-mnist[:FOLDER] (Debian package)')
    p.add_argument('--betas', default=None, help='comma-separated betas (default preset: 0.01,1,10)')
    p.add_argument('--no-ends', action='store_true', help='without the no-attention and unrestricted ViT runs')
    for name, typ in (('img-size', int), ('patch-size', int), ('depth', int), ('embed-dim', int), ('num-heads', int),
                      ('vib-dim', int), ('vib-hidden', int), ('vib-logvar-init', float), ('epochs', int),
                      ('batch-size', int), ('lr', float), ('warmup-epochs', float), ('beta-warmup-epochs', float),
                      ('stochastic-eval', int), ('max-train-samples', int), ('max-val-samples', int),
                      ('max-images', int), ('nmi-samples', int)):
        p.add_argument(f'--{name}', type=typ, default=None, help='overrides the preset')
    p.add_argument('--vib-small-init-dec', type=lambda v: {'true': True, 'false': False}[v.lower()], default=None,
                   metavar='{true,false}', help='overrides the preset: decoders start near zero')
    p.add_argument('--pos-embed-init', choices=POS_EMBED_INITS, default=None,
                   help="overrides the preset (sincos): where every model's learned position embedding starts; "
                        "trunc_normal is timm's")
    p.add_argument('--seed', type=int, default=None, help='one seed instead of the preset\'s --seeds')
    p.add_argument('--seeds', default=None, help='comma-separated seeds, a spectrum each (default preset: 0,1,2)')
    p.add_argument('--jobs', type=int, default=None, help='runs trained at a time, one process each (default preset: 2)')
    p.add_argument('--cpu', action='store_true', help='train on the CPU even if a GPU is present')
    p.add_argument('--mixed-precision', choices=('auto', 'no', 'fp16', 'bf16'), default='auto')
    p.add_argument('--num-workers', type=int, default=0)
    p.add_argument('--threads', type=int, default=1,
                   help="torch CPU threads in all, divided between --jobs, at least one each (0: every core). The "
                        "demo's models are "
                        "too small to gain from more than one each, and extra threads slow them down many times "
                        "over when other jobs share the cores")
    p.add_argument('--no-progress', action='store_true')
    return p


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    s = dict(PRESETS[args.preset])
    for k in s:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    return s


def _train_argv(s: Dict[str, Any], args: argparse.Namespace, model: str, out: Path, seed: Optional[int] = None) -> List[str]:
    kw = [f'{k}={s[k]}' for k in ('img_size', 'patch_size', 'depth', 'embed_dim', 'num_heads', 'pos_embed_init')]
    if 'vib' in model:
        kw += [f"vib_dim={s['vib_dim']}", f"vib_logvar_init={s['vib_logvar_init']}",
               f"vib_small_init_dec={s['vib_small_init_dec']}"]
        if s['vib_hidden'] is not None:  # None: the registered models' default (64, the reference's)
            kw.append(f"vib_hidden={s['vib_hidden']}")
    # ramping beta up from 0 (the reference code's warm-up) lets heads learn something worth its cost
    # before the price applies; at full beta from the first step, sampled noise swamps small models
    bw = ['--beta-warmup-epochs', str(s['beta_warmup_epochs'])] if 'vib' in model else []
    argv = ['--model', model, '--model-kwargs', *kw, '--data', args.data, '--epochs', str(s['epochs']),
            '--batch-size', str(s['batch_size']), '--lr', str(s['lr']), '--warmup-epochs', str(s['warmup_epochs']),
            '--seed', str(seed if seed is not None else (args.seed or 0)), '--output', str(out), '--mixed-precision', args.mixed_precision,
            '--num-workers', str(args.num_workers), '--stochastic-eval', str(s['stochastic_eval'] if 'vib' in model else 0),
            '--log-interval', '5', *bw]
    for k in ('max_train_samples', 'max_val_samples'):
        if s[k] is not None:
            argv += [f'--{k.replace("_", "-")}', str(s[k])]
    if args.cpu:
        argv.append('--cpu')
    if args.no_progress:
        argv.append('--no-progress')
    return argv


def _reusable(out: Path, targs: argparse.Namespace) -> bool:
    """True if ``out`` holds a finished run with the same training options (every one ``--resume``
    compares); ValueError naming the differences if it holds another run."""
    from .runs import is_finished
    from .training import run_differences
    if not is_finished(out):
        return False
    diff = run_differences(out, targs)
    if diff:
        raise ValueError(f'{out} holds a finished run with other settings ({"; ".join(diff)}): '
                         'pass another --output or delete it')
    return True


def summary_table(run_dirs: Sequence[Path], title: str = 'timm-vib demo'):
    """The rich table of finished runs: model, beta, top-1 (± stochastic std), nats/image, active heads, time."""
    from rich.table import Table
    from .report import fmt_nats, fmt_run_top1, load_runs
    t = Table(title=title)
    runs = load_runs(run_dirs)
    seeded = len({r.seed for r in runs}) > 1
    for c in ('model', 'seed' if seeded else None, 'beta', 'top-1', 'nats / image', 'active heads', 'train time'):
        if c:
            t.add_column(c, justify='left' if c in ('model', 'active heads') else 'right')
    for r in runs:
        s = r.summary
        t.add_row(s['model'].replace('vit_tiny_', ''), *([str(r.seed)] if seeded else []),
                  '-' if r.mode != 'vib' else f"{s['beta']:g}", fmt_run_top1(s),
                  {'none': '0', 'plain': 'unbounded'}.get(r.mode) or fmt_nats(s['nats_per_image']),
                  '-' if r.mode != 'vib' else _heads(s),
                  f"{s['train_seconds']:.0f} s")
    return t


def _heads(s: Dict[str, Any]) -> str:
    # 'n/total', with the list when it is short enough to read
    n, total = len(s['active_heads']), s['depth'] * s['num_heads']
    return f"{n}/{total}" + (f": {', '.join(s['active_heads'])}" if 0 < n <= 4 else '')


def run_demo(args: argparse.Namespace) -> Path:
    """Train (or reuse) the spectrum for every seed under ``args.output``/runs, write the report;
    returns index.html."""
    from rich.console import Console
    from . import training
    from .report import analyze
    from .sweep import SweepError, local_pid, parse_betas, parse_seeds, plan_runs, run_local, running_marker, runs_failed
    console = Console()
    s = _settings(args)
    if s['jobs'] < 1:
        raise ValueError(f"--jobs must be >= 1, got {s['jobs']}")
    if args.threads < 0:
        raise ValueError(f'--threads must be >= 0 (0: every core), got {args.threads}')
    if args.threads:  # this process trains when --jobs is 1, and writes the report
        import torch
        torch.set_num_threads(args.threads)
    betas = parse_betas(s['betas'] if args.betas is None else args.betas)
    seeds = [args.seed] if args.seed is not None and args.seeds is None else parse_seeds(s['seeds'])
    root = Path(args.output)
    plan = plan_runs(sorted(betas, reverse=True), seeds, not args.no_ends)
    t0 = time.perf_counter()
    console.rule(f'[bold]timm-vib demo: {len(plan)} runs ({len(seeds)} seed{"s" * (len(seeds) > 1)}) on {args.data}, '
                 f'then the report in {root / "report"}')
    console.print(f"settings ({args.preset}): {s}")
    todo = []
    for run in plan:  # check every run's arguments before training any
        out = root / 'runs' / run.folder
        targs = training.parse_args(_train_argv(s, args, run.model, out, seed=run.seed))
        targs.beta, targs.resume = run.beta, 'latest'
        training.check_args(targs)
        if _reusable(out, targs):
            console.print(f'{run.folder}: finished run reused')
        else:
            todo.append((run, targs))
    # a run another process on this machine is training (a second demo or a sweep on the same folder): two
    # writers would interleave one run's checkpoints, and the report needs it finished, so stop before training
    busy = [f'{run.folder} (process {pid})' for run, _ in todo if (pid := local_pid(root / 'runs', run)) is not None]
    if busy:
        raise SweepError(f'{", ".join(busy)} being trained by another process on this machine: wait for it to finish '
                         f'and rerun (the finished runs are reused), or choose another --output')
    if s['jobs'] == 1:
        for i, (run, targs) in enumerate(todo, 1):
            console.rule(f'[{i}/{len(todo) + 1}] training {run.folder}')
            with running_marker(root / 'runs', run, os.getpid()):
                training.train(targs)
    elif todo:
        console.rule(f'training {len(todo)} runs, {s["jobs"]} at a time (logs in {root / "runs" / "logs"})')
        failed = run_local(todo, root / 'runs', s['jobs'], args.threads, print_fn=console.print)
        if failed:
            raise runs_failed(failed, len(todo))
    runs = [root / 'runs' / r.folder for r in plan]
    console.rule(f'[{len(todo) + 1}/{len(todo) + 1}] report')
    index = analyze(runs, root / 'report', max_images=s['max_images'], nmi_samples=s['nmi_samples'],
                    progress=not args.no_progress)
    console.print(summary_table(runs, title=f'timm-vib demo on {args.data} ({time.perf_counter() - t0:.0f} s in all)'))
    console.print(f'report: {index} (and index.md beside it)')
    return index


def _analyze_cli(args: argparse.Namespace) -> Path:
    from rich.console import Console
    from .report import analyze, load_runs
    for flag in ('max_images', 'batch_size', 'nmi_samples'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    index = analyze(args.run_dirs, args.out, max_images=args.max_images, batch_size=args.batch_size,
                    nmi_samples=args.nmi_samples, device=args.device, progress=not args.no_progress)
    Console().print(summary_table([r.dir for r in load_runs(args.run_dirs)], title='runs analysed'))
    print(f'report: {index}')
    return index


def register_cli(sub) -> None:
    """Add ``demo`` and ``analyze`` to the ``timm-vib`` sub-command parser ``sub``."""
    from .errors import command
    d = add_demo_args(sub.add_parser('demo', help='train a small spectrum on built-in data and write its report'))
    from .sweep import SweepError
    d.set_defaults(func=command(run_demo, errors=(SweepError,)))
    a = sub.add_parser('analyze', help='write the report (figures, index.html, index.md) of any set of runs')
    a.add_argument('run_dirs', nargs='+', help='run folders (with summary.json) or sweep folders holding them')
    a.add_argument('--out', required=True, help='report folder')
    a.add_argument('--max-images', type=int, default=512, help='validation images streamed per analysis')
    a.add_argument('--batch-size', type=int, default=64)
    a.add_argument('--nmi-samples', type=int, default=20000, help='Monte Carlo samples for the NMI matrix')
    a.add_argument('--device', default='cpu', help='torch device for the analyses (cpu, cuda, ...)')
    a.add_argument('--no-progress', action='store_true')
    a.set_defaults(func=command(_analyze_cli))
