"""An LM head read only where it is needed: each token's log-probability given the tokens before it.

Row t of a packed chunk gets log p(token_t | tokens < t), computed from row t - 1's hidden state, so the
value a token keeps in the head-output cache depends on its own prefix alone (what the prefix cache
keys on). The first row of each chunk has no row before it in the chunk: it gets 0, and the engine runs
a chunk that follows cached tokens from one token earlier (`HeadSpec.needs_previous_token`), so that
row is the extra one. Logits are taken a slice of rows at a time (a [rows, vocabulary] float32 block),
so the whole [tokens, vocabulary] matrix never exists at once; with `blocked` (deterministic CPU scoring)
they go through `blocked_linear`, so a row's logits do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from prmserve.models.invariant import blocked_linear

ROWS_PER_SLICE = 1024


class TokenLogProbs(nn.Module):
    """The LM head [vocabulary, hidden] and the log-softmax over the vocabulary, at the next row's token."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))
        self.blocked = False  # set by `LogRatioModel.use_blocked_kernels`

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden states, unchanged: the log-probabilities need the tokens too (`log_probs`)."""
        return hidden

    def log_probs(self, hidden: torch.Tensor, token_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """float32 [T]: row t's token's log-probability after row t - 1 of the same packed sequence, 0 on each
        sequence's first row (`cu_seqlens` [N + 1]: where the sequences start; entries may repeat or equal T)."""
        rows = hidden.shape[0]
        following = torch.roll(token_ids, -1)  # row t predicts the token of row t + 1
        out = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, ROWS_PER_SLICE):
            end = min(start + ROWS_PER_SLICE, rows)
            rows_in = hidden[start:end]
            logits = (blocked_linear(rows_in, self.weight, None) if self.blocked else rows_in @ self.weight.t()).float()
            picked = logits.gather(1, following[start:end, None])[:, 0]
            out[start:end] = picked - torch.logsumexp(logits, dim=-1)
        shifted = torch.cat([out.new_zeros(1), out[:-1]])
        # A scalar fill, not an assignment from a host tensor: this runs inside CUDA graph capture. An index of T
        # (an empty trailing entry) lands in the spare slot.
        first = torch.zeros(rows + 1, dtype=torch.bool, device=hidden.device).index_fill_(0, cu_seqlens[:-1].long(), True)
        return shifted.masked_fill(first[:rows], 0.0)
