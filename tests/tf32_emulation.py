"""TF32 arithmetic emulated on the CPU: every matmul's inputs rounded to TF32 (10 stored mantissa
bits, round to nearest even), products accumulated in fp32 — what Ampere tensor cores (Jetson Orin
included) do with fp32 matmuls when TF32 is on. Used to check, without a GPU, that a model and the
tf32 tolerance fit together; the real TF32 engines are checked in test_cuda.py where a GPU exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm}
_ADD_MATMULS = {torch.addmm, torch.baddbmm}


class TF32Matmuls(TorchFunctionMode):
    """Inside ``with TF32Matmuls():`` every F.linear / matmul rounds its operands to TF32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.linear:
            args = (round_to_tf32(args[0]), round_to_tf32(args[1]), *args[2:])
        elif func in _MATMULS:
            args = tuple(round_to_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
        elif func in _ADD_MATMULS:
            args = (args[0], round_to_tf32(args[1]), round_to_tf32(args[2]), *args[3:])
        return func(*args, **kwargs)
