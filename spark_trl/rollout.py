"""Fast rollouts for QLoRA GRPO: sample from a dense copy of the policy with a static KV cache and CUDA graphs.

Plain ``trl.GRPOTrainer`` generates with ``model.generate`` on the 4-bit model with its LoRA adapter attached:
every decoding step re-dequantizes every 4-bit weight and launches hundreds of small kernels, so a step at batch 32
costs 120-175 ms on an H100 (issue 8). :class:`FastRolloutEngine` samples instead from

* a dense copy (bf16, fp16 on GPUs without bf16, fp32 on CPU) of the base weights, dequantized **once** from the
  4-bit weights the training model computes with, plus the LoRA adapter applied either as separate low-rank
  products (``lora_mode="separate"``, default: nothing of a small update is lost to bf16 rounding of ``W``) or
  merged into the dense weight (``lora_mode="merge"``); :meth:`FastRolloutEngine.sync_weights` refreshes it after
  each optimizer step;
* its own decoder for the Llama/Qwen2 family (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) over a
  static KV cache, so that one decoding step (forward, temperature/top-k/top-p/min-p, sampling, EOS bookkeeping)
  is captured once in CUDA graphs and replayed; on CUDA the two halves of a layer around the attention are
  ``torch.compile``d once (``compile_decode``), which fuses their ~30 small kernels into a handful;
* an exact top-p: a top-k prefilter decides the nucleus whenever the kept mass reaches ``top_p`` (exact, since
  every token outside it then has at least ``top_p`` mass above it), else the exact full-vocabulary path runs
  (a sort as in ``transformers``' ``TopPLogitsWarper``, or a bisection on the probability threshold).

Where a decoding step of the 3B model goes on an H100 (batch 32, 5.7 ms) and how each change paid off is in
docs/benchmarks.md.

Sampling semantics are those of TRL's transformers path: the warpers of ``GenerationConfig`` in their order
(temperature, top-k, top-p, min-p), one sample per prompt, generation stops at any of TRL's EOS ids (tokenizer EOS
plus the model's ``generation_config.eos_token_id``), the EOS is included and everything after it cut, at most
``max_completion_length`` tokens. Log-probs stay the training model's; the sampler's own log-probs of the sampled
tokens (``logits / temperature``, before truncation, as TRL computes them) are kept in ``last_logprobs`` so that
the sampler/trainer mismatch can be measured.

Anything the engine does not support (other architectures, sliding-window attention, repetition penalty, DoRA,
unknown ``generation_kwargs`` ...) or any error at run time falls back to plain ``model.generate`` with a
warning, once.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from trl import GRPOConfig
    >>> from spark_trl.rollout import FastRolloutEngine
    >>> model = AutoModelForCausalLM.from_pretrained(path)                         # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained(path)                                  # doctest: +SKIP
    >>> engine = FastRolloutEngine(model, tok, GRPOConfig(max_completion_length=64))  # doctest: +SKIP
    >>> completions = engine.generate([tok("def add(a, b):")["input_ids"]] * 4)    # doctest: +SKIP
    >>> engine.sync_weights(model)  # after each optimizer step                    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")
# generation_kwargs that the engine honours (or that do not change sampling); anything else falls back.
_KNOWN_GENERATION_KEYS = {
    "max_new_tokens", "do_sample", "pad_token_id", "bos_token_id", "eos_token_id", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "cache_implementation", "use_cache", "disable_compile", "return_dict_in_generate",
    "output_scores", "output_logits",
}


class UnsupportedForFastRollout(RuntimeError):
    """The model or the sampling settings are outside what the engine implements: use plain generation."""


@dataclass
class SamplingParams:
    """Sampling settings, read from a TRL ``GRPOConfig`` (or any object with the same fields).

    Example:
        >>> from types import SimpleNamespace
        >>> SamplingParams.from_args(SimpleNamespace(temperature=0.2, top_p=0.95, max_completion_length=512),
        ...                          eos_token_ids=[2], pad_token_id=0).top_p
        0.95
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    do_sample: bool = True
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    repetition_penalty: float = 1.0
    unsupported: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args, eos_token_ids: list[int], pad_token_id: int) -> "SamplingParams":
        gen = {
            "max_new_tokens": getattr(args, "max_completion_length", None) or 512,
            "temperature": getattr(args, "temperature", 1.0),
            "top_p": getattr(args, "top_p", 1.0),
            "top_k": getattr(args, "top_k", 0),
            "min_p": getattr(args, "min_p", None),
            "repetition_penalty": getattr(args, "repetition_penalty", 1.0),
            "eos_token_id": list(eos_token_ids),
            "pad_token_id": pad_token_id,
            "do_sample": True,
        }
        extra = dict(getattr(args, "generation_kwargs", None) or {})
        gen.update(extra)
        eos = gen["eos_token_id"]
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        params = cls(
            max_new_tokens=int(gen["max_new_tokens"]),
            temperature=1.0 if gen["temperature"] is None else float(gen["temperature"]),
            top_p=1.0 if gen["top_p"] is None else float(gen["top_p"]),
            top_k=int(gen["top_k"] or 0),
            min_p=None if gen["min_p"] is None else float(gen["min_p"]),
            do_sample=bool(gen["do_sample"]),
            eos_token_ids=eos,
            pad_token_id=int(gen["pad_token_id"] if gen["pad_token_id"] is not None else (eos[0] if eos else 0)),
            repetition_penalty=1.0 if gen["repetition_penalty"] is None else float(gen["repetition_penalty"]),
        )
        params.unsupported = sorted(k for k in extra if k not in _KNOWN_GENERATION_KEYS)
        if params.repetition_penalty != 1.0:
            params.unsupported.append("repetition_penalty")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {params.max_new_tokens}")
        if params.do_sample and not params.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {params.temperature}")
        if not 0.0 < params.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        return params


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the warpers of transformers' generate (temperature -> top-k -> top-p -> min-p), graph-capturable.
# ----------------------------------------------------------------------------------------------------------------

def _top_p_keep_bisect(probs: torch.Tensor, top_p: float, iters: int = 31) -> torch.Tensor:
    """Exact top-p keep-mask without a sort.

    TopPLogitsWarper keeps token i iff the mass of the tokens ranked above it is < top_p. With
    f(t) = sum_{p_j > t} p_j (decreasing in t), that is f(p_i) < top_p, i.e. p_i >= t* where t* is the smallest
    float with f(t*) < top_p. Positive float32s are ordered like their int32 bit patterns, so 31 halvings of the
    bit range [0, bits(max p)] find t* exactly; each halving is one masked sum over the vocabulary.
    """
    pmax = probs.amax(dim=-1)
    lo = torch.zeros_like(pmax, dtype=torch.int32)
    hi = pmax.contiguous().view(torch.int32).clone()  # f(max p) = 0 < top_p: the condition holds at hi
    for _ in range(iters):
        mid = lo + (hi - lo) // 2
        t = mid.view(torch.float32)
        mass_above = torch.where(probs > t[:, None], probs, 0.0).sum(dim=-1)
        ok = mass_above < top_p
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return probs >= hi.view(torch.float32)[:, None]


def _cumsum_rows(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """cumsum over the last dim of a [R, V] tensor, computed in blocks of ``block``.

    A GPU scan over a few very long rows (32 x 151,936) parallelises poorly (0.23 ms on an H100); as R*V/block short
    rows plus a scan of the block totals it has work for every SM. Leading zero padding keeps the prefix sums.
    """
    R, V = x.shape
    nb = -(-V // block)
    pad = nb * block - V
    if pad:
        x = F.pad(x, (pad, 0))
    c = x.view(R, nb, block).cumsum(dim=-1)
    totals = c[..., -1]
    offsets = totals.cumsum(dim=-1) - totals  # exclusive prefix of the block totals
    return (c + offsets[..., None]).view(R, nb * block)[:, pad:]


def _top_p_keep_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper's own rule (ascending sort, cumulative softmax <= 1 - top_p is removed)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = _cumsum_rows(sorted_logits.softmax(dim=-1))
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return ~remove


def _exp_race(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """One categorical sample per row, proportional to ``weights`` (>= 0): argmax w_i / E_i with E_i ~ Exp(1).

    Equivalent in distribution to torch.multinomial(weights, 1) and capturable in a CUDA graph.
    """
    noise = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return (weights / noise).argmax(dim=-1)


def _temperature_top_k(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """TemperatureLogitsWarper then TopKLogitsWarper (ties with the k-th value kept), in fp32."""
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    if params.top_k and params.top_k > 0:
        k = min(params.top_k, x.shape[-1])
        kth = torch.topk(x, k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return x


def warp_logits(logits: torch.Tensor, params: SamplingParams, top_p_method: str = "bisect") -> torch.Tensor:
    """The logits after transformers' sampling warpers (removed tokens at -inf), computed exactly.

    ``top_p_method``: "bisect" (no sort, see :func:`_top_p_keep_bisect`) or "sort" (TopPLogitsWarper's rule).

    Example:
        >>> import torch
        >>> p = SamplingParams(top_p=0.5)
        >>> warp_logits(torch.tensor([[2.0, 1.0, 0.0]]), p).isinf().tolist()
        [[False, True, True]]
    """
    x = _temperature_top_k(logits, params)
    if params.top_p < 1.0:
        if top_p_method == "sort":
            keep = _top_p_keep_sort(x, params.top_p)
        else:
            keep = _top_p_keep_bisect(torch.softmax(x, dim=-1), params.top_p)
        x = x.masked_fill(~keep, float("-inf"))
    if params.min_p is not None:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def sorted_weights(logits: torch.Tensor, params: SamplingParams):
    """The warped distribution in ascending-sorted order: (sorted token ids, unnormalised weights).

    The same rules as :func:`warp_logits` with ``top_p_method="sort"``, but the sample is drawn in sorted order, so
    nothing is scattered back to vocabulary order and the softmax is computed once (MinP's comparison with the
    largest probability is unchanged by the renormalisation after top-p).

    Example:
        >>> ids, w = sorted_weights(torch.tensor([[0.0, 3.0, 1.0]]), SamplingParams(top_p=0.8))
        >>> ids.tolist(), (w > 0).tolist()
        ([[0, 2, 1]], [[False, False, True]])
    """
    x = _temperature_top_k(logits, params)
    sorted_x, ids = torch.sort(x, descending=False)
    w = sorted_x.softmax(dim=-1)
    if params.top_p < 1.0:
        keep = _cumsum_rows(w) > (1 - params.top_p)
        keep[..., -1] = True
        w = torch.where(keep, w, 0.0)
    if params.min_p is not None:
        w = torch.where(w < params.min_p * w[..., -1:], 0.0, w)
    return ids, w


def _sample_full(logits: torch.Tensor, params: SamplingParams, top_p_method: str, generator=None) -> torch.Tensor:
    if not params.do_sample:
        return logits.argmax(dim=-1)
    if top_p_method == "sort":
        ids, w = sorted_weights(logits, params)
        return ids.gather(-1, _exp_race(w, generator)[:, None])[:, 0]
    warped = warp_logits(logits, params, top_p_method)
    probs = torch.softmax(warped, dim=-1)
    return _exp_race(probs, generator)


def prefilter_probs(logits: torch.Tensor, params: SamplingParams, k: int = 64):
    """The warped distribution restricted to the top-k candidates: (candidate ids, weights, exact).

    The weights are the candidates' probabilities over the whole vocabulary, zero where a warper removed the
    candidate, not renormalised (sampling by exponential race doesn't need it).

    ``exact[b]`` says that the candidates provably hold row b's whole warped distribution: their mass reaches
    ``top_p`` (every other token then has at least ``top_p`` mass above it, so TopPLogitsWarper removes it), or a
    ``top_k`` smaller than ``k`` already cut everything else. Rows that are not exact need the full path.

    Example:
        >>> import torch
        >>> ids, probs, exact = prefilter_probs(torch.tensor([[4.0, 1.0, 0.0, 0.0]]), SamplingParams(top_p=0.9), k=2)
        >>> ids.tolist(), exact.tolist()
        ([[0, 1]], [True])
    """
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    k = min(k, x.shape[-1])
    vals, idx = torch.topk(x, k, dim=-1)  # descending
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    exact = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if params.top_k and 0 < params.top_k < x.shape[-1]:
        # TopKLogitsWarper keeps everything >= the k-th value (ties included) and the softmax renormalises.
        kth = vals[..., min(params.top_k, k) - 1:min(params.top_k, k)]
        vals = vals.masked_fill(vals < kth, float("-inf"))
        lse = torch.logsumexp(vals, dim=-1, keepdim=True)
        if params.top_k < k:
            exact = vals[..., -1] < kth[..., 0]  # the k-th candidate is already cut: nothing beyond survives
    probs = torch.exp(vals - lse)  # normalised over the whole (top-k-warped) vocabulary
    if params.top_p < 1.0:
        mass_above = torch.cumsum(probs, dim=-1) - probs
        keep = mass_above < params.top_p
        keep[..., 0] = True
        exact = exact | (probs.sum(dim=-1) >= params.top_p)
        probs = torch.where(keep, probs, 0.0)
    if params.min_p is not None:
        probs = torch.where(probs < params.min_p * probs[..., :1], 0.0, probs)
    return idx, probs, exact


def _sample_prefilter(logits: torch.Tensor, params: SamplingParams, k: int, generator=None):
    """Sample within the top-k candidates; returns (tokens, exact) (see :func:`prefilter_probs`)."""
    idx, probs, exact = prefilter_probs(logits, params, k)
    choice = _exp_race(probs, generator)
    return idx.gather(-1, choice[:, None])[:, 0], exact


# ----------------------------------------------------------------------------------------------------------------
# The dense decoder (Llama / Qwen2 / Mistral without sliding window)
# ----------------------------------------------------------------------------------------------------------------

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
    # per linear, ~0.7 ms per decoding step of the 3B model on an H100); compiled, this add fuses into the
    # consumer (rotary embedding, residual, SiLU*up).
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


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------

def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs (T4), fp32 on CPU.

    Example:
        >>> default_dtype(torch.device("cpu"))
        torch.float32
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


class FastRolloutEngine:
    """Fast sampling of GRPO completions from the current policy (see the module docstring).

    Args:
        model: the training model (a transformers causal LM, possibly a PEFT model over a bitsandbytes 4-bit base).
        processing_class: its tokenizer (for the EOS and pad ids).
        args: the trainer's config (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
            ``max_completion_length``, ``generation_kwargs``).
        dtype: the sampler's dtype (default: :func:`default_dtype`).
        lora_mode: "separate" (low-rank products next to the dense base) or "merge" (into the dense weight).
        top_p_method: "prefilter" (top-k candidates; exact fallback by sort when their mass is below top_p),
            "bisect" or "sort" (always over the whole vocabulary).
        prefilter_k: number of candidates of the prefilter.
        cuda_graphs: capture each decoding step in a CUDA graph (CUDA only).
        compile_decode: torch.compile the decoding step's layers (fuses the ~30 small kernels of a layer's norms,
            rotary embedding, SwiGLU and residual adds into a few). None (default): on CUDA when Triton is
            importable. Costs a one-time compile (seconds) per process; if it fails the engine warns once and
            decodes eagerly.
        max_batch_size: larger requests are split into chunks of this many prompts.
        fallback: on an unsupported setting or an error, warn once and use ``model.generate``; if False, raise.

    Example:
        >>> engine = FastRolloutEngine(model, tokenizer, grpo_config)          # doctest: +SKIP
        >>> engine.generate([[1, 2, 3], [4, 5]])                                # doctest: +SKIP
        [[17, 9, 2], [33, 2]]
    """

    def __init__(self, model, processing_class, args, dtype: torch.dtype | None = None, lora_mode: str = "separate",
                 top_p_method: str = "prefilter", prefilter_k: int = 64, cuda_graphs: bool = True,
                 max_batch_size: int = 64, fallback: bool = True, seed: int | None = None,
                 compile_decode: bool | None = None):
        if lora_mode not in ("separate", "merge"):
            raise ValueError(f"lora_mode must be 'separate' or 'merge', got {lora_mode!r}")
        if top_p_method not in ("prefilter", "bisect", "sort"):
            raise ValueError(f"top_p_method must be 'prefilter', 'bisect' or 'sort', got {top_p_method!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        hf = _unwrap(model)
        eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos = [self.tokenizer.eos_token_id, *eos]  # the same list as GRPOTrainer.eos_token_ids
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.params = SamplingParams.from_args(args, eos, pad)
        self._extra_generation_kwargs = dict(getattr(args, "generation_kwargs", None) or {})
        self.device = next(hf.parameters()).device
        self.dtype = dtype or default_dtype(self.device)
        self.lora_mode, self.top_p_method, self.prefilter_k = lora_mode, top_p_method, prefilter_k
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.compile_decode = _compile_available(self.device) if compile_decode is None else bool(compile_decode)
        self.compile_error: str | None = None
        self.max_batch_size = max_batch_size
        self.allow_fallback = fallback
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)
        self.decoder = None
        self.fallback_reason = None
        self._graph = None
        self.last_logprobs: list[list[float]] | None = None
        self.stats = {"generate_s": 0.0, "sync_s": 0.0, "tokens": 0, "steps": 0, "full_path_steps": 0,
                      "prefilter_skipped_steps": 0, "captures": 0, "fallback_calls": 0}
        try:
            if self.params.unsupported:
                raise UnsupportedForFastRollout(f"unsupported generation settings: {self.params.unsupported}")
            self.decoder = self._build_decoder(model)
            self.sync_weights(model, refresh_base=True)
        except Exception as exc:  # noqa: BLE001 - any failure must leave training running
            self._fail(exc)

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while the fast path is in use (False after a fallback)."""
        return self.decoder is not None

    def sync_weights(self, model=None, refresh_base: bool | None = None) -> None:
        """Refresh the sampler from the training model (call after each optimizer step).

        The dense base is dequantized once (its 4-bit weights are frozen) unless ``refresh_base`` or the base
        weights are trainable (full fine-tuning); LoRA factors are re-read every time.
        """
        if self.decoder is None:
            return
        t0 = time.perf_counter()
        model = model if model is not None else self.model
        if _unwrap(model) is not _unwrap(self.model):  # another model: rebuild (wrappers of the same are fine)
            self.model = model
            self.decoder = self._build_decoder(model)
            self._graph = None
            refresh_base = True
        if refresh_base is None:
            refresh_base = any(p.requires_grad for layer in self.decoder.layers for lin in layer.values()
                               if isinstance(lin, _FusedLinear) for m in lin.modules
                               for p in _base_layer(m).parameters(recurse=False))
        try:
            self.decoder.sync(refresh_base)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["sync_s"] += time.perf_counter() - t0

    @contextmanager
    def sampling(self, args, max_batch_size: int | None = None):
        """Temporarily sample with other settings (e.g. the evaluation's) from the same dense weights.

        Lets the study's evaluation reuse the trainer's engine instead of holding a second dense copy of the model
        (6 GB for a 3B model: the difference between fitting a 16 GB T4 or not). The captured graphs bake the
        sampling settings in, so they are dropped on entry and on exit (re-capturing costs ~0.1 s).

        Example:
            >>> with engine.sampling(SimpleNamespace(temperature=0.2, top_p=0.95, max_completion_length=512)):  # doctest: +SKIP
            ...     completions = engine.generate(prompt_ids)
        """
        params = SamplingParams.from_args(args, self.params.eos_token_ids, self.params.pad_token_id)
        if params.unsupported:
            raise UnsupportedForFastRollout(f"unsupported generation settings: {params.unsupported}")
        saved = (self.params, self._extra_generation_kwargs, self.max_batch_size)
        self.params, self._graph = params, None
        self._extra_generation_kwargs = dict(getattr(args, "generation_kwargs", None) or {})
        self.max_batch_size = max_batch_size or self.max_batch_size
        try:
            yield self
        finally:
            self.params, self._extra_generation_kwargs, self.max_batch_size = saved
            self._graph = None

    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Sample one completion per prompt; returns the completion token ids (EOS included, nothing after it)."""
        if not prompt_ids:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        t0 = time.perf_counter()
        out, logps = [], []
        try:
            if self.decoder is None:
                raise UnsupportedForFastRollout(self.fallback_reason or "fast rollout engine inactive")
            for i in range(0, len(prompt_ids), self.max_batch_size):
                c, lp = self._generate_chunk(prompt_ids[i:i + self.max_batch_size])
                out.extend(c)
                logps.extend(lp)
            self.last_logprobs = logps
        except Exception as exc:  # noqa: BLE001
            if self.decoder is not None:
                self._fail(exc)
            out = self._generate_plain(prompt_ids)
            self.last_logprobs = None
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["tokens"] += sum(len(c) for c in out)
        return out

    # -- internals ---------------------------------------------------------------------------------------------
    def _build_decoder(self, model):
        decoder = _DenseDecoder(model, self.dtype, self.device, self.lora_mode)
        if self.compile_decode and self.compile_error is None:
            decoder.compile_layers(COMPILE_BACKEND)
        return decoder

    def _drop_compile(self, exc: Exception):
        """A compile failure costs the compiled layers, not the engine: warn once and decode eagerly."""
        self.compile_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"FastRolloutEngine: a decoding step with torch.compile'd layers failed ({self.compile_error}); "
                      "retrying without them (pass compile_decode=False to skip the attempt)",
                      RuntimeWarning, stacklevel=4)
        self.decoder.compiled = None
        if self._graph is not None:
            self._graph["graphs"] = None

    def _fail(self, exc: Exception):
        if not self.allow_fallback:
            raise exc
        self.fallback_reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"FastRolloutEngine falls back to plain model.generate: {self.fallback_reason}",
                      RuntimeWarning, stacklevel=3)
        logger.warning("FastRolloutEngine disabled: %s", self.fallback_reason)
        self.decoder = None
        self._graph = None

    @torch.no_grad()
    def _generate_plain(self, prompt_ids):
        """TRL's transformers path: left-padded model.generate, everything after the first EOS cut."""
        from transformers import GenerationConfig

        self.stats["fallback_calls"] += 1
        p = self.params
        hf = _unwrap(self.model)
        kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, pad_token_id=p.pad_token_id,
                      eos_token_id=p.eos_token_ids, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                      min_p=p.min_p, repetition_penalty=p.repetition_penalty)
        kwargs.update(self._extra_generation_kwargs)
        gen_config = GenerationConfig(**kwargs)
        results = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(prompt_ids), self.max_batch_size):
                chunk = prompt_ids[i:i + self.max_batch_size]
                width = max(len(x) for x in chunk)
                ids = torch.full((len(chunk), width), p.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, x in enumerate(chunk):
                    ids[r, width - len(x):] = torch.tensor(x)
                    mask[r, width - len(x):] = 1
                seqs = hf.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   generation_config=gen_config)
                for row in seqs[:, width:].tolist():
                    results.append(_cut_after_eos(row, p.eos_token_ids))
        finally:
            if was_training:
                self.model.train()
        return results

    def _sample(self, logits):
        """Returns (tokens, needs_full_path or None)."""
        p = self.params
        if not p.do_sample:
            return logits.argmax(dim=-1), None
        if self.top_p_method == "prefilter" and (p.top_p < 1.0 or p.top_k):
            return _sample_prefilter(logits, p, self.prefilter_k, self.generator)
        return _sample_full(logits, p, self.top_p_method, self.generator), None

    def _logp(self, logits, tokens):
        # log-softmax of logits / T at the sampled token: what TRL's trainer computes for the same token.
        x = logits / self.params.temperature if self.params.temperature != 1.0 else logits
        return x.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(x, dim=-1)

    @torch.no_grad()
    def _generate_chunk(self, prompts):
        p, dec = self.params, self.decoder
        n = len(prompts)
        # Bucketed shapes limit how many graphs get captured: batch to a multiple of 8, prompt width to 64.
        B = _round_up(n, 8) if self.cuda_graphs else n
        P = _round_up(max(len(x) for x in prompts), 64 if self.cuda_graphs else 1)
        S = P + p.max_new_tokens
        dev = self.device
        ids = torch.full((B, P), p.pad_token_id, dtype=torch.long)
        npad = torch.zeros(B, dtype=torch.long)
        for r in range(B):
            x = prompts[r] if r < n else prompts[0]  # padding rows repeat prompt 0; their output is dropped
            ids[r, P - len(x):] = torch.tensor(x, dtype=torch.long)
            npad[r] = P - len(x)
        ids, npad = ids.to(dev), npad.to(dev)
        st = self._state(B, S)
        st["cache"].zero_()
        st["npad"].copy_(npad)
        arange_s = torch.arange(S, device=dev)
        key_valid = (arange_s[None, :] >= npad[:, None]) & (arange_s[None, :] < P)
        positions = (torch.arange(P, device=dev)[None, :] - npad[:, None]).clamp(min=0)
        # The prefill runs PREFILL_ROWS sequences at a time: its transient activations grow with rows x prompt
        # length (the MLP's alone ~1 GB for 64 x 350 tokens of the 3B model), the decoding steps' do not.
        zero = torch.tensor(0, device=dev)
        for r in range(0, B, PREFILL_ROWS):
            rows = slice(r, min(B, r + PREFILL_ROWS))
            st["logits"][rows].copy_(dec.forward(ids[rows], positions[rows], st["cache"][:, :, rows], zero,
                                                 key_valid[rows]))
        # Step 0 samples from the prefill's logits; later steps run "decode" (forward of the last token + sample).
        st["slot"].fill_(P - 1)  # commit advances it: the first sampled token goes to slot P
        st["step"].zero_()
        st["finished"].zero_()
        st["finished"][n:] = True  # bucket padding rows: never hold up the "all finished" stop
        st["out"].fill_(p.pad_token_id)
        st["logps"].zero_()
        st["sticky_full"] = 0
        parts = self._parts()
        self._sample_and_commit(st, lambda name: parts[name](st))  # eager: the graphs are for decoding steps
        eos = st["eos"]
        steps = 1
        # With CUDA graphs the host reads "every sequence has finished" one step late, from a pinned copy, so that
        # the next step is already queued when it waits and the GPU does not idle between steps (with the
        # sorted-order sampling this took 0.3 ms off a 6.0 ms step of the 3B model on an H100). The price is one
        # spare step at the end, whose tokens (pads after EOS) are cut below.
        lagged = self.cuda_graphs
        pending = None  # (event, host slot) of the last launched step's flag
        done = bool(st["flags"][0])
        while steps < p.max_new_tokens and not done:
            self._decode_step(st)
            steps += 1
            if not lagged:
                done = bool(st["flags"][0])
                continue
            if pending is not None:
                pending[0].synchronize()
                done = bool(st["host_flag"][pending[1]])
            slot = steps % 2
            st["host_flag"][slot].copy_(st["flags"][0], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending = (event, slot)
        self.stats["steps"] += steps
        k = steps
        out = st["out"][:n, :k].tolist()
        logps = st["logps"][:n, :k].tolist()
        eos_list = eos.tolist()
        comps, lps = [], []
        for row, lp in zip(out, logps):
            c = _cut_after_eos(row, eos_list)
            comps.append(c)
            lps.append(lp[:len(c)])
        return comps, lps

    def _state(self, B, S):
        key = (B, S)
        if self._graph is not None and self._graph["key"] == key:
            return self._graph
        self._graph = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dev, p = self.device, self.params
        st = {
            "key": key, "graphs": None, "sticky_full": 0,
            "cache": self.decoder.new_cache(B, S),
            "tok": torch.zeros(B, dtype=torch.long, device=dev),
            "slot": torch.zeros((), dtype=torch.long, device=dev),
            "step": torch.zeros((), dtype=torch.long, device=dev),
            "npad": torch.zeros(B, dtype=torch.long, device=dev),
            "finished": torch.zeros(B, dtype=torch.bool, device=dev),
            "out": torch.zeros(B, p.max_new_tokens, dtype=torch.long, device=dev),
            "logps": torch.zeros(B, p.max_new_tokens, dtype=torch.float32, device=dev),
            "logits": torch.zeros(B, self.decoder.vocab_size, dtype=torch.float32, device=dev),
            "sampled": torch.zeros(B, dtype=torch.long, device=dev),
            "need_full": torch.zeros(B, dtype=torch.bool, device=dev),
            "flags": torch.zeros(2, dtype=torch.bool, device=dev),
            "eos": torch.tensor(p.eos_token_ids or [-1], dtype=torch.long, device=dev),
            "arange_s": torch.arange(S, device=dev),
            "host_flag": torch.zeros(2, dtype=torch.bool, pin_memory=dev.type == "cuda"),
        }
        self._graph = st
        return st

    # One decoding step = forward -> sample -> commit (finished flags, output buffers, next input). All state lives
    # in device tensors, so each part replays as a CUDA graph without host work. Sampling takes one of two exact
    # paths: the top-k prefilter (cheap; the host then reads one flag to learn whether a row needs the full
    # vocabulary) or the full-vocabulary path. After a step where the prefilter did not suffice, the next
    # STICKY_FULL_STEPS steps go straight to the full path: flat distributions (random weights, early training,
    # high temperature) make the prefilter fail step after step, and then it is wasted work (~0.2 ms per step of
    # the 3B model on an H100).
    def _forward(self, st):
        pos = (st["slot"] - st["npad"])[:, None]
        key_valid = (st["arange_s"][None, :] >= st["npad"][:, None]) & (st["arange_s"][None, :] <= st["slot"])
        logits = self.decoder.forward(st["tok"][:, None], pos, st["cache"], st["slot"][None], key_valid)
        st["logits"].copy_(logits)

    def _prefilter_sample(self, st):
        tok, need_full = self._sample(st["logits"])
        st["sampled"].copy_(tok)
        if need_full is not None:
            st["need_full"].copy_(~need_full & ~st["finished"])
        else:
            st["need_full"].zero_()
        st["flags"][1] = st["need_full"].any()

    def _full_tokens(self, st):
        # The exact full-vocabulary path sorts: on an H100 a segmented sort of 32 x 151,936 logits beat the
        # 31-step bisection by ~1 ms per step (docs/benchmarks.md).
        method = "bisect" if self.top_p_method == "bisect" else "sort"
        return _sample_full(st["logits"], self.params, method, self.generator)

    def _full_sample(self, st):  # the rows the prefilter could not decide
        st["sampled"].copy_(torch.where(st["need_full"], self._full_tokens(st), st["sampled"]))

    def _full_sample_all(self, st):  # every row (sticky full path)
        st["sampled"].copy_(self._full_tokens(st))

    def _commit(self, st):
        p = self.params
        tok = torch.where(st["finished"], torch.full_like(st["sampled"], p.pad_token_id), st["sampled"])
        lp = self._logp(st["logits"], st["sampled"])
        lp = torch.where(st["finished"], torch.zeros_like(lp), lp)
        st["out"].index_copy_(1, st["step"][None], tok[:, None])
        st["logps"].index_copy_(1, st["step"][None], lp[:, None])
        # Not torch.isin: for long stop lists it takes a sort-based path that cannot be captured in a CUDA graph.
        st["finished"].copy_(st["finished"] | (tok[:, None] == st["eos"][None, :]).any(dim=-1))
        st["flags"][0] = st["finished"].all()
        st["tok"].copy_(tok)
        st["step"].add_(1)
        st["slot"].add_(1)

    def _parts(self):
        return {"forward": self._forward, "prefilter": self._prefilter_sample, "full": self._full_sample,
                "full_all": self._full_sample_all, "commit": self._commit}

    def _sample_and_commit(self, st, run):
        """Sample the next token from st["logits"] by the cheapest exact path, then commit it."""
        if st["sticky_full"] > 0:
            st["sticky_full"] -= 1
            run("full_all")
            self.stats["full_path_steps"] += 1
            self.stats["prefilter_skipped_steps"] += 1
        else:
            run("prefilter")
            if bool(st["flags"][1]):
                run("full")
                self.stats["full_path_steps"] += 1
                st["sticky_full"] = STICKY_FULL_STEPS
        run("commit")

    def _decode_step(self, st):
        try:
            return self._decode_step_inner(st)
        except Exception as exc:  # noqa: BLE001
            if self.decoder is None or self.decoder.compiled is None:
                raise
            # Layer 0's compiled half fails on its first call, before any state changed (or after writing this
            # step's K/V, which the retry writes again identically); _capture restores what its warm-up touched.
            self._drop_compile(exc)
            return self._decode_step_inner(st)

    def _decode_step_inner(self, st):
        if self.cuda_graphs:
            if st["graphs"] is None:
                self._capture(st)
            graphs = st["graphs"]

            def run(name):
                graphs[name].replay()
        else:
            parts = self._parts()

            def run(name):
                parts[name](st)
        run("forward")
        self._sample_and_commit(st, run)

    def _capture(self, st):
        """Capture each part of a decoding step as a CUDA graph (after a warm-up on a side stream).

        The warm-up and capture run on scratch copies of the mutable state so that the real sequence state is
        untouched; the graphs then read and write the persistent buffers.
        """
        t0 = time.perf_counter()
        saved = {k: st[k].clone() for k in ("cache", "tok", "slot", "step", "finished", "out", "logps", "logits",
                                               "sampled", "need_full", "flags")}
        parts = self._parts()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # the first call also compiles (compile_decode): never inside a capture
                    for fn in parts.values():
                        fn(st)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graphs = {}
            pool = torch.cuda.graph_pool_handle()
            for name, fn in parts.items():
                g = torch.cuda.CUDAGraph()
                if self.generator is not None:
                    if not hasattr(g, "register_generator_state"):
                        raise UnsupportedForFastRollout("a seeded generator needs torch with register_generator_state")
                    g.register_generator_state(self.generator)  # a private generator must advance on replay
                with torch.cuda.graph(g, pool=pool):
                    fn(st)
                graphs[name] = g
            st["graphs"] = graphs
        finally:
            torch.cuda.synchronize(self.device)
            for k, v in saved.items():
                st[k].copy_(v)
        torch.cuda.synchronize(self.device)
        self.stats["captures"] += 1
        self.stats.setdefault("capture_s", 0.0)
        self.stats["capture_s"] += time.perf_counter() - t0


PREFILL_ROWS = 16  # sequences per prefill forward (bounds its activation memory)
STICKY_FULL_STEPS = 16  # after the prefilter fails, this many steps take the full path directly
COMPILE_BACKEND = "inductor"  # torch.compile backend of compile_decode (tests use "aot_eager": no C/Triton build)


def _compile_available(device: torch.device) -> bool:
    """compile_decode's default: CUDA with Triton (inductor's GPU code generator) and a torch that compiles."""
    if device.type != "cuda" or not hasattr(torch, "compile"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cut_after_eos(row: list[int], eos_ids) -> list[int]:
    """Keep tokens up to and including the first EOS (TRL's completion mask)."""
    eos = set(eos_ids)
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        temperature: float = 1.0, batch_size: int = 8) -> list[list[float]]:
    """Per-token log-probs of completions under ``model`` (logits / temperature), as GRPOTrainer computes them.

    Used to measure the sampler/trainer mismatch: mean |logp_sampler - logp_trainer| per token.

    Example:
        >>> completion_logprobs(model, [[1, 2]], [[3, 4]])  # doctest: +SKIP
        [[-5.71, -5.69]]
    """
    device = next(_unwrap(model).parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompt_ids), batch_size):
            ps, cs = prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size]
            width = max(len(p) + len(c) for p, c in zip(ps, cs))
            ids = torch.zeros(len(ps), width, dtype=torch.long)
            mask = torch.zeros(len(ps), width, dtype=torch.long)
            for r, (p, c) in enumerate(zip(ps, cs)):
                seq = p + c
                ids[r, width - len(seq):] = torch.tensor(seq)  # left padding, as TRL does
                mask[r, width - len(seq):] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float() / temperature
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids.to(device)[:, 1:, None])[..., 0]
            for r, c in enumerate(cs):
                out.append(logp[r, width - 1 - len(c):].tolist() if c else [])
    return out


def logprob_mismatch(sampler: list[list[float]], trainer: list[list[float]]) -> dict:
    """Mean and max |logp_sampler - logp_trainer| per completion token.

    Example:
        >>> logprob_mismatch([[-1.0, -2.0]], [[-1.5, -2.0]])
        {'mean_abs': 0.25, 'max_abs': 0.5, 'tokens': 2}
    """
    diffs = [abs(a - b) for s, t in zip(sampler, trainer) for a, b in zip(s, t)]
    if not diffs:
        return {"mean_abs": math.nan, "max_abs": math.nan, "tokens": 0}
    return {"mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs), "tokens": len(diffs)}
