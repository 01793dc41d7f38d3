"""Shared test set-up."""
# torch's compiler stack (torch._dynamo, which imports triton; torchvision imports it) must load before
# the Keras tests load TensorFlow / JAX: imported after them, triton's import segfaults the process.
import torch._dynamo  # noqa: F401,E402
