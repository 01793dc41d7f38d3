"""Writes tests/data/timm_vit_tiny_vib/: a small timm_vib checkpoint as timm saves it (model.safetensors +
config.json) and timm's own answer on fixed images (expected.npz: images NCHW, logits, KL nats), so that
keras_vib can be checked against timm where torch is not installed. Run by hand with torch and timm:

    python tests/data/make_timm_fixture.py

tests/test_keras_convert.py checks that timm still gives expected.npz from these weights.
"""
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models._hub import save_for_hf

import timm_vib  # noqa: F401  (registers the models)

OUT = Path(__file__).resolve().parent / 'timm_vit_tiny_vib'
MODEL_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, vib_dim=4, vib_hidden=8,
                  num_classes=5, beta=0.5)


def main() -> None:
    torch.manual_seed(0)
    m = timm.create_model('vit_tiny_vib', **MODEL_ARGS).eval()
    with torch.no_grad():  # move the posteriors off their init so that the KL is not trivial
        for b in m.bottlenecks():
            for bias in b._biases():
                bias.normal_(0, 0.5)
            b.stats_bias.normal_(0, 1.0)
    save_for_hf(m, str(OUT), model_args=MODEL_ARGS, safe_serialization=True)
    (OUT / 'pytorch_model.bin').unlink(missing_ok=True)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, kl = m(x, return_kl=True)
    np.savez(OUT / 'expected.npz', images=x.numpy(), logits=logits.numpy(), kl=kl.numpy())


if __name__ == '__main__':
    main()
