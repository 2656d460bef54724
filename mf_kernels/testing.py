"""The parity oracle shared by every op's tests, and seeded input generators shared with the benchmarks.

Oracle: the reference run in fp64 (`upcast=True`) is the truth.
- fp32 (and fp64): max |fused - truth| <= 1e-4 × output scale, scale = max(1, max |truth|).
- fp32 whose dots run in TF32 (cuDNN convs and the Triton GEMM on sm_80+ when
  torch.backends.cudnn.allow_tf32, torch's default): TF32 keeps 10 of fp32's 23 mantissa bits, so each
  operand of a product is rounded by at most 2^-11 relative and a dot sum_i x_i w_i is off by at most
  2 · 2^-11 · sum_i |x_i w_i| (+ fp32 accumulation). The tolerance is that bound with the largest
  sum_i |x_i w_i| of the output (`tf32_abs_dot`), added to the fp32 one. The fp64 truth has no TF32.
- fp16 / bf16: max |fused - truth| <= 2 × max |reference in that dtype - truth| + 1e-3, i.e. the fused
  op may be at most twice as wrong as PyTorch itself at that precision (flash-attention's rule).

Generators: `masked_attention_inputs`, `make_mask_logits`, `make_class_probs` here; the FPN ones are
`mf_kernels.shapes.FpnShape.upsample_inputs` / `lateral_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

FP32_RELATIVE_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_ATOL = 1e-3
LOW_PRECISION = (torch.float16, torch.bfloat16)
TF32_UNIT_ROUNDOFF = 2.0**-11  # 10 explicit mantissa bits, round to nearest


@dataclass
class Parity:
    """Outcome of one comparison; `ok` and a message that says by how much."""

    max_error: float
    tolerance: float
    reference_error: float | None  # PyTorch's own error at the input precision (fp16 / bf16)
    tf32: bool = False  # the tolerance includes the TF32 dot bound

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        own = "" if self.reference_error is None else f", PyTorch's own error {self.reference_error:.3g}"
        tf32 = " (TF32 dots: 2·2^-11·max Σ|x·w| included)" if self.tf32 else ""
        return f"max abs error {self.max_error:.3g} vs tolerance {self.tolerance:.3g}{tf32}{own}"


def tolerance(truth: torch.Tensor, dtype: torch.dtype, reference_low: torch.Tensor | None = None,
              tf32_abs_dot: float | None = None) -> tuple[float, float | None]:
    """(tolerance, PyTorch's own error) for outputs of `dtype` compared with the fp64 `truth`; `tf32_abs_dot`
    (fp32 only): max over outputs of sum_i |x_i w_i| when the fused op's dots may run in TF32."""
    if dtype in LOW_PRECISION:
        if reference_low is None:
            raise ValueError(f"{dtype} parity needs the reference run at {dtype}")
        own = (reference_low.double() - truth).abs().max().item() if truth.numel() else 0.0
        return LOW_PRECISION_FACTOR * own + LOW_PRECISION_ATOL, own
    scale = max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    tf32 = 0.0 if tf32_abs_dot is None else 2 * TF32_UNIT_ROUNDOFF * tf32_abs_dot
    return FP32_RELATIVE_TOLERANCE * scale + tf32, None


def tf32_abs_dot(x: torch.Tensor, weight: torch.Tensor) -> float:
    """max over outputs of sum_i |x_i w_i| for a 1x1 conv of x [B, Cin, H, W] with weight [Cout, Cin] (fp64)."""
    return torch.nn.functional.conv2d(x.double().abs(), weight.double().abs()[:, :, None, None]).max().item()


def tf32_in_use(device: torch.device | str) -> bool:
    """Whether fp32 convs (and so the Triton FPN GEMM, which follows the same flag) may use TF32 on `device`."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.backends.cudnn.allow_tf32
            and torch.cuda.get_device_capability(device) >= (8, 0))


def parity(fused_out: torch.Tensor, reference: Callable[..., torch.Tensor], *args: Any,
           tf32_abs_dot: float | None = None, **kwargs: Any) -> Parity:
    """Compare `fused_out` with `reference(*args, **kwargs)`; the reference must take `upcast=True`.
    `tf32_abs_dot`: see `tolerance` (pass it only when the fused op's fp32 dots may run in TF32)."""
    truth = reference(*args, **kwargs, upcast=True).double()
    low = reference(*args, **kwargs) if fused_out.dtype in LOW_PRECISION else None
    tol, own = tolerance(truth, fused_out.dtype, low, tf32_abs_dot)
    if fused_out.shape != truth.shape:
        raise AssertionError(f"shape {tuple(fused_out.shape)} != reference {tuple(truth.shape)}")
    error = (fused_out.double().cpu() - truth.cpu()).abs().max().item() if truth.numel() else 0.0
    if error != error:  # NaN anywhere
        error = float("inf")
    return Parity(error, tol, own, tf32=tf32_abs_dot is not None and fused_out.dtype not in LOW_PRECISION)


def assert_parity(fused_out: torch.Tensor, reference: Callable[..., torch.Tensor], *args: Any,
                  **kwargs: Any) -> Parity:
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


# Rows of `make_mask_logits` with edge_rows: white noise (many tiny components), all -30 (empty mask),
# all +30 (full mask), an object-like blob.
MASK_ROW_KINDS = ("random", "empty", "full", "blob")


def make_mask_logits(queries: int, h: int, w: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                     edge_rows: bool = True) -> torch.Tensor:
    """Seeded stride-4 mask logits [Q, h, w] for the post-processing ops (tests and benchmarks).

    Every row is an object-like blob: positive inside an ellipse of random centre and radii, negative
    outside, plus noise, so masks are compact with ragged borders, as a trained model's are. With
    `edge_rows`, rows cycle through MASK_ROW_KINDS instead.
    """
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    rows = []
    for q in range(queries):
        kind = MASK_ROW_KINDS[q % len(MASK_ROW_KINDS)] if edge_rows else "blob"
        noise = torch.randn(h, w, generator=gen)
        if kind == "random":
            rows.append(4 * noise)
        elif kind == "empty":
            rows.append(torch.full((h, w), -30.0))
        elif kind == "full":
            rows.append(torch.full((h, w), 30.0))
        else:
            cy, cx, ry, rx = (torch.rand(4, generator=gen) * torch.tensor([h, w, h / 3, w / 3])).tolist()
            inside = 1 - ((ys - cy) / (ry + 1)) ** 2 - ((xs - cx) / (rx + 1)) ** 2
            rows.append(8 * inside.clamp(min=-1) + noise)
    return torch.stack(rows).to(dtype)


def make_class_probs(queries: int, classes: int, kept: int, seed: int = 0) -> torch.Tensor:
    """Seeded class probabilities [Q, C] (softmax over C + 1 with a no-object column, as FAI-MF's):
    `kept` queries spread over Q have one confident class (max prob about 0.6-0.99), the others are
    no-object (max prob below 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(queries, classes + 1, generator=gen)
    logits[:, classes] += 6.0  # no-object wins by default
    confident = torch.linspace(0, queries - 1, kept).round().long() if kept else torch.zeros(0, dtype=torch.long)
    labels = torch.randint(classes, (kept,), generator=gen)
    logits[confident, labels] += 7.0 + 4.0 * torch.rand(kept, generator=gen)
    return logits.softmax(-1)[:, :classes]
