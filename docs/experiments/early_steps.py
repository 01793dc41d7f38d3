"""The first optimizer steps of a demo-sized model: posterior log-variance, cross-entropy, and how far
every parameter moved, with and without the information price (docs/spectrum.md, section 4c).

    python docs/experiments/early_steps.py --logvar-init -6 --beta 10 --steps 60

Same data, model, optimizer and schedules as the demo (digits, 2x2 patches, AdamW 3e-3, timm's cosine
with 2 warm-up epochs, beta ramped over 1.5 epochs); one CPU thread.
"""
import argparse
import copy

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_vib  # noqa: F401  (registers the models)
from timm_vib.data import create_loaders
from timm_vib.training import beta_at


def run(logvar_init: float, beta: float, steps: int, small_init_dec: bool, trace: bool):
    """Train ``steps`` updates; returns {parameter: |change| / |init|} and prints a trace every 5 steps."""
    torch.manual_seed(0)
    train_loader, _, spec = create_loaders('digits', 16, 64, seed=0)
    model = timm.create_model('vit_tiny_vib', img_size=16, patch_size=2, depth=4, embed_dim=48, num_heads=3,
                              vib_dim=8, vib_logvar_init=logvar_init, vib_small_init_dec=small_init_dec,
                              num_classes=spec.num_classes, beta=beta)
    init = copy.deepcopy(model.state_dict())
    opt = create_optimizer_v2(model, 'adamw', lr=3e-3, weight_decay=0.05)
    per_epoch = len(train_loader)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=15, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-6,
                                   step_on_epochs=False, updates_per_epoch=per_epoch)
    logvars = []
    for block in model.blocks:  # the bottleneck returns (z, mu, logvar)
        block.attn.vib.register_forward_hook(lambda mod, inp, out: logvars.append(out[2].detach()))
    step = 0
    model.train()
    while step < steps:
        for x, y in train_loader:
            logvars.clear()
            logits, kl = model(x, return_kl=True)
            ce = F.cross_entropy(logits, y)
            b = beta_at(beta, step, round(1.5 * per_epoch))
            loss = ce + b * kl.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if trace and step % 5 == 0:
                lv = [round(t.mean().item(), 2) for t in logvars]
                print(f'step {step:3d}  beta {b:5.2f}  ce {ce.item():.3f}  kl/head-token {kl.mean().item():6.2f} nats  '
                      f'logvar per layer {lv}  max {max(t.max().item() for t in logvars):.1f}')
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
