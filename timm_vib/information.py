"""The information cost of a Gaussian bottleneck: KL to the standard normal prior, in nats."""
from typing import Literal

import torch

__all__ = ['gaussian_kl', 'information_loss', 'KL_REDUCTIONS']

KL_REDUCTIONS = ('mean', 'sum')


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last (latent) dimension.

    Args:
        mu, logvar: [..., r] posterior mean and log-variance.

    Returns:
        [...] KL in nats, float32 whatever the input dtype (autocast would otherwise
        compute it in half precision, where exp(logvar) - 1 - logvar loses the small values).
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(-1)


def information_loss(kl: torch.Tensor, reduction: Literal['mean', 'sum'] = 'mean') -> torch.Tensor:
    """The information term of the VIB loss (multiply by beta and add to the cross-entropy).

    Args:
        kl: [batch, depth, heads, tokens] per-head, per-token KL in nats, as returned by
            ``model(x, return_kl=True)``.
        reduction: ``'mean'`` averages over layers x heads x tokens and the batch: the
            convention of the paper's reference code, which the published beta values
            (10, 4, 1, 0.01, 0) refer to. ``'sum'`` sums over layers x heads x tokens and
            averages over the batch: eq. 3 of the paper, nats per image. The two differ by
            the factor depth * heads * tokens (12 * 3 * 196 = 7056 for ViT-Tiny at 224 px).

    Returns:
        Scalar float32 tensor in nats.
    """
    if kl.ndim != 4:
        raise ValueError(f'kl must be [batch, depth, heads, tokens], got shape {tuple(kl.shape)}')
    if reduction == 'mean':
        return kl.float().mean()
    if reduction == 'sum':
        return kl.float().sum(dim=(1, 2, 3)).mean()
    raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
