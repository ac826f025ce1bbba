"""KServe v2 for text models: INT64 input_ids + attention_mask in, logits out, through
tritonclient (JSON and binary) on the in-process app, and a real two-rank `prism-trt serve`.

Requests shorter than the build's 16 positions are padded by the server; a GPT-2 answers logits
for the request's own positions, a BERT classifier [B, classes] logits and their label."""

from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, assert_close, text_request
from serving import running
from test_serve_cluster import _output, _serve, _stop
from test_text_export import reference

from prism_trt.engines import ChainKey
from prism_trt.runtime.api import FixedSelector
from prism_trt.runtime.group import free_port
from prism_trt.runtime.local import LocalExecutor
from prism_trt.serve import create_app
from prism_trt.serve.client import wait_until_ready

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")
triton_http = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", params=["gpt2", "bert-base-uncased"])
def text_app(request, text_engines):
    """(name, URL, model) of the app over a local executor of the family's engines."""
    directory, model = text_engines(request.param)
    executor = LocalExecutor(directory / "rank0", options=ONE_THREAD)
    try:
        with running(create_app(executor, FixedSelector(ChainKey.local()), max_wait_ms=5)) as url:
            yield request.param, url, model
    finally:
        executor.close()


def triton_infer(url: str, name: str, ids: np.ndarray, mask: np.ndarray | None, binary: bool, outputs=None):
    client = triton_http.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    try:
        inputs = []
        for tensor_name, values in (("input_ids", ids), ("attention_mask", mask)):
            if values is not None:
                tensor = triton_http.InferInput(tensor_name, list(values.shape), "INT64")
                tensor.set_data_from_numpy(values, binary_data=binary)
                inputs.append(tensor)
        requested = None if outputs is None else [triton_http.InferRequestedOutput(o, binary_data=binary)
                                                  for o in outputs]
        return client.infer(name, inputs, outputs=requested)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gets_the_model_outputs(text_app, binary):
    name, url, model = text_app
    ids, mask = text_request(3, seed=5, lengths=(10, 7, 3))
    short = 10  # the request's own length: the server pads to 16
    result = triton_infer(url, name, ids[:, :short].numpy(), mask[:, :short].numpy(), binary)
    with torch.no_grad():
        expected = model(ids, mask)
    logits = result.as_numpy("logits")
    if model.spec.causal:
        assert logits.shape == (3, short, 97) and result.as_numpy("label") is None
        assert_close(logits, expected[:, :short])
    else:
        assert logits.shape == (3, model.spec.num_classes)
        assert_close(logits, expected)
        np.testing.assert_array_equal(result.as_numpy("label"), expected.numpy().argmax(axis=1))
    unmasked = triton_infer(url, name, ids.numpy(), None, binary)  # no attention_mask: every position is a token
    with torch.no_grad():
        assert_close(unmasked.as_numpy("logits"), model(ids, torch.ones_like(ids)))


def test_text_metadata(text_app):
    name, url, model = text_app
    metadata = httpx.get(f"{url}/v2/models/{name}").json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    assert metadata["parameters"]["max_sequence_length"] == 16 and metadata["parameters"]["vocab_size"] == 97
    names = [o["name"] for o in metadata["outputs"]]
    assert names == (["logits"] if model.spec.causal else ["logits", "label"])


def _tensor(name="input_ids", shape=(1, 4), datatype="INT64", data=None):
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": data or [1] * int(np.prod(shape))}


@pytest.mark.parametrize("inputs, status, fragment", [
    ([_tensor(datatype="FP32")], 400, "takes INT64"),
    ([_tensor(data=[1, 2, 97, 3])], 400, "must lie in [0, 97)"),
    ([_tensor(shape=(1, 17))], 413, "built for at most 16"),
    ([_tensor(shape=(5, 2))], 413, "max batch 4"),
    ([_tensor(), _tensor("attention_mask", data=[1, 2, 0, 0])], 400, "only 0 (padding) and 1"),
    ([_tensor(), _tensor("attention_mask", shape=(1, 3))], 400, "they must match"),
    ([_tensor("attention_mask")], 400, "no 'input_ids'"),
    ([_tensor(), _tensor()], 400, "given twice"),
    ([_tensor("input")], 400, "unknown input"),
    ([_tensor(data=[1.5, 2, 3, 4])], 400, "only integers"),
])
def test_bad_text_requests_are_refused(text_app, inputs, status, fragment):
    name, url, _ = text_app
    response = httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": inputs})
    assert response.status_code == status and fragment in response.json()["error"], response.text


def test_text_model_has_no_image_endpoint(text_app):
    name, url, _ = text_app
    response = httpx.post(f"{url}/v2/models/{name}/infer/image", content=b"x", headers={"content-type": "image/png"})
    assert response.status_code == 404 and "text model" in response.json()["error"]


@contextmanager
def two_rank_serve(directory, cr: str = "2"):
    """(URL, rank 0, worker) of a real two-rank `prism-trt serve --mode prism`, once ready; both
    ranks are stopped however the body ends."""
    master, http = free_port(), free_port()
    worker = _serve(directory, 1, master, http, cr=cr)
    server = _serve(directory, 0, master, http, cr=cr)
    url = f"http://127.0.0.1:{http}"
    try:
        assert wait_until_ready(url, [server, worker]), _output(server, 5)[-3000:]
        yield url, server, worker
    finally:
        _stop(server, worker)


def test_two_rank_serve(text_engines):
    """`prism-trt serve --mode prism` on two real ranks answers what the Prism simulation computes."""
    directory, model = text_engines("gpt2")
    with two_rank_serve(directory) as (url, server, worker):
        ids, mask = text_request(2, seed=9, lengths=(16, 12))
        for binary in (True, False):
            result = triton_infer(url, "gpt2", ids.numpy(), mask.numpy(), binary)
            assert result.get_response()["parameters"]["choice"] == "prism-cr2"
            assert_close(result.as_numpy("logits"), reference(model, "prism", 4, ids, mask))
        _stop(server)  # SIGTERM on rank 0 stops every rank
        assert "stopped by rank 0" in _output(worker, 60) and worker.returncode == 0
        assert server.returncode == 0, _output(server)
