"""The training step the benchmarks time, as the trainer takes it: CE + beta * KL (the KL in float32) under
autocast, backward, AdamW step; fp16 with a GradScaler, as Accelerate's fp16 path."""
from typing import Callable

import torch
import torch.nn.functional as F

import timm_vib

AMP = {'no': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=AMP[amp], enabled=AMP[amp] is not None)


def make_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, amp: str = 'no') -> Callable[[torch.Tensor, torch.Tensor], None]:
    """step(x [B, C, H, W], y [B]) on the model's device; ``amp`` is one of :data:`AMP`."""
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    has_kl = getattr(model, 'attn_mode', 'plain') != 'plain'  # the trainer's rule: every model of ours but gap

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, amp):
            if has_kl:
                logits, kl = model(x, return_kl=True)
                loss = F.cross_entropy(logits.float(), y) + model.beta * timm_vib.information_loss(kl)
            else:
                loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step
