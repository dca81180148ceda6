"""Inference-only CPU speed-up: Linear weights reordered once into oneDNN's blocked layout.

At batch size 1 the text stream has ~38 rows and the visual stream 101, so every GEMM is short and wide. The
default BLAS path repacks the weight matrix on every call; with the weights reordered ahead of time the oneDNN
kernel reaches 1.3-1.9x the throughput on these shapes. Where the packed kernel stops winning depends on the
CPU: with AVX-512 it beat the default path at every row count measured (38 to 808 rows); on AVX2-only CPUs
the default BLAS kernel is faster again from about 150 rows on (batched requests). Each layer therefore keeps
both copies and, on AVX2, picks by row count: this costs a second copy of the weights in memory (0.94 GB for
the full model); on AVX-512 only the packed copy is kept. bench/bench_vilbert.py records the effect. Results
agree with nn.Linear to fp32 rounding.

On CPUs with native bf16 dot products (AVX512-BF16 or AMX) the weights can instead be packed in bf16, for
`precision="bf16"`: the packed bf16 kernel ran about twice the fp32 packed rate on every shape measured, while
autocast over nn.Linear converts every weight matrix to bf16 again on each call. Such a model runs under
torch.autocast(bf16) like the unpacked one, and returns bf16 from its packed layers as autocast would.

Packing replaces the modules in place: the packed model is for inference only (no gradients). Load or save
checkpoints before packing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# The reorder takes the expected number of input rows as a layout hint; ViLBERT's rows are tens to hundreds.
ROWS_HINT = 64
# On AVX2-only CPUs the default BLAS path beats the packed kernel above this many rows (docs/PERFORMANCE.md).
AVX2_MAX_PACKED_ROWS = 128


def default_max_packed_rows() -> int | None:
    """Row count above which PackedLinear uses the default BLAS kernel instead; None = always packed.

    Measured with bench/bench_vilbert.py and per-shape sweeps (docs/PERFORMANCE.md): on an AVX-512 CPU the
    packed kernel ran 189-223 GFLOP/s from 38 to 808 rows against 91-195 for the default path, while on AVX2
    the default path was 10-15% faster above ~128 rows."""
    return None if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else AVX2_MAX_PACKED_ROWS


def onednn_linear_available() -> bool:
    """True when this PyTorch build has the oneDNN packed-linear ops (standard x86 and aarch64 builds do)."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4), weight, torch.zeros(4), "none", [], "")
        return True
    except (AttributeError, RuntimeError):
        return False


def native_bf16_linear_available() -> bool:
    """True when oneDNN can run packed bf16 linears on this CPU with native bf16 instructions.

    oneDNN also accepts bf16 on plain AVX-512 by emulation, at about a third of the fp32 speed (measured), so the
    instruction sets are checked, not only the op."""
    cpu = torch.cpu
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return native and not _bf16_isa_capped() and onednn_linear_available()


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10")


def _bf16_isa_capped() -> bool:
    """True when the process is told to use less than the CPU has: ATEN_CPU_CAPABILITY below AVX-512, or
    ONEDNN_MAX_CPU_ISA (DNNL_MAX_CPU_ISA) below AVX512_CORE_BF16. The CPUID probes above ignore both, so without
    this an AVX2-capped run (how the tests emulate an AVX2-only CPU, docs/TESTING.md) would pack bf16 weights
    for kernels it may not use."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return True
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    return not cap.startswith(_BF16_ISAS)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout. x [..., in] -> [..., out]

    fp32: short inputs take the packed kernel, inputs over max_packed_rows the default one (see the module
    docstring). bf16: W and b in bf16, every input cast to bf16 and always packed (there is no faster path)."""

    def __init__(
        self,
        linear: nn.Linear,
        rows_hint: int = ROWS_HINT,
        max_packed_rows: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        """max_packed_rows: fp32 inputs with more rows take F.linear; None = default_max_packed_rows() for this
        CPU. dtype: torch.float32 or torch.bfloat16, the precision of the packed weight and of the output."""
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PackedLinear packs float32 or bfloat16 weights, not {dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        if dtype == torch.bfloat16:
            self.max_packed_rows = None
        else:
            self.max_packed_rows = default_max_packed_rows() if max_packed_rows is None else max_packed_rows
        # The plain weight serves only the fallback kernel; where there is none it would be an unused second copy.
        self.weight = linear.weight if self.max_packed_rows is not None else None
        if dtype == torch.float32:
            self.bias = linear.bias
        else:
            bias = None if linear.bias is None else linear.bias.detach().to(dtype)
            self.register_buffer("bias", bias, persistent=False)
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows_hint)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_packed_rows is not None and x.numel() // self.in_features > self.max_packed_rows:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        rows = "all rows" if self.max_packed_rows is None else f"up to {self.max_packed_rows} rows"
        precision = "bf16 " if self.dtype == torch.bfloat16 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {precision}oneDNN-packed for {rows}"


def pack_linear_weights(model: nn.Module, min_out_features: int = 2, dtype: torch.dtype = torch.float32) -> int:
    """Replace every fp32 CPU nn.Linear of `model` (in place) by a PackedLinear holding its weight in `dtype`.
    Returns how many were packed.

    Linears whose weight is shared with another module (the tied MLM decoder) are left alone, and so are tiny
    output layers, where packing buys nothing."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.device.type == "cpu"
                and child.weight.dtype == torch.float32
                and counts[id(child.weight)] == 1
                and child.out_features >= min_out_features
            ):
                setattr(module, name, PackedLinear(child, dtype=dtype))
                packed += 1
    return packed
