"""Accuracy of a Prism plan on a labelled stream, and agreement with the unpartitioned model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..model.vit import MeansSource, PrismViT
from .plan import SegmentPlan
from .rank import simulate


@dataclass(frozen=True)
class AccuracyResult:
    ranks: int
    segments: int
    cr: float
    means_source: str
    correct: int
    reference_correct: int
    agree: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def agreement(self) -> float:
        return self.agree / self.total if self.total else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "agreement": self.agreement}


@torch.no_grad()
def evaluate(model: PrismViT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], plans: list[SegmentPlan],
             means_sources: list[MeansSource], total: int | None = None, progress: bool = True
             ) -> list[AccuracyResult]:
    """One pass over ``batches``: every (plan, means source) pair plus the unpartitioned reference."""
    configs = [(plan, source) for plan in plans for source in means_sources]
    correct = [0] * len(configs)
    agree = [0] * len(configs)
    reference_correct = seen = 0
    with tqdm(total=total, unit="img", disable=not progress, desc="accuracy") as bar:
        for images, labels in batches:
            reference = model(images).argmax(dim=-1)
            reference_correct += int((reference == labels).sum())
            for i, (plan, source) in enumerate(configs):
                predicted = simulate(model, images, plan, source).argmax(dim=-1)
                correct[i] += int((predicted == labels).sum())
                agree[i] += int((predicted == reference).sum())
            seen += len(labels)
            bar.update(len(labels))
    return [AccuracyResult(plan.ranks, plan.segments, plan.cr, source, correct[i], reference_correct, agree[i], seen)
            for i, (plan, source) in enumerate(configs)]
