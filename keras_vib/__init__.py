"""keras_vib: the timm_vib vision transformers with per-head information bottlenecks, in Keras 3.

Backend: Keras picks its backend at import time from ``KERAS_BACKEND`` (or ``~/.keras/keras.json``)
and falls back to TensorFlow, so without TensorFlow a bare ``import keras`` fails. When neither the
variable nor keras.json chooses a backend and TensorFlow is not installed, ``import keras_vib``
sets ``KERAS_BACKEND=torch`` (or ``jax`` when only JAX is installed) before importing Keras. A
backend you chose (the variable, or a non-TensorFlow backend in keras.json) is never overridden;
if Keras was imported before keras_vib, its backend stays.

    import keras_vib
    model = keras_vib.vit_tiny_vib(beta=1.0, num_classes=10, image_size=32, patch_size=4)
    model.compile("adamw", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images_nhwc, labels)          # optimises CE + beta * mean KL (nats)
    # the paper's recipe: keras_vib.paper_optimizer, keras_vib.cosine_schedule, keras_vib.BetaWarmup
    out = keras_vib.kl_and_latents(model, images_nhwc)   # kl [B, depth, heads, tokens], mu, logvar
    model = keras_vib.from_timm("path/to/folder")        # timm weights (folder, file, module, Hub id)
"""
import importlib.util
import json
import os
import sys


def _keras_json_backend() -> bool:
    """True when keras.json names a usable backend other than TensorFlow (a user's choice).

    Keras writes keras.json with "tensorflow" itself on its first import, so that value is not
    taken as a choice: without TensorFlow installed it cannot work anyway.
    """
    home = os.environ.get('KERAS_HOME') or os.path.join(os.path.expanduser('~'), '.keras')
    try:
        with open(os.path.join(home, 'keras.json')) as f:
            backend = json.load(f).get('backend')
    except (OSError, ValueError, AttributeError):
        return False
    return bool(backend) and backend != 'tensorflow'


def _default_backend() -> None:
    if 'KERAS_BACKEND' in os.environ or 'keras' in sys.modules or _keras_json_backend():
        return
    if importlib.util.find_spec('tensorflow') is not None:
        return  # Keras's own default works
    for name in ('torch', 'jax'):
        if importlib.util.find_spec(name) is not None:
            os.environ['KERAS_BACKEND'] = name
            return


_default_backend()

from .layers import (  # noqa: E402
    GaussianBottleneck,
    MlpBlock,
    PatchEmbedding,
    PoolingHead,
    TransformerBlock,
    VIBMultiHeadAttention,
    gaussian_kl,
)
from .models import (  # noqa: E402
    MODEL_NAMES,
    PRESETS,
    VisionTransformerVIB,
    create_model,
    kl_and_latents,
    information_loss,
    vit_tiny_gap,
    vit_tiny_noattn,
    vit_tiny_vib,
    vit_tiny_vib_b0,
    vit_tiny_vib_b0p01,
    vit_tiny_vib_b0p1,
    vit_tiny_vib_b1,
    vit_tiny_vib_b4,
    vit_tiny_vib_b10,
)
from .convert import from_timm, load_timm_weights, to_timm_state_dict  # noqa: E402
from .recipe import BetaWarmup, PaperAdamW, beta_at, cosine_schedule, no_weight_decay_variables, paper_optimizer  # noqa: E402

__all__ = [
    'GaussianBottleneck', 'VIBMultiHeadAttention', 'TransformerBlock', 'MlpBlock', 'PatchEmbedding',
    'PoolingHead', 'VisionTransformerVIB', 'gaussian_kl', 'information_loss', 'kl_and_latents',
    'create_model', 'MODEL_NAMES', 'PRESETS', 'from_timm', 'load_timm_weights', 'to_timm_state_dict',
    'vit_tiny_vib', 'vit_tiny_vib_b0', 'vit_tiny_vib_b0p01', 'vit_tiny_vib_b0p1', 'vit_tiny_vib_b1',
    'vit_tiny_vib_b4', 'vit_tiny_vib_b10', 'vit_tiny_noattn', 'vit_tiny_gap',
    'paper_optimizer', 'PaperAdamW', 'cosine_schedule', 'no_weight_decay_variables', 'BetaWarmup', 'beta_at',
]
