"""timm-vib: information bottlenecks on every attention head of timm vision transformers.

``import timm_vib`` registers the ``vit_tiny_vib*``, ``vit_tiny_noattn`` and ``vit_tiny_gap``
models with timm, so ``timm.create_model("vit_tiny_vib_b4")`` works.
"""
try:
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:  # a Keras-only install (timm-vib[keras]) has neither
    raise ImportError(f'timm_vib needs torch and timm ({e.name} is not installed): pip install "timm-vib[torch]". '
                      'The Keras port, keras_vib, works without them.') from e

from .information import KL_REDUCTIONS, gaussian_kl, information_loss, information_per_sample
from .vision_transformer_vib import (
    ATTN_MODES,
    HUB_NAMESPACE,
    MODEL_NAMES,
    HeadBottleneck,
    MlpBlock,
    VIBAttention,
    VIBBlock,
    VisionTransformerVIB,
    beta_from_name,
    convert_reference_state_dict,
    name_for_beta,
    vibify,
)

__version__ = '0.1.0'


def __getattr__(name):
    # timm_vib.estimators loads on first use, so `import timm_vib` stays light
    if name == 'estimators':
        import importlib
        return importlib.import_module('.estimators', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
