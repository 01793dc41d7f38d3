"""Training through Hugging Face Accelerate: one loop for one CPU, one GPU, many GPUs or nodes.

``train(args)`` is the loop, written top to bottom like Accelerate's examples; the pieces it uses
(arguments, model, schedule, evaluation, checkpoints) are the other functions here. The run folder
it writes (``--output``) is described in :mod:`timm_vib.runs`. ``examples/train.py``, ``timm-vib
train`` and every run of ``timm-vib sweep`` / ``timm-vib demo`` call it.
"""
import argparse
import ast
import copy
import json
import math
import os
import platform
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import command
from .checkpoints import TRAIN_STATE_NAME, remove_temporaries, verify_checkpoint, write_manifest
from .files import apply_umask, atomic_write_json
from .information import KL_REDUCTIONS, information_loss, information_per_sample
from .runs import METRICS, RUN_CONFIG, SUMMARY, append_metrics, read_metrics, truncate_metrics
from .vision_transformer_vib import check_patch_grid

__all__ = ['add_train_args', 'parse_args', 'to_argv', 'train', 'evaluate', 'Checkpoints', 'build_model',
           'register_cli', 'ACTIVE_KL']

ACTIVE_KL = 1e-2  # nats: a head is active if it sends more than this to at least one validation patch (paper)
BETA_SCHEDULES = ('linear', 'log')
LOG_RAMP_START = 1e-8  # the reference code's start of its log ramp


def default_beta_warmup_epochs(epochs: float) -> float:
    """The beta warm-up without ``--beta-warmup-epochs``: 10 % of the epochs (the reference script: 100 of 1000)."""
    return 0.1 * epochs


def beta_at(beta: float, update: int, warmup_updates: int, schedule: str = 'linear') -> float:
    """The information cost in force at optimizer update ``update`` (0-based) of a warm-up over
    ``warmup_updates`` updates: ``linear`` rises from beta / warmup_updates to beta, ``log`` rises
    geometrically from 1e-8 to beta (the reference code's two ramps); beta itself afterwards."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f'beta schedule must be one of {BETA_SCHEDULES}, got {schedule!r}')
    if not (math.isfinite(beta) and beta >= 0) or update < 0 or warmup_updates < 0:
        raise ValueError(f'beta must be finite and >= 0, update and warmup_updates >= 0; got beta={beta}, '
                         f'update={update}, warmup_updates={warmup_updates}')
    if update >= warmup_updates or beta == 0:
        return beta
    if schedule == 'linear':
        return beta * (update + 1) / warmup_updates
    return math.exp(math.log(LOG_RAMP_START) + (math.log(beta) - math.log(LOG_RAMP_START)) * update / warmup_updates)


# --- arguments ----------------------------------------------------------------------------------

def _kv(text: str) -> Tuple[str, Any]:
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'--model-kwargs takes KEY=VALUE, got {text!r}')
    key, value = text.split('=', 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string, e.g. global_pool=avg
    return key, value


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a training run (defaults: the paper's recipe, appendix A)."""
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_tiny_vib_b1', help='timm model name (vit_tiny_vib_b4, vit_tiny_noattn, ...)')
    g.add_argument('--model-kwargs', nargs='*', default=[], type=_kv, metavar='KEY=VALUE',
                   help='passed to timm.create_model, e.g. depth=2 img_size=32 patch_size=4')
    g.add_argument('--beta', type=float, default=None, help='information cost (default: from the model name)')
    g.add_argument('--beta-warmup-epochs', type=float, default=None,
                   help='ramp beta up over these epochs (default: 10%% of --epochs, as the reference script: 100 '
                        'of 1000; 0 = fixed beta, as the paper text says)')
    g.add_argument('--beta-schedule', choices=BETA_SCHEDULES, default='linear',
                   help='warm-up shape: linear from 0, or log (geometric) from 1e-8, the reference code\'s two options')
    g.add_argument('--kl-reduction', choices=KL_REDUCTIONS, default='mean',
                   help='mean over layers x heads x tokens (reference code, default), sum (eq. 3), or sqrt '
                        '(the reference\'s --sqrt-kl: square root of each head\'s mean KL over tokens, then mean)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (through Accelerate)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='digits',
                   help='digits | fashion-mnist[:FOLDER] | an ImageNet-style FOLDER | one of timm\'s dataset names '
                        'with its local root, PREFIX/NAME:ROOT (torch/cifar10:DIR, hfds/NAME:CACHE_DIR)')
    g.add_argument('--class-list', default=None, help='file of WordNet ids to keep, or "imagenet100"')
    g.add_argument('--max-train-samples', type=int, default=None, help='keep N training images (short runs)')
    g.add_argument('--max-val-samples', type=int, default=None, help='keep N validation images')
    g.add_argument('--num-workers', type=int, default=0)
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=1000)
    g.add_argument('--batch-size', type=int, default=256, help='per process')
    g.add_argument('--lr', type=float, default=6e-4)
    g.add_argument('--min-lr', type=float, default=1e-6, help='end of the cosine schedule')
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--warmup-epochs', type=float, default=10.)
    g.add_argument('--grad-accum', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (off by default)')
    g.add_argument('--mixed-precision', choices=('auto', 'no', 'fp16', 'bf16'), default='auto',
                   help='auto: bf16 on GPUs that have it, else fp16 on GPU, off on CPU')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--cpu', action='store_true', help='train on the CPU even if a GPU is present')
    g = p.add_argument_group('run')
    g.add_argument('--output', default=None, help='run folder (default runs/MODEL-DATA)')
    g.add_argument('--resume', nargs='?', const='latest', default=None, metavar='CHECKPOINT',
                   help='continue from the latest checkpoint in OUTPUT/checkpoints (or the one given)')
    g.add_argument('--checkpoint-every', type=int, default=0, help='also save a checkpoint every N optimizer steps')
    g.add_argument('--keep-checkpoints', type=int, default=2, help='keep the latest K checkpoints')
    g.add_argument('--eval-z', choices=('sample', 'mean'), default='sample',
                   help="validation of bottlenecked models: sample z as in training (the reference code's "
                        "validation, and the paper's numbers) or feed the decoders the posterior mean, which MLP "
                        "decoders trained on noisy z never saw (see docs/spectrum.md)")
    g.add_argument('--stochastic-eval', type=int, default=0, metavar='K',
                   help='also report mean and std over K validation passes that sample z (after the last epoch)')
    g.add_argument('--stochastic-eval-every', type=int, default=0, metavar='N',
                   help='run the K sampled validation passes every N epochs too (0: only after the last)')
    g.add_argument('--log-with', nargs='*', default=[], help='Accelerate trackers, e.g. tensorboard')
    g.add_argument('--log-interval', type=int, default=10, help='steps between progress-bar updates')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    g.add_argument('--kill-at-step', type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL itself there
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the training arguments (``examples/train.py`` and ``timm-vib train`` take the same)."""
    return add_train_args(argparse.ArgumentParser(description='Train a timm_vib model with Accelerate')).parse_args(argv)


def to_argv(args: argparse.Namespace) -> List[str]:
    """The command line that parses back to these training arguments (``parse_args(to_argv(a)) == a``):
    how a sweep hands a run to another process or to a Slurm job."""
    defaults = vars(parse_args([]))
    argv: List[str] = []
    for key, default in defaults.items():
        value = getattr(args, key, default)
        flag = '--' + key.replace('_', '-')
        if value is None or value == default and not isinstance(default, (list, bool)):
            continue
        if isinstance(default, bool):
            argv += [flag] if value else []
        elif key == 'model_kwargs':
            argv += [flag, *(f'{k}={v!r}' for k, v in dict(value).items())] if value else []
        elif isinstance(default, list):
            argv += [flag, *map(str, value)] if value else []
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


# Every numeric option and its range ('>0': strictly positive); all must also be finite (argparse takes
# 'nan' and 'inf' as floats, and torch flips the sign of a negative --clip-grad: training goes backwards)
_NUMERIC_OPTIONS = {
    'epochs': 1, 'batch_size': 1, 'grad_accum': 1, 'keep_checkpoints': 1, 'log_interval': 1,
    'max_train_samples': 1, 'max_val_samples': 1,
    'checkpoint_every': 0, 'stochastic_eval': 0, 'stochastic_eval_every': 0, 'num_workers': 0, 'seed': 0,
    'lr': '>0', 'min_lr': 0, 'weight_decay': 0, 'warmup_epochs': 0, 'beta_warmup_epochs': 0, 'clip_grad': '>0',
    'beta': 0,
}


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for bad arguments, before any data is read or weights allocated (the model is built on
    the meta device, so its own checks of its kwargs run here too)."""
    import timm
    import timm_vib  # noqa: F401  (registers the models)
    from .data import check_data
    if not timm.is_model(args.model):
        close = [n for n in timm_vib.MODEL_NAMES if args.model.split('_')[0] in n][:8] or timm_vib.MODEL_NAMES
        raise ValueError(f'unknown model {args.model!r}; timm_vib models: {", ".join(close)}')
    for name, low in _NUMERIC_OPTIONS.items():
        value = getattr(args, name, None)
        if value is None:
            continue  # optional, and not given
        flag = f'--{name.replace("_", "-")}'
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{flag} must be a finite number, got {value!r}')
        if low == '>0' and not value > 0 or low != '>0' and value < low:
            raise ValueError(f'{flag} must be {low if low == ">0" else f">= {low}"}, got {value}')
    if args.min_lr > args.lr:
        raise ValueError(f'--min-lr {args.min_lr} is above --lr {args.lr}: the cosine schedule would rise')
    if args.seed >= 2 ** 32:
        raise ValueError(f'--seed must be < 2**32 (numpy\'s seeds), got {args.seed}')
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f'--output {args.output} is a file: the run folder must be a folder (or not exist yet)')
    model_kwargs = dict(args.model_kwargs)
    if 'patch_size' in model_kwargs:  # the model's own check, before it is built
        check_patch_grid(dict(model_kwargs, img_size=_img_size(args)))
    if not model_kwargs.get('pretrained'):
        # every other model kwarg checked by the model itself, on the meta device: nothing allocated, so a
        # sweep or demo names a bad one once, before launching runs that would each fail on it
        with torch.device('meta'):
            build_model(args, num_classes=2)
    check_data(args.data)


def _default_output(args: argparse.Namespace) -> str:
    data = Path(args.data.split(':', 1)[-1]).name if args.data not in ('digits', 'fashion-mnist') else args.data
    return str(Path('runs') / f'{args.model}-{data}')


# --- model, optimisation --------------------------------------------------------------------------

def _default_img_size(name: str) -> int:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def _img_size(args: argparse.Namespace) -> int:
    """The run's image size: ``img_size`` in --model-kwargs, else the model's pretrained config's."""
    return int(dict(args.model_kwargs).get('img_size', _default_img_size(args.model)))


def build_model(args: argparse.Namespace, num_classes: int) -> Tuple[torch.nn.Module, str, Dict[str, Any]]:
    """The model of the run, with beta resolved; returns (model, architecture to record, model_args).

    ``--beta`` on a fixed-beta name builds ``vit_tiny_vib(beta=...)``, recorded as such, so the saved
    folder reloads with the right beta.
    """
    import timm
    import timm_vib
    kwargs = dict(args.model_kwargs)
    name, arch = args.model, args.model
    fixed = timm_vib.beta_from_name(name)
    if args.beta is not None:
        if name in ('vit_tiny_noattn', 'vit_tiny_gap'):
            raise ValueError(f'{name} has no information bottleneck: --beta does not apply to it')
        if fixed is not None and args.beta != fixed:
            arch = 'vit_tiny_vib'
        if name.startswith('vit_tiny_vib'):
            kwargs['beta'] = args.beta
    try:
        model = timm.create_model(arch, num_classes=num_classes, **kwargs)
    except (TypeError, AssertionError) as e:
        raise ValueError(f'--model-kwargs {kwargs} do not fit {arch}: {e}') from None
    if args.beta is not None and not hasattr(model, 'beta'):
        raise ValueError(f'{name} has no information bottleneck: --beta does not apply to it')
    if arch != name or 'beta' in kwargs:
        kwargs['beta'] = float(model.beta)
    return model, arch, kwargs


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    xpu = getattr(torch, 'xpu', None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def _mixed_precision(choice: str, cpu: bool) -> str:
    """``auto``: bf16 on a GPU that has it, else fp16 on a GPU, off on the CPU (``--cpu`` included)."""
    if choice != 'auto':
        return choice
    if torch.cuda.is_available() and not cpu:
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    return 'no'


def _wait_for_everyone(accelerator) -> None:
    """``accelerator.wait_for_everyone()``, except between CPU processes (gloo): Accelerate hands the barrier
    the process's GPU index there too, and where CUDA is present torch then runs the barrier on that GPU, so
    ``torchrun --nproc_per_node 2 ... --cpu`` on a one-GPU machine stopped with 'invalid device ordinal'
    (seen on an H100 machine with torch 2.11)."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def _check_processes_per_gpu(cpu: bool) -> None:
    """torchrun and ``accelerate launch`` start LOCAL_WORLD_SIZE processes on this node, and NCCL needs a GPU for
    each: more processes than GPUs would stop inside NCCL with 'Duplicate GPU detected'."""
    procs = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    if cpu or procs <= 1 or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if procs > gpus:
        raise ValueError(
            f'{procs} processes on this node but {gpus} GPU(s): each process needs a GPU of its own; start at most '
            f'{gpus} (torchrun --nproc_per_node {gpus}), or pass --cpu to train {procs} CPU processes (gloo)')


# --- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, accelerator, beta: float, kl_reduction: str = 'mean', stochastic: bool = False) -> Dict[str, Any]:
    """Validation metrics in eval mode (posterior mean mu, or sampled z with ``stochastic``).

    Every process evaluates its shard; ``gather_for_metrics`` drops the samples Accelerate repeats to
    even out the shards, so counts are exact. Returns val_loss, val_ce, val_top1, val_top5 (%),
    nats_per_image (sum of KL over layers x heads x tokens), nats_per_patch, head_kl [depth][heads]
    (mean KL per patch, nats), active_heads ("layer.head" with KL > 1e-2 nats on some patch), val_count.
    """
    net = accelerator.unwrap_model(model)
    has_kl = getattr(net, 'attn_mode', 'plain') != 'plain'
    model.eval()
    bottleneck = getattr(net, 'has_bottleneck', False)
    callers_stochastic = net.stochastic_eval if bottleneck else False
    parts: Dict[str, List[torch.Tensor]] = {}
    try:
        if bottleneck:
            net.stochastic_eval = stochastic
        for x, y in loader:
            if has_kl:
                logits, kl = model(x, return_kl=True)
            else:
                logits, kl = model(x), None
            logits = logits.float()
            ce = F.cross_entropy(logits, y, reduction='none')
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            out = {'ce': ce, 'top1': (top[:, 0] == y).float(), 'top5': (top == y[:, None]).any(-1).float()}
            if kl is not None:
                out['nats'] = kl.sum(dim=(1, 2, 3))                         # [B] nats per image
                out['info'] = information_per_sample(kl, kl_reduction)
                out['head_mean'] = kl.mean(dim=3)                           # [B, depth, heads]
                out['head_max'] = kl.amax(dim=3)
                out['tokens'] = torch.full_like(ce, kl.shape[-1])
            for k, v in accelerator.gather_for_metrics(out).items():
                parts.setdefault(k, []).append(v.float().cpu())
    finally:
        if bottleneck:
            net.stochastic_eval = callers_stochastic  # the caller's setting, even if the loop raised
    r = {k: torch.cat(v) for k, v in parts.items()}
    n = len(r['ce'])
    res: Dict[str, Any] = {
        'val_count': n,
        'val_ce': r['ce'].mean().item(),
        'val_top1': 100 * r['top1'].mean().item(),
        'val_top5': 100 * r['top5'].mean().item(),
    }
    if 'nats' in r:
        res['val_loss'] = (r['ce'] + beta * r['info']).mean().item()
        res['nats_per_image'] = r['nats'].mean().item()
        res['nats_per_patch'] = res['nats_per_image'] / r['tokens'][0].item()
        res['head_kl'] = r['head_mean'].mean(0).tolist()
        peak = r['head_max'].amax(0)
        res['active_heads'] = [f'{l}.{h}' for l, h in (peak > ACTIVE_KL).nonzero().tolist()]
    else:
        res.update(val_loss=res['val_ce'], nats_per_image=None, nats_per_patch=None, head_kl=None, active_heads=None)
    return res


def stochastic_evaluate(model, loader, accelerator, beta: float, kl_reduction: str, k: int) -> Dict[str, Any]:
    """Mean and std (over K passes, ddof=1; None for one pass) of top-1 and nats per image with z sampled, as the
    paper reports."""
    runs = [evaluate(model, loader, accelerator, beta, kl_reduction, stochastic=True) for _ in range(k)]
    out = {'k': k}
    for key, name in (('val_top1', 'top1'), ('val_top5', 'top5'), ('nats_per_image', 'nats_per_image')):
        v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        out[f'{name}_mean'] = v.mean().item()
        out[f'{name}_std'] = v.std().item() if k > 1 else None  # one pass has no spread to report
    return out


# --- checkpoints --------------------------------------------------------------------------------

class Checkpoints:
    """Accelerate states under ``folder``, one sub-folder per checkpoint, the latest ``keep`` kept.

    A checkpoint is written into a hidden temporary folder and renamed into place only once every
    process has finished writing; older ones are pruned only after that. A kill at any moment thus
    leaves the previous checkpoints intact (a half-written temporary folder is ignored and removed
    later). Names are our own (``ckpt-STEP-EPOCH-BATCH``) rather than Accelerate's automatic naming,
    whose counter ``load_state`` does not restore.
    """

    def __init__(self, accelerator, folder: Path, keep: int = 2):
        self.accelerator, self.folder, self.keep = accelerator, Path(folder), keep

    def list(self) -> List[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob('ckpt-*') if (p / TRAIN_STATE_NAME).is_file())

    def latest(self) -> Optional[Path]:
        """The newest intact checkpoint (see ``verify_checkpoint``); damaged newer ones are skipped with
        a warning naming them. None if there is none; ValueError naming the damage if none is intact."""
        skipped = []
        for path in reversed(self.list()):
            try:
                verify_checkpoint(path)
            except ValueError as e:
                skipped.append(str(e))
                continue
            if skipped:
                warnings.warn('skipped damaged checkpoint(s): ' + '; '.join(skipped) + f'; resuming from {path}')
            return path
        if skipped:
            raise ValueError('no intact checkpoint in ' + f'{self.folder}: ' + '; '.join(skipped))
        return None

    def save(self, state: Dict[str, Any]) -> Path:
        acc = self.accelerator
        name = f'ckpt-{state["step"]:09d}-{state["epoch"]:05d}-{state["batch"]:06d}'
        final, tmp = self.folder / name, self.folder / f'.tmp-{name}'
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _wait_for_everyone(acc)
        acc.save_state(str(tmp))
        _wait_for_everyone(acc)
        if acc.is_main_process:
            atomic_write_json(tmp / TRAIN_STATE_NAME, state)
            apply_umask(tmp)  # Accelerate writes the weights 0600
            write_manifest(tmp)  # last: a checkpoint with a manifest is complete
            if final.exists():  # same position saved again: move the old one aside first
                old = self.folder / f'.old-{name}'
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            for p in self.list()[:-self.keep]:
                shutil.rmtree(p, ignore_errors=True)
            for p in self.folder.glob('.old-*'):
                shutil.rmtree(p, ignore_errors=True)
        _wait_for_everyone(acc)
        return final

    def load(self, path: Path) -> Dict[str, Any]:
        """Restore the Accelerate states of checkpoint ``path``; returns its train state. The checkpoint
        is verified first: a damaged one is a ValueError naming the file, not a traceback from torch."""
        state = verify_checkpoint(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # e.g. a checkpoint of another model: name it
            raise ValueError(f'cannot restore checkpoint {path}: {type(e).__name__}: {str(e).strip()[:500]}') from None
        return state


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: the run stopped, its last good checkpoint is named."""


class _FirstNonFinite:
    """The first optimizer step whose loss was NaN or infinite, kept on the device: updating it queues
    two small kernels and never waits for the device; only :meth:`check` reads it (at the log interval,
    before a checkpoint, at the end of an epoch)."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.step < 0)
        self.step = torch.where(new, torch.full_like(self.step, step), self.step)

    def check(self, accelerator, epoch: int, ckpts: 'Checkpoints') -> None:
        """NonFiniteLossError naming the step if any process saw a non-finite loss (every process
        calls this at the same points, so all of them stop together)."""
        steps = accelerator.gather(self.step[None]) if accelerator.num_processes > 1 else self.step[None]
        bad = steps[steps >= 0]
        if len(bad):
            raise _diverged(int(bad.min()), epoch, ckpts)


def _diverged(step: int, epoch: int, ckpts: 'Checkpoints') -> NonFiniteLossError:
    try:
        last = ckpts.latest()
    except ValueError:
        last = None
    where = (f'the last good checkpoint is {last} (checkpoints are only written while the loss is finite)'
             if last is not None else 'no checkpoint was written before it')
    return NonFiniteLossError(
        f'the training loss became non-finite (NaN or inf) at optimizer step {step} (epoch {epoch + 1}): training '
        f'stopped and wrote no final weights; {where}. Lower --lr or set --clip-grad, and train into a new --output')


# --- run files ----------------------------------------------------------------------------------

def _versions() -> Dict[str, str]:
    import accelerate
    import timm
    import timm_vib
    return {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
            'accelerate': accelerate.__version__, 'timm_vib': timm_vib.__version__}


# Options that may change when a run is resumed: where and how it reports and checkpoints. Every other
# option of the trainer changes what is trained or measured, so it must match the run being continued.
_FREE_ON_RESUME = ('output', 'resume', 'checkpoint_every', 'keep_checkpoints', 'log_with', 'log_interval',
                   'no_progress', 'num_workers', 'kill_at_step')


def _recorded_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments as run_config.json records them (model kwargs as a dict, no test-only options)."""
    return {k: dict(v) if k == 'model_kwargs' else v for k, v in vars(args).items() if k not in ('kill_at_step', 'func')}


def run_differences(out: Path, args: argparse.Namespace) -> List[str]:
    """The options in which ``args`` (resolved) differ from the run recorded in ``out/run_config.json``,
    as '--name X (run) vs Y (now)' (options it does not record count as their defaults); [] if none or
    if there is no record. ValueError if the record is corrupt."""
    path = out / RUN_CONFIG
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())['args']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is corrupt ({e}): cannot tell whether it holds the same run') from None
    from .vision_transformer_vib import beta_from_name
    defaults = vars(parse_args([]))
    new = _recorded_args(args)
    diff = []
    for key in defaults:
        if key in _FREE_ON_RESUME:
            continue
        was, now = old.get(key, defaults[key]), new.get(key, defaults[key])
        if key == 'model_kwargs':
            was, now = dict(was or {}), dict(now or {})
        # options left out resolve as the trainer resolves them: vit_tiny_vib_b1 is vit_tiny_vib_b1 --beta 1, and
        # no --beta-warmup-epochs is 10 % of --epochs
        if key == 'beta':
            was = beta_from_name(old.get('model', defaults['model'])) if was is None else was
            now = beta_from_name(new.get('model', defaults['model'])) if now is None else now
        if key == 'beta_warmup_epochs':
            was = default_beta_warmup_epochs(old.get('epochs', defaults['epochs'])) if was is None else was
            now = default_beta_warmup_epochs(new.get('epochs', defaults['epochs'])) if now is None else now
        if json.dumps(was, sort_keys=True) != json.dumps(now, sort_keys=True):
            diff.append(f'--{key.replace("_", "-")} {was!r} (run) vs {now!r} (now)')
    return diff


def _check_same_run(out: Path, args: argparse.Namespace) -> None:
    """ValueError listing the options in which ``args`` differ from the run in ``out``."""
    diff = run_differences(out, args)
    if diff:
        raise ValueError(f'--resume with arguments that differ from the run in {out}: {"; ".join(diff)}. Resume with '
                         'the same arguments, or train into another --output')


def _run_config(args, accelerator, spec, arch: str, model_args: Dict[str, Any], beta: float, attn_mode: str,
                img_size: int, updates_per_epoch: int, beta_warmup_updates: int) -> Dict[str, Any]:
    """run_config.json: every choice of the run."""
    return {
        'args': _recorded_args(args),
        'model': args.model, 'architecture': arch, 'model_kwargs': model_args, 'beta': beta, 'attn_mode': attn_mode,
        'kl_reduction': args.kl_reduction, 'beta_warmup_epochs': args.beta_warmup_epochs,
        'beta_schedule': args.beta_schedule, 'beta_warmup_updates': beta_warmup_updates,
        'data': spec.to_dict(), 'dataset': spec.name, 'num_classes': spec.num_classes, 'img_size': img_size,
        'mean': list(spec.mean), 'std': list(spec.std),
        'optimizer': {'name': 'adamw', 'lr': args.lr, 'weight_decay': args.weight_decay,
                      'no_weight_decay': 'biases, 1-D parameters, model.no_weight_decay() (all bottleneck parameters)'},
        'schedule': {'name': 'timm cosine, linear warmup from min_lr', 'warmup_epochs': args.warmup_epochs,
                     'updates_per_epoch': updates_per_epoch, 'total_updates': updates_per_epoch * args.epochs,
                     'min_lr': args.min_lr, 'stepped': 'per optimizer update'},
        'world_size': accelerator.num_processes,
        'global_batch_size': args.batch_size * accelerator.num_processes * args.grad_accum,
        'mixed_precision': accelerator.mixed_precision, 'device': str(accelerator.device), 'seed': args.seed,
        'versions': _versions(),
    }


def _summary(args, net, accelerator, spec, arch: str, beta: float, attn_mode: str, img_size: int,
             state: Dict[str, Any], last: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json: the finished run in one record (the last epoch's metrics, throughput, seed)."""
    se = {k[len('stochastic_'):]: v for k, v in last.items() if k.startswith('stochastic_')} or None
    pe = getattr(net, 'patch_embed', None)
    blocks = getattr(net, 'blocks', [])
    if blocks and hasattr(blocks[0], 'attn'):
        num_heads = blocks[0].attn.num_heads
    else:
        num_heads = getattr(blocks[0], 'num_heads', None) if blocks else None
    return {
        'model': args.model, 'architecture': arch, 'beta': beta, 'attn_mode': attn_mode,
        'kl_reduction': args.kl_reduction, 'beta_schedule': args.beta_schedule,
        'eval_z': args.eval_z if attn_mode == 'vib' else None,
        'beta_warmup_epochs': args.beta_warmup_epochs, 'dataset': spec.name, 'num_classes': spec.num_classes,
        'img_size': img_size, 'patch_size': int(pe.patch_size[0]) if pe is not None else None,
        'depth': len(blocks), 'num_heads': num_heads,
        'vib_dim': getattr(net, 'vib_dim', None), 'vib_hidden': getattr(net, 'vib_hidden', None),
        'epochs': args.epochs, 'steps': state['step'],
        'val_top1': last['val_top1'], 'val_top5': last['val_top5'], 'val_loss': last['val_loss'],
        'nats_per_image': last['nats_per_image'], 'nats_per_patch': last['nats_per_patch'],
        'head_kl': last['head_kl'], 'active_heads': last['active_heads'],
        'num_active_heads': None if last['active_heads'] is None else len(last['active_heads']),
        'stochastic_eval': se, 'train_seconds': state['train_seconds'],
        'train_samples_per_second': state['samples'] / state['train_seconds'] if state['train_seconds'] else None,
        'world_size': accelerator.num_processes, 'seed': args.seed,
    }


# --- the loop, step by step -----------------------------------------------------------------------

def _resolve(args: argparse.Namespace) -> Tuple[argparse.Namespace, Path, int]:
    """Step 1: check everything that can be checked before anything starts; returns a copy of the
    arguments with defaults resolved, the run folder and the image size."""
    args = copy.copy(args)
    args.model_kwargs = list(args.model_kwargs)
    check_args(args)
    if args.beta_warmup_epochs is None:
        args.beta_warmup_epochs = default_beta_warmup_epochs(args.epochs)
    out = Path(args.output or _default_output(args))
    args.output = str(out)
    if args.resume and ((out / SUMMARY).is_file() or any((out / 'checkpoints').glob('ckpt-*'))):
        _check_same_run(out, args)  # continue the run that is there, or say how these arguments differ
    if (out / SUMMARY).is_file() and not args.resume:
        raise ValueError(f'{out} holds a finished run ({SUMMARY}); choose another --output or remove it')
    if not args.resume and (out / 'checkpoints').is_dir() and any((out / 'checkpoints').glob('ckpt-*')):
        raise ValueError(f'{out} holds an unfinished run: pass --resume to continue it, or choose another --output')
    return args, out, _img_size(args)


def _accelerator(args: argparse.Namespace, out: Path):
    """Step 2: device, processes, mixed precision. The seedable sampler makes the shuffling a function
    of (seed, epoch), which exact resumption relies on."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    # without a GPU, say so: only then does Accelerate take torchrun's WORLD_SIZE > 1 as multi-CPU (gloo)
    cpu = args.cpu or not _has_accelerator()
    _check_processes_per_gpu(cpu)
    return Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=_mixed_precision(args.mixed_precision, cpu),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=args.log_with or None,
        project_dir=str(out),
        dynamo_backend='inductor' if args.compile else 'no',
        cpu=cpu,
    )


def _check_same_augmentation(out: Path, config: Dict[str, Any]) -> None:
    """ValueError when the run in ``out`` was trained with another augmentation than this code builds from the same
    arguments (photo folders had timm's 'rand-m9-n2' RandAugment until 2026-11-24, the reference code's torchvision
    RandAugment since). Only the entries both records have are compared: older records leave out the colour jitter
    that the grey sets have always had."""
    try:
        recorded = json.loads((out / RUN_CONFIG).read_text())['data']['augmentation']
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable record to compare with (the checkpoint's own checks still apply)
    now = json.loads(json.dumps(config['data']['augmentation']))
    differ = sorted(k for k in recorded.keys() & now.keys() if recorded[k] != now[k])
    if differ:
        said = '; '.join(f'{k}: {recorded[k]!r} then, {now[k]!r} now' for k in differ)
        raise ValueError(f'{out} was trained with another augmentation than this timm_vib builds ({said}): resuming '
                         'would change the recipe mid-run; train into another --output')


def _resume(args, accelerator, ckpts: 'Checkpoints', out: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """Step 6: the training position (epoch, batch, step, running sums) to start from, restoring
    model, optimizer, RNG and sampler states from the checkpoint when resuming; writes
    run_config.json on a fresh start and drops metrics rows of epochs that will be trained again."""
    state = {'epoch': 0, 'batch': 0, 'step': 0, 'samples': 0, 'train_seconds': 0.0, 'sums': [0.0, 0.0, 0.0, 0.0]}
    resume_from = None
    if args.resume:
        resume_from = ckpts.latest() if args.resume == 'latest' else Path(args.resume)
        if resume_from is None:
            accelerator.print(f'no checkpoint in {ckpts.folder}: starting {out} from scratch')
        elif not (resume_from / TRAIN_STATE_NAME).is_file():
            raise FileNotFoundError(f'{resume_from} is not a checkpoint of this trainer (no train_state.json)')
    if resume_from is not None:
        _check_same_augmentation(out, config)
        state = ckpts.load(resume_from)
        if not accelerator.is_main_process:
            state['sums'] = [0.0] * 4  # the saved sums are over all processes; rank 0 carries them
        accelerator.print(f'resumed from {resume_from} (epoch {state["epoch"] + 1}, batch {state["batch"]}, step {state["step"]})')
    if accelerator.is_main_process:
        if resume_from is None:
            atomic_write_json(out / RUN_CONFIG, config)
        truncate_metrics(out / METRICS, state['epoch'])
    return state


class _Sums:
    """Loss, CE, correct and sample counts of an epoch, summed on the device: adding a step's values
    queues work without waiting for it, and only :meth:`read` (at the log interval and the epoch's
    end) synchronises with the device. float64 where the device has it (not on MPS)."""

    def __init__(self, start: Sequence[float], device: torch.device):
        dtype = torch.float32 if device.type == 'mps' else torch.float64
        self.value = torch.tensor(list(start), dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=dtype, device=device)

    def add(self, loss: torch.Tensor, ce: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = self._count.fill_(y.shape[0])  # a device-side fill: a Python number in torch.tensor() would be a copy
        self.value += torch.stack([loss.detach().to(n.dtype) * n, ce.detach().to(n.dtype) * n,
                                   (logits.detach().argmax(-1) == y).sum().to(n.dtype), n])

    def read(self, accelerator=None) -> List[float]:
        """[loss sum, ce sum, correct, count], over all processes when ``accelerator`` is given."""
        v = self.value.clone()
        return (accelerator.reduce(v, 'sum') if accelerator is not None else v).tolist()


def train_one_epoch(args, epoch: int, model, optimizer, scheduler, train_loader, accelerator, ckpts: 'Checkpoints',
                    state: Dict[str, Any], beta: float, beta_warmup_updates: int, has_kl: bool,
                    progress, task, nonfinite: '_FirstNonFinite') -> List[float]:
    """Step 7: one epoch from ``state['batch']`` on (after a kill mid-epoch, exactly the batches that
    were left, in the same order); updates ``state`` in place and returns the epoch's summed
    [loss, ce, correct, count] over all processes. A non-finite loss stops it (NonFiniteLossError) at
    the next log interval, before any checkpoint holds the diverged weights."""
    from accelerate.data_loader import skip_first_batches
    model.train()
    train_loader.set_epoch(epoch)
    train_loader.dataset.set_epoch(epoch)  # augmentation seeds (seed, epoch, index)
    loader = skip_first_batches(train_loader, state['batch']) if state['batch'] else train_loader
    progress.reset(task, total=len(train_loader), completed=state['batch'])
    show = not progress.disable
    sums = _Sums(state['sums'], accelerator.device)
    t0 = time.perf_counter()
    for batch_idx, (x, y) in enumerate(loader, start=state['batch']):
        with accelerator.accumulate(model):
            beta_now = beta_at(beta, state['step'], beta_warmup_updates, args.beta_schedule)
            if has_kl:
                logits, kl = model(x, return_kl=True)
                info = information_loss(kl, args.kl_reduction)
            else:
                logits, kl, info = model(x), None, 0.0
            ce = F.cross_entropy(logits.float(), y)
            loss = ce + beta_now * info
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums.add(loss, ce, logits, y)
        nonfinite.update(loss, state['step'] + 1)
        state['batch'] = batch_idx + 1
        state['samples'] += x.shape[0] * accelerator.num_processes
        if show:
            progress.update(task, completed=state['batch'])
        if not accelerator.sync_gradients:
            continue
        state['step'] += 1
        scheduler.step_update(num_updates=state['step'])
        if state['step'] % args.log_interval == 0:
            nonfinite.check(accelerator, epoch, ckpts)
        if show and (state['step'] % args.log_interval == 0 or state['batch'] == len(train_loader)):
            # the only reads of device values inside the epoch, and only when someone looks at them
            nats = kl.detach().sum(dim=(1, 2, 3)).mean().item() if kl is not None else float('nan')
            loss_sum, _, correct, count = sums.read()
            progress.update(task, description=(
                f'epoch {epoch + 1}/{args.epochs} loss {loss_sum / count:.3f} '
                f'acc {100 * correct / count:.1f}% nats/img {nats:.1f}'))
        if args.checkpoint_every and state['step'] % args.checkpoint_every == 0 and state['batch'] < len(train_loader):
            state['train_seconds'] += time.perf_counter() - t0
            state['sums'] = sums.read(accelerator)
            nonfinite.check(accelerator, epoch, ckpts)  # never checkpoint diverged weights
            ckpts.save(state)
            t0 = time.perf_counter()
        if args.kill_at_step is not None and state['step'] == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: a real kill, at any point after a checkpoint
    state['train_seconds'] += time.perf_counter() - t0
    progress.update(task, completed=state['batch'])
    nonfinite.check(accelerator, epoch, ckpts)
    return sums.read(accelerator)


def _epoch_row(args, epoch: int, model, optimizer, val_loader, accelerator, state: Dict[str, Any],
               train_sums: Sequence[float], beta_epoch: float, attn_mode: str) -> Dict[str, Any]:
    """Step 8: the epoch's metrics.jsonl row: train metrics, validation (z sampled, or the posterior mean
    with ``--eval-z mean``), and the K sampled validation passes after the last epoch (and every
    ``--stochastic-eval-every`` epochs)."""
    loss_sum, ce_sum, correct, count = train_sums
    val = evaluate(model, val_loader, accelerator, beta_epoch, args.kl_reduction, stochastic=args.eval_z == 'sample')
    row = {'epoch': epoch + 1, 'step': state['step'], 'lr': optimizer.param_groups[0]['lr'], 'beta': beta_epoch,
           'train_loss': loss_sum / count, 'train_ce': ce_sum / count, 'train_top1': 100 * correct / count, **val}
    every = args.stochastic_eval_every
    if args.stochastic_eval and attn_mode == 'vib' and (epoch + 1 == args.epochs or (every and (epoch + 1) % every == 0)):
        se = stochastic_evaluate(model, val_loader, accelerator, beta_epoch, args.kl_reduction, args.stochastic_eval)
        row.update({f'stochastic_{k}': v for k, v in se.items()})
    return row


def train(args: argparse.Namespace) -> Path:
    """Train one model as ``args`` say; returns the run folder. A finished run (summary.json present)
    is returned as it is when ``--resume`` is given."""
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from .checkpoints import save_model
    from .data import create_loaders

    # 1. Check everything we can before starting anything
    args, out, img_size = _resolve(args)
    if (out / SUMMARY).is_file():  # finished, and --resume asked for it
        if int(os.environ.get('RANK', '0')) == 0:
            remove_temporaries(out)  # what a kill during the final writes left
        return out

    # 2. Accelerator: device, processes, mixed precision, seedable sampler
    accelerator = _accelerator(args, out)
    set_seed(args.seed)
    if accelerator.is_main_process:
        remove_temporaries(out)  # what a kill during an earlier write left

    # 3. Data and model
    train_loader, val_loader, spec = create_loaders(
        args.data, img_size, args.batch_size, class_list=args.class_list, seed=args.seed, num_workers=args.num_workers,
        max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples)
    model, arch, model_args = build_model(args, spec.num_classes)
    beta = float(getattr(model, 'beta', 0.0))
    attn_mode = getattr(model, 'attn_mode', 'plain')
    has_kl = attn_mode != 'plain'  # gap (and non-timm_vib models) train as plain classifiers

    # 4. Optimiser: AdamW, no decay on biases, 1-D parameters and the bottlenecks (model.no_weight_decay)
    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    # timm's cosine schedule with linear warmup, stepped per optimizer update; the lr is a function of
    # the update count alone, so resuming only needs state['step'] (not prepared: Accelerate would
    # step it once per process)
    scheduler, _ = create_scheduler_v2(
        optimizer.optimizer, sched='cosine', num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.min_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    beta_warmup_updates = round(args.beta_warmup_epochs * updates_per_epoch)

    # 5. Record every choice
    config = _run_config(args, accelerator, spec, arch, model_args, beta, attn_mode, img_size, updates_per_epoch,
                         beta_warmup_updates)
    ckpts = Checkpoints(accelerator, out / 'checkpoints', args.keep_checkpoints)

    # 6. Resume: model, optimizer, RNG and sampler states, then our position in the data (and so the lr)
    state = _resume(args, accelerator, ckpts, out, config)
    scheduler.step_update(num_updates=state['step'])
    if args.log_with:
        accelerator.init_trackers(out.name, config={k: v for k, v in config['args'].items() if isinstance(v, (int, float, str, bool))})

    # 7. The loop: train an epoch, then 8. validate, append its metrics row, checkpoint
    progress = Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), disable=args.no_progress or not accelerator.is_local_main_process)
    task = progress.add_task('', total=len(train_loader))
    nonfinite = _FirstNonFinite(accelerator.device)
    with progress:
        for epoch in range(state['epoch'], args.epochs):
            train_sums = train_one_epoch(args, epoch, model, optimizer, scheduler, train_loader, accelerator, ckpts,
                                         state, beta, beta_warmup_updates, has_kl, progress, task, nonfinite)
            beta_epoch = beta_at(beta, max(state['step'] - 1, 0), beta_warmup_updates, args.beta_schedule)
            row = _epoch_row(args, epoch, model, optimizer, val_loader, accelerator, state, train_sums, beta_epoch,
                             attn_mode)
            if accelerator.is_main_process:
                append_metrics(out / METRICS, row)
            accelerator.print(
                f'epoch {epoch + 1}: train loss {row["train_loss"]:.4f} | val loss {row["val_loss"]:.4f} top-1 '
                f'{row["val_top1"]:.2f}% top-5 {row["val_top5"]:.2f}% | nats/img {row["nats_per_image"]} | '
                f'active heads {None if row["active_heads"] is None else len(row["active_heads"])}')
            if args.log_with:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state['step'])
            state.update(epoch=epoch + 1, batch=0, sums=[0.0] * 4)
            ckpts.save(state)

    # 9. Final weights (timm's Hub format) and the summary, written last
    _wait_for_everyone(accelerator)
    net = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        # the registered configs' tag is 'in100': only an ImageNet-100 run keeps it
        tag = 'in100' if args.class_list == 'imagenet100' else None
        save_model(net, out, model_args=model_args, data_config=spec.data_config(), architecture=arch, tag=tag)
        last = read_metrics(out / METRICS)[-1]
        atomic_write_json(out / SUMMARY, _summary(args, net, accelerator, spec, arch, beta, attn_mode, img_size, state, last))
        remove_temporaries(out)
    _wait_for_everyone(accelerator)
    if args.log_with:
        accelerator.end_training()
    return out


# --- console ------------------------------------------------------------------------------------

def register_cli(sub) -> None:
    """Add ``train`` to the ``timm-vib`` sub-command parser ``sub``."""
    t = add_train_args(sub.add_parser('train', help='train one model with Accelerate'))
    t.set_defaults(func=command(train))
