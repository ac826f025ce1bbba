"""The adaptive side of the profiler: the latency model fitted from a performance map, the
selector that picks a chain per batch from it, and the plots that show both."""

from .evaluation import evaluate, held_out_report, leave_one_out, naive_total_mape
from .latency_model import LatencyModel
from .selector import Candidate, Decision, LiveSelector, MapSelector, NoCandidate

__all__ = ["Candidate", "Decision", "LatencyModel", "LiveSelector", "MapSelector", "NoCandidate", "evaluate",
           "held_out_report", "leave_one_out", "naive_total_mape"]
