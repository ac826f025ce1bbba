"""Shared fixtures: small deterministic models, the shared MNIST data (skipped when absent)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from hypothesis import settings

from prism_trt.core.precision import Comparison, require_close
from prism_trt.data import data_dir
from prism_trt.export.onnx_export import DYNAMO_MIN_TORCH, dynamo_supported
from prism_trt.model import PrismViT, ViTSpec, from_timm
from prism_trt.model.adapters import create_timm
from prism_trt.runtime import RuntimeOptions

torch.set_num_threads(2)

# How the tests run engines: one intra-op thread (two where a test times or checks more work).
ONE_THREAD, TWO_THREADS = RuntimeOptions(threads=1), RuntimeOptions(threads=2)

# Reproducible property tests: examples derived from the test itself, none replayed from a database.
settings.register_profile("prism-trt", derandomize=True, database=None, deadline=None)
settings.load_profile("prism-trt")


needs_dynamo = pytest.mark.skipif(
    not dynamo_supported(),
    reason=f"torch {torch.__version__}'s dynamo ONNX exporter cannot export the stages (needs torch >= "
           f"{'.'.join(map(str, DYNAMO_MIN_TORCH))}); the torchscript exporter is tested instead")


def assert_close(got, want, precision: str = "fp32", name: str = "output") -> Comparison:
    """Assert ``got`` matches ``want`` under the precision's tolerance (prism_trt.core.precision),
    failing (ToleranceError is an AssertionError) with the report: errors, worst element, margin."""
    return require_close(got, want, precision, name)


@pytest.fixture(scope="session")
def mnist_dir():
    root = data_dir() / "mnist"
    if not (root / "vit_mnist.pt").is_file() or not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"shared MNIST data not found at {root} (set PRISM_TRT_DATA to the folder holding mnist/)")
    return root


@pytest.fixture(scope="session")
def mnist_model(mnist_dir):
    from prism_trt.model import from_mnist_checkpoint

    return from_mnist_checkpoint(mnist_dir / "vit_mnist.pt")


@pytest.fixture(scope="session")
def timm_pair():
    """Cached (timm module, PrismViT) pairs by name, random init with a fixed seed."""
    cache = {}

    def get(name: str):
        if name not in cache:
            reference = create_timm(name, seed=0)
            cache[name] = (reference, from_timm(reference, name))
        return cache[name]

    return get


def build_engines(model: PrismViT, out, ranks: int, crs=(), segments=(), source: dict | None = None,
                  max_batch: int = 32, threads: int = 1, exporter: str = "torchscript", backend=None,
                  precision: str = "fp32"):
    """Real engine directories for ``ranks`` ranks (local, voltage and one prism chain per CR)."""
    from prism_trt.engines import BuildOptions, get_backend
    from prism_trt.export.build import Builder, config_plans

    spec = model.spec
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, ranks, list(crs), list(segments))
    builder = Builder(model, source or {"timm": spec.name}, backend or get_backend("onnxruntime", threads=threads),
                      BuildOptions(max_batch=max_batch, precision=precision), exporter=exporter)
    return builder.build(out, ranks, configs, progress=False)


def small_spec(img: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2, head_dim: int = 16,
               prefix: int = 1, act: str = "gelu") -> ViTSpec:
    return ViTSpec(name="tiny-test", img_size=(img, img), patch_size=(patch, patch), in_chans=3,
                   num_prefix_tokens=prefix, embed_dim=dim, depth=depth, num_heads=heads, head_dim=head_dim,
                   mlp_hidden_dim=2 * dim, mlp_act=act, norm_eps=1e-6, qkv_bias=True, pre_norm=False,
                   final_norm=True, pool="token", fc_norm=False, num_classes=5, mean=(0.5,) * 3, std=(0.5,) * 3)


def random_model(spec: ViTSpec, seed: int = 0) -> PrismViT:
    """A PrismViT whose every parameter (norms and embeddings too) is random."""
    torch.manual_seed(seed)
    model = PrismViT(spec).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


_testbed_names = itertools.count()


@pytest.fixture
def testbed_name():
    """A testbed name unique to this process and test. Skips where this machine cannot build a
    testbed (no root, no ip/tc, no veth or tbf: probed for real), and removes the testbed's
    namespaces at teardown whatever the test did, so failures and parallel runs leave nothing."""
    from prism_trt.profiler.testbed import TESTBED_PREFIX, cleanup_stale, testbed_support

    ok, why = testbed_support()
    if not ok:
        pytest.skip(f"no network testbed here: {why}")
    name = f"t{os.getpid() % 0xFFFFF:x}{next(_testbed_names)}"
    yield name
    cleanup_stale(f"{TESTBED_PREFIX}{name}-")


# -- the inference server (tests/test_serve_app.py, tests/test_serve_inputs.py) -------------------------


@pytest.fixture(scope="session")
def serve_executor(tmp_path_factory):
    """A real LocalExecutor over engines built here, reporting whatever health a test sets."""
    from serving import MAX_BATCH, ReportingLocalExecutor

    out = tmp_path_factory.mktemp("serve-engines")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 1, source={"timm": "test"}, max_batch=MAX_BATCH)
    executor = ReportingLocalExecutor(out / "rank0", options=ONE_THREAD)
    yield executor
    executor.close()


def _serving_client(executor, selector, **options):
    import httpx
    from serving import running

    from prism_trt.serve import create_app

    with running(create_app(executor, selector, **options)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def serve_client(serve_executor):
    """The app with the fixed local chain, a short batching wait and a 1 MiB body limit."""
    from serving import BODY_LIMIT, LOCAL

    from prism_trt.runtime.api import FixedSelector

    yield from _serving_client(serve_executor, FixedSelector(LOCAL), max_wait_ms=25, max_body_bytes=BODY_LIMIT)


@pytest.fixture
def triton(serve_client):
    """(tritonclient.http, its client of ``serve_client``'s server)."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(str(serve_client.base_url).removeprefix("http://"),
                                               connection_timeout=30, network_timeout=30)
    yield triton_http, client
    client.close()


@contextmanager
def loopback_cluster(engines, timeout_s: float, options: RuntimeOptions):
    """Rank 0's real DistributedExecutor over ``engines`` (its rank0/) in this process and one
    worker process (`prism-trt run --rank 1`) on loopback: yields (executor, worker), then closes
    the executor and waits for the worker (bounded)."""
    from prism_trt.runtime.distributed import DistributedExecutor
    from prism_trt.runtime.group import GroupConfig, free_port

    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines),
                               "--rank", "1", "--world-size", "2", "--master-port", str(port), "--threads", "1",
                               "--timeout", str(timeout_s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, timeout_s), options)
    try:
        yield executor, worker
    finally:
        executor.close()
        try:
            worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()


@pytest.fixture(scope="session")
def flaky_client(serve_executor):
    """Same executor, a selector the executor fails on for batches of 3, and a long batching wait."""
    from serving import VoltageForBatchOfThree

    yield from _serving_client(serve_executor, VoltageForBatchOfThree(), max_wait_ms=300)


@pytest.fixture(scope="session")
def auth_client(serve_executor):
    from serving import LOCAL, TOKEN

    from prism_trt.runtime.api import FixedSelector

    yield from _serving_client(serve_executor, FixedSelector(LOCAL), token=TOKEN, max_wait_ms=1)


#: A test-size text model: 2 blocks, width 32, 4 heads, 97 ids, sequences of 16 positions.
TEXT_SIZE = dict(layers=2, hidden_size=32, heads=4, vocab_size=97)
TEXT_SEQ_LEN = 16


@pytest.fixture(scope="session")
def text_engines(tmp_path_factory):
    """name -> (two-rank engine directory built by `prism-trt build`, the same PrismText): tiny
    GPT-2 / BERT at N = 16 with local, voltage and prism CR 2 chains (torchscript, max batch 4)."""
    from click.testing import CliRunner

    from prism_trt.cli import main
    from prism_trt.model.text_adapters import load_text_model, size_overrides

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"text-{name}")
            sizes = [arg for key, value in TEXT_SIZE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
            result = CliRunner().invoke(main, ["build", "--model", name, *sizes, "--seq-len", str(TEXT_SEQ_LEN),
                                               "--ranks", "2", "--cr", "2", "--exporter", "torchscript",
                                               "--opt-batch", "2", "--max-batch", "4", "--threads", "1",
                                               "--out", str(out), "-q"])
            assert result.exit_code == 0, result.output
            cache[name] = (out, load_text_model(name, **size_overrides(name, **TEXT_SIZE)))
        return cache[name]

    return get


def text_request(batch: int = 3, seed: int = 0, lengths: tuple[int, ...] = (16, 11, 5)):
    """Deterministic ids (B, 16) and a right-padded attention mask with the given valid lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_SIZE["vocab_size"], (batch, TEXT_SEQ_LEN), generator=generator)
    mask = (torch.arange(TEXT_SEQ_LEN)[None, :] < torch.tensor(lengths[:batch])[:, None]).long()
    return ids, mask
