"""FastRolloutEngine on CPU: same distribution as transformers' sampling, same log-probs as the training model,
TRL's EOS semantics, weight sync after a LoRA update, safe fallback. (Speed is measured in benchmarks/.)"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from spark_trl.rollout import (FastRolloutEngine, SamplingParams, completion_logprobs, logprob_mismatch,
                               prefilter_probs, sorted_weights, warp_logits)
from spark_trl.rollout.sampling import _cumsum_rows, _sample_full, _sample_prefilter


def _args(**kw):
    base = dict(max_completion_length=12, temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                generation_kwargs=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _hf_warp(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=None):
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p))
    return procs(None, logits.clone())


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in ("def add(a, b):", "assert is_even(4) is True\nimport math", "x")]
    return model, tok, prompts


# ------------------------------------------------------------------------------------------------ sampling math

@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(top_p=0.5, temperature=0.3), dict(top_k=7, top_p=0.8),
                                      dict(top_p=0.95, min_p=0.05), dict(temperature=0.2, top_p=0.95, top_k=50)])
@pytest.mark.parametrize("method", ["bisect", "sort"])
def test_warp_logits_keeps_exactly_the_tokens_transformers_keeps(settings, method):
    g = torch.Generator().manual_seed(0)
    # Rows from flat to very peaked: the nucleus goes from most of the vocabulary to one token.
    logits = torch.randn(64, 500, generator=g) * torch.logspace(-1, 1.3, 64)[:, None]
    ours = warp_logits(logits, SamplingParams(**settings), top_p_method=method)
    ref = _hf_warp(logits, **settings)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert kept.sum(-1).min() >= 1 and kept.sum(-1).max() > 4 * kept.sum(-1).min()  # flat and peaked rows
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(ref, -1))


@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(top_p=0.5, temperature=0.3), dict(top_k=7, top_p=0.8),
                                      dict(top_p=0.95, min_p=0.05), dict(temperature=0.2, top_p=0.95, top_k=50)])
def test_sorted_weights_are_the_warped_distribution_in_sorted_order(settings):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 500, generator=g) * torch.logspace(-1, 1.3, 64)[:, None]
    ids, w = sorted_weights(logits, SamplingParams(**settings))
    assert torch.equal(ids.sort(-1).values, torch.arange(500).expand(64, -1))  # a permutation of the vocabulary
    dense = torch.zeros_like(logits).scatter(-1, ids, w)
    ref = torch.softmax(_hf_warp(logits, **settings), -1)
    assert torch.equal(dense > 0, ref > 0)
    torch.testing.assert_close(dense / dense.sum(-1, keepdim=True), ref)


@pytest.mark.parametrize("shape", [(3, 1), (2, 128), (5, 129), (4, 1000)])
def test_blocked_cumsum_equals_cumsum(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(_cumsum_rows(x, block=16), x.cumsum(-1))


@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(top_p=0.95, temperature=0.2), dict(top_k=5, top_p=1.0),
                                      dict(top_p=0.9, min_p=0.1)])
def test_prefilter_is_exact_where_it_claims_and_flags_the_rest(settings):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 400, generator=g) * torch.logspace(-1, 1.3, 64)[:, None]
    params = SamplingParams(**settings)
    idx, probs, exact = prefilter_probs(logits, params, k=16)
    ref = torch.softmax(_hf_warp(logits, **settings), -1)
    dense = torch.zeros_like(ref).scatter(-1, idx, probs)
    dense = dense / dense.sum(-1, keepdim=True)  # the candidates' weights are not renormalised (sampling needn't)
    assert exact.any()
    torch.testing.assert_close(dense[exact], ref[exact])
    if "top_k" not in settings:
        assert not exact.all()  # flat rows must go to the full path
    if "top_k" not in settings and "min_p" not in settings:  # (min_p can cut more: the flag is conservative)
        # A row flagged inexact really has nucleus mass outside the 16 candidates.
        outside = ref[~exact].clone().scatter_(-1, idx[~exact], 0.0).sum(-1)
        assert (outside > 0).all()


@pytest.mark.parametrize("path", ["bisect", "sort", "prefilter"])
def test_sampled_frequencies_match_the_warped_distribution(path):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -3.0, -4.0]])
    params = SamplingParams(temperature=0.8, top_p=0.9)
    ref = torch.softmax(_hf_warp(logits, temperature=0.8, top_p=0.9), -1)[0]
    n = 40000
    big = logits.expand(n, -1).contiguous()
    torch.manual_seed(0)
    if path != "prefilter":
        draws = _sample_full(big, params, path)
    else:
        draws, exact = _sample_prefilter(big, params, k=6)
        assert exact.all()
    freq = torch.bincount(draws, minlength=8).float() / n
    assert freq[ref == 0].sum() == 0  # never a token outside the nucleus
    assert (freq - ref).abs().max() < 0.01


def test_sampling_params_read_trl_config_and_reject_bad_values():
    from trl import GRPOConfig

    cfg = GRPOConfig(output_dir="unused", bf16=False, use_cpu=True, temperature=0.7, top_p=0.9, max_completion_length=33,
                     generation_kwargs={"top_k": 20})
    p = SamplingParams.from_args(cfg, eos_token_ids=[5], pad_token_id=0)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.eos_token_ids) == (0.7, 0.9, 20, 33, [5])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_args(_args(top_p=0.0), [5], 0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_args(_args(temperature=0.0), [5], 0)
    assert SamplingParams.from_args(_args(generation_kwargs={"stop_strings": ["\n"]}), [5], 0).unsupported


# ------------------------------------------------------------------------------------------------ the engine

def test_sampler_logprobs_equal_the_models_on_padded_batches(tiny):
    """The decoder (prefill, KV cache, left padding, positions) computes the model's own distribution."""
    model, tok, prompts = tiny
    engine = FastRolloutEngine(model, tok, _args(top_p=0.9, max_completion_length=16), fallback=False)
    comps = engine.generate(prompts)
    assert engine.active and len(comps) == 3 and all(1 <= len(c) <= 16 for c in comps)
    ref = completion_logprobs(model, prompts, comps)
    m = logprob_mismatch(engine.last_logprobs, ref)
    assert m["tokens"] == sum(map(len, comps)) and m["max_abs"] < 1e-4


def test_greedy_equals_transformers_generate(tiny):
    model, tok, prompts = tiny
    args = _args(max_completion_length=10, generation_kwargs={"do_sample": False})
    engine = FastRolloutEngine(model, tok, args, fallback=False)
    assert engine.generate(prompts) == engine._generate_plain(prompts)


def test_eos_is_kept_and_everything_after_it_cut(tiny):
    model, tok, prompts = tiny
    # Half of the vocabulary counts as a stop token: most completions stop early.
    stops = list(range(0, len(tok), 2))
    engine = FastRolloutEngine(model, tok, _args(max_completion_length=30, generation_kwargs={"eos_token_id": stops}),
                               fallback=False)
    assert engine.params.eos_token_ids == stops
    comps = engine.generate(prompts * 4)
    stopped = [c for c in comps if c[-1] in stops]
    assert stopped and all(len(c) < 30 for c in stopped)
    for c in comps:
        assert all(t not in stops for t in c[:-1])  # a stop token can only be the last one
        assert c[-1] in stops or len(c) == 30
    assert engine.stats["steps"] < 30 * 2  # the loop stops once every sequence has finished


def test_eos_ids_are_trls(tiny):
    model, tok, _ = tiny
    engine = FastRolloutEngine(model, tok, _args(), fallback=False)
    assert engine.params.eos_token_ids[0] == tok.eos_token_id
    assert engine.params.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("lora_mode", ["separate", "merge"])
def test_sync_weights_follows_a_lora_update(tiny, lora_mode):
    from peft import get_peft_model

    from spark_trl.models import lora_config

    base, tok, prompts = tiny
    import copy

    model = get_peft_model(copy.deepcopy(base), lora_config(dropout=0.0)).eval()
    engine = FastRolloutEngine(model, tok, _args(max_completion_length=8), lora_mode=lora_mode, fallback=False)
    comps = engine.generate(prompts)
    assert logprob_mismatch(engine.last_logprobs, completion_logprobs(model, prompts, comps))["max_abs"] < 1e-4
    # An "optimizer step": LoRA B leaves zero. Before the sync the sampler still samples the old policy.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    torch.manual_seed(3)
    comps = engine.generate(prompts)
    stale = logprob_mismatch(engine.last_logprobs, completion_logprobs(model, prompts, comps))
    assert stale["mean_abs"] > 1e-2
    engine.sync_weights(model)
    comps = engine.generate(prompts)
    fresh = logprob_mismatch(engine.last_logprobs, completion_logprobs(model, prompts, comps))
    assert fresh["max_abs"] < 1e-4


def test_4bit_base_is_dequantized_as_the_training_model_computes(tiny_model_path):
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from spark_trl.models import lora_config

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=q, dtype=torch.float32)
    model = get_peft_model(model, lora_config(dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [tok("def add(a, b):")["input_ids"], tok("x = 1")["input_ids"]]
    engine = FastRolloutEngine(model, tok, _args(max_completion_length=8), fallback=False)
    comps = engine.generate(prompts)
    m = logprob_mismatch(engine.last_logprobs, completion_logprobs(model, prompts, comps))
    assert m["max_abs"] < 1e-3


def test_unsupported_settings_fall_back_to_plain_generate_with_one_warning(tiny):
    model, tok, prompts = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = FastRolloutEngine(model, tok, _args(repetition_penalty=1.3, max_completion_length=6))
        first = engine.generate(prompts)
        engine.generate(prompts)
    assert not engine.active and "repetition_penalty" in engine.fallback_reason
    assert sum("falls back" in str(w.message) for w in caught) == 1
    assert len(first) == 3 and all(1 <= len(c) <= 6 for c in first)
    assert engine.stats["fallback_calls"] == 2
    with pytest.raises(Exception):
        FastRolloutEngine(model, tok, _args(repetition_penalty=1.3), fallback=False)


def test_bad_input_is_refused_before_work(tiny):
    model, tok, prompts = tiny
    with pytest.raises(ValueError, match="lora_mode"):
        FastRolloutEngine(model, tok, _args(), lora_mode="fuse")
    with pytest.raises(ValueError, match="top_p_method"):
        FastRolloutEngine(model, tok, _args(), top_p_method="nucleus")
    engine = FastRolloutEngine(model, tok, _args(), fallback=False)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([prompts[0], []])
    assert engine.generate([]) == []


# ------------------------------------------------------------------------------------------------ compile_decode

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decoding_step_samples_the_same_policy(tiny, monkeypatch, backend):
    """compile_decode changes kernels, not the distribution: same greedy tokens and log-probs as the model."""
    import spark_trl.rollout.engine as engine_module

    if backend == "inductor":
        pytest.importorskip("torch._inductor")
    monkeypatch.setattr(engine_module, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    model, tok, prompts = tiny
    args = _args(max_completion_length=8, generation_kwargs={"do_sample": False})
    eager = FastRolloutEngine(model, tok, args, fallback=False, compile_decode=False)
    compiled = FastRolloutEngine(model, tok, args, fallback=False, compile_decode=True)
    assert compiled.decoder.compiled is not None and eager.decoder.compiled is None
    expected = eager.generate(prompts)
    assert compiled.generate(prompts) == expected
    assert compiled.compile_error is None and compiled.decoder.compiled is not None
    m = logprob_mismatch(compiled.last_logprobs, completion_logprobs(model, prompts, expected))
    assert m["max_abs"] < 1e-4
    # Another batch size reuses (or recompiles once) the same compiled halves and still agrees.
    assert compiled.generate(prompts[:2]) == eager.generate(prompts[:2])


def test_a_compile_failure_degrades_to_eager_decoding_not_to_plain_generate(tiny, monkeypatch):
    import spark_trl.rollout.engine as engine_module

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(engine_module, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    model, tok, prompts = tiny
    args = _args(max_completion_length=8, generation_kwargs={"do_sample": False})
    expected = FastRolloutEngine(model, tok, args, fallback=False, compile_decode=False).generate(prompts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = FastRolloutEngine(model, tok, args, compile_decode=True)
        assert engine.generate(prompts) == expected
        assert engine.generate(prompts) == expected
    assert engine.active and engine.stats["fallback_calls"] == 0  # still the fast engine
    assert engine.decoder.compiled is None and "no compiler here" in engine.compile_error
    assert sum("torch.compile'd layers failed" in str(w.message) for w in caught) == 1


def test_compile_decode_defaults_off_on_cpu(tiny):
    model, tok, _ = tiny
    engine = FastRolloutEngine(model, tok, _args(), fallback=False)
    assert engine.compile_decode is False and engine.decoder.compiled is None


def test_a_failing_prefilter_sends_the_next_steps_straight_to_the_full_path(tiny, monkeypatch):
    """Flat distributions (a random tiny model, top_p 0.99 > the mass of its top 4 tokens) make the prefilter fail:
    after each failure STICKY_FULL_STEPS steps skip it, and the samples stay those of the model's distribution."""
    import spark_trl.rollout.steps as steps

    monkeypatch.setattr(steps, "STICKY_FULL_STEPS", 3)
    model, tok, prompts = tiny
    engine = FastRolloutEngine(model, tok, _args(top_p=0.99, max_completion_length=17), prefilter_k=4,
                               fallback=False)
    comps = engine.generate(prompts)
    steps = engine.stats["steps"]
    assert steps == 17 and all(len(c) == 17 or c[-1] in engine.params.eos_token_ids for c in comps)
    # Every step needs the full path; the prefilter runs on steps 0, 4, 8, 12, 16 and is skipped on the others.
    assert engine.stats["full_path_steps"] == steps
    assert engine.stats["prefilter_skipped_steps"] == steps - 5
    m = logprob_mismatch(engine.last_logprobs, completion_logprobs(model, prompts, comps))
    assert m["max_abs"] < 1e-4
    # top_p 0.01: the top 4 of 320 tokens always hold at least 4/320 > 0.01, so the prefilter always decides.
    engine = FastRolloutEngine(model, tok, _args(top_p=0.01, max_completion_length=8), prefilter_k=4, fallback=False)
    engine.generate(prompts)
    assert engine.stats["full_path_steps"] == 0 and engine.stats["prefilter_skipped_steps"] == 0


def test_prefill_in_row_chunks_computes_the_same_distribution(tiny, monkeypatch):
    """PREFILL_ROWS splits the prompt forward over rows (memory); each chunk writes its own rows of the KV cache."""
    import spark_trl.rollout.steps as steps

    monkeypatch.setattr(steps, "PREFILL_ROWS", 2)
    model, tok, prompts = tiny
    engine = FastRolloutEngine(model, tok, _args(top_p=0.9, max_completion_length=6), fallback=False)
    many = prompts * 2 + [prompts[0][:2]]  # 7 rows of three widths: chunks of 2, 2, 2, 1
    comps = engine.generate(many)
    m = logprob_mismatch(engine.last_logprobs, completion_logprobs(model, many, comps))
    assert m["tokens"] == sum(map(len, comps)) and m["max_abs"] < 1e-4
    greedy = _args(max_completion_length=6, generation_kwargs={"do_sample": False})
    chunked = FastRolloutEngine(model, tok, greedy, fallback=False)
    assert chunked.generate(many) == chunked._generate_plain(many)
