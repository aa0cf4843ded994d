"""``LowRankLinear``: a drop-in ``nn.Linear`` whose weight is the product ``up @ down``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plrd.core.checks import check_features, check_rank
from plrd.core.factorize import (
    init_factors_,
    svd_factors,
    truncate_factors,
    whitened_svd_factors,
)
from plrd.core.kinds import Factored, as_linear, is_conv1d
from plrd.errors import InputError
from plrd_kernels import lowrank_linear


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(
            f"dtype={dtype!r} is not a floating-point torch dtype; pass e.g. torch.float32, "
            "torch.bfloat16, or None for the default"
        )


class LowRankLinear(nn.Module, Factored):
    """y = (x · downᵀ) · upᵀ + bias, with down [rank, in], up [out, rank], bias [out].

    Holds ``rank·(in + out)`` weights instead of ``in·out``; it pays below the break-even rank
    ⌊in·out/(in + out)⌋. The forward runs through :func:`plrd_kernels.lowrank_linear` (fused
    Triton kernels on CUDA, two matmuls on the CPU).

    ``ridge`` records the relative Cholesky ridge used when the factors came from a Gram that
    was not positive definite (0.0 otherwise); it is informational and not saved.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        rank = check_rank(rank, out_features, in_features)
        if not isinstance(bias, bool):
            raise InputError(f"bias must be True or False, got {bias!r}; pass a bool")
        _check_dtype(dtype)
        in_features, out_features = int(in_features), int(out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.ridge = 0.0
        self.down = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.up = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with nn.Linear's output variance (see ``factorize.init_factors_``)."""
        init_factors_(self.up, self.down)
        if self.bias is not None:
            bound = self.in_features**-0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return lowrank_linear(x, self.down, self.up, self.bias)

    @classmethod
    def _from_factors(
        cls, up: Tensor, down: Tensor, bias: Tensor | None, like: Tensor, ridge: float = 0.0
    ) -> LowRankLinear:
        """A layer holding ``up``/``down`` (cast to ``like``'s dtype and device) and ``bias``."""
        out_features, rank = up.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = down.shape[1]
        layer.out_features = out_features
        layer.rank = rank
        layer.ridge = ridge
        factory = {"device": like.device, "dtype": like.dtype}
        layer.down = nn.Parameter(down.to(**factory).contiguous(), requires_grad=like.requires_grad)
        layer.up = nn.Parameter(up.to(**factory).contiguous(), requires_grad=like.requires_grad)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, gram: Tensor | None = None, name: str | None = None
    ) -> LowRankLinear:
        """Factor a dense ``nn.Linear`` (or Hugging Face ``Conv1D``) at ``rank``.

        Without ``gram``: plain SVD, the best rank-r approximation of W in Frobenius norm. With
        ``gram`` = Σ xᵀx [in, in] of the layer's inputs (``plrd.collect_grams``): whitened SVD,
        the best rank-r approximation of the layer's outputs on those inputs. ``name`` labels
        error messages. Raises InputError (before any work) for a rank outside 1..min(in, out),
        non-finite or non-floating weights, or a Gram of the wrong shape or with NaN/inf.
        """
        if isinstance(linear, LowRankLinear):
            raise InputError(
                f"{'layer ' + repr(name) if name else 'layer'} is already a LowRankLinear; "
                "use layer.truncate(rank, gram) to lower its rank"
            )
        if is_conv1d(linear):
            linear = as_linear(linear)
        if not isinstance(linear, nn.Linear):
            raise InputError(
                f"from_linear needs an nn.Linear (or Hugging Face Conv1D), got "
                f"{type(linear).__name__}; pass the dense linear layer to factor"
            )
        weight = linear.weight.detach()
        if gram is None:
            up, down = svd_factors(weight, rank, name)
            ridge = 0.0
        else:
            (up, down), ridge = whitened_svd_factors(weight, rank, gram, name)
        return cls._from_factors(up, down, linear.bias, linear.weight, ridge)

    def truncate(
        self, rank: int, gram: Tensor | None = None, name: str | None = None
    ) -> LowRankLinear:
        """A new layer with the optimal rank-``rank`` approximation of ``up @ down``.

        Uses the QR-core method (no dense SVD, O((in + out)·r²)); with ``gram`` the optimum is
        taken in the whitened output norm, as in :meth:`from_linear`. Raises InputError for a
        rank outside 1..current rank or a bad Gram, before any work.
        """
        (up, down), ridge = truncate_factors(self.up.detach(), self.down.detach(), rank, gram, name)
        return type(self)._from_factors(up, down, self.bias, self.up, ridge)

    def dense_weight(self) -> Tensor:
        """The effective weight ``up @ down`` [out, in] (a new tensor, no grad)."""
        return (self.up.detach() @ self.down.detach()).to(self.up.dtype)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``up @ down`` and the same bias, dtype and device."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.up.device,
            dtype=self.up.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.up.double() @ self.down.double())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
