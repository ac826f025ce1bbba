"""One drive loop: embed -> (exchange -> block)* -> head is written once (core/drive.py), with the
exchange as its parameter, and every way of running ranks goes through it with the same answers."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines, random_model, small_spec, text_request

from prism_trt.core import Exchange, make_partition_plan, make_segment_plan, simulate, voltage_plan
from prism_trt.core.drive import drive, remote_means
from prism_trt.core.rank import RankForward
from prism_trt.core.text_rank import TextRankForward, simulate_text, text_partition
from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS, PATCHES, REMOTE_SIZES
from prism_trt.runtime import InferenceRequest, load_chain, run_chains_in_process

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prism_trt"
DRIVE = PACKAGE / "core" / "drive.py"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _calls_block(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "block"
               for n in ast.walk(node))


def _loops_over_depth(node: ast.AST) -> bool:
    """``for ... in range(<something naming depth>)``."""
    return (isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Name)
            and node.iter.func.id == "range" and "depth" in ast.unparse(node.iter))


def _joins_remote_means(node: ast.AST) -> bool:
    """``torch.cat`` over a comprehension that picks ranks' entries: indexed by the loop variable
    (``gathered[q] for q in ...``) or filtered by rank (``... if q != rank``)."""
    if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.cat" and node.args
            and isinstance(node.args[0], (ast.ListComp, ast.GeneratorExp))):
        return False
    comprehension = node.args[0]
    targets = {n.id for g in comprehension.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
    element = comprehension.elt
    indexed = isinstance(element, ast.Subscript) and isinstance(element.slice, ast.Name) and element.slice.id in targets
    filtered = any(isinstance(c, ast.Compare) and any(isinstance(op, ast.NotEq) for op in c.ops)
                   for g in comprehension.generators for c in g.ifs)
    return indexed or filtered


def test_the_block_loop_is_written_once():
    found = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path, tree in _modules() for node in ast.walk(tree)
             if _loops_over_depth(node) and _calls_block(node)]
    assert found == ["core/drive.py:" + str(_line_of_loop(DRIVE))], found


def _line_of_loop(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return next(node.lineno for node in ast.walk(tree) if _loops_over_depth(node) and _calls_block(node))


def test_the_remote_means_are_joined_once():
    found = [str(path.relative_to(PACKAGE)) for path, tree in _modules() for node in ast.walk(tree)
             if _joins_remote_means(node)]
    assert found == ["core/drive.py"], found


def test_the_checks_can_fail():
    """The two patterns the checks look for are the ones the former copies were written with."""
    loop = ast.parse("for index in range(chains[0].depth):\n    states = [c.block(index, x) for c, x in s]")
    assert _loops_over_depth(loop.body[0]) and _calls_block(loop.body[0])
    for source in ("torch.cat([means for q, means in enumerate(gathered) if q != rank], dim=1)",
                   "torch.cat([gathered[q] for q in self.sources], dim=1)"):
        assert _joins_remote_means(ast.parse(source).body[0].value)
    assert not _joins_remote_means(ast.parse("torch.cat([s[:, :n] for s, n in zip(a, b)], dim=1)").body[0].value)


class Recording(Exchange):
    """The list exchange, keeping what every rank received before each block."""

    def __init__(self):
        self.received = []

    def means(self, ranks, sent):
        remote = super().means(ranks, sent)
        self.received.append(remote)
        return remote


def _plain_loop(ranks, requests):
    """The loop as it used to be written beside each runner: the reference the drive must equal."""
    states = [rank.embed(request) for rank, request in zip(ranks, requests)]
    for index in range(ranks[0].depth):
        gathered = [means for _, means in states]
        states = [rank.block(index, x, remote_means(gathered, rank.attended_ranks), request)
                  for rank, (x, _), request in zip(ranks, states, requests)]
    return [x for x, _ in states]


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("segments", [None, 2])
def test_vit_ranks_driven_bit_identically(ranks, segments):
    model = random_model(small_spec(depth=3))
    partition = make_partition_plan(model.spec.num_tokens, 1, ranks)
    plan = voltage_plan(partition) if segments is None else make_segment_plan(partition, segments=segments)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(ranks))
    forwards = [RankForward(model, plan, r) for r in range(ranks)]
    patches = [rank.patches(images) for rank in forwards]  # each rank reads its own patches
    with torch.no_grad():
        expected = forwards[0].head(_plain_loop(forwards, patches)[0])
        exchange = Recording()
        got = drive(forwards, patches, exchange)
    assert torch.equal(got, expected) and torch.equal(simulate(model, images, plan), expected)
    assert len(exchange.received) == model.spec.depth
    for remote in exchange.received:  # every rank reads every other rank's means, once per block
        assert [None if m is None else m.shape[1] for m in remote] == \
            [None if ranks == 1 else plan.remote_count(r) for r in range(ranks)]


@pytest.mark.parametrize("name, head", [("gpt2", "lm"), ("bert-base-uncased", "classifier")])
def test_text_ranks_driven_bit_identically(name, head):
    pytest.importorskip("transformers")
    from test_text_model import random_batch, tiny_pair

    _, model = tiny_pair(name, head)
    plan = make_segment_plan(text_partition(model.spec, 12, 3), segments=2)
    ids, mask = random_batch(2, 12, seed=4, lengths=[12, 7])
    forwards = [TextRankForward(model, plan, r) for r in range(3)]
    batches = [rank.batch(ids, mask) for rank in forwards]
    with torch.no_grad():
        final = _plain_loop(forwards, batches)
        expected = forwards[0].head(final[0]) if model.reads_only_prefix else \
            torch.cat([rank.head(x) for rank, x in zip(forwards, final)], dim=1)
        exchange = Recording()
        got = drive(forwards, batches, exchange, head_reads_all_positions=not model.reads_only_prefix)
    assert torch.equal(got, expected) and torch.equal(simulate_text(model, plan, ids, mask), expected)
    if model.spec.causal:  # rank p reads the means of ranks before it only; the last rank's go nowhere
        assert [[None if m is None else m.shape[1] for m in remote] for remote in exchange.received][0] == \
            [None, plan.counts[0], plan.counts[0] + plan.counts[1]]


def test_vit_engine_chains_driven_like_the_reference(tmp_path):
    model = random_model(small_spec())
    build_engines(model, tmp_path, 2, crs=(2.0,), source={"checkpoint": "random"}, max_batch=8)
    chains = [load_chain(tmp_path / f"rank{r}", "prism", 2.0, options=ONE_THREAD).__enter__() for r in range(2)]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    plan = chains[0].config.plan
    shares = [{PATCHES: (rank.patches(images) * 0.5 + 0.5) * 255}  # raw pixels: the engines normalise
              for rank in (RankForward(model, plan, r) for r in range(2))]
    with torch.no_grad():
        expected = chains[0].head(_plain_loop(chains, shares)[0])
    got = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))
    assert torch.equal(got, expected)
    assert_close(got, simulate(model, images, chains[0].config.plan))


def test_text_engine_chains_driven_like_the_reference(text_engines):
    pytest.importorskip("transformers")
    directory, model = text_engines("gpt2")
    chains = [load_chain(directory / f"rank{r}", "prism", 2.0, options=ONE_THREAD).__enter__() for r in range(2)]
    ids, mask = text_request()
    request = {INPUT_IDS: ids, ATTENTION_MASK: mask}
    shares = []  # each rank reads its own positions and the sizes of the segments it attends to
    for rank in range(2):
        share = TextRankForward(model, chains[0].config.plan, rank).share(ids, mask)
        shares.append({INPUT_IDS: share.input_ids, ATTENTION_MASK: share.attention_mask,
                       **({} if share.remote_sizes is None else {REMOTE_SIZES: share.remote_sizes})})
    with torch.no_grad():
        expected = chains[0].head(torch.cat(_plain_loop(chains, shares), dim=1))
    got = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, request))
    assert torch.equal(got, expected)
    assert_close(got, simulate_text(model, chains[0].config.plan, ids, mask))
