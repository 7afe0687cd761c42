"""Log-probabilities from the output head's vocab shards, without gathering the vocab.

Each rank holds logits [B, per_rank] for its slice of the vocab (ParallelLMHead). The
log-softmax needs the row's log-sum-exp over the whole vocab: each rank's max is reduced (max),
then each rank's sum of exp(logit - max) (sum). A token's log-probability comes from the rank
that owns it (the others add 0). The top K: each rank's own top K (value, global id), gathered
(2K numbers per rank and row) and merged. Vocab padding rows never count. All in fp32, from the
raw logits: before temperature, penalties and filters.
"""
from __future__ import annotations

import torch

from internlm2_tp.parallel.layers import ParallelLMHead


def _real(head: ParallelLMHead, local: torch.Tensor) -> torch.Tensor:
    """local [B, per_rank] as fp32, its padding columns -inf."""
    local = local.float()
    real = max(0, head.end - head.start)
    if real < local.shape[-1]:
        local = local.clone()
        local[:, real:] = float("-inf")
    return local


def vocab_logsumexp(head: ParallelLMHead, local: torch.Tensor) -> torch.Tensor:
    """[B, per_rank] -> [B, 1] log-sum-exp of the full vocab's logits (fp32)."""
    local = _real(head, local)
    m = head.tp.all_reduce(local.max(dim=-1, keepdim=True).values.clone(), op="max")  # [B, 1]
    s = head.tp.all_reduce(torch.exp(local - m).sum(dim=-1, keepdim=True))          # [B, 1]
    return m + torch.log(s)


def token_logprobs(head: ParallelLMHead, local: torch.Tensor, lse: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[b]) of each row: local [B, per_rank], lse [B, 1], ids [B] global -> [B] fp32."""
    local = _real(head, local)
    own = (ids >= head.start) & (ids < head.end)
    col = (ids - head.start).clamp(0, local.shape[-1] - 1).unsqueeze(1)
    mine = torch.where(own, local.gather(1, col).squeeze(1), torch.zeros_like(ids, dtype=local.dtype))
    return head.tp.all_reduce(mine) - lse.squeeze(1)


def top_logprobs(head: ParallelLMHead, local: torch.Tensor, lse: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K most likely tokens of each row, best first: (ids [B, K] int64, logprobs [B, K])."""
    local = _real(head, local)
    kk = min(k, local.shape[-1])
    vals, idx = torch.topk(local, kk, dim=-1)                                      # [B, kk]
    if head.tp.size > 1:
        pair = torch.cat([vals.double(), (idx + head.start).double()], dim=-1)     # [B, 2kk]
        every = head.tp.all_gather_last(pair).view(local.shape[0], head.tp.size, 2, kk)
        vals = every[:, :, 0].reshape(local.shape[0], -1)                          # [B, tp*kk]
        ids = every[:, :, 1].reshape(local.shape[0], -1)
        # Ranks in ascending id order, each sorted: a stable sort keeps lower ids first on ties.
        order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :k]
        vals, idx = vals.gather(1, order).float(), ids.gather(1, order).long()
    return idx[:, :k], vals[:, :k] - lse
