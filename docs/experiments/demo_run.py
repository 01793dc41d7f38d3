"""One run of the demo's spectrum, for any seed, optionally with the heads' writes muted (docs/spectrum.md, 4f).

    python docs/experiments/demo_run.py MODEL SEED OUTPUT [--mute writes|branch] [--mu-gain G] [--identity-init]
        [--no-sampling] [--freeze-bottleneck] [--vib-lr-scale S] [--keep-rng | --own-rng] [--he-init]
        [--mute-layers L,L...] [demo flags ...]

Trains ``MODEL`` (e.g. ``vit_tiny_noattn``, ``vit_tiny_vib_b10``) with exactly the arguments ``timm-vib demo``
gives it for ``SEED`` (the demo's flags after the options, e.g. ``--data fashion-mnist --img-size 28
--patch-size 4 --epochs 10 --max-train-samples 5000 --max-val-samples 1000``), so more seeds than the demo's can
be trained one by one, e.g. ``seq 6 23 | xargs -P 2 -I S python docs/experiments/demo_run.py vit_tiny_noattn S
runs/many/noattn_sS``.

``--mute writes`` multiplies every head's decoded write by 0 in training and validation: the parameters, the
random draws and the KL stay those of the normal run, and the attention branch adds only its output
projection's bias. ``--mute branch`` also freezes that bias at its init (0), so the network computes the
attention-free model's function. Both run the unfused reference path (``fold_projections = False``; run
``--mute none-unfused`` for the same path with the writes kept, the control). Since the demo's MLPs of 64 on
heads of 16 run that path by default anyway, ``none`` and ``none-unfused`` are now the same run; the controls
of docs/spectrum.md 4f were trained when the default still folded. ``--mu-gain G`` starts every posterior mean G
times larger (the log-variances unchanged): the channels open sooner (docs/spectrum.md 4g). ``--identity-init``
starts every bottleneck at ``HeadBottleneck.init_identity`` and ``--no-sampling`` sets z = mu in training and
validation: with both, a linear bottleneck with r = head_dim computes the ViT's function at init (4g);
``--freeze-bottleneck`` keeps it there (no gradient), ``--vib-lr-scale S`` trains the bottlenecks at S x the
learning rate, and ``--keep-rng`` gives the bottlenecks' init a saved and restored RNG state, so that every other
weight and the data order are those of the bottleneck-free runs of the same seed (4g: with the three, seed 2
reproduces the ViT's run to the last digit; but timm's init pass re-initialises the bottlenecks, which then draw
the same numbers as the next MLP layer: use it only where the bottleneck's draws do not matter, as for a frozen
identity). ``--own-rng`` pairs seeds properly: the bottlenecks' init draws from a stream of its own, so every other
weight and the data order are the ViT's of the same seed, and the bottlenecks' draws are uncorrelated with the rest
(4h: the frozen control then lands 0.1 ± 0.5 points from the ViT over six seeds). ``--he-init`` starts every
bottleneck layer scale-preserving (4h). ``--mute-layers 0`` mutes the writes (as ``--mute writes``) of the
listed blocks only (0 = the first), so that only the other blocks' heads can talk; in the ViT those blocks'
attention outputs only its projection's bias (4k).
"""
import argparse
import sys

import torch

from timm_vib import vision_transformer_vib as vtv
from timm_vib.cli import main as cli_main
from timm_vib.demo import _settings, _train_argv, add_demo_args

MUTES = ('none', 'none-unfused', 'writes', 'branch')


def patch(mute: str) -> None:
    """Change VIBAttention / HeadBottleneck for every model built after this call."""
    if mute == 'none':
        return
    add_bottleneck = vtv.VIBAttention._add_bottleneck

    def _add_bottleneck(self, *args, **kwargs):
        add_bottleneck(self, *args, **kwargs)
        self.fold_projections = False  # the unfused path calls vib.decode, which the mute replaces
        if mute == 'branch' and self.proj.bias is not None:
            self.proj.bias.requires_grad_(False)  # timm initialises it to 0; no gradient, so AdamW leaves it there

    vtv.VIBAttention._add_bottleneck = _add_bottleneck
    if mute in ('writes', 'branch'):
        decode = vtv.HeadBottleneck.decode
        vtv.HeadBottleneck.decode = lambda self, z: 0.0 * decode(self, z)


def patch_mute_layers(layers: set) -> None:
    """Every head's decoded write in the blocks numbered ``layers`` (0 = the first) multiplied by 0 in training
    and validation, as ``--mute writes`` does for all of them; the other blocks unchanged. In a model without
    bottlenecks (the ViT) those blocks' attention outputs only their output projection's bias."""
    init = vtv.VisionTransformerVIB.__init__

    def mute(attn, args, out):
        return 0.0 * out + (attn.proj.bias if attn.proj.bias is not None else 0.0)

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if max(layers) >= len(self.blocks):
            raise ValueError(f'--mute-layers {sorted(layers)}: the model has {len(self.blocks)} blocks')
        for i, block in enumerate(self.blocks):
            attn = getattr(block, 'attn', None)
            if attn is None:
                raise ValueError(f'--mute-layers: block {i} of {type(self).__name__} has no attention to mute')
            if hasattr(attn, 'vib'):
                attn.fold_projections = False  # the unfused path calls vib.decode
                attn.vib.muted = i in layers
            elif i in layers:  # the ViT: the attention's output, bias kept
                attn.register_forward_hook(mute)

    vtv.VisionTransformerVIB.__init__ = __init__
    decode = vtv.HeadBottleneck.decode
    vtv.HeadBottleneck.decode = lambda self, z: (0.0 if getattr(self, 'muted', False) else 1.0) * decode(self, z)


def _blocks(value: str) -> set:
    """'0' or '1,2,3' -> {block numbers}."""
    parts = value.split(',')
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f'expected block numbers >= 0 separated by commas, e.g. 0 or 1,2,3, got {value!r}')
    return {int(p) for p in parts}


def _wrap_init(step) -> None:
    """Every ``HeadBottleneck.init_weights`` (also re-run by timm's init pass) becomes ``step(self, init)``, where
    ``init`` is the one in force before this call, so patches compose in the order they are applied."""
    init = vtv.HeadBottleneck.init_weights
    vtv.HeadBottleneck.init_weights = lambda self: step(self, lambda: init(self))


def patch_mu_gain(gain: float) -> None:
    """Scale every bottleneck's initial posterior means by ``gain`` (the mean columns of the layer that outputs
    (mu, logvar)), leaving the log-variances and everything else at their init."""
    def step(self, init):
        init()
        w = self.enc_out_weight if self.is_mlp else self.enc_weight
        with torch.no_grad():
            w[..., :self.vib_dim].mul_(gain)

    if gain != 1.0:
        _wrap_init(step)


def patch_he_init() -> None:
    """Every bottleneck layer scale-preserving at init (He's init): the layers before a GELU drawn at sqrt(6) x,
    the others at sqrt(3) x nn.Linear's uniform bound (the same draws, scaled), so that the bottleneck passes a
    head's output at about its own rms where nn.Linear's init shrinks it ~40x through the MLP (docs/spectrum.md 4h).
    A decoder started near zero (``small_init_dec``) stays there."""
    def step(self, init):
        init()
        with torch.no_grad():
            before_gelu = (self.enc_weight, self.dec_in_weight) if self.is_mlp else ()
            for w in self._weights():
                if w is self.dec_weight and self.small_init_dec:
                    continue
                w.mul_(6 ** 0.5 if any(w is b for b in before_gelu) else 3 ** 0.5)

    _wrap_init(step)


def patch_identity_init() -> None:
    """Start every bottleneck at :meth:`HeadBottleneck.init_identity` (as ``vibify`` does): without sampling, the
    identity on each head's output where the bottleneck is wide enough, else a projection."""
    def step(self, init):
        init()
        self.init_identity()

    _wrap_init(step)


def patch_no_sampling() -> None:
    """z = mu in training and validation: the bottleneck's layers without their noise."""
    def forward(self, stats):
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, mu, logvar.clamp(self.logvar_clamp[0], self.logvar_clamp[1])

    vtv.HeadBottleneck.forward = forward


def patch_vib_lr_scale(scale: float) -> None:
    """Train every bottleneck parameter at ``scale`` x the learning rate (a param group of their own: timm's
    schedulers keep each group's base rate); everything else as the demo does."""
    import timm.optim
    create = timm.optim.create_optimizer_v2

    def create_optimizer_v2(model, *args, **kwargs):
        opt = create(model, *args, **kwargs)
        vib = {id(p) for n, p in model.named_parameters() if '.vib.' in n}
        for group in list(opt.param_groups):
            mine = [p for p in group['params'] if id(p) in vib]
            if mine:
                group['params'] = [p for p in group['params'] if id(p) not in vib]
                opt.add_param_group({**{k: v for k, v in group.items() if k != 'params'}, 'params': mine,
                                     'lr': group['lr'] * scale})
        return opt

    timm.optim.create_optimizer_v2 = create_optimizer_v2


def patch_freeze_bottleneck() -> None:
    """Bottleneck parameters keep their init (no gradient, so no optimizer step)."""
    def step(self, init):
        init()
        self.requires_grad_(False)

    _wrap_init(step)


def patch_keep_rng() -> None:
    """The bottlenecks' init draws from a saved and restored RNG state, so every other parameter, and the data
    order, get the draws they get in the bottleneck-free models of the same seed."""
    def step(self, init):
        state = torch.get_rng_state()
        init()
        torch.set_rng_state(state)

    _wrap_init(step)


def patch_own_rng(seed: int) -> None:
    """The bottlenecks' init draws from a random stream of its own (seeded by ``seed``), continued across layers
    and across timm's second init pass: every other parameter, and the data order, get the draws they get in the
    bottleneck-free models of the same seed, and each bottleneck its own numbers, uncorrelated with the rest."""
    stream = [torch.Generator().manual_seed(seed + 1_000_003).get_state()]

    def step(self, init):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(stream[0])
            init()
            stream[0] = torch.get_rng_state()

    _wrap_init(step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model')
    p.add_argument('seed', type=int)
    p.add_argument('output')
    p.add_argument('--mute', choices=MUTES, default='none')
    p.add_argument('--mu-gain', type=float, default=1.0, help='scale the initial posterior means (docs/spectrum.md 4g)')
    p.add_argument('--identity-init', action='store_true', help='bottlenecks start at init_identity (docs/spectrum.md 4g)')
    p.add_argument('--no-sampling', action='store_true', help='z = mu: no noise (docs/spectrum.md 4g)')
    p.add_argument('--vib-lr-scale', type=float, default=1.0,
                   help="the bottleneck parameters' learning rate, relative to the rest (docs/spectrum.md 4g)")
    p.add_argument('--freeze-bottleneck', action='store_true', help='bottleneck parameters stay at their init (4g)')
    p.add_argument('--he-init', action='store_true', help='scale-preserving bottleneck layers at init (4h)')
    p.add_argument('--mute-layers', type=_blocks, default=set(),
                   help="mute the heads' writes of these blocks only, e.g. 0 or 1,2,3 (4k)")
    pairing = p.add_mutually_exclusive_group()  # two ways of pairing seeds with the bottleneck-free runs
    pairing.add_argument('--keep-rng', action='store_true',
                         help="the bottlenecks' init leaves the RNG as it found it (4g)")
    pairing.add_argument('--own-rng', action='store_true',
                         help="the bottlenecks' init draws from a stream of its own: seeds pair with the ViT's (4h)")
    args, demo_flags = p.parse_known_args()
    if args.vib_lr_scale != 1.0:
        patch_vib_lr_scale(args.vib_lr_scale)
    if args.no_sampling:
        patch_no_sampling()
    patch(args.mute)
    if args.mute_layers:
        patch_mute_layers(args.mute_layers)
    patch_mu_gain(args.mu_gain)
    if args.identity_init:
        patch_identity_init()
    if args.he_init:
        patch_he_init()
    if args.freeze_bottleneck:  # after the other init patches, so it freezes what they set
        patch_freeze_bottleneck()
    if args.keep_rng:  # outermost: restores the RNG after every init patch has drawn
        patch_keep_rng()
    if args.own_rng:
        patch_own_rng(args.seed)
    demo = add_demo_args(argparse.ArgumentParser()).parse_args(['--no-progress', *demo_flags])
    torch.set_num_threads(1)
    return cli_main(['train', *_train_argv(_settings(demo), demo, args.model, args.output, seed=args.seed)])


if __name__ == '__main__':
    sys.exit(main())
