"""Counters, histograms and gauges kept in plain Python, exposed through prometheus_client only
when something reads them.

Both services count from their first second, but /metrics is read much later, if ever (a site
serves it only when given a port). `prometheus_client` and the HTTP and WSGI modules it pulls
in cost ~45 ms of CPU at every start, on the path to a coordinator's readiness and a site's
hello: `MetricSet.collector` imports it on the first exposition instead. The text exposed is
prometheus_client's own (`generate_latest`), with the same series (``_total``, ``_bucket``,
``_count``, ``_sum`` and ``_created`` unless PROMETHEUS_DISABLE_CREATED_SERIES is set).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["Counter", "Gauge", "Histogram", "MetricSet"]

_M = TypeVar("_M", "Counter", "Histogram", "Gauge")


class _Value:
    """One series' value (a counter's, or a histogram's buckets and sum)."""

    def __init__(self, buckets: int = 0) -> None:
        self.lock = threading.Lock()
        self.value = 0.0
        self.counts = [0.0] * buckets
        self.created = time.time()


class _CounterChild:
    def __init__(self, value: _Value) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._value.lock:
            self._value.value += amount


class _HistogramChild:
    def __init__(self, value: _Value, bounds: tuple[float, ...]) -> None:
        self._value = value
        self._bounds = bounds

    def observe(self, amount: float) -> None:
        with self._value.lock:
            self._value.value += amount
            for index, bound in enumerate(self._bounds):
                if amount <= bound:
                    self._value.counts[index] += 1
                    break


class _Metric:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Value] = {}
        if not self.labelnames:
            self._series[()] = self._new_value()

    def _new_value(self) -> _Value:
        return _Value()

    def _value(self, labels: dict[str, str]) -> _Value:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)}, expected {self.labelnames}")
        key = tuple(str(labels[name]) for name in self.labelnames)
        with self._lock:
            value = self._series.get(key)
            if value is None:
                value = self._series[key] = self._new_value()
            return value

    def _items(self) -> list[tuple[tuple[str, ...], _Value]]:
        with self._lock:
            return list(self._series.items())


class Counter(_Metric):
    """A counter (`prometheus_client.Counter`'s ``labels(...).inc(n)`` and ``inc(n)``)."""

    kind = "counter"

    def labels(self, **labels: str) -> _CounterChild:
        return _CounterChild(self._value(labels))

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def family(self, created: bool) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in self._items():
            with value.lock:
                total = value.value
            family.add_metric(list(key), total, created=value.created if created else None)
        return family


class Histogram(_Metric):
    """A histogram with fixed buckets (``observe(x)``, ``labels(...).observe(x)``)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        self.bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames)

    def _new_value(self) -> _Value:
        return _Value(len(self.bounds))

    def labels(self, **labels: str) -> _HistogramChild:
        return _HistogramChild(self._value(labels), self.bounds)

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def family(self, created: bool) -> Any:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.samples import Sample
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in self._items():
            with value.lock:
                counts, total = list(value.counts), value.value
            cumulative, buckets = 0.0, []
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            family.add_metric(list(key), buckets, total)
            if created:
                labels = dict(zip(self.labelnames, key, strict=True))
                family.samples.append(Sample(self.name + "_created", labels, value.created))
        return family


class Gauge(_Metric):
    """A gauge read from a function at each exposition (``set_function``)."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation)
        self._function: Callable[[], float] | None = None

    def set_function(self, function: Callable[[], float]) -> None:
        self._function = function

    def family(self, created: bool) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        value = float(self._function()) if self._function is not None else 0.0
        return GaugeMetricFamily(self.name, self.documentation, value=value)


class MetricSet:
    """The metrics of one service; `registry()` builds a prometheus_client registry that reads
    them (imported then, not before)."""

    def __init__(self) -> None:
        self.metrics: list[Counter | Histogram | Gauge] = []
        self._registry: Any = None
        self._lock = threading.Lock()

    def add(self, metric: _M) -> _M:
        self.metrics.append(metric)
        return metric

    def collect(self) -> Iterator[Any]:
        created = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
            "true",
            "1",
            "t",
        )
        for metric in self.metrics:
            yield metric.family(created)

    def registry(self) -> Any:
        """A `prometheus_client.CollectorRegistry` exposing these metrics (made once)."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry(auto_describe=False)
                registry.register(self)
                self._registry = registry
            return self._registry

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry())
