"""dtype codes shared with cuda/include/vattn/dtypes.h (never renumber)."""
import torch

FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

TORCH_TO_CODE = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
CODE_TO_TORCH = {v: k for k, v in TORCH_TO_CODE.items()}


def code_of(dtype: torch.dtype) -> int:
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise TypeError(f"vattn: unsupported dtype {dtype}; expected float32, float16 or bfloat16") from None
