"""gla_cuda: Gated Linear Attention for PyTorch (CUDA/CuTe kernels, Triton, reference)."""
from gla_cuda.api import chunk_gla, explain_backend, fused_recurrent_gla, fused_recurrent_gla_pooled
from gla_cuda.dispatch import BACKENDS
from gla_cuda.layers import GatedLinearAttention, GLACache
from gla_cuda.serving import chunk_gla_pooled, fused_recurrent_gla_verify_pooled

__version__ = "0.1.0"
__all__ = ["chunk_gla", "fused_recurrent_gla", "fused_recurrent_gla_pooled", "chunk_gla_pooled",
           "fused_recurrent_gla_verify_pooled", "explain_backend", "BACKENDS",
           "GatedLinearAttention", "GLACache", "__version__"]
