""" Repetition probe (paper fig. 5)

Copy one patch of an image to N other patch-aligned places and measure how far a head's latent
mean at the original patch moves: mu_aug - mu_0. Heads that detect repetition shift further as N
grows (4, 16, 64 in the paper).
"""
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .activity import _device, _need_bottleneck, _num_heads, check_layer_head
from .capture import DeviceLike, capture, eval_mode, grid_size, num_prefix_tokens

__all__ = ['copy_patch', 'repetition_probe', 'RepetitionProbe']


def _patch_indices(patches) -> torch.Tensor:
    """Patch indices as a long tensor; 3.7 or True is a mistake, not patch 3 or 1."""
    patches = torch.as_tensor(patches)
    if patches.dtype == torch.bool or (patches.is_floating_point() and not torch.equal(patches, patches.round())):
        raise ValueError(f'patch indices must be integers, got {patches.tolist()}')
    return patches.long()


def _patch_size(model: nn.Module) -> Tuple[int, int]:
    p = model.patch_embed.patch_size
    return (p, p) if isinstance(p, int) else tuple(p)


def copy_patch(
        images: torch.Tensor,
        patches: torch.Tensor,
        n_copies: int,
        patch_size: Sequence[int],
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Paste patch ``patches[i]`` (row-major index on the patch grid) of image i onto ``n_copies`` other
    distinct grid cells chosen at random: [P, C, H, W] -> [P, C, H, W] (the source stays in place)."""
    P, C, Hh, Ww = images.shape
    ph, pw = patch_size
    if Hh % ph or Ww % pw:
        raise ValueError(f'image size {Hh}x{Ww} is not a multiple of the patch size {ph}x{pw}')
    gh, gw = Hh // ph, Ww // pw
    G = gh * gw
    patches = _patch_indices(patches).to(images.device)
    if patches.shape != (P,):
        raise ValueError(f'need one patch index per image: {P} images, patches of shape {tuple(patches.shape)}')
    if (patches < 0).any() or (patches >= G).any():
        raise IndexError(f'patch index outside the {gh}x{gw} grid (valid: 0..{G - 1}), got {patches.tolist()}')
    if not 0 <= n_copies <= G - 1:
        raise ValueError(f'n_copies must be in 0..{G - 1} (other cells of the {gh}x{gw} grid), got {n_copies}')
    cells = images.reshape(P, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(P, G, C, ph, pw)
    keys = torch.rand(P, G, generator=generator, device=generator.device if generator else images.device).to(images.device)
    keys[torch.arange(P), patches] = 2.0  # the source is never a destination
    dest = torch.zeros(P, G, dtype=torch.bool, device=images.device)
    dest.scatter_(1, keys.argsort(1)[:, :n_copies], True)
    src = cells[torch.arange(P), patches]
    out = torch.where(dest[:, :, None, None, None], src[:, None], cells)
    return out.reshape(P, gh, gw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(P, C, Hh, Ww)


def probe_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s copy locations in :func:`repetition_probe`."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]))


class RepetitionProbe(NamedTuple):
    """Result of :func:`repetition_probe` (latent units): ``shift`` [P, len(n_copies), pairs, r] is
    mu_aug - mu_0; ``mu0`` [P, pairs, r] is mu_0, the latent mean at the patch in the original image."""
    shift: torch.Tensor
    mu0: torch.Tensor


def repetition_probe(
        model: nn.Module,
        images: torch.Tensor,
        patches: Union[torch.Tensor, Sequence[int]],
        layer_heads: Sequence[Tuple[int, int]],
        n_copies: Sequence[int] = (4, 16, 64),
        seed: int = 0,
        batch_size: int = 64,
        device: DeviceLike = None,
) -> RepetitionProbe:
    """Shift of the latent mean at a copied patch: mu_aug - mu_0 for chosen heads.

    Args:
        images: [P, C, H, W], one per (image, patch) pair (repeat an image for several patches).
        patches: [P] row-major patch indices on the patch grid.
        layer_heads: (layer, head) pairs to read.
        n_copies: numbers of copies N (each at most grid cells - 1).
        seed: copy locations are drawn from (seed, the image's index in ``images``): the same whatever the
            batch size, and nested over ``n_copies`` (the N locations of an image are among its N' > N ones).

    Returns:
        :class:`RepetitionProbe` (shift [P, len(n_copies), len(layer_heads), r], mu0 [P, len(layer_heads), r])
        in latent units. The model runs under :func:`eval_mode` whatever its mode: mu is then a
        deterministic function of the image, so the shift holds no noise sampled in earlier layers.
    """
    _need_bottleneck(model, allow_attention_free=False)
    if images.ndim != 4:
        raise ValueError(f'images must be [P, C, H, W], got {tuple(images.shape)}')
    if len(layer_heads) == 0:
        raise ValueError('no (layer, head) pairs given')
    for layer, head in layer_heads:
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in (layer, head)):
            raise ValueError(f'(layer, head) pairs must be integers, got {(layer, head)!r}')
        check_layer_head(model, layer, head)
    # negative indices count from the end, as in Python; the tensors below need them positive
    layer_heads = [(layer % len(model.blocks), head % _num_heads(model.blocks[layer])) for layer, head in layer_heads]
    gh, gw = grid_size(model)
    G = gh * gw
    patches = _patch_indices(patches).reshape(-1)
    if len(patches) != len(images):
        raise ValueError(f'need one patch index per image: {len(images)} images, {len(patches)} patches')
    if (patches < 0).any() or (patches >= G).any():
        raise IndexError(f'patch index outside the {gh}x{gw} grid (valid: 0..{G - 1})')
    for n in n_copies:
        if not 0 <= n <= G - 1:
            raise ValueError(f'n_copies {n} does not fit: the {gh}x{gw} grid has {G - 1} other cells')
    device = _device(model, device)
    layers = torch.tensor([lh[0] for lh in layer_heads])
    heads = torch.tensor([lh[1] for lh in layer_heads])
    tok = num_prefix_tokens(model) + patches
    ps = _patch_size(model)

    def copied(x, p, start, n):  # each image's copies from its own generator, seeded by (seed, index)
        return torch.cat([copy_patch(x[j:j + 1], p[j:j + 1], n, ps, probe_generator(seed, start + j))
                          for j in range(len(x))])

    def read(x, t):  # mu at the source token for every chosen head: [b, pairs, r]
        model(x.to(device))
        return rec.mu[torch.arange(len(x))[:, None], layers[None], heads[None], t[:, None]].cpu()

    shifts, mu0s = [], []
    with torch.no_grad(), eval_mode(model), capture(model) as rec:
        for s in range(0, len(images), batch_size):
            x, p, t = images[s:s + batch_size], patches[s:s + batch_size], tok[s:s + batch_size]
            mu0 = read(x, t)
            shifts.append(torch.stack([read(copied(x, p, s, n), t) - mu0 for n in n_copies], 1))
            mu0s.append(mu0)
    return RepetitionProbe(torch.cat(shifts), torch.cat(mu0s))
