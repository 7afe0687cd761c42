"""An independent reference: transformers' LlamaForCausalLM fed with a q/k/v split written here,
reading the checkpoint files with safetensors/torch directly (none of our loading code)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

RENAMES = [("tok_embeddings", "embed_tokens"), ("attention.wo", "self_attn.o_proj"),
           ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
           ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
           ("ffn_norm", "post_attention_layernorm"), ("output.weight", "lm_head.weight")]


def raw_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        from safetensors.torch import load_file
        sd.update(load_file(f))
    for f in sorted(Path(ckpt).glob("*.bin")):
        sd.update(torch.load(f, weights_only=True))
    return sd


def hf_llama(ckpt: Path, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads((Path(ckpt) / "config.json").read_text())
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    d, g = hidden // heads, heads // kv
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=c["intermediate_size"],
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=d,
                      num_hidden_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                      rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                      max_position_embeddings=c["max_position_embeddings"],
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    sd = {}
    for k, v in raw_state_dict(ckpt).items():
        for a, b in RENAMES:
            k = k.replace(a, b)
        if "attention.wqkv" in k:
            w = v.view(kv, g + 2, d, hidden)  # per KV group: g q heads, then k, then v
            sd[k.replace("attention.wqkv", "self_attn.q_proj")] = w[:, :g].reshape(-1, hidden)
            sd[k.replace("attention.wqkv", "self_attn.k_proj")] = w[:, g].reshape(-1, hidden)
            sd[k.replace("attention.wqkv", "self_attn.v_proj")] = w[:, g + 1].reshape(-1, hidden)
        else:
            sd[k] = v
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def hf_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    return torch.cat([model(torch.tensor([s])).logits[0].float() for s in seqs])


def ref_forward(sd: dict[str, torch.Tensor], c: dict, ids: list[int],
                rope_T: list[int]) -> torch.Tensor:
    """Plain InternLM2 forward over one sequence, full recompute, written from the official math.
    rope_T[p] is the length whose dynamic-NTK base rotates token p. Returns logits [len, vocab]."""
    return ref_hidden(sd, c, ids, rope_T) @ sd["output.weight"].float().T


def ref_reward(sd: dict[str, torch.Tensor], c: dict, ids: list[int]) -> float:
    """InternLM2ForRewardModel's score, as published: v_head of the final-normed hidden state at
    the last token (the reward token), in fp32."""
    T = [len(ids)] * len(ids)
    return float(ref_hidden(sd, c, ids, T)[-1] @ sd["v_head.weight"].float()[0])


def ref_hidden(sd: dict[str, torch.Tensor], c: dict, ids: list[int],
               rope_T: list[int]) -> torch.Tensor:
    """The final-normed hidden states [len, hidden] of ref_forward."""
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    d, g, eps = hidden // heads, heads // kv, c["rms_norm_eps"]
    theta, max_pos = c["rope_theta"], c["max_position_embeddings"]
    rs = c.get("rope_scaling")
    n = len(ids)

    def norm(x, w):
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    cos, sin = torch.empty(n, d), torch.empty(n, d)
    for p in range(n):
        base, t = theta, float(p)
        if rs and rs["type"] == "dynamic" and rope_T[p] > max_pos:
            f = rs["factor"]
            base = theta * ((f * rope_T[p] / max_pos) - (f - 1)) ** (d / (d - 2))
        if rs and rs["type"] == "linear":
            t = p / rs["factor"]
        inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
        fr = torch.cat([t * inv, t * inv])
        cos[p], sin[p] = fr.cos(), fr.sin()

    def rot(x):  # x [n, h, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    h = sd["model.tok_embeddings.weight"][torch.tensor(ids)].float()
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"].float())
        w = sd[p + "attention.wqkv.weight"].float().view(kv, g + 2, d, hidden)
        q = (x @ w[:, :g].reshape(-1, hidden).T).view(n, heads, d)
        k = (x @ w[:, g].reshape(-1, hidden).T).view(n, kv, d)
        v = (x @ w[:, g + 1].reshape(-1, hidden).T).view(n, kv, d)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
        a = torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
        h = h + a.reshape(n, -1) @ sd[p + "attention.wo.weight"].float().T
        x = norm(h, sd[p + "ffn_norm.weight"].float())
        gate = x @ sd[p + "feed_forward.w1.weight"].float().T
        up = x @ sd[p + "feed_forward.w3.weight"].float().T
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "feed_forward.w2.weight"].float().T
    return norm(h, sd["model.norm.weight"].float())


def ref_greedy(ckpt: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by full recompute with the official rotation rule: prompt tokens use
    T = prompt length, a generated token at position p uses T = p + 1 (cached keys keep it)."""
    c = json.loads((Path(ckpt) / "config.json").read_text())
    sd = raw_state_dict(ckpt)
    ids = list(prompt)
    L = len(prompt)
    for _ in range(new):
        T = [max(L, p + 1) for p in range(len(ids))]
        ids.append(int(ref_forward(sd, c, ids, T)[-1].argmax()))
    return ids[L:]
