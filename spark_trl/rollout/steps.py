"""The engine's generation loop: prefill, then decoding steps replayed as CUDA graphs over a named state.

One decoding step = forward -> sample -> commit (finished flags, output buffers, next input). All of its state lives
in the device tensors of a :class:`DecodeState`, so each part replays as a CUDA graph without host work. Sampling
takes one of two exact paths: the top-k prefilter (cheap; the host then reads one flag to learn whether a row needs
the full vocabulary) or the full-vocabulary path. After a step where the prefilter did not suffice, the next
``STICKY_FULL_STEPS`` steps go straight to the full path: flat distributions (random weights, early training, high
temperature) make the prefilter fail step after step, and then it is wasted work.

EOS semantics are TRL's: generation stops at any of TRL's EOS ids (tokenizer EOS plus the model's
``generation_config.eos_token_id``), the EOS is included and everything after it cut, at most
``max_completion_length`` tokens. The sampler's own log-probs of the sampled tokens (``logits / temperature``,
before truncation, as TRL computes them) are kept so that the sampler/trainer mismatch can be measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .decoder import UnsupportedForFastRollout
from .sampling import _sample_full, _sample_prefilter

# Sequences per prefill forward. The prefill's transient activations grow with rows x prompt length (the MLP's
# alone ~1 GB for 64 x 350 tokens of the 3B model), the decoding steps' do not: 16 rows bound the prefill to a
# quarter of a 64-row chunk's.
PREFILL_ROWS = 16
# Steps that skip the prefilter after it failed. Not a tuned value: short next to a 512-token completion, so a
# distribution that sharpens again soon gets the cheap path back, and long enough that a flat stretch stops paying
# for a failing prefilter on every step.
STICKY_FULL_STEPS = 16
# Each new (batch, cache length) shape costs a capture of new CUDA graphs: rounding the batch up to a multiple of 8
# and the prompt width to a multiple of 64 lets chunks of similar sizes share graphs (padding rows and columns cost
# a little compute, a capture costs ~0.1 s).
BATCH_BUCKET = 8
PROMPT_BUCKET = 64
# The two slots of DecodeState.flags: one device tensor, so that a step's questions to the host are one small read.
FLAG_ALL_FINISHED = 0
FLAG_NEED_FULL = 1


@dataclass(eq=False)
class DecodeState:
    """The device buffers of one chunk's generation: what the captured graphs of a decoding step read and write.

    B rows (the chunk, padded to the batch bucket), S cache slots (prompt width + ``max_new_tokens``). Every tensor
    is allocated once per shape and updated in place, because a CUDA graph replays on the addresses it captured.
    """

    key: tuple[int, int]
    """(B, S) these buffers were sized for: a chunk of another shape gets a new state (and new graphs)."""
    cache: torch.Tensor
    """[layers, 2, B, KV heads, S, head_dim] the static KV cache (K then V), written in place by every forward."""
    tok: torch.Tensor
    """[B] each row's last committed token: the input of the next decoding step's forward."""
    slot: torch.Tensor
    """Scalar: the cache slot ``tok`` is written to next; on the device so that a replayed step advances it."""
    step: torch.Tensor
    """Scalar: the output column the next commit writes (tokens committed so far), on the device like ``slot``."""
    npad: torch.Tensor
    """[B] left padding of each row's prompt: positions are ``slot - npad`` and slots below ``npad`` are masked."""
    finished: torch.Tensor
    """[B] rows that have emitted an EOS (or are bucket padding): they commit pads with log-prob 0 from then on."""
    out: torch.Tensor
    """[B, max_new_tokens] the committed tokens, one column per step; read back once the loop stops."""
    logps: torch.Tensor
    """[B, max_new_tokens] the sampler's log-prob of each committed token, kept to measure the trainer mismatch."""
    logits: torch.Tensor
    """[B, V] fp32 logits of the current step (the prefill's for step 0), read by sampling and commit."""
    sampled: torch.Tensor
    """[B] this step's sample of each row, before commit replaces it by a pad on finished rows."""
    need_full: torch.Tensor
    """[B] rows the prefilter could not decide exactly: the full-vocabulary path resamples them."""
    flags: torch.Tensor
    """[2] bool, indexed by FLAG_ALL_FINISHED (the loop's stop) and FLAG_NEED_FULL (run the full path)."""
    eos: torch.Tensor
    """[n] TRL's stop ids ([-1], which no token matches, when there are none), compared on the device by commit."""
    arange_s: torch.Tensor
    """[S] the slot indices 0..S-1, made once for the key mask of every decoding step."""
    host_flag: torch.Tensor
    """[2] pinned host copies of FLAG_ALL_FINISHED, alternating by step, so the host reads one a step late."""
    graphs: dict | None = None
    """The captured CUDA graph of each step part, by part name; None before capture or after compile is dropped."""
    sticky_full: int = 0
    """Host counter: decoding steps left that go straight to the full path (see STICKY_FULL_STEPS)."""


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _cut_after_eos(row: list[int], eos_ids) -> list[int]:
    """Keep tokens up to and including the first EOS (TRL's completion mask)."""
    eos = set(eos_ids)
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


class _DecodingLoop:
    """The generation loop of :class:`~spark_trl.rollout.engine.FastRolloutEngine`, as a mixin of it.

    Uses the engine's ``params``, ``decoder``, ``device``, ``cuda_graphs``, ``generator``, ``top_p_method``,
    ``prefilter_k``, ``stats`` and ``_drop_compile``; keeps the current :class:`DecodeState` in ``_decode_state``.
    """

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
        """At most ``max_batch_size`` prompts -> (completions cut after their EOS, the sampler's log-probs)."""
        p, dec = self.params, self.decoder
        n = len(prompts)
        B = _round_up(n, BATCH_BUCKET) if self.cuda_graphs else n
        P = _round_up(max(len(x) for x in prompts), PROMPT_BUCKET if self.cuda_graphs else 1)
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
        st.cache.zero_()
        st.npad.copy_(npad)
        arange_s = torch.arange(S, device=dev)
        key_valid = (arange_s[None, :] >= npad[:, None]) & (arange_s[None, :] < P)
        positions = (torch.arange(P, device=dev)[None, :] - npad[:, None]).clamp(min=0)
        zero = torch.tensor(0, device=dev)
        for r in range(0, B, PREFILL_ROWS):
            rows = slice(r, min(B, r + PREFILL_ROWS))
            st.logits[rows].copy_(dec.forward(ids[rows], positions[rows], st.cache[:, :, rows], zero,
                                              key_valid[rows]))
        # Step 0 samples from the prefill's logits; later steps run "decode" (forward of the last token + sample).
        st.slot.fill_(P - 1)  # commit advances it: the first sampled token goes to slot P
        st.step.zero_()
        st.finished.zero_()
        st.finished[n:] = True  # bucket padding rows: never hold up the "all finished" stop
        st.out.fill_(p.pad_token_id)
        st.logps.zero_()
        st.sticky_full = 0
        parts = self._parts()
        self._sample_and_commit(st, lambda name: parts[name](st))  # eager: the graphs are for decoding steps
        eos = st.eos
        steps = 1
        # With CUDA graphs the host reads "every sequence has finished" one step late, from a pinned copy, so that
        # the next step is already queued when it waits and the GPU does not idle between steps. The price is one
        # spare step at the end, whose tokens (pads after EOS) are cut below.
        lagged = self.cuda_graphs
        pending = None  # (event, host slot) of the last launched step's flag
        done = bool(st.flags[FLAG_ALL_FINISHED])
        while steps < p.max_new_tokens and not done:
            self._decode_step(st)
            steps += 1
            if not lagged:
                done = bool(st.flags[FLAG_ALL_FINISHED])
                continue
            if pending is not None:
                pending[0].synchronize()
                done = bool(st.host_flag[pending[1]])
            slot = steps % 2
            st.host_flag[slot].copy_(st.flags[FLAG_ALL_FINISHED], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending = (event, slot)
        self.stats["steps"] += steps
        k = steps
        out = st.out[:n, :k].tolist()
        logps = st.logps[:n, :k].tolist()
        eos_list = eos.tolist()
        comps, lps = [], []
        for row, lp in zip(out, logps):
            c = _cut_after_eos(row, eos_list)
            comps.append(c)
            lps.append(lp[:len(c)])
        return comps, lps

    def _state(self, B, S) -> DecodeState:
        """The buffers for B rows of S cache slots: reused (with their captured graphs) while the shape repeats."""
        key = (B, S)
        if self._decode_state is not None and self._decode_state.key == key:
            return self._decode_state
        self._decode_state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dev, p = self.device, self.params
        st = DecodeState(
            key=key,
            cache=self.decoder.new_cache(B, S),
            tok=torch.zeros(B, dtype=torch.long, device=dev),
            slot=torch.zeros((), dtype=torch.long, device=dev),
            step=torch.zeros((), dtype=torch.long, device=dev),
            npad=torch.zeros(B, dtype=torch.long, device=dev),
            finished=torch.zeros(B, dtype=torch.bool, device=dev),
            out=torch.zeros(B, p.max_new_tokens, dtype=torch.long, device=dev),
            logps=torch.zeros(B, p.max_new_tokens, dtype=torch.float32, device=dev),
            logits=torch.zeros(B, self.decoder.vocab_size, dtype=torch.float32, device=dev),
            sampled=torch.zeros(B, dtype=torch.long, device=dev),
            need_full=torch.zeros(B, dtype=torch.bool, device=dev),
            flags=torch.zeros(2, dtype=torch.bool, device=dev),
            eos=torch.tensor(p.eos_token_ids or [-1], dtype=torch.long, device=dev),
            arange_s=torch.arange(S, device=dev),
            host_flag=torch.zeros(2, dtype=torch.bool, pin_memory=dev.type == "cuda"),
        )
        self._decode_state = st
        return st

    # The parts of a decoding step (see the module docstring); each reads and writes only the state's tensors.
    def _forward(self, st):
        pos = (st.slot - st.npad)[:, None]
        key_valid = (st.arange_s[None, :] >= st.npad[:, None]) & (st.arange_s[None, :] <= st.slot)
        logits = self.decoder.forward(st.tok[:, None], pos, st.cache, st.slot[None], key_valid)
        st.logits.copy_(logits)

    def _prefilter_sample(self, st):
        tok, need_full = self._sample(st.logits)
        st.sampled.copy_(tok)
        if need_full is not None:
            st.need_full.copy_(~need_full & ~st.finished)
        else:
            st.need_full.zero_()
        st.flags[FLAG_NEED_FULL] = st.need_full.any()

    def _full_tokens(self, st):
        # The exact full-vocabulary path sorts unless bisection was asked for: on the GPU a segmented sort of the
        # logits beat the 31-step bisection (docs/benchmarks.md).
        method = "bisect" if self.top_p_method == "bisect" else "sort"
        return _sample_full(st.logits, self.params, method, self.generator)

    def _full_sample(self, st):  # the rows the prefilter could not decide
        st.sampled.copy_(torch.where(st.need_full, self._full_tokens(st), st.sampled))

    def _full_sample_all(self, st):  # every row (sticky full path)
        st.sampled.copy_(self._full_tokens(st))

    def _commit(self, st):
        p = self.params
        tok = torch.where(st.finished, torch.full_like(st.sampled, p.pad_token_id), st.sampled)
        lp = self._logp(st.logits, st.sampled)
        lp = torch.where(st.finished, torch.zeros_like(lp), lp)
        st.out.index_copy_(1, st.step[None], tok[:, None])
        st.logps.index_copy_(1, st.step[None], lp[:, None])
        # Not torch.isin: for long stop lists it takes a sort-based path that cannot be captured in a CUDA graph.
        st.finished.copy_(st.finished | (tok[:, None] == st.eos[None, :]).any(dim=-1))
        st.flags[FLAG_ALL_FINISHED] = st.finished.all()
        st.tok.copy_(tok)
        st.step.add_(1)
        st.slot.add_(1)

    def _parts(self):
        return {"forward": self._forward, "prefilter": self._prefilter_sample, "full": self._full_sample,
                "full_all": self._full_sample_all, "commit": self._commit}

    def _sample_and_commit(self, st, run):
        """Sample the next token from st.logits by the cheapest exact path, then commit it."""
        if st.sticky_full > 0:
            st.sticky_full -= 1
            run("full_all")
            self.stats["full_path_steps"] += 1
            self.stats["prefilter_skipped_steps"] += 1
        else:
            run("prefilter")
            if bool(st.flags[FLAG_NEED_FULL]):
                run("full")
                self.stats["full_path_steps"] += 1
                st.sticky_full = STICKY_FULL_STEPS
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
            if st.graphs is None:
                self._capture(st)
            graphs = st.graphs

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

        The warm-up and the capture write the state's buffers; what they wrote is restored afterwards from copies,
        so the sequences' state is as before. The graphs then read and write those persistent buffers.
        """
        t0 = time.perf_counter()
        saved = {k: getattr(st, k).clone() for k in ("cache", "tok", "slot", "step", "finished", "out", "logps",
                                                        "logits", "sampled", "need_full", "flags")}
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
            st.graphs = graphs
        finally:
            torch.cuda.synchronize(self.device)
            for k, v in saved.items():
                getattr(st, k).copy_(v)
        torch.cuda.synchronize(self.device)
        self.stats["captures"] += 1
        self.stats.setdefault("capture_s", 0.0)
        self.stats["capture_s"] += time.perf_counter() - t0
