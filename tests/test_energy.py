"""Energy meters: joules only from a meter that sees the computing device, and n/a (None), never 0,
when there is no such meter or the interval is below what the meter resolves."""

import time

import pytest

from prism_trt.engines.manifest import BackendRecord
from prism_trt.profiler.energy import EnergyMeter, RaplMeter, detect_meter


def rapl_zone(root, energy_uj: int, max_range_uj: int = 2**32):
    zone = root / "intel-rapl:0"
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(str(energy_uj))
    (zone / "max_energy_range_uj").write_text(str(max_range_uj))
    return zone


def measure(meter, zone, advance_uj: int, start_uj: int) -> float | None:
    meter.start()
    time.sleep(2 * meter.update_period_s)  # long enough for the counter to have updated once
    (zone / "energy_uj").write_text(str(start_uj + advance_uj))
    return meter.stop()


def test_rapl_reads_joules_across_a_wrap(tmp_path):
    zone = rapl_zone(tmp_path, 1_000)
    meter = RaplMeter(tmp_path)
    assert measure(meter, zone, 2_000_000, 1_000) == pytest.approx(2.0)
    top = 2**32
    (zone / "energy_uj").write_text(str(top - 100))
    meter.start()
    time.sleep(2 * meter.update_period_s)
    (zone / "energy_uj").write_text("900")  # wrapped past max_energy_range_uj
    assert meter.stop() == pytest.approx(1e-3)


def test_below_resolution_is_none_never_zero(tmp_path):
    zone = rapl_zone(tmp_path, 5_000)
    meter = RaplMeter(tmp_path)
    assert measure(meter, zone, 0, 5_000) is None  # the counter did not move: unmeasurable, not 0 J
    (zone / "energy_uj").write_text("5000")
    assert measure(meter, zone, 50, 5_000) is None  # 50 uJ is below RAPL's 61 uJ step


def test_interval_shorter_than_the_update_period_is_none():
    class SlowMeter(EnergyMeter):
        name, update_period_s = "slow", 60.0

        def _end(self):
            return 5.0

    meter = SlowMeter()
    meter.start()
    assert meter.stop() is None
    assert EnergyMeter().stop() is None  # no meter at all


def test_meters_follow_the_computing_device():
    meter, note = detect_meter("nvml", device="cpu")
    assert meter.name is None and "nvml does not measure cpu engines" in note
    meter, note = detect_meter(device="cpu")
    assert meter.name in (None, "jtop", "rapl") and "cpu engines" in note
    meter.close()
    with pytest.raises(ValueError, match="device must be one of"):
        detect_meter(device="tpu")
    assert BackendRecord("onnxruntime", "1.18", "cpu", "cpu").compute_device == "cpu"
    assert BackendRecord("onnxruntime", "1.20", "cuda:Orin", "cuda").compute_device == "cuda"
    assert BackendRecord("tensorrt", "10.3", "cuda:0 Orin", None).compute_device == "cuda"
