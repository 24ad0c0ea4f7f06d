"""Bridges to other libraries' models. Each submodule imports its library lazily: gla_cuda
itself never requires them."""
