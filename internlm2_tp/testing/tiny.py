"""Tiny InternLM2 checkpoints in exactly the published layout, for tests, demos and benchmarks.

Writes config.json (with the published fields, auto_map included, which readers must ignore),
tokenizer.model + tokenizer_config.json, generation_config.json, and random weights sharded over
>= 2 files with an index json, as .safetensors or .bin. Tensors are generated and written one
shard at a time, so a checkpoint of hundreds of MB never sits in memory whole.

Random weights are scaled so hidden states keep unit size and logits are well spread: greedy
decoding then has clear winners and token-exact comparisons are meaningful.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from internlm2_tp.config import DTYPE_BYTES, torch_dtype

IM_END_ID = 92542  # <|im_end|> in the published vocabulary
REWARD_TOKEN_ID = 92527  # InternLM2-Reward's config.json reward_token_id


@dataclass
class TinySpec:
    hidden_size: int = 192                 # 48 heads x head_dim 4: the 20B's 48 q / 8 KV heads
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    num_hidden_layers: int = 2
    intermediate_size: int = 512
    vocab_size: int = 0                    # 0: the tokenizer's size (92544 with the real one)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None       # e.g. {"type": "dynamic", "factor": 2.0}
    dtype: str = "bfloat16"
    format: str = "safetensors"            # or "bin"
    num_shards: int = 2
    chat: bool = True                      # generation_config eos [2, 92542]
    seed: int = 0
    tokenizer_model: str | None = None     # path to a tokenizer.model; None: the real one if found
    layout: str = "internlm2"              # "llama": write the Llama layout directly (tests)
    reward: bool = False                   # InternLM2ForRewardModel: v_head.weight, no output.weight
    extra: dict = field(default_factory=dict)  # merged into config.json (tests of odd configs)

    def __post_init__(self) -> None:
        if self.format not in ("safetensors", "bin"):
            raise ValueError(f"format must be 'safetensors' or 'bin', got {self.format!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.hidden_size % self.num_attention_heads or \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide into num_attention_heads, which must be a "
                             "multiple of num_key_value_heads")
        if self.layout not in ("internlm2", "llama"):
            raise ValueError(f"layout must be 'internlm2' or 'llama', got {self.layout!r}")
        if self.reward and self.layout != "internlm2":
            raise ValueError("a reward checkpoint is written in the internlm2 layout only")


def _tensors(spec: TinySpec, vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order, generated lazily from one seeded generator."""
    g = torch.Generator().manual_seed(spec.seed)
    h, f = spec.hidden_size, spec.intermediate_size
    heads, kv = spec.num_attention_heads, spec.num_key_value_heads
    d = h // heads
    dt = torch_dtype(spec.dtype)

    def lin(o: int, i: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * (gain / i ** 0.5)).to(dt)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dt)

    llama = spec.layout == "llama"
    yield ("model.embed_tokens.weight" if llama else "model.tok_embeddings.weight",
           torch.randn(vocab, h, generator=g).to(dt))
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        wqkv = lin((heads + 2 * kv) * d, h)
        if llama:
            grouped = wqkv.view(kv, heads // kv + 2, d, h)
            yield p + "self_attn.q_proj.weight", grouped[:, :-2].reshape(heads * d, h).clone()
            yield p + "self_attn.k_proj.weight", grouped[:, -2].reshape(kv * d, h).clone()
            yield p + "self_attn.v_proj.weight", grouped[:, -1].reshape(kv * d, h).clone()
            yield p + "self_attn.o_proj.weight", lin(h, heads * d)
            yield p + "mlp.gate_proj.weight", lin(f, h)
            yield p + "mlp.up_proj.weight", lin(f, h)
            yield p + "mlp.down_proj.weight", lin(h, f)
            yield p + "input_layernorm.weight", norm()
            yield p + "post_attention_layernorm.weight", norm()
        else:
            yield p + "attention.wqkv.weight", wqkv
            yield p + "attention.wo.weight", lin(h, heads * d)
            yield p + "feed_forward.w1.weight", lin(f, h)
            yield p + "feed_forward.w3.weight", lin(f, h)
            yield p + "feed_forward.w2.weight", lin(h, f)
            yield p + "attention_norm.weight", norm()
            yield p + "ffn_norm.weight", norm()
    yield "model.norm.weight", norm()
    if spec.reward:   # the published reward layout: a [1, hidden] value head, no LM head
        yield "v_head.weight", lin(1, h, gain=2.0)
    else:
        yield ("lm_head.weight" if llama else "output.weight"), lin(vocab, h, gain=2.0)


def _shard_sizes(spec: TinySpec, vocab: int) -> int:
    h, f, kv = spec.hidden_size, spec.intermediate_size, spec.num_key_value_heads
    d = h // spec.num_attention_heads
    per_layer = (spec.num_attention_heads + 2 * kv) * d * h + h * h + 3 * h * f + 2 * h
    heads_out = h if spec.reward else vocab * h
    numel = vocab * h + heads_out + spec.num_hidden_layers * per_layer + h
    return numel * DTYPE_BYTES[spec.dtype]


def config_json(spec: TinySpec, vocab: int) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM" if spec.layout == "llama" else "InternLM2ForCausalLM"],
        "model_type": "llama" if spec.layout == "llama" else "internlm2",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_hidden_layers": spec.num_hidden_layers, "vocab_size": vocab,
        "max_position_embeddings": spec.max_position_embeddings, "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "bias": False, "tie_word_embeddings": False, "torch_dtype": spec.dtype,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "initializer_range": 0.02,
        "use_cache": True, "transformers_version": "4.41.0",
    }
    if spec.reward:
        cfg["architectures"] = ["InternLM2ForRewardModel"]
        cfg["reward_token_id"] = REWARD_TOKEN_ID if vocab > REWARD_TOKEN_ID else vocab - 1
    if spec.layout == "internlm2":  # as published: remote code we must never run
        cfg["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
        cfg["attn_implementation"] = "eager"
    else:
        cfg.pop("bias")
        cfg["attention_bias"] = False
    cfg.update(spec.extra)
    return cfg


def write_tiny_checkpoint(out: str | Path, spec: TinySpec | None = None) -> Path:
    from internlm2_tp.testing.tokenizer_files import write_tokenizer_files

    spec = spec or TinySpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_vocab = write_tokenizer_files(out, spec.tokenizer_model)
    vocab = spec.vocab_size or tok_vocab
    (out / "config.json").write_text(json.dumps(config_json(spec, vocab), indent=2))
    eos = [2, IM_END_ID] if spec.chat and vocab > IM_END_ID else 2
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 2}, indent=2))
    total = _shard_sizes(spec, vocab)
    budget = -(-total // spec.num_shards)
    ext = "safetensors" if spec.format == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, weight_map, written = 0, {}, []

    def flush() -> None:
        idx = len(written) + 1
        name = f"{stem}-{idx:05d}-of-{{n:05d}}.{ext}"
        tmp = out / f".tmp-{idx}.{ext}"
        if ext == "safetensors":
            from safetensors.torch import save_file
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shards[0], tmp)
        written.append((tmp, name, list(shards[0])))
        shards[0] = {}

    for tname, t in _tensors(spec, vocab):
        if shards[0] and size + t.numel() * t.element_size() > budget * len(written + [0]):
            flush()
        shards[0][tname] = t
        size += t.numel() * t.element_size()
    flush()
    n = len(written)
    for tmp, name, names in written:
        final = out / name.format(n=n)
        os.replace(tmp, final)
        weight_map.update({t: final.name for t in names})
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    index_name = "model.safetensors.index.json" if ext == "safetensors" else \
        "pytorch_model.bin.index.json"
    (out / index_name).write_text(json.dumps(index, indent=2))
    return out
