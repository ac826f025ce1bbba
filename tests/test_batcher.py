"""The dynamic batcher on its own, over a deterministic in-test executor: batching policy, row
routing, error isolation, the queue bound and shutdown. Ordering is forced with events (a gate
the executor waits at, the queue gauges), never with sleeps; timeouts are only safety nets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import threading
import types

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism_trt.core.chain_key import ChainKey
from prism_trt.engines.manifest import ModelRecord
from prism_trt.model.spec import ViTSpec
from prism_trt.runtime.api import InferenceResult
from prism_trt.runtime.request import InferenceRequest
from prism_trt.runtime.timing import PhaseTimes
from prism_trt.serve.batcher import Batcher, BatcherStopped, InferenceFailed, QueueFull
from prism_trt.serve.metrics import sample_sum

pytestmark = pytest.mark.timeout(60)

SAFETY_S = 10  # no step of these tests should come near this; it only keeps a bug from hanging the run
CLASSES = 5
SPEC = ViTSpec(name="batcher-test", img_size=(4, 4), patch_size=(2, 2), in_chans=1, num_prefix_tokens=1,
               embed_dim=8, depth=1, num_heads=1, head_dim=8, mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-6,
               qkv_bias=True, pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=CLASSES,
               mean=(0.5,), std=(0.5,))
LOCAL, VOLTAGE, PRISM = ChainKey.local(), ChainKey.voltage(), ChainKey.prism(2, SPEC.num_tokens, 2)
MODEL = ModelRecord({"timm": "batcher-test"}, SPEC, "0" * 64)
POISON = -1000.0  # an image whose first pixel is this makes the executor raise


def logits_for(images: torch.Tensor) -> torch.Tensor:
    """Each row is a function of its own image only, so a misrouted row shows."""
    return images.flatten(1)[:, :CLASSES] * 2.0 + images.flatten(1).sum(dim=1, keepdim=True)


def request(images: torch.Tensor) -> InferenceRequest:
    return InferenceRequest.of(MODEL, images)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


class RowExecutor:
    """Logits from the images; voltage "fails" and falls back to local; ``gate`` holds a batch."""

    model_name = "batcher-test"
    spec = SPEC
    manifest = types.SimpleNamespace(model=MODEL)

    def __init__(self, max_batch: int = 4):
        self.max_batch = max_batch
        self.calls: list[tuple[int, ChainKey]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.fault: str | None = None  # "raise", "shape" or "nan"

    @property
    def sizes(self) -> list[int]:
        return [size for size, _ in self.calls]

    def infer(self, request: InferenceRequest, key: ChainKey) -> InferenceResult:
        images = request.tensors["images"]
        self.calls.append((int(images.shape[0]), key))
        self.entered.set()
        assert self.gate.wait(SAFETY_S), "the test never opened the gate"
        if self.fault == "raise":
            raise RuntimeError("device lost")
        if (images[:, 0, 0, 0] == POISON).any():
            raise ValueError("poison image")
        logits = logits_for(images)
        if self.fault == "shape":
            logits = logits[:, :-1]
        elif self.fault == "nan":
            logits[-1, 0] = float("nan")
        if key.mode == "voltage":
            return InferenceResult(logits, LOCAL, PhaseTimes(), True)
        return InferenceResult(logits, key, PhaseTimes())


class RecordingSelector:
    def __init__(self, by_size: dict[int, ChainKey] | None = None):
        self.sizes, self.by_size, self.error = [], by_size or {}, None

    def choose(self, batch: int) -> ChainKey:
        self.sizes.append(batch)
        if self.error is not None:
            raise self.error
        return self.by_size.get(batch, LOCAL)


def asynchronous(test):
    """Run an async test on a fresh event loop, under an overall safety timeout."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 3 * SAFETY_S))
    return wrapper


@contextlib.asynccontextmanager
async def batcher_for(executor, selector=None, **options):
    batcher = Batcher(executor, selector or RecordingSelector(), **options)
    try:
        yield batcher
    finally:
        executor.gate.set()
        await asyncio.wait_for(batcher.stop(), SAFETY_S)


async def until(predicate, what: str) -> None:
    """Yield to the loop until ``predicate`` holds (state the loop itself changes)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def taken(batcher: Batcher) -> None:
    await until(lambda: sample_sum(batcher.metrics.queue_depth) == 0, "the worker took the queued requests")


async def hold_executor(batcher: Batcher, executor: RowExecutor) -> asyncio.Task:
    """Put a one-image batch into the executor and keep it there until ``executor.gate`` is set."""
    executor.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(request(images(1, 999))))
    assert await asyncio.to_thread(executor.entered.wait, SAFETY_S), "the executor was never called"
    return blocker


async def queue(batcher: Batcher, batches: list[torch.Tensor]) -> list[asyncio.Task]:
    """Submit each tensor as its own request and wait until all of them sit in the queue."""
    before = sample_sum(batcher.metrics.queue_depth)
    tasks = [asyncio.ensure_future(batcher.submit(request(x))) for x in batches]
    await until(lambda: sample_sum(batcher.metrics.queue_depth) == before + len(batches), "requests queued")
    return tasks


def check_rows(outcomes, batches) -> None:
    for outcome, x in zip(outcomes, batches, strict=True):
        assert torch.equal(outcome.logits, logits_for(x)), "a request got rows that are not its own"


async def queued_behind_a_batch(batcher: Batcher, executor: RowExecutor, sizes: list[int]) -> list:
    """Queue requests of ``sizes`` images behind a held batch, release it, check every request's rows."""
    blocker = await hold_executor(batcher, executor)
    batches = [images(n, seed) for seed, n in enumerate(sizes)]
    tasks = await queue(batcher, batches)
    executor.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_S)
    check_rows(outcomes, batches)
    check_rows([await blocker], [images(1, 999)])
    return outcomes


def fifo_batches(sizes: list[int], max_batch: int) -> list[list[int]]:
    """Request indices per batch: fill from the head, stop at the first request that would overflow."""
    batches: list[list[int]] = [[]]
    for index, size in enumerate(sizes):
        if sum(sizes[i] for i in batches[-1]) + size > max_batch:
            batches.append([])
        batches[-1].append(index)
    return batches


# ------------------------------------------------------------------ batching and routing


@settings(max_examples=25)
@example((8, [1, 3, 2]))  # all in one batch
@example((4, [2, 1, 2, 3, 1, 4]))  # the 2 after [2, 1] opens the next batch: no skipping ahead to the 1
@example((4, [1] * 5))
@given(st.integers(1, 6).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(1, m), min_size=1, max_size=10))))
@asynchronous
async def test_queued_requests_are_batched_fifo_up_to_max_batch(case):
    max_batch, sizes = case
    executor, selector = RowExecutor(max_batch=max_batch), RecordingSelector()
    async with batcher_for(executor, selector, max_wait_s=0) as batcher:
        outcomes = await queued_behind_a_batch(batcher, executor, sizes)
        batches = fifo_batches(sizes, max_batch)
        totals = [sum(sizes[i] for i in batch) for batch in batches]
        assert executor.sizes[1:] == totals and max(totals) <= max_batch
        assert selector.sizes == executor.sizes
        assert [o.batch_size for o in outcomes] == [total for batch, total in zip(batches, totals) for _ in batch]
        assert sample_sum(batcher.metrics.queue_images) == 0


@asynchronous
async def test_partial_batch_waits_for_company_until_full():
    executor = RowExecutor(max_batch=3)
    async with batcher_for(executor, max_wait_s=3 * SAFETY_S) as batcher:
        batches, tasks = [images(1, seed) for seed in range(3)], []
        for x in batches:  # each arrives after the worker took the ones before into its batch
            tasks += await queue(batcher, [x])
            await taken(batcher)
        check_rows(await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_S), batches)
        assert executor.sizes == [3]


@asynchronous
async def test_selector_choice_reaches_executor_and_outcome():
    executor = RowExecutor(max_batch=4)
    selector = RecordingSelector({2: PRISM, 3: VOLTAGE})
    async with batcher_for(executor, selector, max_wait_s=0) as batcher:
        outcomes = [await asyncio.wait_for(batcher.submit(request(images(n, n))), SAFETY_S) for n in (1, 2, 3)]
        assert selector.sizes == [1, 2, 3]
        assert executor.calls == [(1, LOCAL), (2, PRISM), (3, VOLTAGE)]
        assert [(o.choice, o.fell_back) for o in outcomes] == [(LOCAL, False), (PRISM, False), (LOCAL, True)]
        metrics = batcher.metrics
        assert sample_sum(metrics.chosen, mode=PRISM.label) == sample_sum(metrics.chosen, mode="voltage") == 1
        assert sample_sum(metrics.fallbacks) == 1


@asynchronous
async def test_cancelled_request_is_not_computed():
    executor = RowExecutor(max_batch=4)
    async with batcher_for(executor, max_wait_s=0) as batcher:  # given up while queued
        blocker = await hold_executor(batcher, executor)
        gone, kept = await queue(batcher, [images(2, 1), images(1, 2)])
        gone.cancel()
        executor.gate.set()
        check_rows([await asyncio.wait_for(kept, SAFETY_S)], [images(1, 2)])
        await blocker
        assert executor.sizes == [1, 1]
    executor.calls.clear()
    async with batcher_for(executor, max_wait_s=3 * SAFETY_S) as batcher:  # given up inside a collecting batch
        (gone,) = await queue(batcher, [images(1, 3)])
        await taken(batcher)
        gone.cancel()
        kept = await queue(batcher, [images(3, 4)])  # fills the batch
        check_rows(await asyncio.wait_for(asyncio.gather(*kept), SAFETY_S), [images(3, 4)])
        assert executor.sizes == [3]


# ------------------------------------------------------------------ failures


@asynchronous
async def test_failing_request_fails_alone_and_the_rest_are_answered():
    executor = RowExecutor(max_batch=4)
    poison = images(1, 5)
    poison[0, 0, 0, 0] = POISON
    batches = [images(2, 1), poison, images(1, 2)]
    async with batcher_for(executor, max_wait_s=3 * SAFETY_S) as batcher:  # one batch: it runs once full
        tasks = [asyncio.ensure_future(batcher.submit(request(x))) for x in batches]
        good, bad, last = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), SAFETY_S)
        assert isinstance(bad, InferenceFailed) and str(bad) == "ValueError: poison image"
        check_rows([good, last], [batches[0], batches[2]])
        assert executor.sizes == [4, 2, 1, 1]  # merged, then each alone
        assert sample_sum(batcher.metrics.isolations) == 1
        later = images(4, 9)
        check_rows([await asyncio.wait_for(batcher.submit(request(later)), SAFETY_S)], [later])
        assert batcher.healthy


@pytest.mark.parametrize("fault,message", [
    ("raise", r"^RuntimeError: device lost$"),
    ("shape", r"^RuntimeError: executor returned logits of shape \[(\d), 4\] for a batch of \1; "
              r"expected \[\1, 5\]$"),
    ("nan", r"^RuntimeError: executor returned non-finite logits$"),
    ("selector", r"^KeyError: 'no profile'$"),
])
@asynchronous
async def test_broken_batches_fail_their_requests_then_serving_resumes(fault, message):
    executor, selector = RowExecutor(max_batch=4), RecordingSelector()
    executor.fault = None if fault == "selector" else fault
    selector.error = KeyError("no profile") if fault == "selector" else None
    async with batcher_for(executor, selector, max_wait_s=3 * SAFETY_S) as batcher:
        tasks = [asyncio.ensure_future(batcher.submit(request(images(2, seed)))) for seed in (1, 2)]
        errors = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), SAFETY_S)
        for error in errors:
            assert isinstance(error, InferenceFailed) and re.search(message, str(error)), error
        assert selector.sizes == [4, 2, 2]  # the merged batch, then each request alone
        executor.fault, selector.error = None, None
        x = images(4, 3)
        check_rows([await asyncio.wait_for(batcher.submit(request(x)), SAFETY_S)], [x])
        assert batcher.healthy


# ------------------------------------------------------------------ limits and shutdown


@asynchronous
async def test_queue_bound_refuses_then_recovers():
    executor = RowExecutor(max_batch=4)
    async with batcher_for(executor, max_wait_s=0, max_queue_images=4) as batcher:
        blocker = await hold_executor(batcher, executor)  # in the executor, no longer queued
        batches = [images(3, 1), images(1, 2)]
        tasks = await queue(batcher, batches)
        with pytest.raises(QueueFull, match=r"already holds 4 images \(limit 4\)"):
            await asyncio.wait_for(batcher.submit(request(images(1, 3))), SAFETY_S)
        executor.gate.set()
        check_rows(await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_S), batches)
        await blocker
        full = images(4, 4)
        check_rows([await asyncio.wait_for(batcher.submit(request(full)), SAFETY_S)], [full])
        assert executor.sizes == [1, 4, 4]


@asynchronous
async def test_a_request_given_up_frees_its_place_in_the_queue_at_once():
    """Under overload clients time out: their requests must not hold the queue until they reach its head."""
    executor = RowExecutor(max_batch=4)
    async with batcher_for(executor, max_wait_s=0, max_queue_images=4) as batcher:
        blocker = await hold_executor(batcher, executor)
        (gone,) = await queue(batcher, [images(4, 1)])
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        kept = images(3, 2)  # would not fit beside the 4 images given up
        task = asyncio.ensure_future(batcher.submit(request(kept)))
        executor.gate.set()
        check_rows([await asyncio.wait_for(task, SAFETY_S)], [kept])
        await blocker
        assert executor.sizes == [1, 3]


@asynchronous
async def test_invalid_arguments():
    executor = RowExecutor(max_batch=4)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(executor, RecordingSelector(), max_wait_s=-0.1)
    with pytest.raises(ValueError, match=r"max_queue_images \(3\) must hold at least one full batch \(4\)"):
        Batcher(executor, RecordingSelector(), max_queue_images=3)
    async with batcher_for(executor) as batcher:
        for count in (0, 5):
            with pytest.raises(ValueError, match=f"1 to 4 images, got {count}"):
                await batcher.submit(request(torch.zeros(count, 1, 4, 4)))
    assert executor.calls == []


@asynchronous
async def test_stop_answers_every_accepted_request_and_waits_for_the_executor():
    executor = RowExecutor(max_batch=4)
    batcher = Batcher(executor, RecordingSelector(), max_wait_s=0)
    blocker = await hold_executor(batcher, executor)
    queued = await queue(batcher, [images(2, 1), images(1, 2)])
    stopping = asyncio.ensure_future(batcher.stop())
    for task in queued:  # answered at once, not after the running batch
        with pytest.raises(BatcherStopped, match="shutting down"):
            await asyncio.wait_for(task, SAFETY_S)
    assert not stopping.done()  # it waits for the batch still inside the executor
    assert not batcher.healthy
    executor.gate.set()
    await asyncio.wait_for(stopping, SAFETY_S)
    with pytest.raises(BatcherStopped):
        await asyncio.wait_for(blocker, SAFETY_S)  # documented: stop fails the running batch's requests
    assert len(executor.calls) == 1  # queued work never reached the executor
    with pytest.raises(BatcherStopped):
        await batcher.submit(request(images(1, 3)))
    await asyncio.wait_for(batcher.stop(), SAFETY_S)  # idempotent


@asynchronous
async def test_stop_fails_a_batch_still_collecting():
    executor = RowExecutor(max_batch=4)
    batcher = Batcher(executor, RecordingSelector(), max_wait_s=3 * SAFETY_S)
    (waiting,) = await queue(batcher, [images(1, 1)])
    await taken(batcher)
    await asyncio.wait_for(batcher.stop(), SAFETY_S)
    with pytest.raises(BatcherStopped):
        await asyncio.wait_for(waiting, SAFETY_S)
    assert executor.calls == []


def test_degraded_fallback_warnings_are_throttled(caplog, monkeypatch):
    """A degraded cluster falls back on every batch; the log gets one line per interval, not one per batch."""
    from prism_trt.serve import batcher as batcher_module

    now = [1000.0]
    monkeypatch.setattr(batcher_module.time, "monotonic", lambda: now[0])
    throttled = batcher_module.ThrottledLog(every_s=30.0)
    with caplog.at_level("WARNING", logger=batcher_module.log.name):
        for _ in range(60):
            throttled.warning("fell back for a batch of %d", 4)
            now[0] += 0.1
        assert [r.getMessage() for r in caplog.records] == ["fell back for a batch of 4"]
        now[0] += 30.0
        throttled.warning("fell back for a batch of %d", 2)
    assert caplog.records[-1].getMessage() == "fell back for a batch of 2 (and 59 more in the last 36 s)"
