"""Shared test set-up."""

# torch's compiler stack (torch._dynamo, which imports triton; torchvision imports it) must load before
# the Keras tests load TensorFlow / JAX: imported after them, triton's import segfaults the process.
# TensorFlow imported before torchvision crashes too (a segfault in torchvision's C ops); the Keras tests
# on TensorFlow still use timm as the reference. Where torch is absent (the torch-free environment)
# there is nothing to order.
try:
    import torch._dynamo  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass
