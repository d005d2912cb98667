"""`/pooling`'s base64 encoding, as vLLM's: one input's rows flattened, as raw bytes of the asked dtype and byte order."""

from __future__ import annotations

import base64
import sys

import torch

_DTYPES = {"float32": (torch.float32, torch.int32), "float16": (torch.float16, torch.int16), "bfloat16": (torch.bfloat16, torch.int16)}


def rows_to_base64(rows: list[list[float]], embed_dtype: str = "float32", endianness: str = "native") -> str:
    """Base64 of the rows' values in row order; decode with e.g. `numpy.frombuffer(base64.b64decode(s), "<f4")`."""
    dtype, same_width_int = _DTYPES[embed_dtype]
    # Through an integer view: numpy has no bfloat16, and its byte order of an int array is explicit.
    values = torch.tensor(rows, dtype=torch.float32).flatten().to(dtype).view(same_width_int).numpy()
    order = {"native": "=", "little": "<", "big": ">"}[endianness]
    if order == "=":
        order = "<" if sys.byteorder == "little" else ">"
    return base64.b64encode(values.astype(values.dtype.newbyteorder(order)).tobytes()).decode("ascii")
