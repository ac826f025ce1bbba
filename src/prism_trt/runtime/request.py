"""The one request type, from the protocol edge to the engines: the model's named tensors,
checked once, already padded to the sequence bucket that runs them.

A text request of n positions runs on the shortest built bucket N >= n, right-padded there (ids
0, mask 0): exact, padding never changes a real position's output. The bucket is chosen, and the
padding done, when the request is made (:meth:`InferenceRequest.create`); a per-position head's
logits are cut back to the request's own positions by :meth:`InferenceRequest.trim`, once, by
whoever hands the answer out (the server's batcher per request; a programmatic caller itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..engines.buckets import shortest_holding
from ..engines.modality import Modality
from ..engines.model_record import ModelRecord
from ..errors import UsageError


@dataclass(frozen=True, eq=False)
class InferenceRequest:
    """One request (or one executor batch of several): B items of the model's named tensors.

    tensors: name -> (B, ...) in the model's shapes and one of its dtypes for each
        (:meth:`~prism_trt.engines.modality.Modality.dtypes`: a ViT's images are raw uint8 pixels or
        normalised float32), padded to ``bucket_length``.
    bucket_length: the sequence bucket N the request runs on; None for a model of fixed tokens (ViT).
    positions: where a per-position head's answer ends (the request's own n <= N); None where the
        logits have no position axis.
    """

    tensors: dict[str, torch.Tensor]
    bucket_length: int | None = None
    positions: int | None = None

    @classmethod
    def create(cls, modality: Modality, tensors: Mapping[str, torch.Tensor], lengths: Sequence[int] = ()
               ) -> InferenceRequest:
        """The request for ``modality`` of named ``tensors``, checked (names, dtypes, shapes, one batch
        size), on the shortest of the built sequence ``lengths`` (ascending; default the modality's
        own) that holds it, padded to it. A UsageError says what is wrong."""
        tensors = dict(tensors)
        names = [t.name for t in modality.request_inputs()]
        if sorted(tensors) != sorted(names):
            raise UsageError(f"{modality.spec.name} takes inputs {names}, got {sorted(tensors)}")
        positions = modality.request_positions(tensors)
        length = None
        if positions is not None:
            lengths = tuple(lengths) or (modality.sequence_length,)
            length = lengths[shortest_holding(lengths, positions)]
        specs = modality.request_inputs(length)
        batch = tensors[specs[0].name].shape[0] if tensors[specs[0].name].dim() else 0
        padded = {}
        for spec in specs:
            tensor, want = tensors[spec.name], spec.concrete(batch)
            given = want if positions is None else (*want[:-1], positions)
            dtypes = modality.dtypes(spec)
            if str(tensor.dtype).removeprefix("torch.") not in dtypes or tuple(tensor.shape) != given:
                raise UsageError(f"input {spec.name!r} must be {' or '.join(dtypes)} of shape {list(given)}, got "
                                 f"{tensor.dtype} of shape {list(tensor.shape)}"
                                 + ("; every input holds the request's positions, they must match"
                                    if positions else ""))
            padded[spec.name] = tensor if given == want else torch.nn.functional.pad(tensor, (0, want[-1] - positions))
        return cls(padded, length, positions if modality.per_position else None)

    @classmethod
    def of(cls, model: ModelRecord, inputs: torch.Tensor | Mapping[str, torch.Tensor], lengths: Sequence[int] = ()
           ) -> InferenceRequest:
        """The request of a programmatic caller: a model's one input as a plain tensor (a ViT's
        images), or its named tensors. See :meth:`create`."""
        if isinstance(inputs, torch.Tensor):
            names = [t.name for t in model.request_inputs()]
            if len(names) != 1:
                raise UsageError(f"{model.spec.name} takes named inputs {names}; pass them as a mapping")
            inputs = {names[0]: inputs}
        return cls.create(model.modality, inputs, lengths)

    @property
    def batch_size(self) -> int:
        """Items in the request."""
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def item_shape(self) -> tuple:
        """What must agree for requests to share a batch: the bucket and every tensor's dtype and
        item shape (raw uint8 pixels and normalised float32 ones are different scales)."""
        return (self.bucket_length, tuple((name, str(t.dtype), tuple(t.shape[1:]))
                                          for name, t in sorted(self.tensors.items())))

    @classmethod
    def concatenate(cls, requests: Sequence[InferenceRequest]) -> InferenceRequest:
        """One executor batch of several requests of one item shape, in order. Its ``positions`` is
        the longest of theirs: the batch's answer is only cut per request (:meth:`trim`)."""
        if len(requests) == 1:
            return requests[0]
        first = requests[0]
        for request in requests[1:]:
            if request.item_shape != first.item_shape:
                raise UsageError(f"requests of item shapes {first.item_shape} and {request.item_shape} cannot "
                                 f"share a batch")
        positions = None if first.positions is None else max(r.positions for r in requests)
        tensors = {name: torch.cat([r.tensors[name] for r in requests]) for name in first.tensors}
        return cls(tensors, first.bucket_length, positions)

    def trim(self, logits: torch.Tensor) -> torch.Tensor:
        """A per-position head's logits (B, N, ...) cut back to the request's own positions."""
        return logits if self.positions is None else logits[:, :self.positions]
