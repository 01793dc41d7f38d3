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

# The tests compare float32 results with float32 references (timm against the Keras port on each
# backend, one backend against another). On a GPU both frameworks would otherwise round some float32
# products to TF32's 10-bit mantissa (torch's convolutions, JAX's matrix products), about 1e-3 relative:
# set before JAX is imported, and inherited by the backends the tests start in subprocesses.
import os

os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
try:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
except NameError:  # no torch here
    pass
