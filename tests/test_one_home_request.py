"""One request type and one modality object: counted in the code, and the request's behaviour.

The request is made (checked, given its bucket, padded) in one place, ``InferenceRequest.create``,
and cut back in one, ``InferenceRequest.trim``; which model family a build holds is answered by its
modality object (``engines/modality.py``), and the layers above attach their parts to it by kind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import prism_trt
from prism_trt.engines.manifest import ModelRecord
from prism_trt.engines.modality import MODALITIES, Modality, Text, Vision
from prism_trt.engines.stage_spec import ATTENTION_MASK, IMAGES, INPUT_IDS
from prism_trt.errors import UsageError
from prism_trt.model.spec import ViTSpec
from prism_trt.model.text_spec import TextSpec
from prism_trt.runtime.request import InferenceRequest

ROOT = Path(prism_trt.__file__).parent
#: The modality objects themselves (and the model families they describe) may ask what they are.
MODALITY_HOMES = {"engines/modality.py"}
FAMILY_NAMES = {"TextSpec", "ViTSpec", "PrismText", "PrismViT"}
KIND_LITERALS = {"text", "vit"}
MOST_MODALITY_QUESTIONS = 5

VIT = ViTSpec(name="request-vit", img_size=(4, 4), patch_size=(2, 2), in_chans=1, num_prefix_tokens=1, embed_dim=8,
              depth=1, num_heads=1, head_dim=8, mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-6, qkv_bias=True,
              pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=3, mean=(0.5,), std=(0.5,))


def text_spec(head: str) -> TextSpec:
    classifier = head == "classifier"
    return TextSpec(name=f"request-{head}", family="bert" if classifier else "gpt2", vocab_size=11, max_positions=16,
                    type_vocab_size=2 if classifier else 0, num_prefix_tokens=1 if classifier else 0, head=head,
                    num_classes=2 if classifier else 0, embed_dim=8, depth=1, num_heads=1, head_dim=8,
                    mlp_hidden_dim=16, mlp_act="gelu", norm_eps=1e-5, qkv_bias=True)


def _sources() -> list[tuple[str, ast.AST]]:
    return [(str(path.relative_to(ROOT)), ast.parse(path.read_text())) for path in sorted(ROOT.rglob("*.py"))
            if path.relative_to(ROOT).parts[0] != "model"]


def _names(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, (ast.Name, ast.Attribute))}


def modality_questions() -> list[str]:
    """Every place outside the modality objects that asks which family a model is: an isinstance
    against a family's spec or model class, a comparison with a kind's name, or is_text_model()."""
    found = []
    for path, tree in _sources():
        if path in MODALITY_HOMES:
            continue
        for node in ast.walk(tree):
            asks = False
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "isinstance" and len(node.args) == 2:
                    asks = bool(_names(node.args[1]) & FAMILY_NAMES)
                asks |= node.func.id == "is_text_model"
            elif isinstance(node, ast.Compare):
                literals = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                asks = bool(literals & KIND_LITERALS) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
            if asks:
                found.append(f"{path}:{node.lineno}")
    return found


def calls_of(name: str) -> list[str]:
    return [f"{path}:{node.lineno}" for path, tree in _sources() for node in ast.walk(tree)
            if isinstance(node, ast.Call) and name in _names(node.func) and
            (isinstance(node.func, ast.Name) and node.func.id == name or
             isinstance(node.func, ast.Attribute) and node.func.attr == name)]


def test_at_most_five_places_outside_the_modality_objects_ask_which_modality():
    questions = modality_questions()
    assert len(questions) <= MOST_MODALITY_QUESTIONS, questions


def test_the_request_is_checked_bucketed_padded_and_trimmed_in_one_place():
    # the bucket: one rule (shortest_holding), used by the bucket set and the request's constructor
    assert sorted(p.split(":")[0] for p in calls_of("shortest_holding")) == ["engines/buckets.py",
                                                                             "runtime/request.py"]
    # padding and trimming of a request's tensors: only in the request type
    padding = [p for p in calls_of("pad") if p.split(":")[0].startswith(("runtime/", "serve/"))]
    assert [p.split(":")[0] for p in padding] == ["runtime/request.py"]
    assert [p.split(":")[0] for p in calls_of("trim")] == ["serve/batcher.py"]  # the server's one trim
    # the model's check of a request's tensors: only InferenceRequest.create builds them from raw tensors
    assert [p.split(":")[0] for p in calls_of("create") if p.startswith(("runtime/", "serve/"))] == \
        ["runtime/request.py", "serve/kserve.py"]
    # no union of plain tensor and mapping threads through: the helpers that branched on it are gone
    defined = {node.name for _, tree in _sources() for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert not defined & {"as_request", "fit_request", "trim_positions", "batch_size", "item_shape"}


def test_every_kind_has_its_served_and_exported_parts():
    from prism_trt.export.stages import STAGE_BUILDERS
    from prism_trt.serve.app import SERVED

    assert set(SERVED) == set(STAGE_BUILDERS) == set(MODALITIES) == {"vit", "text"}


# ------------------------------------------------------------------ the modality objects


def test_modality_answers_what_differs():
    vision, lm, classifier = Vision(VIT), Text(text_spec("lm"), 8), Text(text_spec("classifier"), 8)
    assert vision.num_tokens == VIT.num_tokens and not vision.per_position and not vision.causal
    assert [t.name for t in vision.request_inputs()] == [IMAGES] and vision.output_shape() == (3,)
    assert lm.num_tokens == 8 and lm.per_position and lm.causal and lm.output_shape(4) == (4, 11)
    assert [t.name for t in lm.request_inputs(4)] == [INPUT_IDS, ATTENTION_MASK]
    assert not classifier.per_position and classifier.output_shape(4) == (2,)
    assert Modality.of_spec(VIT, 99) == vision and Modality.of_spec(text_spec("lm"), 8) == lm
    record = ModelRecord.of({"text": "x"}, lm, "0" * 64)
    assert record.kind == "text" and record.sequence_length == 8 and record.modality == lm
    assert ModelRecord({"timm": "x"}, VIT, "0" * 64).to_dict().keys() == {"source", "spec", "weights_sha256"}
    with pytest.raises(UsageError, match="needs a sequence length"):
        ModelRecord({"text": "x"}, text_spec("lm"), "0" * 64, "text")
    with pytest.raises(UsageError, match="TextSpec"):
        ModelRecord({"text": "x"}, VIT, "0" * 64, "text", 8)


# ------------------------------------------------------------------ the request type


def test_a_vit_request_takes_its_images_as_they_are():
    record = ModelRecord({"timm": "x"}, VIT, "0" * 64)
    images = torch.randn(2, 1, 4, 4)
    request = InferenceRequest.of(record, images)
    assert request.tensors[IMAGES] is images and request.bucket_length is None and request.positions is None
    assert request.batch_size == 2 and request.trim(torch.ones(2, 3)).shape == (2, 3)
    assert InferenceRequest.create(record.modality, {IMAGES: images}).item_shape == request.item_shape
    with pytest.raises(UsageError, match="must be float32 or uint8 of shape"):
        InferenceRequest.of(record, torch.randn(2, 3, 4, 4))
    with pytest.raises(UsageError, match="must be float32 or uint8 of shape"):
        InferenceRequest.of(record, images.double())
    with pytest.raises(UsageError, match="takes inputs"):
        InferenceRequest.of(record, {"input": images})
    pixels = InferenceRequest.of(record, torch.zeros(2, 1, 4, 4, dtype=torch.uint8))  # raw pixels, one byte each
    assert pixels.item_shape != request.item_shape  # raw and normalised images never share a batch
    with pytest.raises(UsageError, match="cannot share a batch"):
        InferenceRequest.concatenate([request, pixels])


def _ids(batch: int, positions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 11, (batch, positions), generator=torch.Generator().manual_seed(seed))
    return {INPUT_IDS: ids, ATTENTION_MASK: torch.ones_like(ids)}


def test_a_text_request_is_padded_to_its_bucket_and_trimmed_back():
    lm = ModelRecord({"text": "x"}, text_spec("lm"), "0" * 64, "text", 16)
    inputs = _ids(2, 5)
    request = InferenceRequest.of(lm, inputs, lengths=(8, 16))
    assert request.bucket_length == 8 and request.positions == 5
    for name in (INPUT_IDS, ATTENTION_MASK):
        padded = request.tensors[name]
        assert padded.shape == (2, 8) and torch.equal(padded[:, :5], inputs[name]) and not padded[:, 5:].any()
    logits = torch.randn(2, 8, 11)
    assert torch.equal(request.trim(logits), logits[:, :5])
    assert InferenceRequest.of(lm, _ids(1, 9), lengths=(8, 16)).bucket_length == 16
    assert InferenceRequest.of(lm, _ids(1, 9)).bucket_length == 16  # default: the build's own length
    classifier = ModelRecord({"text": "x"}, text_spec("classifier"), "0" * 64, "text", 16)
    answer = InferenceRequest.of(classifier, _ids(2, 5), lengths=(8, 16))
    assert answer.positions is None and answer.trim(torch.ones(2, 2)).shape == (2, 2)  # no position axis
    with pytest.raises(UsageError, match="longest sequence 16"):
        InferenceRequest.of(lm, _ids(1, 17), lengths=(8, 16))
    with pytest.raises(UsageError, match="named inputs"):
        InferenceRequest.of(lm, inputs[INPUT_IDS])
    with pytest.raises(UsageError, match="must match"):
        InferenceRequest.of(lm, {INPUT_IDS: inputs[INPUT_IDS], ATTENTION_MASK: inputs[ATTENTION_MASK][:, :4]})


def test_requests_of_one_bucket_share_a_batch_and_others_are_refused():
    lm = ModelRecord({"text": "x"}, text_spec("lm"), "0" * 64, "text", 16)
    short, shorter, long = (InferenceRequest.of(lm, _ids(b, n, seed=n), lengths=(8, 16))
                            for b, n in ((2, 5), (1, 3), (1, 12)))
    batch = InferenceRequest.concatenate([short, shorter])
    assert batch.batch_size == 3 and batch.bucket_length == 8 and batch.positions == 5
    assert torch.equal(batch.tensors[INPUT_IDS], torch.cat([short.tensors[INPUT_IDS], shorter.tensors[INPUT_IDS]]))
    assert InferenceRequest.concatenate([long]) is long
    with pytest.raises(UsageError, match="cannot share a batch"):
        InferenceRequest.concatenate([short, long])
