"""Next-token accuracy of Prism plans on a language model, and agreement with the unpartitioned one.

The text counterpart of :mod:`prism_trt.core.accuracy`: every (plan, means source) pair is run
through :func:`~prism_trt.core.text_rank.simulate_text` on the same fixed windows
(:class:`~prism_trt.data.text_corpus.TextWindows`), next to the unpartitioned reference. Counts
are over *valid* positions only (those with a next token; padding never counts):

* accuracy: argmax of the logits == the true next token;
* agreement: argmax == the unpartitioned model's argmax (what the selector's floor reads);
* loss: mean cross-entropy in nats of the true next token (``exp(loss)`` is the perplexity).

Rank 0 of a causal plan is exact (it sees no remote mean), so its positions always agree; the
``*_approx`` counts cover only the positions the plan approximates (ranks >= 1 of a causal model,
every position of a bidirectional one), so the figures can be read without that dilution.

Means source ``"none"`` is a baseline, not a Prism mode: every rank attends to its own partition
only (nothing is exchanged; rank 0 is still exact), so ``none`` vs ``ln1`` shows what the segment
means add over simply cutting the sequence at the partition boundaries. It does not depend on L.

Unlabelled batches (targets None: random-weight models, calibration) give agreement only; a
classifier head (BERT) makes one prediction per sequence instead of one per position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.text_corpus import IGNORE
from ..errors import UsageError
from ..model.text import PrismText
from ..model.vit import MeansSource
from .accuracy import AccuracyResult
from .drive import NoExchange
from .plan import SegmentPlan
from .text_rank import simulate_text

#: ``means_sources`` entry of the no-exchange baseline (see the module doc).
NO_EXCHANGE = "none"


@dataclass(frozen=True)
class TextAccuracyResult(AccuracyResult):
    """:class:`~prism_trt.core.accuracy.AccuracyResult`'s counts over valid positions, plus the loss
    and the agreement over approximated positions."""

    nll_sum: float  # summed cross-entropy (nats) of the true next tokens
    reference_nll_sum: float
    agree_approx: int  # agreement over the positions the plan approximates only (see the module doc)
    total_approx: int
    labelled: bool = True  # False: no targets, so accuracy and loss are not defined

    def _labelled_share(self, count: float) -> float:
        return count / self.total if self.total and self.labelled else float("nan")

    @property
    def accuracy(self) -> float:
        return self._labelled_share(self.correct)

    @property
    def reference_accuracy(self) -> float:
        return self._labelled_share(self.reference_correct)

    @property
    def agreement_approx(self) -> float:
        return self.agree_approx / self.total_approx if self.total_approx else float("nan")

    @property
    def loss(self) -> float:
        return self._labelled_share(self.nll_sum)

    @property
    def reference_loss(self) -> float:
        return self._labelled_share(self.reference_nll_sum)

    def to_dict(self) -> dict:
        def number(value: float) -> float | None:  # JSON has no NaN
            return None if math.isnan(value) else value

        return {**asdict(self), "accuracy": number(self.accuracy),
                "reference_accuracy": number(self.reference_accuracy),
                "agreement": number(self.agreement), "agreement_approx": number(self.agreement_approx),
                "loss": number(self.loss), "reference_loss": number(self.reference_loss),
                "perplexity": number(math.exp(self.loss)) if not math.isnan(self.loss) else None}


def _check(plans: list[SegmentPlan]) -> None:
    lengths = {plan.partition.num_tokens for plan in plans}
    if len(lengths) > 1:
        raise UsageError(f"all plans must partition the same sequence length, got {sorted(lengths)}")


def simulate_isolated(model: PrismText, plan: SegmentPlan, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position outputs (B, N, ...) when every rank sees only its own partition (no means)."""
    return simulate_text(model, plan, input_ids, attention_mask, exchange=NoExchange())


def _run(model: PrismText, plan: SegmentPlan, source: str, input_ids: torch.Tensor,
         attention_mask: torch.Tensor) -> torch.Tensor:
    if source == NO_EXCHANGE:
        if model.reads_only_prefix:
            raise UsageError("the no-exchange baseline is for per-position (language-model) heads")
        return simulate_isolated(model, plan, input_ids, attention_mask)
    return simulate_text(model, plan, input_ids, attention_mask, means_source=source)


def _per_prediction(outputs: torch.Tensor) -> torch.Tensor:
    """(B, n, V) per-position logits as they are; a classifier's (B, C) as one prediction (B, 1, C)."""
    return outputs if outputs.dim() == 3 else outputs[:, None]


@torch.no_grad()
def evaluate_text(model: PrismText, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  plans: list[SegmentPlan], means_sources: list[MeansSource | str], total: int | None = None,
                  progress: bool = True) -> list[TextAccuracyResult]:
    """One pass over ``batches`` of (input_ids, attention_mask, targets or None), each (B, N): every
    (plan, means source) pair plus the unpartitioned reference. ``total``: windows, for the bar."""
    _check(plans)
    classifier = model.spec.head == "classifier"
    configs = [(plan, source) for plan in plans for source in means_sources]
    correct, agree, agree_approx, total_approx = ([0] * len(configs) for _ in range(4))
    nll = [0.0] * len(configs)
    reference_correct = seen = 0
    reference_nll, labelled = 0.0, True
    with tqdm(total=total, unit="window", disable=not progress, desc="accuracy") as bar:
        for input_ids, attention_mask, targets in batches:
            labelled &= targets is not None
            if targets is not None and model.spec.head != "lm":
                raise UsageError(f"next-token targets need a language-model head; {model.spec.name} has "
                                 f"{model.spec.head!r}")
            if classifier:
                valid = torch.ones(len(input_ids), 1, dtype=torch.bool)
            else:
                valid = attention_mask.bool() if targets is None else targets != IGNORE
            reference = _per_prediction(model(input_ids, attention_mask))
            reference_top = reference.argmax(dim=-1)
            if targets is not None:
                wanted = targets[valid]
                reference_correct += int((reference_top[valid] == wanted).sum())
                reference_nll += float(F.cross_entropy(reference[valid], wanted, reduction="sum"))
            for i, (plan, source) in enumerate(configs):
                logits = _per_prediction(_run(model, plan, source, input_ids, attention_mask))
                top = logits.argmax(dim=-1)
                same = (top == reference_top) & valid
                agree[i] += int(same.sum())
                approx = valid.clone()
                if model.spec.causal:
                    approx[:, :plan.partition.token_range(0)[1]] = False  # rank 0's positions are exact
                agree_approx[i] += int((same & approx).sum())
                total_approx[i] += int(approx.sum())
                if targets is not None:
                    correct[i] += int((top[valid] == wanted).sum())
                    nll[i] += float(F.cross_entropy(logits[valid], wanted, reduction="sum"))
            seen += int(valid.sum())
            bar.update(len(input_ids))
    return [TextAccuracyResult(plan.ranks, plan.segments, plan.cr, source, correct[i], reference_correct, agree[i],
                               seen, nll[i], reference_nll, agree_approx[i], total_approx[i], labelled)
            for i, (plan, source) in enumerate(configs)]
