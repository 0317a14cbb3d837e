"""The sampler's copy of the policy: a Llama/Qwen2 decoder over a static KV cache.

* a dense copy (bf16, fp16 on GPUs without bf16, fp32 on CPU) of the base weights, dequantized **once** from the
  4-bit weights the training model computes with, plus the LoRA adapter applied either as separate low-rank
  products (``lora_mode="separate"``, default: nothing of a small update is lost to bf16 rounding of ``W``) or
  merged into the dense weight (``lora_mode="merge"``); ``sync`` refreshes it from the training model;
* the Llama/Qwen2 family's layers (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) over a static KV
  cache, so that a decoding step has fixed shapes and can be captured in CUDA graphs; the two halves of a layer
  around the attention can be ``torch.compile``d once (:meth:`_DenseDecoder.compile_layers`), which fuses their
  ~30 small kernels into a handful.

Anything outside that family (other architectures, sliding-window attention, q/k norms, DoRA, LoRA on the
embeddings ...) raises :class:`UnsupportedForFastRollout`, on which the engine falls back to ``model.generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The architectures whose layers _DenseDecoder reproduces exactly; Mistral only without its sliding window.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


class UnsupportedForFastRollout(RuntimeError):
    """The model or the sampling settings are outside what the engine implements: use plain generation."""


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as Qwen2RMSNorm / LlamaRMSNorm: variance in fp32, scale in the input dtype.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _unwrap(model):
    """The transformers *ForCausalLM under DDP / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight a (possibly bitsandbytes-quantized) linear layer computes with, as a dense [out, in] tensor."""
    w = linear.weight
    cls = type(w).__name__
    if cls in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(linear)
    return w


def _lora_parts(module: torch.nn.Module):
    """[(A [r, in], B*scaling [out, r])] of the active, unmerged LoRA adapters of a PEFT-wrapped linear."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False):
        return []
    if getattr(module, "merged", False):
        return []  # the delta already sits in the base weight
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise UnsupportedForFastRollout("DoRA adapters are not supported by the fast rollout engine")
        if getattr(module, "lora_bias", {}).get(name, False):
            raise UnsupportedForFastRollout("LoRA bias is not supported by the fast rollout engine")
        if getattr(module, "fan_in_fan_out", False):
            raise UnsupportedForFastRollout("fan_in_fan_out LoRA layers are not supported")
        a = module.lora_A[name].weight
        b = module.lora_B[name].weight
        parts.append((a, b, float(module.scaling[name])))
    return parts


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


class _FusedLinear:
    """y = x @ W^T (+ b) (+ x @ A^T @ B^T) over several source linears fused along the output dimension.

    W is a persistent dense buffer (dequantized once); A and B are persistent buffers refreshed by sync, so that
    captured CUDA graphs keep reading the current weights.
    """

    def __init__(self, modules, dtype, device, lora_mode):
        self.modules = modules
        self.lora_mode = lora_mode
        outs = [_base_layer(m).out_features for m in modules]
        in_f = _base_layer(modules[0]).in_features
        self.outs = outs
        self.n_out = sum(outs)
        parts = [_lora_parts(m) for m in modules]
        self.ranks = [[a.shape[0] for a, _, _ in p] for p in parts]
        r_total = sum(sum(r) for r in self.ranks) if lora_mode == "separate" else 0
        # Separate LoRA: the A factors are extra output rows of the base weight, so that one matmul yields both
        # x W^T and x A^T; one addmm then adds (x A^T) B^T. Two kernels per linear instead of four.
        self.weight = torch.empty(self.n_out + r_total, in_f, dtype=dtype, device=device)
        if r_total:
            self.weight[self.n_out:].zero_()
        biases = [_base_layer(m).bias for m in modules]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.zeros(self.n_out + r_total, dtype=dtype, device=device)
        self.lora_b = torch.zeros(r_total, self.n_out, dtype=dtype, device=device) if r_total else None
        self.base_loaded = False

    @torch.no_grad()
    def sync(self, refresh_base: bool):
        parts = [_lora_parts(m) for m in self.modules]
        ranks = [[a.shape[0] for a, _, _ in p] for p in parts]
        if ranks != self.ranks:
            raise UnsupportedForFastRollout("the set of active LoRA adapters changed after the engine was built")
        merge = self.lora_mode == "merge" and any(parts)
        if refresh_base or not self.base_loaded or merge:
            row = 0
            for m, p, n in zip(self.modules, parts, self.outs):
                base = _base_layer(m)
                w = _dense_weight(base)
                if merge and p:
                    # The sum in fp32: a small delta must not vanish in the rounding of W before it is added.
                    w = w.float() + sum(b.float() @ a.float() * s for a, b, s in p)
                self.weight[row:row + n].copy_(w.reshape(n, -1))  # rows [n_out:] hold the LoRA A factors
                if self.bias is not None and base.bias is not None:
                    self.bias[row:row + n].copy_(base.bias)
                row += n
            self.base_loaded = True
        if self.lora_b is not None:
            row, col = 0, self.n_out
            for p, n in zip(parts, self.outs):
                for a, b, s in p:
                    r = a.shape[0]
                    self.weight[col:col + r].copy_(a)
                    self.lora_b[col - self.n_out:col - self.n_out + r, row:row + n].copy_((b.float() * s).t())
                    col += r
                row += n

    def tensors(self):
        """What :func:`_linear` needs, as plain arguments (so that a compiled caller guards on tensors only)."""
        return self.weight, self.bias, self.lora_b, self.n_out

    def __call__(self, x):
        return _linear(x, *self.tensors())


def _linear(x, weight, bias, lora_b, n_out: int):
    """x W^T + b, plus (x A^T) B^T when the A factors ride as extra rows of ``weight`` (see _FusedLinear)."""
    y = F.linear(x, weight, bias)
    if lora_b is None:
        return y
    y2 = y.reshape(-1, y.shape[-1])
    # Not addmm: its "input" here is a strided slice, which addmm first copies into its output (one more kernel
    # per linear); compiled, this add fuses into the consumer (rotary embedding, residual, SiLU*up).
    return (y2[:, :n_out] + y2[:, n_out:] @ lora_b).reshape(*x.shape[:-1], n_out)


# A layer is cut in three around the KV-cache write and the attention: the two outer parts are pure functions of
# their inputs (no state, no mutation), which is what torch.compile fuses best (norm, rope, SiLU*up and residual
# adds become a handful of kernels instead of ~30). The cache write and SDPA stay eager in between.
def _layer_in(h, ln_w, qkv, cos, sin, eps: float, H: int, KV: int, D: int):
    """RMSNorm -> fused q/k/v projection (+ LoRA) -> rotary embedding. Returns q [B,H,T,D], k, v [B,KV,T,D]."""
    B, T = h.shape[0], h.shape[1]
    x = _rms_norm(h, ln_w, eps)
    q, k, v = _linear(x, *qkv).split([H * D, KV * D, KV * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, KV, D).transpose(1, 2)
    v = v.view(B, T, KV, D).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _layer_in_kv(h, ln_w, qkv, cos, sin, eps: float, H: int, KV: int, D: int, kc, vc, slots):
    """:func:`_layer_in`, plus the K/V cache write at ``slots`` (compiled, the write fuses with the rotary
    embedding instead of costing two more kernels per layer). Returns q."""
    q, k, v = _layer_in(h, ln_w, qkv, cos, sin, eps, H, KV, D)
    kc.index_copy_(2, slots, k)
    vc.index_copy_(2, slots, v)
    return q


def _layer_out(h, attn, ln_w, o, gate_up, down, eps: float):
    """Output projection + residual -> RMSNorm -> SwiGLU MLP + residual."""
    h = h + _linear(attn, *o)
    x = _rms_norm(h, ln_w, eps)
    g, u = _linear(x, *gate_up).chunk(2, dim=-1)
    return h + _linear(F.silu(g) * u, *down)


class _DenseDecoder:
    """The sampler's copy of a Llama/Qwen2 decoder with a static KV cache."""

    def __init__(self, model, dtype, device, lora_mode):
        hf = _unwrap(model)
        cfg = hf.config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedForFastRollout(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        if getattr(cfg, "use_sliding_window", False) or (model_type == "mistral" and cfg.sliding_window):
            raise UnsupportedForFastRollout("sliding-window attention is not supported")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedForFastRollout(f"hidden_act {cfg.hidden_act!r} is not supported")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise UnsupportedForFastRollout(f"rope_type {rope_type!r} is not supported")
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        theta = theta or getattr(cfg, "rope_theta", 10000.0)
        core = hf.model
        self.config = cfg
        self.dtype, self.device = dtype, device
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device)
                                         .float() / self.head_dim))
        self.layers = []
        for layer in core.layers:
            att, mlp = layer.self_attn, layer.mlp
            if getattr(att, "q_norm", None) is not None:
                raise UnsupportedForFastRollout("q/k norms (Qwen3) are not supported")
            self.layers.append({
                "qkv": _FusedLinear([att.q_proj, att.k_proj, att.v_proj], dtype, device, lora_mode),
                "o": _FusedLinear([att.o_proj], dtype, device, lora_mode),
                "gate_up": _FusedLinear([mlp.gate_proj, mlp.up_proj], dtype, device, lora_mode),
                "down": _FusedLinear([mlp.down_proj], dtype, device, lora_mode),
                "ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm,
            })
        self.embed_module, self.norm_module, self.lm_head_module = core.embed_tokens, core.norm, hf.lm_head
        if hasattr(self.embed_module, "lora_embedding_A") or hasattr(self.lm_head_module, "lora_A"):
            raise UnsupportedForFastRollout("LoRA on embeddings / lm_head is not supported")
        self.tied = self.lm_head_module.weight is self.embed_module.weight or (
            self.lm_head_module.weight.data_ptr() == self.embed_module.weight.data_ptr())
        self.small = {}  # norms, embeddings: shared with the model when dtype/device match, else copied
        self.compiled = None  # (layer_in_kv, layer_out) compiled for decoding steps; see compile_layers

    def compile_layers(self, backend: str = "inductor"):
        """Use torch.compile'd layer halves for decoding steps (T == 1); prefill stays eager.

        Regional compilation: the two functions are shared by every layer (weights are arguments), so they
        compile once, in seconds, instead of once per layer or for a whole unrolled model. ``dynamic=None`` lets
        a second batch size recompile them once with a symbolic batch instead of once per size.
        """
        opts = dict(backend=backend, fullgraph=True, dynamic=None)
        self.compiled = (torch.compile(_layer_in_kv, **opts), torch.compile(_layer_out, **opts))

    def _small(self, key, tensor):
        if tensor.dtype == self.dtype and tensor.device == self.device:
            self.small[key] = tensor.detach()
        elif key in self.small and self.small[key].shape == tensor.shape and self.small[key].dtype == self.dtype \
                and self.small[key].data_ptr() != tensor.data_ptr():
            self.small[key].copy_(tensor.detach())
        else:
            self.small[key] = tensor.detach().to(device=self.device, dtype=self.dtype).clone()

    @torch.no_grad()
    def sync(self, refresh_base: bool):
        for i, layer in enumerate(self.layers):
            for key in ("qkv", "o", "gate_up", "down"):
                layer[key].sync(refresh_base)
            self._small(f"ln1.{i}", layer["ln1"].weight)
            self._small(f"ln2.{i}", layer["ln2"].weight)
        self._small("norm", self.norm_module.weight)
        self._small("embed", _dense_weight(self.embed_module))
        if self.tied:
            self.small["lm_head"] = self.small["embed"]
        else:
            self._small("lm_head", _dense_weight(self.lm_head_module))

    def rope(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.inv_freq  # [..., D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, tokens, positions, cache, slot_start, key_valid, query_valid=None):
        """Run T new tokens per sequence ([B, T]) at cache slots [slot_start, slot_start + T).

        key_valid: [B, S] bool, the cache slots each sequence may attend to (after this step's writes); causality
        inside the T new tokens is added here. Returns the last position's logits in fp32, [B, V].
        """
        B, T = tokens.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = F.embedding(tokens, self.small["embed"])
        cos, sin = self.rope(positions)  # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]
        S = cache.shape[4]
        slots = slot_start + torch.arange(T, device=tokens.device)
        if T == 1:
            mask = key_valid[:, None, None, :]  # [B, 1, 1, S]
        else:
            causal = torch.arange(S, device=tokens.device)[None, :] <= slots[:, None]  # [T, S]
            mask = key_valid[:, None, :] & causal[None]
            # A padded query sees no key: let it see its own slot so that softmax stays finite (output unused).
            mask = mask | (torch.arange(S, device=tokens.device)[None, :] == slots[:, None])[None]
            mask = mask[:, None]  # [B, 1, T, S]
        # An additive mask, made once per forward: SDPA would otherwise convert a boolean mask in every layer
        # (two kernels per layer per decoding step). Same arithmetic: 0 where attended, -inf elsewhere.
        mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        layer_in, layer_out = (self.compiled if T == 1 and self.compiled is not None else (_layer_in_kv, _layer_out))
        for i, layer in enumerate(self.layers):
            kc, vc = cache[i, 0], cache[i, 1]  # [B, KV, S, D]
            q = layer_in(h, self.small[f"ln1.{i}"], layer["qkv"].tensors(), cos, sin, self.eps, H, KV, D, kc, vc,
                         slots)
            if T == 1:
                # Grouped-query attention for one new token without repeating the cache: the G query heads
                # of a KV head are that head's "queries".
                qg = q.reshape(B, KV, H // KV, D)
                o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=D ** -0.5)
                o = o.reshape(B, 1, H * D)
            else:
                rep = H // KV
                kr = kc.repeat_interleave(rep, dim=1) if rep > 1 else kc
                vr = vc.repeat_interleave(rep, dim=1) if rep > 1 else vc
                o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=D ** -0.5)
                o = o.transpose(1, 2).reshape(B, T, H * D)
            h = layer_out(h, o, self.small[f"ln2.{i}"], layer["o"].tensors(), layer["gate_up"].tensors(),
                          layer["down"].tensors(), self.eps)
        h = _rms_norm(h[:, -1], self.small["norm"], self.eps)
        return F.linear(h, self.small["lm_head"]).float()

    def new_cache(self, batch, length):
        return torch.zeros(len(self.layers), 2, batch, self.n_kv, length, self.head_dim,
                           dtype=self.dtype, device=self.device)

