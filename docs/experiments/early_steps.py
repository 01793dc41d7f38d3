"""The first optimizer steps of a demo-sized model: posterior log-variance, cross-entropy, and how far
every parameter moved, with and without the information price (docs/spectrum.md, section 4c).

    python docs/experiments/early_steps.py --logvar-init -6 --beta 10 --steps 60 --small-init-dec

The demo's default preset (digits, its model, AdamW, timm's cosine schedule with its warm-ups, the
beta ramp) except the posterior's init, which is the experiment's variable, and the position embedding,
which keeps timm's init (the demo's when section 4c was measured; it now starts at sin-cos, 4e); one CPU
thread.
"""
import argparse
import copy

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_vib.data import create_loaders
from timm_vib.demo import PRESETS
from timm_vib.estimators import capture
from timm_vib.training import beta_at


def run(logvar_init: float, beta: float, steps: int, small_init_dec: bool, trace: bool):
    """Train ``steps`` updates; returns {parameter: |change| / |init|} and prints a trace every 5 steps."""
    s = PRESETS['default']
    torch.manual_seed(0)
    train_loader, _, spec = create_loaders('digits', s['img_size'], s['batch_size'], seed=0)
    model = timm.create_model('vit_tiny_vib', num_classes=spec.num_classes, beta=beta, vib_logvar_init=logvar_init,
                              vib_small_init_dec=small_init_dec,
                              **{k: s[k] for k in ('img_size', 'patch_size', 'depth', 'embed_dim', 'num_heads', 'vib_dim')})
    init = copy.deepcopy(model.state_dict())
    opt = create_optimizer_v2(model, 'adamw', lr=s['lr'], weight_decay=0.05)  # the trainer's default decay
    per_epoch = len(train_loader)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=s['epochs'], warmup_epochs=s['warmup_epochs'],
                                   warmup_lr=1e-6, min_lr=1e-6, step_on_epochs=False, updates_per_epoch=per_epoch)
    step = 0
    model.train()
    with capture(model) as rec:
        while step < steps:
            for x, y in train_loader:
                logits, kl = model(x, return_kl=True)
                ce = F.cross_entropy(logits, y)
                b = beta_at(beta, step, round(s['beta_warmup_epochs'] * per_epoch))
                loss = ce + b * kl.mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                sched.step_update(step)
                if trace and step % 5 == 0:
                    lv = rec.logvar  # [B, depth, heads, tokens, r]
                    print(f'step {step:3d}  beta {b:5.2f}  ce {ce.item():.3f}  kl/head-token {kl.mean().item():6.2f} '
                          f'nats  logvar per layer {[round(v, 2) for v in lv.mean(dim=(0, 2, 3, 4)).tolist()]}  '
                          f'max {lv.max().item():.1f}')
                if step >= steps:
                    break
    now = model.state_dict()
    return {k: ((now[k] - init[k]).norm() / init[k].norm()).item() for k in now
            if now[k].dtype.is_floating_point and init[k].norm() > 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--logvar-init', type=float, default=-6.0)
    p.add_argument('--beta', type=float, default=10.0)
    p.add_argument('--steps', type=int, default=60)
    p.add_argument('--small-init-dec', action='store_true')
    args = p.parse_args()
    torch.set_num_threads(1)
    priced = run(args.logvar_init, args.beta, args.steps, args.small_init_dec, trace=True)
    free = run(args.logvar_init, 0.0, args.steps, args.small_init_dec, trace=False)
    print(f'\n|change| / |init| after {args.steps} steps (weights; biases start at zero)')
    print(f'{"parameter":40s} {"beta " + format(args.beta, "g"):>10s} {"beta 0":>10s}')
    for k in priced:
        print(f'{k:40s} {priced[k]:10.2f} {free[k]:10.2f}')


if __name__ == '__main__':
    main()
