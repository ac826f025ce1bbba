"""Dynamic batching: requests queue up, one worker merges them into executor batches.

Guarantees, and what gives them:

* FIFO fairness: the worker only ever takes requests from the head of the queue, and stops
  filling a batch at the first request that would overflow ``max_batch`` (that request heads the
  next batch) rather than skipping ahead to smaller ones, so no request can be starved.
* Bounded wait: a batch waits for company at most ``max_wait_s`` after its *oldest* request
  arrived, so a request that already queued behind a running batch is not held any longer.
* Exactly once: each request owns one future. Once popped from the queue it is either answered
  with its rows of the logits or failed with an exception, through ``_answer``, which never
  touches a future twice; a ``finally`` fails whatever a batch left unanswered (worker cancelled,
  a bug), and ``stop`` fails what is still queued. A caller that gave up (its future cancelled)
  is skipped, not computed.
* One shape per batch: requests are merged only with those of the same item shape (a text
  build's sequence buckets: requests padded to different N); a request of another shape ends the
  batch and heads the next one, so FIFO order holds across buckets too.
* Isolation: when a merged batch raises, each of its requests is rerun alone, so one request the
  executor chokes on fails only itself; a request fails only when it fails on its own.
* Learning: a selector with ``observe`` (``--mode auto``) is shown each batch's result after the
  batch is checked; if it raises, the error is logged and counted and the batch is answered anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..core.chain_key import ChainKey
from ..engines.modality import Modality
from ..runtime.api import Executor, InferenceResult, Observation, Selector
from ..runtime.request import InferenceRequest
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


class ThrottledLog:
    """A warning logged at most once per ``every_s``, saying how many were folded into it: a
    degraded cluster falls back on every batch, which would otherwise be ~60 lines/s under load
    (the fallbacks metric counts every one)."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._last = -float("inf")
        self._folded = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._folded += 1
            return
        if self._folded:
            message += f" (and {self._folded} more in the last {now - self._last:.0f} s)"
        log.warning(message, *args)
        self._last, self._folded = now, 0


class QueueFull(RuntimeError):
    """The queue holds as many images as the server accepts; the client should retry later."""


class BatcherStopped(RuntimeError):
    """The server is shutting down and will not run this request."""


class InferenceFailed(RuntimeError):
    """The executor (or selector) raised while running the batch holding this request."""


@dataclass(frozen=True)
class BatchOutcome:
    logits: torch.Tensor  # this request's rows (a per-position head's cut to its own positions)
    choice: ChainKey  # the chain that actually ran
    fell_back: bool
    batch_size: int  # images in the executor batch this request rode in
    queue_s: float  # from submit to the batch starting
    executor_s: float


@dataclass
class _Pending:
    request: InferenceRequest
    future: asyncio.Future
    enqueued: float  # loop time

    @property
    def count(self) -> int:
        return self.request.batch_size


class Batcher:
    def __init__(self, executor: Executor, selector: Selector, *, max_wait_s: float = 0.005,
                 max_queue_images: int | None = None, metrics: ServerMetrics | None = None,
                 modality: Modality | None = None):
        """modality: what one item's logits look like on a bucket (default the executor's model's)."""
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.executor, self.selector = executor, selector
        self.modality = modality or executor.manifest.model.modality
        self.max_batch = int(executor.max_batch)
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images if max_queue_images is not None else 16 * self.max_batch
        if self.max_queue_images < self.max_batch:
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must hold at least one full batch "
                             f"({self.max_batch})")
        self.metrics = metrics or ServerMetrics(self.max_batch)
        self._fallback_log = ThrottledLog()
        self._observe_log = ThrottledLog()
        self._pending: deque[_Pending] = deque()
        self._queued_images = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stopped = False
        # One thread: the executor runs one batch at a time, and the event loop stays free meanwhile.
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-infer")

    @property
    def healthy(self) -> bool:
        """False once stopped or if the worker died (it is written not to, this is the alarm)."""
        return not self._stopped and (self._worker is None or not self._worker.done())

    def start(self) -> None:
        """Start the worker on the running loop; idempotent, and ``submit`` calls it too."""
        if self._stopped:
            raise BatcherStopped("the batcher was stopped")
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="prism-batcher")

    async def stop(self) -> None:
        """Fail what is queued, stop the worker (failing its batch), wait for the executor thread."""
        self._stopped = True
        while self._pending:
            self._answer(self._pop(), error=BatcherStopped("the server is shutting down"))
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        # Wait out a batch still inside the executor, so the caller may close the executor next.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)

    async def submit(self, request: InferenceRequest) -> BatchOutcome:
        """Queue a request of 1 <= B <= max_batch items and wait for its logits (a per-position
        head's cut back to the request's own positions)."""
        count = request.batch_size
        if not 1 <= count <= self.max_batch:
            raise ValueError(f"a request holds 1 to {self.max_batch} images, got {count}")
        if self._queued_images + count > self.max_queue_images:
            raise QueueFull(f"the queue already holds {self._queued_images} images (limit {self.max_queue_images})")
        self.start()
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._queued_images += count
        self._report_queue()
        self._arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:  # the caller gave up (client gone): free its place in the queue now
            self._discard(pending)
            raise

    def _discard(self, pending: _Pending) -> None:
        try:
            self._pending.remove(pending)
        except ValueError:  # already taken into a batch (or answered)
            return
        self._queued_images -= pending.count
        self._report_queue()

    def _pop(self) -> _Pending:
        pending = self._pending.popleft()
        self._queued_images -= pending.count
        self._report_queue()
        return pending

    def _report_queue(self) -> None:
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.queue_images.set(self._queued_images)

    @staticmethod
    def _answer(pending: _Pending, outcome: BatchOutcome | None = None, error: BaseException | None = None) -> None:
        if pending.future.done():  # the caller gave up, or it was already answered
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(outcome)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[_Pending] = []  # owned here, so a cancel while collecting still answers what was popped
            try:
                await self._collect(batch, loop)
                await self._run(batch, loop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not kill the worker and strand every later request
                log.exception("batch worker error")
                for pending in batch:
                    self._answer(pending, error=InferenceFailed(f"internal batching error: {exc!r}"))
            finally:
                for pending in batch:
                    self._answer(pending, error=BatcherStopped("the server is shutting down"))

    async def _collect(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        """Fill ``batch`` from the head of the queue (see the module docstring for the policy)."""
        size, shape = 0, None
        deadline = None
        while True:
            while self._pending and self._pending[0].future.done():
                self._pop()  # its caller is gone; computing it would only delay the others
            if self._pending:
                head = self._pending[0]
                if size + head.count > self.max_batch or (batch and head.request.item_shape != shape):
                    return
                batch.append(self._pop())
                size += head.count
                shape = head.request.item_shape
                if deadline is None:
                    deadline = head.enqueued + self.max_wait_s
                if size == self.max_batch:
                    return
                continue
            self._arrived.clear()
            if not batch:
                await self._arrived.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _infer(self, request: InferenceRequest, size: int) -> tuple[InferenceResult, ChainKey, float]:
        choice = self.selector.choose(size)
        start = time.perf_counter()
        result = self.executor.infer(request, choice)
        elapsed = time.perf_counter() - start
        shape, expected = tuple(result.logits.shape), (size, *self.modality.output_shape(request.bucket_length))
        if shape != expected:
            raise RuntimeError(f"executor returned logits of shape {list(shape)} for a batch of {size}; expected "
                               f"{list(expected)}")
        if not torch.isfinite(result.logits).all():
            raise RuntimeError("executor returned non-finite logits")
        self._observe(size, result)
        return result, choice, elapsed

    def _observe(self, size: int, result: InferenceResult) -> None:
        """Show a learning selector the batch (on this thread, so it sees batches in order); never
        lets its failure reach the batch."""
        observe = getattr(self.selector, "observe", None)
        if observe is None:
            return
        try:
            observation = observe(size, result)
            if observation is not None:
                self._record(observation)
        except Exception as exc:  # a bug in learning must not cost the batch its answers
            self.metrics.observer_errors.inc()
            self._observe_log.warning("the selector could not learn from a batch of %d: %r", size, exc)

    def _record(self, observation: Observation) -> None:
        if observation.bandwidth_mbit is not None:
            self.metrics.bandwidth_estimate.set(observation.bandwidth_mbit)
        if observation.explored:
            self.metrics.explored.labels(mode=observation.mode).inc()
        error = observation.relative_error
        if error is not None:
            self.metrics.prediction_error.labels(mode=observation.mode).observe(error)
            self.metrics.last_prediction_error.labels(mode=observation.mode).set(error)

    async def _run(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        batch = [pending for pending in batch if not pending.future.done()]
        if not batch:
            return
        size = sum(pending.count for pending in batch)
        request = InferenceRequest.concatenate([pending.request for pending in batch])
        started = loop.time()
        try:
            # the selector runs in the thread too: an adaptive one may consult profiles
            result, chosen, executor_s = await loop.run_in_executor(self._thread, self._infer, request, size)
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batch of %d requests (%d images) failed (%r); rerunning them one at a time",
                            len(batch), size, exc)
                self.metrics.isolations.inc()
                for pending in batch:
                    await self._run([pending], loop)
                return
            log.error("inference of %d image(s) failed: %r", size, exc)
            self._answer(batch[0], error=InferenceFailed(f"{type(exc).__name__}: {exc}"))
            return
        log.debug("batch of %d request(s), %d image(s): %s in %.2f ms", len(batch), size, result.choice.label,
                  executor_s * 1e3)
        self.metrics.batch_size.observe(size)
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.chosen.labels(mode=chosen.label).inc()
        self.metrics.executor_seconds.labels(mode=result.choice.label).observe(executor_s)
        self.metrics.batch_executor_seconds.labels(batch_size=str(size)).observe(executor_s)
        self.metrics.last_inference.set_to_current_time()
        if result.fell_back:
            self.metrics.fallbacks.inc()
            self._fallback_log.warning("%s could not run a batch of %d; the local chain answered", chosen.label, size)
        logits = result.logits.detach().to("cpu", torch.float32)
        offset = 0
        for pending in batch:
            rows = pending.request.trim(logits[offset:offset + pending.count])
            offset += pending.count
            self._answer(pending, BatchOutcome(rows, result.choice, result.fell_back, size,
                                               started - pending.enqueued, executor_s))
