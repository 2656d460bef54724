"""The parity oracle shared by every op's tests, and seeded input generators shared with the benchmarks.

Oracle: the reference run in fp64 (`upcast=True`) is the truth.
- fp32 (and fp64): max |fused - truth| <= 1e-4 × output scale, scale = max(1, max |truth|).
- fp16 / bf16: max |fused - truth| <= 2 × max |reference in that dtype - truth| + 1e-3, i.e. the fused
  op may be at most twice as wrong as PyTorch itself at that precision (flash-attention's rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

FP32_RELATIVE_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_ATOL = 1e-3
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Parity:
    """Outcome of one comparison; `ok` and a message that says by how much."""

    max_error: float
    tolerance: float
    reference_error: float | None  # PyTorch's own error at the input precision (fp16 / bf16)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        own = "" if self.reference_error is None else f", PyTorch's own error {self.reference_error:.3g}"
        return f"max abs error {self.max_error:.3g} vs tolerance {self.tolerance:.3g}{own}"


def tolerance(truth: torch.Tensor, dtype: torch.dtype, reference_low: torch.Tensor | None = None) -> tuple[float, float | None]:
    """(tolerance, PyTorch's own error) for outputs of `dtype` compared with the fp64 `truth`."""
    if dtype in LOW_PRECISION:
        if reference_low is None:
            raise ValueError(f"{dtype} parity needs the reference run at {dtype}")
        own = (reference_low.double() - truth).abs().max().item() if truth.numel() else 0.0
        return LOW_PRECISION_FACTOR * own + LOW_PRECISION_ATOL, own
    scale = max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    return FP32_RELATIVE_TOLERANCE * scale, None


def parity(fused_out: torch.Tensor, reference: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Parity:
    """Compare `fused_out` with `reference(*args, **kwargs)`; the reference must take `upcast=True`."""
    truth = reference(*args, **kwargs, upcast=True).double()
    low = reference(*args, **kwargs) if fused_out.dtype in LOW_PRECISION else None
    tol, own = tolerance(truth, fused_out.dtype, low)
    if fused_out.shape != truth.shape:
        raise AssertionError(f"shape {tuple(fused_out.shape)} != reference {tuple(truth.shape)}")
    error = (fused_out.double().cpu() - truth.cpu()).abs().max().item() if truth.numel() else 0.0
    if error != error:  # NaN anywhere
        error = float("inf")
    return Parity(error, tol, own)


def assert_parity(fused_out: torch.Tensor, reference: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Parity:
    result = parity(fused_out, reference, *args, **kwargs)
    assert result.ok, f"{getattr(reference, '__name__', 'reference')}: {result}"
    return result


def assert_close_outputs(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Whole-model comparisons (no fp64 truth available): fp32 outputs within 1e-4 × scale, lower
    precisions within 1e-2 × scale."""
    scale = max(1.0, expected.abs().max().item())
    tol = (FP32_RELATIVE_TOLERANCE if dtype not in LOW_PRECISION else 1e-2) * scale
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol, f"{what}: max abs error {error:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------------------------------
# Inputs

ROW_KINDS = ("random", "all_blocked", "all_open", "one_open")


def masked_attention_inputs(batch: int, queries: int, hw: int, dim: int = 256, heads: int = 8,
                            dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu",
                            edge_rows: bool = True, first_kind: int = 0,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (q, k, v, mask_logits) for masked cross-attention, generated in fp32 on the CPU.

    With `edge_rows`, query rows cycle through ROW_KINDS: random logits (about half the keys open),
    every key blocked (the row must attend to every key), every key open, and exactly one open key
    (at a seeded position), starting at ROW_KINDS[first_kind] (so Q=1 can be each kind).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, dim, generator=gen)
    k = torch.randn(batch, hw, dim, generator=gen)
    v = torch.randn(batch, hw, dim, generator=gen)
    logits = torch.randn(batch, queries, hw, generator=gen)
    if edge_rows:
        for row in range(queries):
            kind = ROW_KINDS[(row + first_kind) % len(ROW_KINDS)]
            if kind == "all_blocked":
                logits[:, row] = -logits[:, row].abs() - 0.1
            elif kind == "all_open":
                logits[:, row] = logits[:, row].abs()
            elif kind == "one_open":
                logits[:, row] = -logits[:, row].abs() - 0.1
                logits[:, row, int(torch.randint(hw, (1,), generator=gen))] = 0.0  # 0 is open: blocked is < 0
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, logits))
