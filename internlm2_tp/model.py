"""InternLM2 as a tensor-parallel model over a paged KV cache.

Module names follow the checkpoint (`attention.wqkv`, `attention.wo`, `feed_forward.w1/w2/w3`
with w1 and w3 stacked into one `w13` matmul, `attention_norm`, `ffn_norm`, `tok_embeddings`,
`output`). WEIGHT_NAMES maps each module to its checkpoint tensor(s) in both layouts we read
(InternLM2's own and the Llama layout our converter writes); every one of those modules has
`load(reader, names)`, so loading is one loop over that table.

The op set (norm, rotary, swiglu) and the attention backend come from the platform, chosen once
when the model is built; the collectives are explicit calls in the decoder layer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from internlm2_tp.attention import AttentionMetadata
from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.config import ModelConfig, check_tp
from internlm2_tp.errors import CheckpointError
from internlm2_tp.parallel.group import TPGroup
from internlm2_tp.parallel.layers import (MergedColumnParallelLinear, ParallelLMHead,
                                          QKVParallelLinear, RowParallelLinear, ShardedLinear,
                                          StagingPool, VocabParallelEmbedding)
from internlm2_tp.parallel.platform import Platform, platform_for
from internlm2_tp.rotary import RotaryEmbedding

Rope = tuple[torch.Tensor, torch.Tensor]   # cos, sin [T, d] of this step's tokens
KV = tuple[torch.Tensor, torch.Tensor]     # one layer's key and value caches

# Our module -> its checkpoint tensor name(s), per layout; "{i}" is the layer index.
WEIGHT_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "internlm2": {
        "tok_embeddings": ("model.tok_embeddings.weight",),
        "layers.{i}.attention.wqkv": ("model.layers.{i}.attention.wqkv.weight",),
        "layers.{i}.attention.wo": ("model.layers.{i}.attention.wo.weight",),
        "layers.{i}.feed_forward.w13": ("model.layers.{i}.feed_forward.w1.weight",
                                        "model.layers.{i}.feed_forward.w3.weight"),
        "layers.{i}.feed_forward.w2": ("model.layers.{i}.feed_forward.w2.weight",),
        "layers.{i}.attention_norm": ("model.layers.{i}.attention_norm.weight",),
        "layers.{i}.ffn_norm": ("model.layers.{i}.ffn_norm.weight",),
        "norm": ("model.norm.weight",),
        "output": ("output.weight",),
    },
    "llama": {
        "tok_embeddings": ("model.embed_tokens.weight",),
        "layers.{i}.attention.wqkv": tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight"
                                           for p in "qkv"),
        "layers.{i}.attention.wo": ("model.layers.{i}.self_attn.o_proj.weight",),
        "layers.{i}.feed_forward.w13": ("model.layers.{i}.mlp.gate_proj.weight",
                                        "model.layers.{i}.mlp.up_proj.weight"),
        "layers.{i}.feed_forward.w2": ("model.layers.{i}.mlp.down_proj.weight",),
        "layers.{i}.attention_norm": ("model.layers.{i}.input_layernorm.weight",),
        "layers.{i}.ffn_norm": ("model.layers.{i}.post_attention_layernorm.weight",),
        "norm": ("model.norm.weight",),
        "output": ("lm_head.weight",),
    },
}


# A reward model (config task "reward") has this instead of "output".
VALUE_HEAD = ("v_head", ("v_head.weight",))


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, the fused add-and-norm: (norm(x + residual), x + residual)."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device,
                 ops: Any):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device),
                                   requires_grad=False)
        self.eps, self.hidden, self.ops = eps, hidden, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        h = residual + x
        return self.ops.rms_norm(h, self.weight, self.eps), h

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        (name,) = names
        reader.expect_shape(name, (self.hidden,))
        self.weight.data.copy_(reader.read(name))


class ValueHead(nn.Module):
    """A reward model's `v_head` (nn.Linear(hidden, 1, bias=False)), whole on every rank: its
    input, the final-normed hidden state, is already whole on every rank after the layers'
    all-reduces, so it needs no collective and every rank computes the same score. Kept and
    applied in fp32 (hidden floats), whatever the run's dtype."""

    def __init__(self, hidden: int, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden, dtype=torch.float32, device=device),
                                   requires_grad=False)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, hidden] -> [B] fp32
        return (x.float() @ self.weight.t()).squeeze(-1)

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        (name,) = names
        reader.expect_shape(name, (1, self.hidden))
        self.weight.data.copy_(reader.read(name))


class InternLM2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 ops: Any, backend: Any):
        super().__init__()
        d = cfg.head_dim
        self.wqkv = QKVParallelLinear(cfg.hidden_size, cfg.num_attention_heads,
                                      cfg.num_key_value_heads, d, tp, dtype, device)
        self.wo = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, tp, dtype, device)
        self.head_dim, self.scale, self.ops, self.backend = d, d ** -0.5, ops, backend

    def forward(self, x: torch.Tensor, rope: Rope, kv: KV, meta: AttentionMetadata
                ) -> torch.Tensor:
        """x [T, hidden] -> this rank's PARTIAL sum of the output projection [T, hidden]."""
        qkv = self.wqkv(x)                                                    # [T, (q+2kv)*d]
        q, k, v = qkv.split([self.wqkv.q_size, self.wqkv.kv_size, self.wqkv.kv_size], dim=-1)
        t, d = x.shape[0], self.head_dim
        q, k = self.ops.rotary(q.view(t, -1, d), k.view(t, -1, d), *rope)    # [T, heads, d]
        o = self.backend.forward(q, k, v.view(t, -1, d), kv, meta, self.scale)  # [T, q*d]
        return self.wo(o)


class InternLM2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 ops: Any):
        super().__init__()
        f, h = cfg.intermediate_size, cfg.hidden_size
        self.w13 = MergedColumnParallelLinear(h, [f, f], tp, dtype, device)   # w1 gate | w3 up
        self.w2 = RowParallelLinear(f, h, tp, dtype, device)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> this rank's PARTIAL sum [T, hidden]."""
        return self.w2(self.ops.silu_and_mul(self.w13(x)))


class InternLM2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 ops: Any, backend: Any):
        super().__init__()
        self.tp = tp
        self.attention = InternLM2Attention(cfg, tp, dtype, device, ops, backend)
        self.feed_forward = InternLM2MLP(cfg, tp, dtype, device, ops)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops)

    def forward(self, h: torch.Tensor, rope: Rope, kv: KV, meta: AttentionMetadata
                ) -> torch.Tensor:
        """h [T, hidden] (the residual stream) -> h after attention and MLP."""
        a = self.tp.all_reduce(self.attention(self.attention_norm(h), rope, kv, meta))
        x, h = self.ffn_norm(a, residual=h)
        return h + self.tp.all_reduce(self.feed_forward(x))


class InternLM2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 platform: Platform | None = None):
        super().__init__()
        check_tp(cfg, tp.size)
        self.cfg, self.tp, self.dtype, self.device = cfg, tp, dtype, device
        self.platform = platform if platform is not None else platform_for(torch.device(device))
        self.ops = self.platform.ops()
        self.attention_backend = self.platform.attention()
        ops, backend = self.ops, self.attention_backend
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(InternLM2Layer(cfg, tp, dtype, device, ops, backend)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops)
        self.is_reward = cfg.task == "reward"
        self.output = None if self.is_reward else ParallelLMHead(cfg.vocab_size, cfg.hidden_size,
                                                                 tp, dtype, device, ops)
        self.v_head = ValueHead(cfg.hidden_size, device) if self.is_reward else None
        self.rotary = RotaryEmbedding(cfg, device, dtype)

    @property
    def weight_bytes(self) -> int:
        """This rank's weight bytes as held now: after loading that is the packed copies of the
        CPU matmul weights and an embedding kept in the checkpoint's dtype (fp32 runs of bf16
        checkpoints), so the reported figure is what the rank really holds."""
        dense = sum(p.numel() * p.element_size() for p in self.parameters())
        packed = sum(m.packed.numel() * m.packed.element_size() for m in self.modules()
                     if isinstance(m, ShardedLinear) and m.packed is not None)
        return dense + packed

    @property
    def kv_heads_local(self) -> int:
        return self.layers[0].attention.wqkv.kv_local

    @property
    def heads_local(self) -> int:
        return self.layers[0].attention.wqkv.q_local

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[KV],
                gather: bool = True) -> torch.Tensor | None:
        """input_ids [T] -> logits [B, vocab] fp32 at meta.logits_indices ([T, vocab] if None);
        with gather=False this rank's vocab shard [B, per_rank] (for output.argmax); a reward
        model: scores [B] fp32, the same on every rank. None when the step samples nothing
        (only prefill chunks): the norm and the head are skipped."""
        self.attention_backend.prepare(meta, kv_caches[0][0], self.heads_local)
        rope = self.rotary(meta.positions, meta.rope_lengths, meta.max_position,
                           meta.max_rope_length)                               # [T, d] each
        h = self.tp.all_reduce(self.tok_embeddings(input_ids))                 # [T, hidden]
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, rope, kv, meta)
        if meta.logits_indices is not None:
            if meta.logits_indices.numel() == 0:
                return None
            h = h[meta.logits_indices]                                         # [B, hidden]
        if self.v_head is not None:
            return self.v_head(self.norm(h))                                   # [B] fp32
        local = self.output(self.norm(h))                                      # [B, per_rank]
        return self.output.gather(local) if gather else local

    def argmax(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Greedy ids [B] from this rank's vocab shard (forward(gather=False)), the op set's
        row reduction inside the shard."""
        return self.output.argmax(local_logits, self.ops.row_max)

    # -- loading ------------------------------------------------------------------------------
    def weight_names(self, reader: CheckpointReader) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """Every module that loads weights, with its checkpoint tensor names (WEIGHT_NAMES of the
        checkpoint's layout; a tied output head reads the embedding when it has no tensor)."""
        table = dict(WEIGHT_NAMES[self.cfg.layout])
        if self.is_reward:
            del table["output"]
            table[VALUE_HEAD[0]] = VALUE_HEAD[1]
        elif self.cfg.tie_word_embeddings and not reader.has(table["output"][0]):
            table["output"] = table["tok_embeddings"]
        out: list[tuple[nn.Module, tuple[str, ...]]] = []
        for path, names in table.items():
            for i in range(self.cfg.num_hidden_layers) if "{i}" in path else (0,):
                out.append((self.get_submodule(path.format(i=i)),
                            tuple(n.format(i=i) for n in names)))
        return out

    def load_weights(self, reader: CheckpointReader) -> None:
        """Read this rank's slices of every tensor; refuse missing or unexpected tensors."""
        modules = self.weight_names(reader)
        wanted = {name for _, names in modules for name in names}
        missing = sorted(wanted - set(reader.weight_map))
        if missing:
            raise CheckpointError(f"{reader.path}: tensor {missing[0]} is missing from the "
                                  f"checkpoint ({len(missing)} missing in all)")
        unexpected = sorted(set(reader.names()) - wanted)
        if unexpected:
            raise CheckpointError(f"{reader.file_of(unexpected[0])}: unexpected tensor "
                                  f"{unexpected[0]} ({len(unexpected)} unexpected in all; is this "
                                  f"an InternLM2 checkpoint of the config's shape?)")
        # In file order, so a .bin checkpoint maps one file at a time; each matmul weight is
        # re-laid out (CPU) as soon as it is in, its staging memory reused by the next.
        pool = StagingPool()
        for module, names in sorted(modules, key=lambda m: str(reader.file_of(m[1][0]))):
            sharded = isinstance(module, ShardedLinear)
            if sharded:
                module.stage(pool, self.ops)
            module.load(reader, names)
            if sharded:
                module.pack(pool, self.ops)
        reader.release()
        loaded = {m for m, _ in modules}
        unloaded = [n for n, m in self.named_modules() if hasattr(m, "load") and m not in loaded]
        assert not unloaded, f"modules not loaded: {unloaded[:5]}"
