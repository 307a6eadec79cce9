"""Minimal SmolLM2-135M (Llama) forward for CPU benchmarking, with pluggable linears.

Weights can be copied from a transformers LlamaForCausalLM (for numerics checks).
KV cache is static [L, B, NKV, TMAX, HD]; decode attends over the full TMAX with an
additive mask built from per-sequence lengths, so shapes never change with kv length
(compile-friendly: no recompiles per step).
"""
import math

import torch
import torch.nn.functional as F

HIDDEN, INTER, NH, NKV, HD, NLAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152
EPS, THETA = 1e-5, 100000.0


def smollm_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                       num_hidden_layers=NLAYERS, num_attention_heads=NH, num_key_value_heads=NKV,
                       head_dim=HD, max_position_embeddings=8192, rms_norm_eps=EPS,
                       rope_theta=THETA, tie_word_embeddings=True, hidden_act="silu", **kw)


class Linear(torch.nn.Module):
    """Linear with a selectable kernel. kind: flinear | packed (mkldnn IP prepack) | mkl."""

    def __init__(self, w, kind="flinear", batch_hint=1):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)
        self.kind = kind
        if kind == "packed":
            self.pw = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        elif kind == "mkl":
            self.bh = batch_hint
            self.pw = torch.ops.mkl._mkl_reorder_linear_weight(w, batch_hint)

    def forward(self, x):
        if self.kind == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.pw, None, "none", [], "")
        if self.kind == "mkl":
            # _mkl_linear needs 2D input with the packed batch size
            return torch.ops.mkl._mkl_linear(x, self.pw, self.w, None, self.bh)
        return F.linear(x, self.w)


def rms_norm(x, w, eps=EPS):
    # same op order as HF LlamaRMSNorm (fp32 compute, cast back, then weight)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_cos_sin(pos, dtype):
    inv = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    f = pos.float()[..., None] * inv  # [..., HD/2]
    emb = torch.cat([f, f], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        for k, v in kw.items():
            setattr(self, k, v if isinstance(v, torch.nn.Module) else torch.nn.Parameter(v, requires_grad=False))

    def __getitem__(self, k):
        return getattr(self, k)


class SmolLM(torch.nn.Module):
    def __init__(self, sd, dtype, kind="flinear", batch_hint=1, nlayers=NLAYERS, attn="sdpa", kv_dtype=None):
        """attn: 'sdpa' (F.sdpa with additive mask over the static cache) or 'reduce' (GQA decode
        attention as broadcast-multiply + sum reductions: no GEMM calls, fuses under torch.compile).
        kv_dtype: cache dtype (default = dtype); float32 makes CPU SDPA much cheaper in a bf16 model."""
        super().__init__()
        self.attn = attn
        self.kv_dtype = kv_dtype or dtype
        g = lambda k: sd[k].to(dtype).contiguous()  # noqa: E731
        P = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.dtype = dtype
        self.embed = P(g("model.embed_tokens.weight"))
        self.lm_head = Linear(self.embed.data, kind, batch_hint)
        self.norm = P(g("model.norm.weight"))
        self.layers = torch.nn.ModuleList()
        for i in range(nlayers):
            p = f"model.layers.{i}."
            qkv = torch.cat([g(p + "self_attn.q_proj.weight"), g(p + "self_attn.k_proj.weight"),
                             g(p + "self_attn.v_proj.weight")], 0).contiguous()
            gu = torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")], 0).contiguous()
            self.layers.append(Layer(
                ln1=g(p + "input_layernorm.weight"), ln2=g(p + "post_attention_layernorm.weight"),
                qkv=Linear(qkv, kind, batch_hint), o=Linear(g(p + "self_attn.o_proj.weight"), kind, batch_hint),
                gu=Linear(gu, kind, batch_hint), down=Linear(g(p + "mlp.down_proj.weight"), kind, batch_hint)))

    def new_cache(self, B, tmax):
        """Per-layer K and V buffers (separate tensors: in-place updates stay small under compile)."""
        mk = lambda: torch.zeros(B, NKV, tmax, HD, dtype=self.kv_dtype)  # noqa: E731
        return [mk() for _ in self.layers], [mk() for _ in self.layers]

    def layer(self, L, h, cos, sin, kc, vc, pos, mask):
        """h [B, S, H]; pos [B, S] (absolute positions, S new tokens); kc/vc [B, NKV, TMAX, HD]."""
        B, S, _ = h.shape
        x = rms_norm(h, L["ln1"])
        qkv = L["qkv"](x.view(B * S, HIDDEN)).view(B, S, NH + 2 * NKV, HD).transpose(1, 2)
        q, k, v = qkv.split([NH, NKV, NKV], dim=1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # scatter new k/v into the static cache at their positions
        idx = pos[:, None, :, None].expand(B, NKV, S, HD)
        kc.scatter_(2, idx, k.to(kc.dtype))
        vc.scatter_(2, idx, v.to(vc.dtype))
        if self.attn == "reduce":
            # q [B, NH, S, HD] -> [B, NKV, G, S, 1, HD]; k/v cache [B, NKV, 1, 1, T, HD]
            G = NH // NKV
            qg = q.float().reshape(B, NKV, G, S, 1, HD)
            sc = (qg * kc[:, :, None, None].float()).sum(-1) * (HD ** -0.5)  # [B, NKV, G, S, T]
            sc = sc + mask.float().view(B, 1, 1, S, -1)
            pr = torch.softmax(sc, -1)
            a = (pr[..., None] * vc[:, :, None, None].float()).sum(-2)  # [B, NKV, G, S, HD]
            a = a.to(h.dtype).reshape(B, NH, S, HD)
        else:
            a = F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=mask.to(kc.dtype),
                                               enable_gqa=True).to(h.dtype)
        a = a.transpose(1, 2).reshape(B * S, NH * HD)
        h = h + L["o"](a).view(B, S, HIDDEN)
        x = rms_norm(h, L["ln2"]).view(B * S, HIDDEN)
        gu = L["gu"](x)
        gate, up = gu.split(INTER, dim=-1)
        h = h + L["down"](F.silu(gate) * up).view(B, S, HIDDEN)
        return h

    def forward(self, ids, pos, cache, last_only=True):
        """ids, pos: [B, S] long. cache: (k list, v list) of [B, NKV, TMAX, HD]. Returns logits."""
        B, S = ids.shape
        tmax = cache[0][0].shape[-2]
        h = F.embedding(ids, self.embed)
        cos, sin = rope_cos_sin(pos, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B,1,S,HD]
        # additive mask: key j visible to query at position p iff j <= p
        kpos = torch.arange(tmax)
        mask = torch.where(kpos[None, None, :] <= pos[:, :, None], 0.0, float("-inf")).to(self.dtype)
        mask = mask[:, None]  # [B,1,S,TMAX]
        for i, L in enumerate(self.layers):
            h = self.layer(L, h, cos, sin, cache[0][i], cache[1][i], pos, mask)
        if last_only:
            h = h[:, -1]
        h = rms_norm(h, self.norm)
        return self.lm_head(h.reshape(-1, HIDDEN)).float()


def random_state_dict(seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(smollm_config())
    return m, {k: v.detach() for k, v in m.state_dict().items()}


def fast_random_state_dict(seed=0):
    """Random weights with the HF key names, without building the HF model."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(NLAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": r(NH * HD, HIDDEN), p + "self_attn.k_proj.weight": r(NKV * HD, HIDDEN),
                   p + "self_attn.v_proj.weight": r(NKV * HD, HIDDEN), p + "self_attn.o_proj.weight": r(HIDDEN, NH * HD),
                   p + "mlp.gate_proj.weight": r(INTER, HIDDEN), p + "mlp.up_proj.weight": r(INTER, HIDDEN),
                   p + "mlp.down_proj.weight": r(HIDDEN, INTER),
                   p + "input_layernorm.weight": torch.ones(HIDDEN), p + "post_attention_layernorm.weight": torch.ones(HIDDEN)})
    return sd
