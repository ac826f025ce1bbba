"""Energy per inference behind one interface. Where no meter can be read, energy is None
("n/a"), never estimated.

Only a meter that sees the device doing the work is used: NVML for engines on an NVIDIA GPU,
RAPL (CPU package) for CPU engines, jtop on a Jetson for either (its rails cover the whole
board). A GPU's counter during a CPU-engine sweep measures idle power of a device that did none
of the work, so NVML is never picked for CPU engines.

An interval too short for a meter to resolve reads as None, never 0: counters advance in steps
(NVML's in millijoules, and only every so often; RAPL's in ~61 uJ) and a sampled meter needs two
samples, so a reading at or below one step, or over less than one update period, is noise.

- jetson-stats (`jtop`): board power rails, sampled in a thread and integrated over wall time
  (Jetson has no energy counter);
- NVML `nvmlDeviceGetTotalEnergyConsumption` (mJ) on discrete NVIDIA GPUs (Volta+);
- Linux RAPL `/sys/class/powercap/intel-rapl:*/energy_uj` where readable (package energy).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..errors import UsageError

COMPUTE_DEVICES = ("cpu", "cuda")


class EnergyMeter:
    """``start()`` then ``stop()`` -> joules over the interval, or None when unavailable or when
    the interval is below the meter's resolution.

    resolution_j: the smallest energy step the meter reports; update_period_s: how often it updates.
    """

    name: str | None = None
    resolution_j: float = 0.0
    update_period_s: float = 0.0

    def __init__(self) -> None:
        self._started_at: float | None = None

    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._begin()

    def stop(self) -> float | None:
        if self._started_at is None:
            return None
        elapsed, self._started_at = time.perf_counter() - self._started_at, None
        joules = self._end()
        if joules is None or elapsed < self.update_period_s or joules <= self.resolution_j:
            return None
        return joules

    def close(self) -> None:
        pass

    def _begin(self) -> None:
        pass

    def _end(self) -> float | None:
        return None


class RaplMeter(EnergyMeter):
    name = "rapl"
    # The package energy unit is 2^-14 J on Intel since Sandy Bridge (MSR_RAPL_POWER_UNIT); updates ~1 ms.
    resolution_j = 2.0**-14
    update_period_s = 1e-3

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        super().__init__()
        self.zones = [z for z in sorted(root.glob("intel-rapl:*")) if ":" in z.name and z.name.count(":") == 1]
        self.zones = [z for z in self.zones if (z / "energy_uj").is_file()]
        if not self.zones:
            raise RuntimeError(f"no readable RAPL zones under {root}")
        self._wrap = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._start: list[int] = []

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def _begin(self) -> None:
        self._start = self._read()

    def _end(self) -> float | None:
        total = 0
        for begin, end, wrap in zip(self._start, self._read(), self._wrap):
            total += end - begin if end >= begin else end + wrap - begin
        return total / 1e6


class NvmlMeter(EnergyMeter):
    name = "nvml"
    # The counter counts millijoules and advances when the driver samples power, tens of ms apart on
    # recent GPUs (not measured by this project): intervals under 100 ms are reported as n/a.
    resolution_j = 1e-3
    update_period_s = 0.1

    def __init__(self, device: int = 0):
        super().__init__()
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # raises where unsupported
        self._start = 0

    def _begin(self) -> None:
        self._start = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def _end(self) -> float | None:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._start) / 1e3

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class JtopMeter(EnergyMeter):
    """Integrates jtop's total board power (mW) over wall time with the trapezoid rule."""

    name = "jtop"

    def __init__(self, interval_s: float = 0.05):
        super().__init__()
        from jtop import jtop

        self.jetson = jtop(interval=interval_s)
        self.jetson.start()
        self.interval_s = interval_s
        self.update_period_s = 2 * interval_s  # at least two samples inside the interval
        self._samples: list[tuple[float, float]] = []
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def _power_w(self) -> float:
        return float(self.jetson.power["tot"]["power"]) / 1e3

    def _sample(self) -> None:
        while self._running.is_set():
            self._samples.append((time.perf_counter(), self._power_w()))
            time.sleep(self.interval_s)

    def _begin(self) -> None:
        self._samples = [(time.perf_counter(), self._power_w())]
        self._running.set()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _end(self) -> float | None:
        self._running.clear()
        if self._thread:
            self._thread.join(timeout=1)
        self._samples.append((time.perf_counter(), self._power_w()))
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(self._samples, self._samples[1:]))

    def close(self) -> None:
        self.jetson.close()


#: Which meters see the work of engines on each compute device, in the order they are tried.
METERS_FOR_DEVICE = {"cpu": ("jtop", "rapl"), "cuda": ("jtop", "nvml")}
METERS = {"jtop": JtopMeter, "nvml": NvmlMeter, "rapl": RaplMeter}


def detect_meter(preferred: str | None = None, device: str = "cpu") -> tuple[EnergyMeter, str]:
    """The first meter that works here and sees ``device`` ("cpu" or "cuda": where the engines
    run), or ``preferred``, with a sentence on what was found."""
    if device not in COMPUTE_DEVICES:
        raise UsageError(f"device must be one of {COMPUTE_DEVICES}, got {device!r}")
    suited = METERS_FOR_DEVICE[device]
    if preferred is not None and preferred not in suited:
        return EnergyMeter(), (f"energy unavailable (n/a): {preferred} does not measure {device} engines "
                               f"(meters for them: {', '.join(suited)})")
    reasons = []
    for name in [preferred] if preferred else suited:
        try:
            meter = METERS[name]()
            return meter, f"energy from {name} ({device} engines)"
        except Exception as error:  # each meter fails in its own way (import, permission, unsupported)
            reasons.append(f"{name}: {type(error).__name__}: {error}")
    return EnergyMeter(), f"energy unavailable (n/a) for {device} engines: " + "; ".join(reasons)
