"""The typed verification reports a manifest keeps for every built stage (Polygraphy's comparator
structs): per check, each output's :class:`~prism_trt.core.precision.Comparison` and what follows
from them; per stage, the engine check and, where it was run apart, the export check.

The JSON layout is what the build has always written, field for field, so a manifest reads back
and writes out unchanged (its digest included)::

    {"batches": [...], "device": str,
     "engine": {"precision", "passed", "used", "max_abs_error", "outputs": [Comparison, ...]},
     "export": {the same} | null}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..core.precision import Comparison
from .json_record import NUMBER, Fields


@dataclass(frozen=True)
class VerificationReport:
    """One check (the engine on its target, or the exported ONNX on the CPU) against the torch
    reference: per output, the comparison that used the largest share of its tolerance."""

    precision: str
    outputs: tuple[Comparison, ...]

    @classmethod
    def of(cls, comparisons: Sequence[Comparison]) -> VerificationReport:
        return cls(comparisons[0].precision, tuple(comparisons))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)

    @property
    def used(self) -> float:
        """The largest share of its tolerance any output needed (<= 1 passes)."""
        return max(c.used for c in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "passed": self.passed, "used": self.used,
                "max_abs_error": self.max_abs_error, "outputs": [c.to_dict() for c in self.outputs]}

    @classmethod
    def parse(cls, record: Fields) -> VerificationReport:
        record.get("passed", bool)
        record.number("used", minimum=0)
        record.number("max_abs_error", minimum=0)
        outputs = tuple(_comparison(output) for output in record.items("outputs"))
        if not outputs:
            raise record.fail("outputs", "empty: a check compares at least one output")
        report = cls(record.get("precision", str), outputs)
        for name in ("passed", "used", "max_abs_error"):
            if record.data[name] != getattr(report, name):
                raise record.fail(name, f"{record.data[name]!r} does not follow from the outputs' reports "
                                        f"({getattr(report, name)!r}); rebuild the engines with `prism-trt build`")
        return report


def _comparison(record: Fields) -> Comparison:
    kinds = {"name": str, "precision": str, "passed": bool, "nonfinite": int}
    values = {}
    for field in fields(Comparison):
        if field.name in ("shape", "worst_index"):
            values[field.name] = record.integers(field.name)
        elif field.name in kinds:
            values[field.name] = record.get(field.name, kinds[field.name])
        else:  # any float as written (a worst element may be NaN), so the report reads back unchanged
            values[field.name] = record.get(field.name, NUMBER)
    return Comparison(**values)


@dataclass(frozen=True)
class StageVerification:
    """What a stage's build verified: the batch sizes and device it ran them on, the engine's check
    at the build's precision, and the ONNX file's at fp32 where the engine's does not cover it."""

    batches: tuple[int, ...]
    device: str
    engine: VerificationReport
    export: VerificationReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batches": list(self.batches), "device": self.device, "engine": self.engine.to_dict(),
                "export": None if self.export is None else self.export.to_dict()}

    @classmethod
    def parse(cls, record: Fields) -> StageVerification:
        engine = VerificationReport.parse(record.nested("engine"))
        export = record.nested("export", optional=True)
        return cls(record.integers("batches", minimum=1), record.get("device", str), engine,
                   None if export is None else VerificationReport.parse(export))
