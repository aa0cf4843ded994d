"""Fused low-rank matmul kernels: ``lowrank_linear(x, down, up, bias)``."""

from plrd_kernels.op import lowrank_linear
from plrd_kernels.reference import lowrank_linear_reference

__all__ = ["lowrank_linear", "lowrank_linear_reference"]
