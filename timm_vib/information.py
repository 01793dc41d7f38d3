"""The information cost of a Gaussian bottleneck: KL to the standard normal prior, in nats."""
from typing import Literal

import torch

__all__ = ['gaussian_kl', 'information_loss', 'information_per_sample', 'KL_REDUCTIONS']

KL_REDUCTIONS = ('mean', 'sum', 'sqrt')
SQRT_EPS = 1e-8  # the reference code's SAFETY_EPSILON: keeps the gradient of sqrt finite at KL = 0


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last (latent) dimension.

    Args:
        mu, logvar: [..., r] posterior mean and log-variance.

    Returns:
        [...] KL in nats, float32 whatever the input dtype (autocast would otherwise
        compute it in half precision). exp(logvar) - 1 - logvar is computed as expm1(logvar) - logvar:
        near logvar = 0 (collapsed heads) the former cancels to about -1e-6 in float32, so the KL of a
        head at the prior could come out negative.
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (torch.expm1(logvar) - logvar + mu.square()).sum(-1)


def information_per_sample(kl: torch.Tensor, reduction: Literal['mean', 'sum', 'sqrt'] = 'mean') -> torch.Tensor:
    """The information term of each image: [batch, depth, heads, tokens] KL (nats) -> [batch] float32.

    ``'mean'``: mean over layers x heads x tokens (nats); ``'sum'``: their sum, eq. 3 of the paper (nats
    per image); ``'sqrt'``: the reference code's ``--sqrt-kl``, the square root of each head's mean KL
    over tokens, averaged over layers x heads (sqrt-nats). Being concave, the square root makes one
    head sending 4x as much cheaper than four heads each sending x, so information consolidates into
    fewer heads.
    """
    if kl.ndim != 4:
        raise ValueError(f'kl must be [batch, depth, heads, tokens], got shape {tuple(kl.shape)}')
    kl = kl.float()
    if reduction == 'mean':
        return kl.mean(dim=(1, 2, 3))
    if reduction == 'sum':
        return kl.sum(dim=(1, 2, 3))
    if reduction == 'sqrt':
        return (kl.mean(dim=3).clamp(min=0) + SQRT_EPS).sqrt().mean(dim=(1, 2))
    raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")


def information_loss(kl: torch.Tensor, reduction: Literal['mean', 'sum', 'sqrt'] = 'mean') -> torch.Tensor:
    """The information term of the VIB loss (multiply by beta and add to the cross-entropy).

    Args:
        kl: [batch, depth, heads, tokens] per-head, per-token KL in nats, as returned by
            ``model(x, return_kl=True)``.
        reduction: ``'mean'`` averages over layers x heads x tokens and the batch: the
            convention of the paper's reference code, which the published beta values
            (10, 4, 1, 0.01, 0) refer to. ``'sum'`` sums over layers x heads x tokens and
            averages over the batch: eq. 3 of the paper, nats per image. The two differ by
            the factor depth * heads * tokens (12 * 3 * 196 = 7056 for ViT-Tiny at 224 px).
            ``'sqrt'``: the reference code's ``--sqrt-kl`` option (see :func:`information_per_sample`).

    Returns:
        Scalar float32 tensor (nats; sqrt-nats for ``'sqrt'``).
    """
    if kl.ndim == 4 and kl.shape[0] == 0:
        raise ValueError('kl holds a batch of 0 images: the mean information over it is undefined')
    return information_per_sample(kl, reduction).mean()
