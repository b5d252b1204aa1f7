"""dtype codes of q / out shared with cuda/include/vattn/dtypes.h, derived from the format registry
(the plain KV formats' codes are the dtype codes)."""

import torch

from .formats import PLAIN

FLOAT32, FLOAT16, BFLOAT16 = (PLAIN[d].code for d in (torch.float32, torch.float16, torch.bfloat16))

TORCH_TO_CODE = {dtype: fmt.code for dtype, fmt in PLAIN.items()}
CODE_TO_TORCH = {v: k for k, v in TORCH_TO_CODE.items()}


def code_of(dtype: torch.dtype) -> int:
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise TypeError(f"vattn: unsupported dtype {dtype}; expected float32, float16 or bfloat16") from None
