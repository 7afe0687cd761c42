"""Rotary position embeddings as the official InternLM2 computes them (rotate-half convention).

- default: inv_freq = 1 / theta ** (arange(0, d, 2) / d), angle = position * inv_freq.
- linear: positions divided by the factor.
- dynamic NTK: a token whose length T (see below) exceeds max_position_embeddings is rotated with
  base(T) = theta * ((factor * T / max_pos) - (factor - 1)) ** (d / (d - 2)); at or below
  max_pos it is unscaled. For one request the official model uses T = prompt length for prompt
  tokens and T = p + 1 for a generated token at position p, and cached keys keep the rotation
  they were given. The engine therefore passes T per token (max(prompt_len, p + 1)), which makes
  a row's rotation independent of its batch and of prefill chunking.
"""
from __future__ import annotations

import torch

from internlm2_tp.config import ModelConfig


def cos_sin(angles: torch.Tensor, dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of fp32 angles, correctly rounded to `dtype`: taken in float64 on the host.
    torch's fp32 cos on CPU was not reproducible between processes here: in about 1 process
    in 10, entries of a 4096-position table came out up to 1.5e-4 away from their usual value
    (sin was not affected), which moved fp32 tp=2 logits by 3-5e-4."""
    wide = angles.to("cpu", torch.float64)
    return wide.cos().to(dtype).to(device), wide.sin().to(dtype).to(device)


class RotaryEmbedding:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.d = cfg.head_dim
        self.theta = cfg.rope_theta
        self.max_pos = cfg.max_position_embeddings
        rs = cfg.rope_scaling
        self.kind = rs.type if rs else "default"
        self.factor = rs.factor if rs else 1.0
        self.device, self.dtype = device, dtype
        # On `meta` (the driver's dry load) computed on CPU and moved: arange / pow on meta go
        # through torch._refs, which imports torch._dynamo, seconds on every driver start.
        at = torch.device("cpu") if torch.device(device).type == "meta" else device
        exponents = torch.arange(0, self.d, 2, dtype=torch.float32, device=at) / self.d
        self.exponents = exponents.to(device)
        self.inv_freq = (1.0 / (self.theta ** exponents)).to(device)               # [d/2] fp32
        self.cos_table = torch.empty(0, self.d, dtype=dtype, device=device)
        self.sin_table = torch.empty(0, self.d, dtype=dtype, device=device)

    def _grow(self, n: int) -> None:
        """Cos/sin for unscaled-base positions [0, n), computed once and reused."""
        n = max(n, 2 * self.cos_table.shape[0], min(self.max_pos, 4096))
        t = torch.arange(n, dtype=torch.float32, device=self.device)
        if self.kind == "linear":
            t = t / self.factor
        freqs = torch.outer(t, self.inv_freq)                                         # [n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table, self.sin_table = cos_sin(emb, self.dtype, self.device)

    def base_for(self, lengths: torch.Tensor) -> torch.Tensor:
        """Per-token rotary base for dynamic NTK (float64 math, as Python floats would do)."""
        ln = lengths.to(torch.float64)
        b = self.theta * ((self.factor * ln / self.max_pos) - (self.factor - 1)) ** (
            self.d / (self.d - 2))
        return torch.where(ln > self.max_pos, b, torch.full_like(b, self.theta))

    def __call__(self, positions: torch.Tensor, lengths: torch.Tensor, max_position: int,
                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, lengths [T] -> cos, sin [T, d] in the model dtype. `max_position` and
        `max_length` are the step's largest position and rope length, known to the host (no
        device read)."""
        if max_position + 1 > self.cos_table.shape[0]:
            self._grow(max_position + 1)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        if self.kind == "dynamic" and max_length > self.max_pos:
            cos, sin = self._dynamic(positions, lengths, cos, sin)
        return cos, sin

    def _dynamic(self, positions: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-rotate the tokens whose length passes max_position_embeddings, with their own
        base. The base is computed in float64 on the host (as the official model's Python
        floats; devices lack float64): on a device this reads the step's lengths back, once,
        only in steps holding such a token (32k+ contexts, where a step's compute dwarfs it)."""
        pos_h, len_h = positions.cpu(), lengths.cpu()
        idx = (len_h > self.max_pos).nonzero().squeeze(1)                           # [n]
        base = self.base_for(len_h[idx]).to(torch.float32)                           # [n]
        inv = 1.0 / (base[:, None] ** self.exponents.cpu()[None, :])                  # [n, d/2]
        freqs = pos_h[idx].to(torch.float32)[:, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        idx = idx.to(cos.device)
        cos, sin = cos.clone(), sin.clone()
        cos[idx], sin[idx] = cos_sin(emb, self.dtype, cos.device)
        return cos, sin
