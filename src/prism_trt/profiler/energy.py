"""Energy per inference behind one interface. Where no meter can be read, energy is None
("n/a"), never estimated.

- jetson-stats (`jtop`): board power rails, sampled in a thread and integrated over wall time
  (Jetson has no energy counter);
- NVML `nvmlDeviceGetTotalEnergyConsumption` (mJ) on discrete NVIDIA GPUs (Volta+);
- Linux RAPL `/sys/class/powercap/intel-rapl:*/energy_uj` where readable (package energy).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class EnergyMeter:
    """``start()`` then ``stop()`` -> joules over the interval, or None when unavailable."""

    name: str | None = None

    def start(self) -> None:
        pass

    def stop(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class RaplMeter(EnergyMeter):
    name = "rapl"

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        self.zones = [z for z in sorted(root.glob("intel-rapl:*")) if ":" in z.name and z.name.count(":") == 1]
        self.zones = [z for z in self.zones if (z / "energy_uj").is_file()]
        if not self.zones:
            raise RuntimeError(f"no readable RAPL zones under {root}")
        self._wrap = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._start: list[int] = []

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float | None:
        total = 0
        for begin, end, wrap in zip(self._start, self._read(), self._wrap):
            total += end - begin if end >= begin else end + wrap - begin
        return total / 1e6


class NvmlMeter(EnergyMeter):
    name = "nvml"

    def __init__(self, device: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # raises where unsupported
        self._start = 0

    def start(self) -> None:
        self._start = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop(self) -> float | None:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._start) / 1e3

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class JtopMeter(EnergyMeter):
    """Integrates jtop's total board power (mW) over wall time with the trapezoid rule."""

    name = "jtop"

    def __init__(self, interval_s: float = 0.05):
        from jtop import jtop

        self.jetson = jtop(interval=interval_s)
        self.jetson.start()
        self.interval_s = interval_s
        self._samples: list[tuple[float, float]] = []
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def _power_w(self) -> float:
        return float(self.jetson.power["tot"]["power"]) / 1e3

    def _sample(self) -> None:
        while self._running.is_set():
            self._samples.append((time.perf_counter(), self._power_w()))
            time.sleep(self.interval_s)

    def start(self) -> None:
        self._samples = [(time.perf_counter(), self._power_w())]
        self._running.set()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        self._running.clear()
        if self._thread:
            self._thread.join(timeout=1)
        self._samples.append((time.perf_counter(), self._power_w()))
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(self._samples, self._samples[1:]))

    def close(self) -> None:
        self.jetson.close()


def detect_meter(preferred: str | None = None) -> tuple[EnergyMeter, str]:
    """The first meter that works here (or ``preferred``), with a sentence on what was found."""
    attempts = {"jtop": JtopMeter, "nvml": NvmlMeter, "rapl": RaplMeter}
    order = [preferred] if preferred else list(attempts)
    reasons = []
    for name in order:
        try:
            meter = attempts[name]()
            return meter, f"energy from {name}"
        except Exception as error:  # each meter fails in its own way (import, permission, unsupported)
            reasons.append(f"{name}: {type(error).__name__}: {error}")
    return EnergyMeter(), "energy unavailable (n/a): " + "; ".join(reasons)
