"""Every kind of staging behind one interface, with the same tests: the host copies, torch CUDA, and
pycuda (on the CPU through a stand-in driver whose copies are real memmoves, on a GPU for real).
The slot layout, the padding, which slots are copied and the byte counts are shared code, tested
here without a GPU; the GPU kinds skip with their reason where there is none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_pycuda import FakeDriver, read_device, write_device

from prism_trt.errors import UsageError
from prism_trt.runtime.options import ExchangeDtype, StagingKind
from prism_trt.runtime.pycuda_staging import DeviceTensor, PycudaStaging
from prism_trt.runtime.staging import HostStaging, SlotLayout, TorchCudaStaging
from prism_trt.runtime.staging_choice import make_staging, resolve_staging_kind

HAS_CUDA = torch.cuda.is_available()


def _pycuda_here() -> bool:
    try:
        import pycuda.driver  # noqa: F401
    except (ImportError, OSError):
        return False
    return HAS_CUDA


KINDS = {
    "host": dict(),
    "pycuda-fake-torch-memory": dict(),
    "pycuda-fake-own-memory": dict(),
    "torch-cuda": dict(marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")),
    "pycuda-cuda": dict(marks=pytest.mark.skipif(not _pycuda_here(), reason="needs pycuda and a CUDA device")),
}


def make(kind: str, counts, rank, dim, attended=None, dtype=ExchangeDtype.FP32):
    """(staging, to_device_tensor, to_numpy) for ``kind``."""
    def torch_in(values, device="cpu"):
        return torch.as_tensor(values).to(device)

    if kind == "host":
        return HostStaging(counts, rank, dim, "cpu", attended, dtype), torch_in, np.asarray
    if kind == "pycuda-fake-torch-memory":
        return (PycudaStaging(counts, rank, dim, "cpu", attended, dtype, driver=FakeDriver(), torch_memory=True),
                torch_in, np.asarray)
    if kind == "pycuda-fake-own-memory":
        staging = PycudaStaging(counts, rank, dim, "cpu", attended, dtype, engine_dtype=torch.float32 if dtype ==
                                ExchangeDtype.FP32 else torch.float16, driver=FakeDriver(), torch_memory=False)

        def own(values):
            array = np.ascontiguousarray(values, np.float32 if dtype == ExchangeDtype.FP32 else np.float16)
            with staging.in_context():
                tensor = DeviceTensor(staging.driver.mem_alloc(array.nbytes), array.shape, array.dtype)
            write_device(tensor, array)
            return tensor

        return staging, own, read_device
    if kind == "torch-cuda":
        return (TorchCudaStaging(counts, rank, dim, "cuda", attended, dtype), lambda v: torch_in(v, "cuda"),
                lambda t: t.cpu().numpy())
    return (PycudaStaging(counts, rank, dim, "cuda", attended, dtype), lambda v: torch_in(v, "cuda"),
            lambda t: t.cpu().numpy())


def test_slot_layout_bookkeeping():
    """Offsets, the runs of slots copied host -> device and the byte counts, for every rank of a
    3-rank plan, non-causal and causal."""
    layout = SlotLayout.of([3, 2, 2], rank=1, dim=8)
    assert layout.max_count == 3 and layout.remote_count == 5
    assert layout.pieces == ((0, 0, 3), (2, 3, 2)) and layout.runs == ((0, 1), (2, 3))
    assert SlotLayout.of([3, 2, 2], 2, 8).runs == ((0, 2),)  # adjacent slots: one copy
    assert SlotLayout.of([3, 2, 2], 0, 8).runs == ((1, 3),)
    causal = SlotLayout.of([3, 2, 2], 1, 8, attended=[0])
    assert causal.pieces == ((0, 0, 3),) and causal.runs == ((0, 1),) and causal.remote_count == 3
    assert SlotLayout.of([3, 2, 2], 0, 8, attended=[]).runs == ()
    # bytes: the wire counts this rank's entries; the copies move whole padded slots
    assert layout.bytes_sent(4, 2) == 4 * 2 * 8 * 2 and layout.bytes_received(4, 4) == 4 * 5 * 8 * 4
    assert layout.d2h_bytes(4, 4) == 4 * 3 * 8 * 4 and layout.h2d_bytes(4, 2) == 2 * 4 * 3 * 8 * 2


@pytest.mark.parametrize("dtype", [ExchangeDtype.FP32, ExchangeDtype.FP16])
@pytest.mark.parametrize("kind", [pytest.param(k, **v) for k, v in KINDS.items()])
@pytest.mark.parametrize("rank, attended", [(1, None), (2, None), (1, [0]), (0, [])])
def test_round_trip(kind, dtype, rank, attended):
    """Means out through the padded send slot, the attended slots back into the remote tensor in
    rank order, in the engines' dtype; buffers reused; every kind gives the same values."""
    counts, dim, batch = [3, 2, 2], 8, 4
    staging, device_in, to_numpy = make(kind, counts, rank, dim, attended, dtype)
    assert staging.itemsize == dtype.itemsize
    buffers = staging.buffers(("test", batch), batch)
    means = np.random.default_rng(rank).standard_normal((batch, counts[rank], dim)).astype(np.float32)
    sent = staging.to_host(device_in(means), buffers)
    assert sent.dtype == {ExchangeDtype.FP32: torch.float32, ExchangeDtype.FP16: torch.float16}[dtype]
    want = means.astype(np.float16) if dtype == ExchangeDtype.FP16 else means
    assert np.array_equal(sent[:, : counts[rank]].numpy(), want)
    for q, slot in enumerate(buffers.gathered):  # what the all-gather would write
        slot.copy_(torch.full(slot.shape, q + 0.5).to(slot.dtype))
    remote = staging.to_device(buffers)
    if not staging.attended:
        assert remote is None
    else:
        got = to_numpy(remote)
        read = [q for q in (attended if attended is not None else [q for q in range(3) if q != rank])]
        want = np.concatenate([np.full((batch, counts[q], dim), q + 0.5) for q in read], axis=1)
        assert got.shape == want.shape and np.array_equal(got.astype(np.float32), want)
    assert staging.buffers(("test", batch), batch) is buffers and staging.allocations == 1


@pytest.mark.parametrize("dtype", [ExchangeDtype.FP32, ExchangeDtype.FP16])
def test_pycuda_copies_move_the_layouts_bytes(dtype):
    """The pycuda kind moves one contiguous padded slot device -> host, and one copy per run of
    attended slots host -> device: the layout's byte counts, halved in fp16."""
    driver = FakeDriver()
    staging = PycudaStaging([3, 2, 2], 1, 8, "cpu", None, dtype, driver=driver, torch_memory=True)
    buffers = staging.buffers(("k", 5), 5)
    staging.to_host(torch.ones(5, 2, 8), buffers)
    staging.to_device(buffers)
    layout = staging.layout
    assert driver.bytes["dtoh"] == layout.d2h_bytes(5, dtype.itemsize) == 5 * 3 * 8 * dtype.itemsize
    assert driver.bytes["htod"] == layout.h2d_bytes(5, dtype.itemsize) and driver.calls["htod"] == len(layout.runs)
    assert staging.last_d2h_ms is not None and staging.last_h2d_ms is not None
    assert driver.context.depth == 0  # every push popped


@pytest.mark.parametrize("dtype", [ExchangeDtype.FP32, ExchangeDtype.FP16])
def test_means_that_fill_the_slot_are_copied_without_a_pack(dtype):
    """A rank whose means fill its slot in the exchange dtype is copied device -> host straight
    from them; a cast (fp16) or a shorter rank packs into the device send slot first."""
    staging = PycudaStaging([3, 2], 0, 4, "cpu", None, dtype, driver=FakeDriver(), torch_memory=True)
    buffers = staging.buffers(("k", 2), 2)
    means = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert (staging.packed(means, buffers) is means) == (dtype == ExchangeDtype.FP32)
    assert torch.equal(staging.to_host(means, buffers).float(), means)
    host = HostStaging([3, 2], 0, 4)  # on the host the slot is GLOO's buffer: always a copy into it
    host_buffers = host.buffers(("k", 2), 2)
    assert host.packed(means, host_buffers) is host_buffers.send and torch.equal(host_buffers.send, means)


def test_pycuda_own_memory_packs_with_2d_copies():
    """Without CUDA torch the pack and unpack are device-to-device 2D copies (no cast possible)."""
    staging, device_in, _ = make("pycuda-fake-own-memory", [3, 2, 2], 1, 8)
    buffers = staging.buffers(("k", 2), 2)
    staging.to_host(device_in(np.ones((2, 2, 8))), buffers)
    staging.to_device(buffers)
    assert staging.driver.bytes["dtod"] == 2 * 2 * 8 * 4 + 2 * 5 * 8 * 4  # pack 2 rows, unpack 2 pieces x 2 rows
    with pytest.raises(UsageError, match="--device cpu"):  # host tensors: nothing on the device to copy
        staging.to_host(torch.ones(2, 2, 8), buffers)
    with pytest.raises(UsageError, match="exchange-dtype"):
        PycudaStaging([3, 2], 0, 8, "cpu", exchange_dtype=ExchangeDtype.FP16, driver=FakeDriver(), torch_memory=False)


def test_a_rank_nobody_reads_sends_its_slot_untouched():
    driver = FakeDriver()
    staging = PycudaStaging([2, 2], 1, 4, "cpu", attended=[0], driver=driver, torch_memory=True)
    buffers = staging.buffers(("k", 1), 1)
    staging.to_host(None, buffers)
    assert driver.bytes["dtoh"] == 0


def test_staging_kind_choice(monkeypatch):
    """auto: host copies for CPU engines, torch where torch has CUDA, pycuda where it has not."""
    assert resolve_staging_kind(StagingKind.AUTO, "cpu") is None
    assert resolve_staging_kind(StagingKind.PYCUDA, "cpu") is None
    assert isinstance(make_staging([2, 2], 0, 4, "cpu", kind=StagingKind.PYCUDA), HostStaging)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_staging_kind(StagingKind.AUTO, "cuda:0") is StagingKind.TORCH
    assert resolve_staging_kind(StagingKind.PYCUDA, "cuda:0") is StagingKind.PYCUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_staging_kind(StagingKind.AUTO, "cuda:0") is StagingKind.PYCUDA
    with pytest.raises(UsageError, match="pycuda"):
        TorchCudaStaging([2, 2], 0, 4, "cuda")


def test_exchange_dtype_resolution():
    assert ExchangeDtype.AUTO.resolve("fp16") is ExchangeDtype.FP16
    assert ExchangeDtype.AUTO.resolve("fp32") is ExchangeDtype.FP32
    assert ExchangeDtype.AUTO.resolve("tf32") is ExchangeDtype.FP32
    assert ExchangeDtype.FP16.resolve("fp32") is ExchangeDtype.FP16
    assert f"{ExchangeDtype.FP16}" == "fp16" and ExchangeDtype.FP16.itemsize == 2
    with pytest.raises(UsageError, match="resolve"):
        HostStaging([2, 2], 0, 4, exchange_dtype=ExchangeDtype.AUTO)


def test_staging_benchmark_dry_run(monkeypatch, tmp_path):
    """benchmarks/staging_gpu.py runs its whole loop on the CPU (host staging vs a host memcpy),
    one row per shape and batch with the layout's bytes, and draws its figure."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import staging_gpu

    rows = staging_gpu.measure_staging(batches=(1, 8), repeat=2, dry_run=True,
                                       exchange_dtype=ExchangeDtype.FP16)
    assert [(r["shape"], r["batch"]) for r in rows] == [(s, b) for s in ("prism CR 9.9", "voltage") for b in (1, 8)]
    assert rows[1]["bytes"] == 2 * 8 * 11 * 768 * 2  # rank 0 of CR 9.9: 11 means a slot, one slot each way, fp16
    assert all(r["kind"] == "host" and r["staging_ms"] > 0 and r["peak_ms"] > 0 for r in rows)
    staging_gpu.plot(rows, "dry run", tmp_path / "staging.png")
    assert (tmp_path / "staging.png").stat().st_size > 0


@pytest.mark.skipif(not _pycuda_here(), reason="needs pycuda and a CUDA device")
def test_pycuda_staging_waits_for_the_torch_stream_that_made_the_means():
    """Means written late on torch's current stream (after a long kernel) are the ones pycuda's
    stream copies: it waits for torch's stream before packing; and its handle wraps as a torch stream."""
    staging = PycudaStaging([3, 2], 1, 8, "cuda", exchange_dtype=ExchangeDtype.FP16)
    buffers = staging.buffers(("k", 4), 4)
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        means = torch.zeros(4, 2, 8, device="cuda")
        torch.cuda._sleep(100_000_000)  # keeps the stream busy well past the host's next calls
        means.fill_(3.0)
        sent = staging.to_host(means, buffers)
    assert torch.equal(sent[:, :2].float(), torch.full((4, 2, 8), 3.0))
    assert staging.torch_stream().cuda_stream == staging.stream_handle != 0
