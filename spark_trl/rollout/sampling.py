"""The sampler's side of TRL's sampling: its settings and the warpers of transformers' ``generate``.

Sampling semantics are those of TRL's transformers path: the warpers of ``GenerationConfig`` in their order
(temperature, top-k, top-p, min-p), one sample per prompt. The warpers and samplers below are graph-capturable, so
that a decoding step's sampling replays in CUDA graphs with its forward (see :mod:`spark_trl.rollout.steps`).

Top-p is exact: a top-k prefilter decides the nucleus whenever the kept mass reaches ``top_p`` (exact, since every
token outside it then has at least ``top_p`` mass above it), else the exact full-vocabulary path runs (a sort as in
``transformers``' ``TopPLogitsWarper``, or a bisection on the probability threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# generation_kwargs that the engine honours (or that do not change sampling); anything else falls back.
_KNOWN_GENERATION_KEYS = {
    "max_new_tokens", "do_sample", "pad_token_id", "bos_token_id", "eos_token_id", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "cache_implementation", "use_cache", "disable_compile", "return_dict_in_generate",
    "output_scores", "output_logits",
}


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


# The warpers of transformers' generate, in its order: temperature -> top-k -> top-p -> min-p.

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

    A GPU scan over a few very long rows (32 x 151,936) parallelises poorly; as R*V/block short rows plus a scan of
    the block totals it has work for every SM. Leading zero padding keeps the prefix sums.
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

