"""A manifest whose digests were recomputed after an edit passes the integrity check, so the
fields that size buffers and limits (max batch: the server's body limit) are bounded on their
own: a forged value is refused with the manifest's error, not trusted."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_engines, random_model, small_spec

from prism_trt.engines import Manifest, ManifestError
from prism_trt.engines.base import MAX_BATCH_LIMIT, BuildOptions
from prism_trt.engines.json_record import sha256_json
from prism_trt.engines.manifest import DIGEST_FIELD
from prism_trt.errors import UsageError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bounds")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 1, max_batch=8, source={"timm": "test"})
    return out / "rank0"


def forged(built, tmp_path, change) -> Manifest:
    """Load a copy of ``built`` whose manifest ``change`` edited, every digest recomputed."""
    copy = tmp_path / "rank0"
    shutil.copytree(built, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    data.pop(DIGEST_FIELD)
    data[DIGEST_FIELD] = sha256_json(data)
    path.write_text(json.dumps(data))
    return Manifest.load(copy)


@pytest.mark.parametrize("field, value, message", [
    ("max_batch", 10**30, rf"max_batch must be at least 1 and at most {MAX_BATCH_LIMIT}"),
    ("max_batch", MAX_BATCH_LIMIT + 1, rf"max_batch must be at least 1 and at most {MAX_BATCH_LIMIT}"),
    ("opt_batch", 10**30, r"batch profile must satisfy"),
    ("max_batch", 8.5, r"max_batch must be an integer"),
    ("max_batch", True, r"max_batch must be an integer"),
    ("workspace_mib", 10**30, r"workspace_mib must be at least 1 and at most"),
    ("device_id", -1, r"device_id must be"),
    ("device_id", 10**30, r"device_id must be"),
])
def test_a_forged_build_option_is_refused_though_the_digest_matches(built, tmp_path, field, value, message):
    with pytest.raises(ManifestError, match=rf"build_options: {message}"):
        forged(built, tmp_path, lambda data: data["build_options"].update({field: value}))


def test_the_unforged_copy_loads(built, tmp_path):
    assert forged(built, tmp_path, lambda data: None).build_options.max_batch == 8


def test_build_options_bound_the_batch_where_they_are_made():
    assert BuildOptions(max_batch=MAX_BATCH_LIMIT).max_batch == MAX_BATCH_LIMIT
    with pytest.raises(UsageError, match="at most"):
        BuildOptions(max_batch=MAX_BATCH_LIMIT + 1)
