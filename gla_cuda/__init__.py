"""gla_cuda: Gated Linear Attention for PyTorch (CUDA/CuTe kernels, Triton, reference)."""
from gla_cuda.api import chunk_gla, explain_backend, fused_recurrent_gla, fused_recurrent_gla_pooled
from gla_cuda.dispatch import BACKENDS
from gla_cuda.layers import GatedLinearAttention, GLACache

__version__ = "0.1.0"
__all__ = ["chunk_gla", "fused_recurrent_gla", "fused_recurrent_gla_pooled", "explain_backend", "BACKENDS",
           "GatedLinearAttention", "GLACache", "__version__"]
