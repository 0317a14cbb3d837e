"""FastRolloutEngine: the public face of fast rollouts, its weight sync and its fallback to ``model.generate``.

The engine builds the dense decoder (:mod:`spark_trl.rollout.decoder`) from the training model, refreshes it after
each optimizer step (:meth:`FastRolloutEngine.sync_weights`) and generates through the decoding loop of
:mod:`spark_trl.rollout.steps`. Anything it does not support (other architectures, sliding-window attention,
repetition penalty, DoRA, unknown ``generation_kwargs`` ...) or any error at run time falls back to plain
``model.generate`` with a warning, once; a failing ``torch.compile`` only costs the compiled layers.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager

import torch

from .decoder import UnsupportedForFastRollout, _base_layer, _DenseDecoder, _FusedLinear, _unwrap
from .sampling import SamplingParams
from .steps import _cut_after_eos, _DecodingLoop

logger = logging.getLogger(__name__)

# torch.compile backend of compile_decode: inductor is the one that generates the fused (Triton) kernels the
# compiled layer halves are for. Tests set "aot_eager", which needs no C/Triton build.
COMPILE_BACKEND = "inductor"


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs (T4), fp32 on CPU.

    Example:
        >>> default_dtype(torch.device("cpu"))
        torch.float32
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _compile_available(device: torch.device) -> bool:
    """compile_decode's default: CUDA with Triton (inductor's GPU code generator) and a torch that compiles."""
    if device.type != "cuda" or not hasattr(torch, "compile"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FastRolloutEngine(_DecodingLoop):
    """Fast sampling of GRPO completions from the current policy (see :mod:`spark_trl.rollout`).

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
        self._decode_state = None
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
            self._decode_state = None
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
        self.params, self._decode_state = params, None
        self._extra_generation_kwargs = dict(getattr(args, "generation_kwargs", None) or {})
        self.max_batch_size = max_batch_size or self.max_batch_size
        try:
            yield self
        finally:
            self.params, self._extra_generation_kwargs, self.max_batch_size = saved
            self._decode_state = None

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
        if self._decode_state is not None:
            self._decode_state.graphs = None

    def _fail(self, exc: Exception):
        if not self.allow_fallback:
            raise exc
        self.fallback_reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"FastRolloutEngine falls back to plain model.generate: {self.fallback_reason}",
                      RuntimeWarning, stacklevel=3)
        logger.warning("FastRolloutEngine disabled: %s", self.fallback_reason)
        self.decoder = None
        self._decode_state = None

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
