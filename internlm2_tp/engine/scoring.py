"""Log-probabilities a request asks for, taken from one step's vocab-sharded logits: of each
sampled token (and the top K there), and of each prompt token given the ones before it.

The logits rows of a step are the sampled rows first, then the prompt positions being scored
(`PromptTarget`). Every rank runs the same calls on the same rows (the collectives of
parallel/logprobs.py), rank-independent results land in each Sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from internlm2_tp.engine.sequence import Sequence
from internlm2_tp.parallel.layers import ParallelLMHead
from internlm2_tp.parallel.logprobs import token_logprobs, top_logprobs, vocab_logsumexp


@dataclass
class PromptTarget:
    seq: Sequence
    position: int       # the prompt token scored (>= 1), from the logits of position - 1
    token: int


def prompt_targets(seq: Sequence, start: int, n: int, offset: int) -> tuple[list[int],
                                                                         list[PromptTarget]]:
    """seq computes tokens [start, start + n) at flat indices offset..: the indices whose logits
    score a prompt token (every one but the prompt's last, which is sampled from) and what."""
    if not seq.params.prompt_logprobs:
        return [], []
    if seq.prompt_logprobs is None:
        seq.prompt_logprobs = [None] * seq.prompt_len
    end = min(start + n, seq.prompt_len - 1)
    idx = [offset + p - start for p in range(start, end)]
    return idx, [PromptTarget(seq, p + 1, seq.prompt_ids[p + 1]) for p in range(start, end)]


def score_prompts(head: ParallelLMHead, local: torch.Tensor, targets: list[PromptTarget]) -> None:
    """local [P, per_rank]: the logits of each target's previous position."""
    if not targets:
        return
    ids = torch.tensor([t.token for t in targets], dtype=torch.long, device=local.device)
    lp = token_logprobs(head, local, vocab_logsumexp(head, local), ids).tolist()
    for t, v in zip(targets, lp):
        t.seq.prompt_logprobs[t.position] = v  # a recompute (preemption) rewrites the same value


def score_samples(head: ParallelLMHead, local: torch.Tensor, seqs: list[Sequence],
                  tokens: list[int]) -> None:
    """local [B, per_rank], seqs and tokens [B]: the sampled tokens' log-probabilities (and the
    top K) for the rows that ask, appended to each sequence."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs >= 0]
    if not rows:
        return
    sub = local[rows] if len(rows) < len(seqs) else local
    ids = torch.tensor([tokens[i] for i in rows], dtype=torch.long, device=local.device)
    lse = vocab_logsumexp(head, sub)
    lp = token_logprobs(head, sub, lse, ids).tolist()
    k = max(seqs[i].params.logprobs for i in rows)
    top_ids, top_lp = (top_logprobs(head, sub, lse, k) if k > 0 else (None, None))
    for j, i in enumerate(rows):
        s = seqs[i]
        if s.token_logprobs is None:
            s.token_logprobs = []
            s.top_logprobs = [] if s.params.logprobs > 0 else None
        s.token_logprobs.append(lp[j])
        if s.params.logprobs > 0:
            kk = s.params.logprobs
            s.top_logprobs.append(list(zip(top_ids[j, :kk].tolist(), top_lp[j, :kk].tolist())))
