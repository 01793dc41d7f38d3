"""Shared test set-up."""
import os

# TensorFlow imported before torchvision makes the interpreter crash (a segfault in torchvision's
# C ops). The Keras tests on the TensorFlow backend still use timm (so torchvision) as the reference:
# load it first. Where torch is absent (the torch-free environment) there is nothing to order.
if os.environ.get('KERAS_BACKEND') == 'tensorflow':
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
