"""Text models on the distributed runtime: a real GLOO group of two processes over loopback.

Rank 0 runs in the test process (DistributedExecutor); the worker is a real `prism-trt run`
subprocess. The distributed logits must equal :func:`simulate_text` (fp32 tolerance) on padded
batches: for GPT-2 rank 1 reads rank 0's means only, rank 0 reads none, and the LM head runs on
rank 0 over the gathered hidden states of all 16 positions."""

import pytest
import torch
from conftest import ONE_THREAD, TEXT_SEQ_LEN, assert_close, text_request
from test_distributed import TIMEOUT_S, rank0_with_workers
from test_text_export import reference

from prism_trt.engines import ChainKey
from prism_trt.engines.stage_spec import ATTENTION_MASK, IMAGES, INPUT_IDS
from prism_trt.errors import UsageError
from prism_trt.runtime import open_executor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.measure import measure

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")
pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_two_ranks_equal_the_simulation(text_engines, name):
    directory, model = text_engines(name)
    with rank0_with_workers(directory) as executor:
        for seed, lengths in enumerate([(16, 11, 5), (3, 16, 9)]):
            ids, mask = text_request(3, seed, lengths)
            for key in (executor.key_for("voltage"), executor.key_for("prism", 2.0)):
                result = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}), key)
                assert not result.fell_back and result.choice == key
                assert_close(result.logits, reference(model, key.mode, key.segments, ids, mask), name=f"{name} {key}")
        ids, mask = text_request(1, 7, (16,))  # another batch size, with the phase times of both ranks
        request = executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask})
        result = executor.infer(request, executor.key_for("prism", 2.0), True)
        assert_close(result.logits, reference(model, "prism", 4, ids, mask))
        sent = [times.bytes_sent for times in result.per_rank]
        if model.spec.causal:  # rank 1's means are never read; both send their hidden states or means
            assert sent[0] == 2 * 4 * 32 * 4 and sent[1] == 8 * 32 * 4
        local = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}), ChainKey.local())
        assert_close(local.logits, model(ids, mask))


def test_single_board_executor_and_measure(text_engines):
    """`prism-trt run` on one board: the local executor takes named inputs, measure makes text requests."""
    directory, model = text_engines("gpt2")
    executor = open_executor(directory, GroupConfig(0, 1, "127.0.0.1", free_port(), TIMEOUT_S), ONE_THREAD)
    try:
        ids, mask = text_request(2, 3, (16, 4))
        result = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}), ChainKey.local())
        assert_close(result.logits, model(ids, mask))
        assert measure(executor, ChainKey.local(), batch=2, warmup=0, repeat=2).latency.mean_ms > 0
        with pytest.raises(UsageError, match="takes inputs"):
            executor.request({IMAGES: torch.zeros(1, 3, 8, 8)})
        with pytest.raises(UsageError, match="must be int64 of shape"):
            executor.request({INPUT_IDS: ids.int(), ATTENTION_MASK: mask})
        with pytest.raises(UsageError, match="they must match"):
            executor.request({INPUT_IDS: ids[:, :8], ATTENTION_MASK: mask})
        with pytest.raises(UsageError, match=f"longest sequence {TEXT_SEQ_LEN}"):
            executor.request({INPUT_IDS: torch.cat([ids, ids], 1), ATTENTION_MASK: torch.cat([mask, mask], 1)})
        # shorter than the build's N: padded to it, and a per-position head answers the request's own positions
        request = executor.request({INPUT_IDS: ids[:, :5], ATTENTION_MASK: mask[:, :5]})
        short = executor.infer(request, ChainKey.local())
        assert short.logits.shape[1] == TEXT_SEQ_LEN and short.sequence_length == TEXT_SEQ_LEN
        assert_close(request.trim(short.logits), model(ids, mask)[:, :5])
    finally:
        executor.close()
