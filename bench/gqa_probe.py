"""Does this torch's Flash varlen kernel take fewer key/value heads than query heads as they are?"""

import torch
from torch.nn.attention.varlen import varlen_attn

torch.manual_seed(0)
lens = [37, 120, 5]
cu = torch.tensor([0, 37, 157, 162], dtype=torch.int32, device="cuda")
q = torch.randn(162, 12, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(162, 2, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(162, 2, 128, device="cuda", dtype=torch.bfloat16)
ref = varlen_attn(q, k.repeat_interleave(6, 1), v.repeat_interleave(6, 1), cu, cu, 120, 120, window_size=(-1, 0))
try:
    out = varlen_attn(q, k, v, cu, cu, 120, 120, window_size=(-1, 0))
    print("native GQA works; max diff", (out - ref).abs().max().item())
except Exception as exc:
    print("native GQA fails:", repr(exc)[:300])
