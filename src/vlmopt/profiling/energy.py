"""Energy used by a region of code: NVML on a CUDA device, RAPL (Linux powercap) on the CPU.

Both backends read a cumulative hardware energy counter before and after the region and
subtract the idle share: idle power, measured just before the region while this process sleeps,
times the region's duration. ``total_j`` is the counter difference, ``energy_j`` what is left
after the idle share.

- NVML: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver was loaded;
  Volta and newer) of the GPU; idle power is the mean of ``nvmlDeviceGetPowerUsage``
  (milliwatts) sampled over ``idle_s`` seconds. The device is synchronized before the final
  reading. The counter is updated periodically, not continuously, so regions much shorter than
  a second are imprecise: time a second or more of work.
- RAPL: ``<root>/intel-rapl:<n>/energy_uj`` (microjoules) of every package zone (its ``name``
  file reads ``package-<k>``), summed; a counter that wrapped during the region is corrected
  with ``max_energy_range_uj``. A region long enough for a counter to wrap twice (minutes to
  hours, depending on power) is undercounted. Package energy includes every process on the
  package. Idle power is the package energy over ``idle_s`` seconds of sleep divided by that time.

Idle power is taken once the device has settled: right after heavy work a GPU's power stays high
for seconds, and subtracting it gave negative energy. The meter measures windows of ``idle_s``
seconds until a window's mean power is no more than ``settle_tolerance_w`` below the window
before it, for at most ``settle_s`` seconds (``method`` says how long it waited, or that power was
still falling). A result that cannot be right is not reported: a counter that did not advance
over the region (NVML updates it periodically; time a second or more of work, as
:attr:`EnergyMeter.measuring` lets a caller do), or a net energy below zero (idle power above the
region's mean power), gives ``energy_j=None`` with the reason, while ``total_j`` (gross) and
``idle_w`` stay readable.

Where a backend cannot be used (no ``pynvml``, no NVML library, no powercap tree, a counter that
is not readable) the result has ``energy_j=None`` and ``reason`` says why; nothing is estimated.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = ["EnergyMeter", "EnergyResult", "per_sample_energy"]

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
NVML_METHOD = "NVML total energy minus idle power x time"
_ZONE = re.compile(r"intel-rapl:\d+")


@dataclass(frozen=True)
class EnergyResult:
    """Energy of a region in ``unit`` (``J``, or ``J/sample`` after :func:`per_sample_energy`).

    ``energy_j`` is ``total_j - idle_w * seconds``; both are None with ``reason`` set when the
    energy could not be measured, and ``energy_j`` alone is None (with the reason) when the counter
    did not advance or the net energy came out below zero. ``idle_w`` is None when no idle power
    was subtracted.
    """

    energy_j: float | None
    total_j: float | None
    idle_w: float | None
    seconds: float
    method: str
    device: str
    unit: str = "J"
    reason: str | None = None


class _Unavailable(Exception):
    """A backend cannot measure here; the message is the reason."""


class _Nvml:
    def __init__(self, device: torch.device) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise _Unavailable("pynvml (nvidia-ml-py) is not installed") from exc
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise _Unavailable(f"NVML could not be initialised: {exc}") from exc
        self.device = device
        self.label = ""
        try:
            self.handle = self._handle()
        except (pynvml.NVMLError, RuntimeError, AssertionError) as exc:
            self.close()
            raise _Unavailable(f"NVML has no handle for {device} ({self.label}): {exc}") from exc

    def _handle(self) -> Any:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = [e.strip() for e in visible.split(",")] if visible else []
        if entries and index < len(entries):
            entry = entries[index]
            if not entry.isdigit():
                self.label = f"NVML UUID {entry}"
                return self.nvml.nvmlDeviceGetHandleByUUID(entry)
            index = int(entry)
        self.label = f"NVML index {index}"
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def read_j(self) -> float:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
        except self.nvml.NVMLError as exc:
            raise _Unavailable(f"nvmlDeviceGetTotalEnergyConsumption failed for {self.label}: {exc}") from exc

    def idle_w(self, seconds: float, interval_s: float) -> float:
        n = max(1, round(seconds / interval_s))
        total_mw = 0.0
        try:
            for i in range(n):
                if i:
                    time.sleep(interval_s)
                total_mw += self.nvml.nvmlDeviceGetPowerUsage(self.handle)
        except self.nvml.NVMLError as exc:
            raise _Unavailable(f"nvmlDeviceGetPowerUsage failed for {self.label}: {exc}") from exc
        return total_mw / n / 1000.0

    def before_stop(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


class _Rapl:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise _Unavailable(f"RAPL is not available: {root} does not exist")
        self.zones: list[tuple[str, Path, int]] = []
        try:
            for zone in sorted(root.iterdir()):
                if not _ZONE.fullmatch(zone.name):
                    continue
                name = (zone / "name").read_text().strip()
                if name.startswith("package-"):
                    max_uj = int((zone / "max_energy_range_uj").read_text())
                    self.zones.append((name, zone / "energy_uj", max_uj))
        except (OSError, ValueError) as exc:
            raise _Unavailable(f"RAPL zones under {root} are not readable: {exc}") from exc
        if not self.zones:
            raise _Unavailable(f"RAPL is not available: no package zone (intel-rapl:<n> named package-<k>) in {root}")
        self.method = "RAPL powercap " + " + ".join(name for name, _, _ in self.zones)
        self.label = str(root)

    def read_uj(self) -> list[int]:
        values = []
        for _, path, _ in self.zones:
            try:
                values.append(int(path.read_text()))
            except OSError as exc:
                raise _Unavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
            except ValueError as exc:
                raise _Unavailable(f"{path} does not hold an integer: {exc}") from exc
        return values

    def delta_j(self, before: list[int], after: list[int]) -> float:
        total_uj = 0
        for (_, _, max_uj), b, a in zip(self.zones, before, after, strict=True):
            diff = a - b
            if diff < 0:  # the counter wrapped once
                diff += max_uj
            total_uj += diff
        return total_uj / 1e6

    def idle_w(self, seconds: float, timer: Callable[[], float]) -> float:
        t0 = timer()
        e0 = self.read_uj()
        time.sleep(seconds)
        e1 = self.read_uj()
        t1 = timer()
        return self.delta_j(e0, e1) / (t1 - t0)

    def before_stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class EnergyMeter:
    """Context manager measuring the energy of its body on ``device`` (default CPU).

    ``idle_s`` seconds of idle power are measured on entry (default 1.0; 0 subtracts nothing),
    once power has stopped falling (windows of ``idle_s`` until one is at most
    ``settle_tolerance_w`` below the one before, for up to ``settle_s`` seconds; 0 takes the first
    window); pass ``idle_w`` to reuse an idle power measured earlier instead. After the ``with``
    block, :attr:`result` holds an :class:`EnergyResult`. ``powercap_root`` is where RAPL zones
    are looked up; ``timer`` returns seconds.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        idle_s: float = 1.0,
        idle_w: float | None = None,
        idle_interval_s: float = 0.1,
        settle_s: float = 10.0,
        settle_tolerance_w: float = 1.0,
        powercap_root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"EnergyMeter supports cpu and cuda devices, got {self.device}")
        if not idle_s >= 0:
            raise ValueError(f"idle_s must be >= 0 seconds, got {idle_s}")
        if not idle_interval_s > 0:
            raise ValueError(f"idle_interval_s must be > 0 seconds, got {idle_interval_s}")
        if idle_w is not None and not idle_w >= 0:
            raise ValueError(f"idle_w must be >= 0 watts, got {idle_w}")
        if not settle_s >= 0 or not settle_tolerance_w >= 0:
            raise ValueError(f"settle_s and settle_tolerance_w must be >= 0, got {settle_s} and {settle_tolerance_w}")
        self.settle_s = float(settle_s)
        self.settle_tolerance_w = float(settle_tolerance_w)
        self._settled = ""
        self.idle_s = float(idle_s)
        self.idle_w = idle_w
        self.idle_interval_s = float(idle_interval_s)
        self.powercap_root = Path(powercap_root)
        self.timer = timer
        self._backend: _Nvml | _Rapl | None = None
        self._reason: str | None = None
        self._method = NVML_METHOD if self.device.type == "cuda" else f"RAPL powercap ({self.powercap_root})"
        self._idle: float | None = None
        self._before: Any = None
        self._t0 = 0.0
        self._result: EnergyResult | None = None

    @property
    def result(self) -> EnergyResult:
        if self._result is None:
            raise RuntimeError("EnergyMeter.result is available only after the with block has ended")
        return self._result

    def _open(self) -> _Nvml | _Rapl:
        if self.device.type == "cuda":
            return _Nvml(self.device)
        return _Rapl(self.powercap_root)

    @property
    def measuring(self) -> bool:
        """Inside the ``with`` block: whether a counter is being read (False: the result will be None)."""
        return self._backend is not None

    def _window(self, backend: _Nvml | _Rapl) -> float:
        if isinstance(backend, _Nvml):
            return backend.idle_w(self.idle_s, self.idle_interval_s)
        return backend.idle_w(self.idle_s, self.timer)

    def _measure_idle(self, backend: _Nvml | _Rapl) -> float | None:
        self._settled = ""
        if self.idle_w is not None:
            return float(self.idle_w)
        if self.idle_s == 0:
            return None
        power = self._window(backend)
        if self.settle_s == 0:
            return power
        waited = 0.0
        while True:
            later = self._window(backend)
            waited += self.idle_s
            if power - later <= self.settle_tolerance_w:
                self._settled = f"; power settled after {waited:g} s"
                return later
            if waited >= self.settle_s:
                self._settled = f"; power still falling after {waited:g} s ({power:.1f} W -> {later:.1f} W)"
                return later
            power = later

    def _method_text(self, backend: _Nvml | _Rapl) -> str:
        if isinstance(backend, _Nvml):
            base = f"{NVML_METHOD} ({backend.label})"
        else:
            base = f"{backend.method}, energy_uj difference minus idle power x time"
        if self.idle_w is not None:
            return f"{base}; idle power given ({self.idle_w:g} W)"
        if self.idle_s == 0:
            return f"{base}; no idle power subtracted"
        return f"{base}; idle power over {self.idle_s:g} s before the region{self._settled}"

    def __enter__(self) -> EnergyMeter:
        self._result = None
        self._backend, self._reason = None, None
        try:
            backend = self._open()
        except _Unavailable as exc:
            self._reason = str(exc)
        else:
            try:
                self._idle = self._measure_idle(backend)
                self._method = self._method_text(backend)
                self._before = backend.read_j() if isinstance(backend, _Nvml) else backend.read_uj()
                self._backend = backend
            except _Unavailable as exc:
                backend.close()
                self._reason = str(exc)
        self._t0 = self.timer()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        backend = self._backend
        if backend is not None:
            backend.before_stop()
        seconds = self.timer() - self._t0
        total: float | None = None
        if backend is not None:
            try:
                if isinstance(backend, _Nvml):
                    total = backend.read_j() - self._before
                else:
                    total = backend.delta_j(self._before, backend.read_uj())
            except _Unavailable as error:
                self._reason = str(error)
            finally:
                backend.close()
                self._backend = None
        idle = self._idle if total is not None else None
        net = None if total is None else total - (idle * seconds if idle is not None else 0.0)
        reason = self._reason if total is None else None
        if total is not None and total <= 0:
            net, reason = None, f"the energy counter did not advance over the {seconds:.3g} s region; time longer work"
        elif net is not None and net < 0:
            reason = (
                f"net energy below zero: idle power {idle:.1f} W is above the region's mean power "
                f"{total / seconds:.1f} W (the device had not settled when idle power was taken)"
            )
            net = None
        self._result = EnergyResult(
            energy_j=net,
            total_j=total,
            idle_w=idle,
            seconds=seconds,
            method=self._method,
            device=str(self.device),
            reason=reason,
        )


def per_sample_energy(result: EnergyResult, n_samples: int) -> EnergyResult:
    """The energies of ``result`` divided by ``n_samples`` (an unmeasured result stays None with its reason)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if result.unit != "J":
        raise ValueError(f"per_sample_energy expects a region's energy (unit 'J'), got unit {result.unit!r}")
    return replace(
        result,
        energy_j=None if result.energy_j is None else result.energy_j / n_samples,
        total_j=None if result.total_j is None else result.total_j / n_samples,
        unit="J/sample",
        method=f"{result.method}; divided by {n_samples} samples",
    )
