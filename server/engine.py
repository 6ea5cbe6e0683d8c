"""Continuous-batching engine: a background thread that admits sequences into KV-cache slots between decode
steps, decodes all running sequences in one forward, and hands each token to a per-sequence callback (a step's
outputs together once the step is done, through `deliver`). It knows token ids, text and timings; nothing of HTTP.

Prompts are prefilled in chunks under a per-step token budget (max_prefill_tokens, like vLLM's
max_num_batched_tokens): each step prefills at most that many prompt tokens, oldest admitted first (but see the
helper below), and decodes every running sequence, so a long prompt arriving delays the running streams by one
chunk per step rather than by its whole prefill. With the native CPU step the chunks ride in the decode step's own call, as
more rows (vLLM's mixed batches); otherwise each chunk is a prefill call before the decode call. (Prompts asking
for prompt logprobs are prefilled whole.)

A prompt longer than the budget that arrives while streams are decoding is prefilled *beside* them
(prefill_beside, with the native step and two or more threads): a helper thread runs its chunks while the engine
thread goes on decoding, the cores split between the two (on 2 cores one each), so the streams slow to the
one-thread step instead of waiting for each chunk (benchmarks/prefill_stall.py on 2 cores, a 512-token prompt
beside 15 streams: first token in 0.71–1.02 s, median 0.83, the streams' worst gap 1.6–2.6 decode steps; in-step
chunks of 16 tokens 1.06–1.11 s and 2.0–2.3 steps; docs/RESULTS.md). The results are the same either way (every
row is computed the same whatever the batch and threads). A second long prompt that arrives while the helper holds
one, with streams decoding, waits for the helper rather than riding in the steps: on the engine thread's half of
the cores its chunks would stall the streams for several steps each.

KV-cache blocks (server/kv_cache.py) are taken when a sequence is admitted (its whole prompt and the first
generated position) and as it grows; a sequence waits in the queue until those blocks are free. When a running
sequence needs a block and none is free, the sequence that arrived last is preempted (like vLLM's recompute
preemption): its blocks and row are freed and it goes back to the head of the queue, to prefill its prompt and
the tokens it has generated again once blocks are free, then go on where it stopped. The oldest sequence is never preempted for a younger one, and
the pool holds at least one sequence of max_model_len (runtime check), so every sequence finishes."""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .batched_llama import BatchedLlama
from .detokenizer import IncrementalDetokenizer
from .sampling import SampledToken, SamplingParams, make_generator, sample, top_logprobs
from .stats import EngineSnapshot, RequestStats

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue cannot take the sequences of this request."""


@dataclass(frozen=True)
class SeqOutput:
    """What one engine step produced for one sequence."""
    token: Optional[SampledToken]        # None when the sequence ended without a new token (abort, error)
    text: str                            # text safe to show now (stop strings held back until resolved)
    finish_reason: Optional[str] = None  # stop | length | abort | error, on the last output only
    prompt_logprobs: Optional[list] = None  # first output only: [None, (lp, top), ...] per prompt token
    error: Optional[str] = None


Sink = Callable[[SeqOutput], None]


def deliver_each(items: list[tuple[Sink, SeqOutput]]) -> None:
    """The default delivery of a step's outputs: each to its sink, in order."""
    for sink, out in items:
        try:
            sink(out)
        except Exception:  # the consumer's event loop is gone; the sequence is aborted separately
            logger.debug("dropping an output: its consumer is gone")


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    detok: IncrementalDetokenizer
    arrival: float
    generator: Optional[torch.Generator] = None
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    prefilled: int = 0  # tokens of `target` whose K/V are cached
    target: list[int] = field(default_factory=list)  # what prefill caches: the prompt, and after a preemption
    # the tokens generated before it but the last (the next decode step feeds that one)
    scheduled: float = 0.0
    first_token: Optional[float] = None
    last_token: float = 0.0
    itls: list[float] = field(default_factory=list)


class Engine:
    # Rows (decode batch, prefill chunk) from which a step runs on threads[1] rather than threads[0]: the two
    # counts can differ (--threads, --threads-batch). Before the native decode step one model thread served 1 and 4
    # streaming clients faster than two on 2 cores; since it, two are faster at every load, and both default to
    # all cores (docs/RESULTS.md). The lm_head always runs on threads[1] (one call, one barrier).
    BATCH_ROWS = 8
    # Tokens per call of a prompt prefilled beside the decode steps (larger calls pass over the weights fewer times;
    # the job stops between calls when its sequence is aborted or preempted: an abort parks its blocks until the
    # call in progress ends, a preemption waits for it, ~0.1-0.2 s on one core of the CPU box).
    BESIDE_CHUNK = 128

    def __init__(self, runner: BatchedLlama, tokenizer, max_num_seqs: int, max_queue: int,
                 on_finished: Callable[[RequestStats], None] = lambda stats: None, max_prefill_tokens: int = 64,
                 threads: Optional[tuple[int, int]] = None,
                 deliver: Callable[[list[tuple[Sink, SeqOutput]]], None] = deliver_each,
                 prefill_beside: bool = False):
        """threads: (for small steps, for steps of BATCH_ROWS rows or more), set with torch.set_num_threads by
        the engine thread before each step; None leaves torch's setting alone.
        deliver: hands a step's outputs, (sink, output) in the order made, to their sinks once the step is done
        (server/async_engine.deliver wakes each event loop once per step rather than once per output).
        prefill_beside: long prompts prefilled on a helper thread beside the decode steps (module docstring), where
        the runner has the native step and `threads` gives two or more."""
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if threads is not None and min(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._threads_now = 0
        if threads is not None:  # the lm_head is one large call per step: all threads pay even for one row
            runner.head_threads = threads[1]
        self.runner, self.tokenizer = runner, tokenizer
        self._deliver = deliver
        self._outbox: Optional[list[tuple[Sink, SeqOutput]]] = None  # a step's outputs, delivered at its end
        self.max_prefill_tokens = max_prefill_tokens
        self._prefilling: deque[_Sequence] = deque()  # admitted (slot held), prompt not yet fully cached
        self.max_queue, self.max_model_len = max_queue, runner.max_model_len
        self.on_finished = on_finished
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._aborts: set[int] = set()
        self._running: dict[int, _Sequence] = {}
        self.capacity = max_num_seqs + max_queue  # sequences the engine can hold at once
        self._free_slots = list(range(max_num_seqs))  # a min-heap: the lowest free slot first, so that the
        # running batch stays dense (slots 0 .. n-1 when nothing has left early) and the runner reads the KV
        # cache in place rather than gathering it
        self._ids = itertools.count()
        self.num_preemptions = 0
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        # The prompt being prefilled beside the decode steps: (sequence, its job, the job's cancel flag).
        self._beside: Optional[tuple[_Sequence, Future, threading.Event]] = None
        self._parked: list[tuple[int, Future]] = []  # (slot, job) of ended sequences whose job is still stopping
        self._helper = (ThreadPoolExecutor(1, thread_name_prefix="mamp-prefill")
                        if prefill_beside and runner.mixed_prefill and threads is not None and threads[1] >= 2
                        else None)
        self.num_prefills_beside = 0
        self.num_beside_waits = 0  # times a step passed over a long prompt waiting for the busy helper

    # ---- called from any thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mamp-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], sinks: list[Sink]) -> list[int]:
        """Queues sequences, all or none; returns their ids. Raises QueueFullError."""
        now = time.monotonic()
        with self._cv:
            if len(self._waiting) + len(prompts) > self.max_queue + len(self._free_slots):
                raise QueueFullError(f"the server is busy: {len(self._waiting)} sequences are waiting "
                                     f"(limit {self.max_queue}); retry later")
            seqs = [_Sequence(next(self._ids), list(p), sp, sink,
                              IncrementalDetokenizer(self.tokenizer, p, sp.stop), now)
                    for p, sp, sink in zip(prompts, params, sinks)]
            self._waiting.extend(seqs)
            self._cv.notify()
        return [s.seq_id for s in seqs]

    def abort(self, seq_ids: list[int]) -> None:
        """Cancels sequences (a client went away); their slots are freed before the next step."""
        with self._cv:
            self._aborts.update(seq_ids)
            self._cv.notify()

    def snapshot(self) -> EngineSnapshot:
        cache = self.runner.cache
        used = cache.allocator.num_used
        per_block_16bit = cache.block_size * cache.bytes_per_token_16bit
        return EngineSnapshot(num_running=len(self._running), num_waiting=len(self._waiting),
                              kv_cache_usage_bytes=cache.usage_bytes, kv_cache_capacity_bytes=cache.capacity_bytes,
                              kv_cache_usage_16bit_bytes=used * per_block_16bit,
                              kv_cache_capacity_16bit_bytes=cache.num_blocks * per_block_16bit,
                              kv_cache_blocks_used=used, kv_cache_blocks_free=cache.allocator.num_free,
                              num_preemptions=self.num_preemptions)

    # ---- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # keep serving; the failing sequences were ended inside _step
                logger.exception("engine step failed")
        self._stop_beside()
        if self._helper is not None:
            self._helper.shutdown(wait=True)
        self._release_parked()
        for seq in list(self._running.values()) + list(self._waiting):
            self._finish(seq, "abort", SeqOutput(None, "", "abort"))

    def _step(self) -> None:
        self._outbox = []
        try:
            self._step_inner()
        finally:
            items, self._outbox = self._outbox, None
            if items:
                try:
                    self._deliver(items)
                except Exception:
                    logger.exception("delivering %d outputs failed", len(items))

    def _step_inner(self) -> None:
        with self._cv:
            while not (self._waiting or self._running or self._aborts or self._stopping
                       or (self._parked and self._parked[0][1].done())):
                self._cv.wait()
            if self._stopping:
                return
            aborts, self._aborts = self._aborts, set()
            aborted = [s for s in self._waiting if s.seq_id in aborts]
            self._waiting = deque(s for s in self._waiting if s.seq_id not in aborts)
        aborted += [s for s in self._running.values() if s.seq_id in aborts]
        for seq in aborted:
            self._finish(seq, "abort", SeqOutput(None, "", "abort"))
        self._release_parked()
        cache = self.runner.cache
        free = cache.allocator.num_free
        with self._cv:
            admitted = []
            while self._waiting and self._free_slots:
                seq = self._waiting[0]
                seq.target = seq.prompt_ids + seq.output_ids[:-1]
                # its prompt (and what it generated before a preemption) and the first decode position
                need = cache.blocks_for(len(seq.target) + 1)
                if free < need <= cache.num_blocks and self._admissible(seq):
                    break  # first come, first served: it waits for blocks, and so do those behind it
                free -= need  # (one that _check_prompt refuses, or that no pool could hold, is admitted to be
                # ended there, holding nothing)
                self._waiting.popleft()
                seq.slot = heapq.heappop(self._free_slots)
                admitted.append(seq)
        for seq in admitted:
            self._admit(seq)
        self._collect_beside()
        if not self._decode(self._prefill_chunks()) and self._beside is not None:
            # Only the helper has work (no stream decodes, so nothing waits for it): its next calls take every
            # thread, and this thread waits for it to finish (its done callback notifies) or for a request or
            # abort to arrive.
            self._use_threads(0, helper_alone=True)
            with self._cv:
                if not (self._beside[1].done() or self._aborts or self._stopping):
                    self._cv.wait(timeout=0.05)

    def _admit(self, seq: _Sequence) -> None:
        seq.scheduled = seq.scheduled or time.monotonic()
        seq.prefilled = 0
        self._running[seq.slot] = seq
        try:
            self._check_prompt(seq.prompt_ids)
            self.runner.cache.ensure(seq.slot, len(seq.target) + 1)
            if seq.generator is None:
                seq.generator = make_generator(seq.params.seed, self.runner.device)
        except Exception as exc:  # a bad request must not take the engine down
            logger.exception("admission failed for sequence %d", seq.seq_id)
            self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))
            return
        self._prefilling.append(seq)

    def _prefill_chunks(self) -> list[tuple[_Sequence, int]]:
        """Prefills up to max_prefill_tokens prompt tokens, oldest admitted sequence first (a long prompt that must
        wait for the busy helper is passed over, and stays at the head of the line); a sequence whose
        prompt is complete samples its first token and joins the decode batch. Where the runner takes prompt
        chunks beside the decode rows (BatchedLlama.mixed_prefill), the chunks are returned as (sequence, tokens)
        for the decode step's one call instead (_decode finishes them); prompts asking for prompt logprobs are
        still prefilled here, whole."""
        mixed: list[tuple[_Sequence, int]] = []
        held: list[_Sequence] = []  # long prompts waiting for the helper, back at the head of the line after
        try:
            self._fill_budget(mixed, held)
        finally:  # (an exception must not lose them: they hold rows and blocks)
            self._prefilling.extendleft(reversed(held))
        return mixed

    def _fill_budget(self, mixed: list[tuple[_Sequence, int]], held: list[_Sequence]) -> None:
        """_prefill_chunks' work: the chunks it returns go to `mixed`, the prompts it passes over to `held`."""
        budget = self.max_prefill_tokens
        while budget > 0 and self._prefilling:
            seq = self._prefilling[0]
            if self._running.get(seq.slot) is not seq or seq.prefilled >= len(seq.target):  # ended or preempted
                self._prefilling.popleft()
                continue
            resumed = bool(seq.output_ids)  # after a preemption: its next token is known
            want_prompt = seq.params.prompt_logprobs is not None and not resumed
            left = len(seq.target) - seq.prefilled
            n = left if want_prompt else min(budget, left)  # prompt logprobs need every position's logits
            if left > self.max_prefill_tokens and not want_prompt:
                if self._start_beside(seq):
                    self._prefilling.popleft()
                    continue
                if self._beside is not None and self._streams_decoding():  # the helper is busy: wait for it
                    held.append(self._prefilling.popleft())
                    self.num_beside_waits += 1
                    continue
            if self.runner.mixed_prefill and not want_prompt:
                mixed.append((seq, n))
                budget -= n
                if n == left:  # its last chunk: the next sequence may take the rest of the budget
                    self._prefilling.popleft()
                continue
            try:
                self._use_threads(n)
                logits = self.runner.prefill(seq.slot, seq.target[seq.prefilled:seq.prefilled + n],
                                             all_logits=want_prompt, start=seq.prefilled)
                seq.prefilled += n
                budget -= n
                if seq.prefilled < len(seq.target):
                    continue
                self._prefilling.popleft()
                if resumed:  # back in the decode batch, where it stopped
                    continue
                prompt_lps = self._prompt_logprobs(seq, logits) if want_prompt else None
                if seq.params.max_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                    self._finish(seq, "length", SeqOutput(None, "", "length", prompt_lps))
                    continue
                self._advance(seq, logits[-1] if want_prompt else logits, prompt_lps)
            except Exception as exc:  # a bad request must not take the engine down
                logger.exception("prefill failed for sequence %d", seq.seq_id)
                if self._prefilling and self._prefilling[0] is seq:
                    self._prefilling.popleft()
                self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))

    def _decode(self, chunks: list[tuple[_Sequence, int]] = ()) -> bool:
        """One call for every sequence with a first token (prefill complete; in slot order, see
        BatchedLlama.decode) and the prompt chunks _prefill_chunks left for it (sequence, tokens): their rows
        after the decode rows, logits only where a prompt completes. Returns whether there was a call."""
        seqs = [s for s in self._running.values() if s.output_ids and s.prefilled == len(s.target)]
        seqs = self._grow(seqs)
        seqs.sort(key=lambda s: s.slot)
        chunks = [(s, n) for s, n in chunks if self._running.get(s.slot) is s]  # _grow may have preempted some
        if not seqs and not chunks:
            return False
        slots = [s.slot for s in seqs]
        tokens = [s.output_ids[-1] for s in seqs]
        positions = [len(s.prompt_ids) + len(s.output_ids) - 1 for s in seqs]
        logit_rows = list(range(len(seqs)))
        for seq, n in chunks:
            start = seq.prefilled
            slots += [seq.slot] * n
            tokens += seq.target[start:start + n]
            positions += range(start, start + n)
            if start + n == len(seq.target) and not seq.output_ids:  # its prompt completes: sample the first token
                logit_rows.append(len(slots) - 1)
        try:
            self._use_threads(len(slots))
            logits = self.runner.decode(slots, tokens, positions, logit_rows if chunks else None)
        except Exception as exc:
            everyone = seqs + [s for s, _ in chunks]
            logger.exception("decode step failed; ending %d sequences", len(everyone))
            for seq in everyone:
                self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))
            return True
        for seq, row in zip(seqs, logits):
            try:
                self._advance(seq, row)
            except Exception as exc:
                logger.exception("sampling failed for sequence %d", seq.seq_id)
                self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))
        first = iter(logits[len(seqs):])
        for seq, n in chunks:
            seq.prefilled += n
            if seq.prefilled < len(seq.target) or seq.output_ids:  # more to come, or resumed after a preemption
                continue
            row = next(first)
            try:
                if seq.params.max_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                    self._finish(seq, "length", SeqOutput(None, "", "length", None))
                else:
                    self._advance(seq, row)
            except Exception as exc:
                logger.exception("sampling failed for sequence %d", seq.seq_id)
                self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))
        return True

    # ---- a long prompt prefilled beside the decode steps ---------------------------------------------------
    def _start_beside(self, seq: _Sequence) -> bool:
        """Hands the rest of seq's prompt to the helper thread, if there is one, it is idle and streams are
        decoding (alone, the prompt is better served by the in-step chunks on every thread)."""
        if self._helper is None or self._beside is not None or not self._streams_decoding():
            return False
        if self.runner.cache.blocks_needed(seq.slot, len(seq.target)) > 0:  # admission took them: the helper must
            return False  # not allocate (the pool's lists belong to this thread)
        cancel = threading.Event()
        start, target, slot = seq.prefilled, list(seq.target), seq.slot
        chunk = max(self.max_prefill_tokens, self.BESIDE_CHUNK)
        runner = self.runner

        def job() -> tuple[int, torch.Tensor]:
            pos, logits = start, None
            while pos < len(target) and not cancel.is_set():
                n = min(chunk, len(target) - pos)
                logits = runner.decode([slot] * n, target[pos:pos + n], list(range(pos, pos + n)), [n - 1])
                pos += n
            return pos, logits

        self._beside = (seq, Future(), cancel)  # (a stand-in until submitted: _use_threads reads it)
        self.num_prefills_beside += 1
        try:
            self._use_threads(0)  # both threads on their share of the cores before the job's first call
            future = self._helper.submit(job)
        except RuntimeError:  # the executor is shut down (or torch refused the thread count): the prompt goes in-step
            self.num_prefills_beside -= 1
            self._beside = None
            self._use_threads(0)
            return False
        self._beside = (seq, future, cancel)
        future.add_done_callback(lambda _: self._wake())
        return True

    def _streams_decoding(self) -> bool:
        return any(s.output_ids and s.prefilled == len(s.target) for s in self._running.values())

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _collect_beside(self) -> None:
        """Where the helper's prompt is done: its first token sampled, and it joins the decode batch."""
        if self._beside is None or not self._beside[1].done():
            return
        seq, job, _ = self._beside
        self._beside = None
        try:
            seq.prefilled, logits = job.result()
        except Exception as exc:
            logger.exception("prefill failed for sequence %d", seq.seq_id)
            self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))
            return
        if seq.output_ids:  # resumed after a preemption: its next token is known
            return
        try:
            if seq.params.max_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                self._finish(seq, "length", SeqOutput(None, "", "length", None))
            else:
                self._advance(seq, logits[-1])
        except Exception as exc:
            logger.exception("sampling failed for sequence %d", seq.seq_id)
            self._finish(seq, "error", SeqOutput(None, "", "error", error=str(exc)))

    def _stop_beside(self, seq: Optional[_Sequence] = None) -> None:
        """Stops the helper's job (that of `seq`, or any) at its next chunk and waits for it: its blocks may then
        be freed. What it cached is dropped with them."""
        if self._beside is None or (seq is not None and self._beside[0] is not seq):
            return
        _, job, cancel = self._beside
        self._beside = None
        cancel.set()
        wait([job])

    def _grow(self, seqs: list[_Sequence]) -> list[_Sequence]:
        """Blocks for each decoding sequence's next position, oldest first; where the pool is short, the latest
        admitted sequences are preempted. Returns the sequences that decode this step."""
        cache = self.runner.cache
        decoding = []
        for seq in sorted(seqs, key=lambda s: s.seq_id):
            if self._running.get(seq.slot) is not seq:  # preempted for an older one meanwhile
                continue
            position = len(seq.prompt_ids) + len(seq.output_ids) - 1
            while cache.blocks_needed(seq.slot, position + 1) > cache.allocator.num_free:
                victim = max(self._running.values(), key=lambda s: s.seq_id)  # the latest to arrive
                if victim is seq and len(self._running) == 1:  # alone and still short: cannot happen when the
                    break  # pool holds max_model_len (runtime.py checks); ensure() below then ends it
                self._preempt(victim)
                if victim is seq:
                    break
            if self._running.get(seq.slot) is not seq:
                continue
            try:
                cache.ensure(seq.slot, position + 1)
            except Exception as exc:
                self._finish(seq, "error", SeqOutput(None, "", "error", error=f"KV cache: {exc}"))
                continue
            decoding.append(seq)
        return decoding

    def _preempt(self, seq: _Sequence) -> None:
        """Frees the blocks and row of `seq` and puts it back at the head of the queue (recompute later)."""
        logger.info("KV cache full: preempting sequence %d (%d tokens cached)", seq.seq_id, seq.prefilled)
        self._vacate(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.num_preemptions += 1
        with self._cv:
            self._waiting.appendleft(seq)

    def _vacate(self, seq: _Sequence, now: bool = True) -> None:
        """Frees the row and blocks of `seq`. Where the helper is prefilling it, its job stops at its next call
        and the blocks go back only once it has (the helper must be done writing them): waited for when `now`
        (a preemption needs the blocks at once), else parked and freed by a later step (an abort or error does
        not hold the streams for the helper's call in progress)."""
        del self._running[seq.slot]
        seq.prefilled = 0
        if self._beside is not None and self._beside[0] is seq and not now:
            _, job, cancel = self._beside
            self._beside = None
            cancel.set()
            self._parked.append((seq.slot, job))
            return
        self._stop_beside(seq)
        self.runner.release(seq.slot)
        heapq.heappush(self._free_slots, seq.slot)

    def _release_parked(self) -> None:
        """Rows and blocks of ended sequences whose helper job has stopped go back to the pool."""
        while self._parked and self._parked[0][1].done():
            slot, _ = self._parked.pop(0)
            self.runner.release(slot)
            heapq.heappush(self._free_slots, slot)

    def _use_threads(self, rows: int, helper_alone: bool = False) -> None:
        """torch's thread count for the next step: threads[0] under BATCH_ROWS rows, else threads[1]; half of
        threads[1] while a prompt is prefilled beside the steps (at::get_num_threads(), which the native kernels
        read at each call, is one value for the process, so the helper's calls take the same count), all of it
        for the helper when nothing decodes (helper_alone)."""
        if self.threads is None:
            return
        want = self.threads[1] if rows >= self.BATCH_ROWS else self.threads[0]
        head = self.threads[1]
        if self._beside is not None:
            want = head = self.threads[1] if helper_alone else max(1, self.threads[1] // 2)
        self.runner.head_threads = head
        if want != self._threads_now:
            torch.set_num_threads(want)
            self._threads_now = want

    def _advance(self, seq: _Sequence, logits: torch.Tensor, prompt_lps: Optional[list] = None) -> None:
        """Samples the next token of `seq` from logits [V] and hands it out."""
        params = seq.params
        token = sample(logits, params, seq.generator, seq.output_ids)
        now = time.monotonic()
        if seq.first_token is None:
            seq.first_token = now
        else:
            seq.itls.append(now - seq.last_token)
        seq.last_token = now
        seq.output_ids.append(token.token_id)
        reason = None
        if token.token_id in params.stop_token_ids and not params.ignore_eos:
            reason = "stop"
        else:
            seq.detok.add(token.token_id)
            if seq.detok.stopped:
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= params.max_tokens
                               or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len):
            reason = "length"
        out = SeqOutput(token, seq.detok.take(final=reason is not None), reason, prompt_lps)
        if reason is None:
            self._send(seq, out)
        else:
            self._finish(seq, reason, out)

    def _finish(self, seq: _Sequence, reason: str, out: SeqOutput) -> None:
        if self._running.get(seq.slot) is seq:
            self._vacate(seq, now=False)
        self._send(seq, out)
        now = time.monotonic()
        stats = RequestStats(
            finish_reason=reason, prompt_tokens=len(seq.prompt_ids), generation_tokens=len(seq.output_ids),
            queue_time=(seq.scheduled or now) - seq.arrival,
            time_to_first_token=None if seq.first_token is None else seq.first_token - seq.arrival,
            inter_token_latencies=tuple(seq.itls), e2e_latency=now - seq.arrival)
        try:
            self.on_finished(stats)
        except Exception:
            logger.exception("stats callback failed")

    def _send(self, seq: _Sequence, out: SeqOutput) -> None:
        if self._outbox is not None:  # inside a step: delivered with the step's other outputs at its end
            self._outbox.append((seq.sink, out))
        else:
            deliver_each([(seq.sink, out)])

    def _admissible(self, seq: _Sequence) -> bool:
        try:
            self._check_prompt(seq.prompt_ids)
        except ValueError:
            return False
        return True

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt or len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit a context of {self.max_model_len}")
        if min(prompt) < 0 or max(prompt) >= self.runner.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.runner.vocab_size})")

    @staticmethod
    def _prompt_logprobs(seq: _Sequence, logits: torch.Tensor) -> list:
        """logits [T, V] -> per prompt token: None for the first, else (logprob, top (id, lp) pairs)."""
        lps = torch.log_softmax(logits[:-1], dim=-1)
        ids = seq.prompt_ids
        k = seq.params.prompt_logprobs or 0
        return [None] + [(float(lps[i - 1, ids[i]]), top_logprobs(lps[i - 1], k)) for i in range(1, len(ids))]
