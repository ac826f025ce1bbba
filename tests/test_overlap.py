"""Micro-batches in flight: a batch cut into micro-batches, one's exchange in flight while another's
stages run, gives the answers of the batch run whole — in process (the drive loop's in-process
exchange) and on a real two-rank GLOO group (asynchronous all-gathers, rank 0's choice followed by
the worker through the batch header), with no allocation in the steady state."""

import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines, random_model, small_spec
from test_distributed import TIMEOUT_S, finish, start_workers

from prism_trt.core import Exchange, RankForward, make_partition_plan, make_segment_plan, simulate
from prism_trt.core.drive import drive, drive_micro_batches, micro_batch_sizes
from prism_trt.engines import ChainKey
from prism_trt.engines.stage_spec import IMAGES
from prism_trt.runtime import RuntimeOptions, load_chain
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.options import micro_batches_for

pytestmark = pytest.mark.timeout(240)


def test_micro_batches_by_default_only_where_they_won():
    assert [micro_batches_for(None, batch) for batch in (1, 2, 4, 7, 8, 12, 16, 32)] == [1, 1, 1, 1, 2, 3, 4, 4]
    assert micro_batches_for(None, 16, profile_barrier=True) == 1  # the profiler measures the whole batch
    assert micro_batches_for(2, 1) == 2 and micro_batches_for(1, 16) == 1  # asked for: as asked
    assert RuntimeOptions().micro_batches is None


def test_micro_batch_sizes():
    assert micro_batch_sizes(16, 2) == [8, 8]
    assert micro_batch_sizes(5, 2) == [3, 2]
    assert micro_batch_sizes(7, 3) == [3, 2, 2]
    assert micro_batch_sizes(1, 2) == [1]  # never an empty micro-batch
    assert micro_batch_sizes(4, 1) == [4]


def _micro(ranks, images: torch.Tensor, sizes: list[int], exchange=Exchange) -> torch.Tensor:
    parts = images.split(sizes)  # each rank reads its own patches of each micro-batch
    return drive_micro_batches(ranks, [[rank.patches(part) for rank in ranks] for part in parts],
                               [exchange() for _ in parts])


@pytest.mark.parametrize("ranks, sizes", [(2, [2, 2]), (3, [3, 2]), (3, [2, 2, 1])])
def test_micro_batches_in_process_equal_the_whole_batch(ranks, sizes):
    model = random_model(small_spec(depth=3))
    plan = make_segment_plan(make_partition_plan(model.spec.num_tokens, 1, ranks), segments=2)
    images = torch.randn(sum(sizes), 3, 32, 32, generator=torch.Generator().manual_seed(ranks))
    forwards = [RankForward(model, plan, r) for r in range(ranks)]
    with torch.no_grad():
        whole = drive(forwards, [rank.patches(images) for rank in forwards], Exchange())
        micro = _micro(forwards, images, sizes)
    assert micro.shape == whole.shape
    assert_close(micro, whole)
    assert_close(micro, simulate(model, images, plan))


class NoHold(Exchange):
    """An exchange that trusts a stage's outputs to outlive the next micro-batch's run of it."""

    def hold(self, tokens):
        return tokens


def test_engine_chains_hold_each_micro_batchs_tokens(tmp_path):
    """Engine runners reuse their output buffers per batch size: two micro-batches of one size
    through one chain overwrite each other's tokens unless each is held (the check can fail)."""
    model = random_model(small_spec())
    build_engines(model, tmp_path, 2, crs=(2.0,), source={"checkpoint": "random"}, max_batch=8)
    chains = [load_chain(tmp_path / f"rank{r}", "prism", 2.0, options=ONE_THREAD).__enter__() for r in range(2)]
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    modality, plan = chains[0].manifest.model.modality, chains[0].config.plan

    def shares(x):  # what each rank's chain reads of a batch: its own patches
        return [modality.rank_inputs({IMAGES: x}, plan, chain.rank) for chain in chains]

    with torch.no_grad():
        whole = drive(chains, shares(images), Exchange())
        parts = [shares(part) for part in images.split([3, 3])]
        micro = drive_micro_batches(chains, parts, [Exchange(), Exchange()])
        unheld = drive_micro_batches(chains, parts, [NoHold(), NoHold()])
    assert_close(micro, whole)
    assert_close(micro, simulate(model, images, chains[0].config.plan))
    assert not torch.allclose(unheld[:3], whole[:3], atol=1e-3)  # micro-batch 0 read micro-batch 1's tokens


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A random ViT's engines for 2 ranks (local, voltage, prism at L = 2 segments)."""
    root = tmp_path_factory.mktemp("overlap")
    model = random_model(small_spec(depth=3))
    build_engines(model, root, 2, crs=(2.0,), source={"checkpoint": "random"}, max_batch=16)
    return root, model


def test_two_ranks_with_micro_batches_in_flight_answer_like_the_whole_batch(engines):
    root, model = engines
    port = free_port()
    workers = start_workers(root, 2, port)
    executor = None
    try:
        executor = DistributedExecutor(root / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S),
                                       RuntimeOptions(threads=1, micro_batches=2))
        images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        prism_key = executor.key_for("prism", 2.0)
        for key in (ChainKey.voltage(), prism_key):
            executor.micro_batches = 2
            micro = executor.infer(executor.request(images), key, gather_timings=True)
            executor.micro_batches = 1
            whole = executor.infer(executor.request(images), key, gather_timings=True)
            assert not micro.fell_back and not whole.fell_back
            assert_close(micro.logits, whole.logits)
            assert_close(micro.logits, simulate(model, images, _plan(executor, key)))
            # the worker followed rank 0's micro-batches: two all-gathers a block, the same bytes
            for cut, plain in zip(micro.per_rank, whole.per_rank):
                assert cut.collectives == 2 * plain.collectives == 2 * model.spec.depth
                assert (cut.bytes_sent, cut.bytes_received) == (plain.bytes_sent, plain.bytes_received)
                assert cut.wait is None and cut.comm >= 0 and cut.compute > 0
        # steady state: the micro-batches' staging buffers and held tokens are made once
        executor.micro_batches = 2
        staging = [route.staging for route in executor.rank.routes]
        before = [s.allocations for s in staging], dict(executor.rank.held)
        for _ in range(3):
            executor.infer(executor.request(images), prism_key)
        assert [s.allocations for s in staging] == before[0]
        assert {k: id(v) for k, v in executor.rank.held.items()} == {k: id(v) for k, v in before[1].items()}
    finally:
        if executor is not None:
            executor.close()
        results = finish(workers)
    assert all(code == 0 for code, _ in results), results


def _plan(executor, key):
    return executor.rank.routes[executor.rank.config_index(key, None)].config.plan


def test_gpt2_micro_batches_gather_every_position_per_micro_batch(text_engines):
    """A per-position head (GPT-2's LM head) gathers each micro-batch's hidden states to rank 0."""
    pytest.importorskip("transformers")
    from conftest import text_request
    from test_distributed import rank0_with_workers
    from test_text_export import reference

    from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS

    directory, model = text_engines("gpt2")
    with rank0_with_workers(directory) as executor:
        executor.micro_batches = 2
        ids, mask = text_request(3, 1, (16, 11, 5))
        for key in (executor.key_for("voltage"), executor.key_for("prism", 2.0)):
            result = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}), key, True)
            assert not result.fell_back
            assert_close(result.logits, reference(model, key.mode, key.segments, ids, mask), name=str(key))
            assert [t.collectives for t in result.per_rank] == [2 * (model.spec.depth + 1)] * 2
