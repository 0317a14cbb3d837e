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

The package, in the order a reader needs it:

* :mod:`~spark_trl.rollout.sampling`: :class:`SamplingParams` and the warpers (temperature, top-k, exact top-p,
  min-p) as graph-capturable tensor code;
* :mod:`~spark_trl.rollout.decoder`: the dense Llama/Qwen2 decoder over the static KV cache and its weights
  (dequantized base, LoRA factors);
* :mod:`~spark_trl.rollout.steps`: the generation loop: prefill, the decoding step's parts over a
  :class:`DecodeState`, their CUDA graph capture;
* :mod:`~spark_trl.rollout.engine`: :class:`FastRolloutEngine` (weight sync, evaluation settings, fallback);
* :mod:`~spark_trl.rollout.diagnostics`: the sampler/trainer log-prob mismatch.

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

from .decoder import SUPPORTED_MODEL_TYPES, UnsupportedForFastRollout
from .diagnostics import completion_logprobs, logprob_mismatch
from .engine import FastRolloutEngine, default_dtype
from .sampling import SamplingParams, prefilter_probs, sorted_weights, warp_logits
from .steps import DecodeState

__all__ = [
    "DecodeState", "FastRolloutEngine", "SUPPORTED_MODEL_TYPES", "SamplingParams", "UnsupportedForFastRollout",
    "completion_logprobs", "default_dtype", "logprob_mismatch", "prefilter_probs", "sorted_weights", "warp_logits",
]
