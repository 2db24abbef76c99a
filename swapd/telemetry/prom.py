"""``GET /metrics``: per-model Prometheus metrics, and llama-swap's system and GPU gauges.

Counters and histograms are updated by the sinks here, once per finished
request and per model start or stop (never per chunk). Gauges that describe
state the scheduler, the backends and the verifier own (model state, in
flight, queued, VRAM per model, verification outcomes) are read from their
owners at scrape time by :class:`StateCollector`; nothing is copied.

llama-swap's own gauge names (``llamaswap_*``) come from :class:`PerfSampler`,
which samples psutil and NVML every ``performance.every`` seconds off the
event loop, as llama-swap's performance monitor does; ``performance.disabled``
turns them off.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapd.backend.state import State
from swapd.logging import get_logger
from swapd.telemetry.record import RequestRecord

log = get_logger("swapd.telemetry")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TPS_BUCKETS = (1, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
START_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

STATES = tuple(state.value for state in State)
STOP_REASONS = ("ttl", "swap", "evict", "unload", "crash", "reload", "shutdown")


def generation_rate(record: RequestRecord) -> float | None:
    """Tokens per second of generation: llama-server's own figure, else output tokens over the streamed span."""
    tokens = record.tokens
    if tokens is None:
        return None
    if tokens.tokens_per_second > 0:
        return tokens.tokens_per_second
    if record.stream and record.first_byte and record.end > record.first_byte and tokens.output > 1:
        return (tokens.output - 1) / (record.end - record.first_byte)
    return None


class RequestMetrics:
    """The counters and histograms; a ``RequestSink`` and a ``ModelSink``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "swapd_requests", "Proxied requests by model and HTTP status", ("model", "status"), registry=registry
        )
        self.duration = Histogram(
            "swapd_request_duration_seconds",
            "Time from arrival to the end of the response (waits for starts and swaps included)",
            ("model",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "swapd_time_to_first_token_seconds",
            "Streamed responses: time from arrival to the first content byte",
            ("model",),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "swapd_prompt_tokens", "Prompt tokens, from the responses' usage", ("model",), registry=registry
        )
        self.completion_tokens = Counter(
            "swapd_completion_tokens", "Generated tokens, from the responses' usage", ("model",), registry=registry
        )
        self.cached_tokens = Counter(
            "swapd_cached_tokens", "Prompt tokens served from the backend's cache", ("model",), registry=registry
        )
        self.tps = Histogram(
            "swapd_generation_tokens_per_second",
            "Generation speed per request (llama-server's timings, else tokens over the streamed time)",
            ("model",),
            buckets=TPS_BUCKETS,
            registry=registry,
        )
        self.starts = Counter("swapd_model_starts", "Model starts that reached ready", ("model",), registry=registry)
        self.start_failures = Counter(
            "swapd_model_start_failures", "Model starts that failed before ready", ("model",), registry=registry
        )
        self.start_seconds = Histogram(
            "swapd_model_start_seconds",
            "Time from spawn to ready",
            ("model",),
            buckets=START_BUCKETS,
            registry=registry,
        )
        self.stops = Counter("swapd_model_stops", "Model stops by reason", ("model", "reason"), registry=registry)
        # labels() looks the child up under a lock each time; the request path keeps its own map
        self._by_model: dict[str, tuple[Any, ...]] = {}
        self._by_status: dict[tuple[str, int], Any] = {}

    # -- RequestSink -----------------------------------------------------------------
    def _children(self, model: str) -> tuple[Any, ...]:
        children = self._by_model.get(model)
        if children is None:
            children = self._by_model[model] = (
                self.duration.labels(model),
                self.ttft.labels(model),
                self.prompt_tokens.labels(model),
                self.completion_tokens.labels(model),
                self.cached_tokens.labels(model),
                self.tps.labels(model),
            )
        return children

    def request_done(self, record: RequestRecord) -> None:
        model = record.model
        key = (model, record.status)
        counter = self._by_status.get(key)
        if counter is None:
            counter = self._by_status[key] = self.requests.labels(model, str(record.status or 0))
        counter.inc()
        duration, ttft_h, prompt, completion, cached, tps = self._children(model)
        duration.observe(record.duration_s)
        ttft = record.ttft_s
        if ttft is not None:
            ttft_h.observe(ttft)
        tokens = record.tokens
        if tokens is None:
            return
        if tokens.input > 0:
            prompt.inc(tokens.input)
        if tokens.output > 0:
            completion.inc(tokens.output)
        if tokens.cache > 0:
            cached.inc(tokens.cache)
        rate = generation_rate(record)
        if rate is not None:
            tps.observe(rate)

    # -- ModelSink -----------------------------------------------------------------------
    def model_started(self, model: str, seconds: float, ok: bool) -> None:
        if ok:
            self.starts.labels(model).inc()
            self.start_seconds.labels(model).observe(seconds)
        else:
            self.start_failures.labels(model).inc()

    def model_stopped(self, model: str, reason: str) -> None:
        self.stops.labels(model, reason).inc()

    def forget(self, model: str) -> None:
        """Drop a model's series (it left the config on a reload)."""
        self._by_model.pop(model, None)
        for key in [k for k in self._by_status if k[0] == model]:
            del self._by_status[key]
        for metric in (self.duration, self.ttft, self.prompt_tokens, self.completion_tokens, self.cached_tokens):
            _remove(metric, model)
        for metric in (self.tps, self.starts, self.start_failures, self.start_seconds):
            _remove(metric, model)


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class StateCollector(Collector):
    """Gauges read from their owners at scrape time: model state, in flight, queued, VRAM, verifications."""

    def __init__(self, runtime: Any) -> None:
        self._rt = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self._rt
        state = GaugeMetricFamily("swapd_model_state", "1 for the model's current state", labels=("model", "state"))
        in_flight = GaugeMetricFamily("swapd_in_flight_requests", "Requests being served", labels=("model",))
        queued = GaugeMetricFamily("swapd_queued_requests", "Requests waiting for the model", labels=("model",))
        scheduler = rt.scheduler
        waiting: dict[str, int] = {}
        for model_id in scheduler.queued():
            waiting[model_id] = waiting.get(model_id, 0) + 1
        for model_id in sorted(rt.config.models):
            if rt.config.models[model_id].remote:
                continue  # no state of its own: it runs elsewhere; its requests are counted as any model's
            backend = rt.backends.get(model_id)
            current = backend.state.value if backend is not None else "stopped"
            for name in STATES:
                state.add_metric((model_id, name), 1.0 if name == current else 0.0)
            in_flight.add_metric((model_id,), float(scheduler.in_flight(model_id)))
            queued.add_metric((model_id,), float(waiting.get(model_id, 0)))
        yield state
        yield in_flight
        yield queued

        vram = GaugeMetricFamily(
            "swapd_vram_used_bytes", "GPU memory held by each running model (NVML)", labels=("model", "gpu")
        )
        verifications = CounterMetricFamily(
            "swapd_vram_verifications",
            "Stops checked against NVML: freed, not_freed, or unverified (no NVML reading was possible)",
            labels=("outcome",),
        )
        verifier = rt.gpu
        counts = {"freed": 0, "not_freed": 0, "unverified": 0}
        if verifier is not None:
            view = verifier.memory_view()
            if view is not None:
                for model_id in sorted(view.usage):
                    backend = rt.backends.get(model_id)
                    if backend is None or backend.state is State.STOPPED:
                        continue  # the reading may predate its (verified) stop
                    for device, mib in sorted(view.usage[model_id].items()):
                        vram.add_metric((model_id, str(device)), float(mib) * MIB)
            c = verifier.counters
            # no_vram: verified, and the model held nothing to free
            counts["freed"] = c.get("freed", 0) + c.get("no_vram", 0)
            counts["not_freed"] = c.get("not_freed", 0)
            counts["unverified"] = c.get("unavailable", 0)
        for outcome, n in counts.items():
            verifications.add_metric((outcome,), float(n))
        yield vram
        yield verifications


# -- llama-swap's performance gauges ------------------------------------------------------


@dataclass
class PerfSample:
    at: float
    cpu_percent: list[float] = field(default_factory=list)
    memory: Any = None
    swap: Any = None
    load: tuple[float, float, float] | None = None
    network: dict[str, Any] = field(default_factory=dict)
    gpus: list[Any] = field(default_factory=list)  # swapd.gpu.nvml.Device with full readings


class PerfSampler(Collector):
    """Samples the system and the GPUs every ``every`` seconds; renders llama-swap's ``llamaswap_*`` gauges.

    The last hour of samples (``history``, as llama-swap's ring buffers keep)
    is what ``GET /api/performance`` serves (swapd.server.perf_api).
    """

    def __init__(self, runtime: Any, every: float) -> None:
        self._rt = runtime
        self.every = every
        self.latest: PerfSample | None = None
        self.history: collections.deque[PerfSample] = collections.deque(maxlen=max(1, int(3600 / every)))
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        psutil.cpu_percent(percpu=True)  # the first call only sets the baseline
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sample(self) -> PerfSample:
        sample = await asyncio.to_thread(self._system)
        verifier = self._rt.gpu
        nvml = getattr(verifier, "nvml", None)
        if nvml is not None:
            try:
                snap = await nvml.snapshot(full=True)
                sample.gpus = list(snap.devices)
            except Exception as exc:  # a GPU that stops answering costs the GPU gauges, not the sampler
                log.warning("perf.gpu_read_failed", error=str(exc))
        self.latest = sample
        self.history.append(sample)
        return sample

    @staticmethod
    def _system() -> PerfSample:
        try:
            load = psutil.getloadavg()
        except (AttributeError, OSError):
            load = None
        try:
            net = psutil.net_io_counters(pernic=True)
        except OSError:
            net = {}
        return PerfSample(
            at=time.time(),
            cpu_percent=psutil.cpu_percent(percpu=True),
            memory=psutil.virtual_memory(),
            swap=psutil.swap_memory(),
            load=load,
            network=net,
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:
                log.warning("perf.sample_failed", error=str(exc))
            await asyncio.sleep(self.every)

    def collect(self) -> Iterator[Metric]:
        s = self.latest
        if s is None:
            return
        cpu = GaugeMetricFamily("llamaswap_cpu_util_percent", "CPU utilization per core (0-100)", labels=("core",))
        for index, pct in enumerate(s.cpu_percent):
            cpu.add_metric((str(index),), pct)
        yield cpu
        if s.memory is not None:
            yield GaugeMetricFamily("llamaswap_memory_total_bytes", "Total memory in bytes", value=s.memory.total)
            yield GaugeMetricFamily("llamaswap_memory_used_bytes", "Used memory in bytes", value=s.memory.used)
            yield GaugeMetricFamily("llamaswap_memory_free_bytes", "Free memory in bytes", value=s.memory.available)
        if s.swap is not None:
            yield GaugeMetricFamily("llamaswap_swap_total_bytes", "Total swap in bytes", value=s.swap.total)
            yield GaugeMetricFamily("llamaswap_swap_used_bytes", "Used swap in bytes", value=s.swap.used)
        if s.load is not None:
            load = GaugeMetricFamily("llamaswap_load_average", "Load average", labels=("interval",))
            for name, value in zip(("1m", "5m", "15m"), s.load, strict=True):
                load.add_metric((name,), value)
            yield load
        if s.network:
            net = CounterMetricFamily(
                "llamaswap_network_bytes", "Total network bytes transferred", labels=("interface", "direction")
            )
            for iface, io in sorted(s.network.items()):
                net.add_metric((iface, "recv"), io.bytes_recv)
                net.add_metric((iface, "sent"), io.bytes_sent)
            yield net
        if not s.gpus:
            return
        gauges = (
            ("llamaswap_gpu_temperature_celsius", "GPU temperature in Celsius", lambda d: d.temperature_c),
            ("llamaswap_gpu_util_percent", "GPU utilization percent (0-100)", lambda d: d.util_percent),
            (
                "llamaswap_gpu_memory_util_percent",
                "GPU memory utilization percent (0-100)",
                lambda d: d.memory_util_percent,
            ),
            ("llamaswap_gpu_memory_used_bytes", "GPU memory used in bytes", lambda d: d.used_mib * MIB),
            ("llamaswap_gpu_memory_total_bytes", "GPU memory total in bytes", lambda d: d.total_mib * MIB),
            ("llamaswap_gpu_power_draw_watts", "GPU power draw in watts", lambda d: d.power_w),
        )
        for name, help_text, read in gauges:
            family = GaugeMetricFamily(name, help_text, labels=("id", "name", "uuid"))
            for dev in s.gpus:
                value = read(dev)
                if value is not None:
                    family.add_metric((str(dev.index), dev.name, dev.uuid), float(value))
            yield family


class PromMetrics:
    """swapd's registry: the request metrics, the state gauges and (unless disabled) the performance gauges."""

    def __init__(self, runtime: Any, performance: bool = True, every: float = 5.0) -> None:
        disable_created_metrics()  # no *_created series: llama-swap dashboards and most exporters have none
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self.registry.register(StateCollector(runtime))
        self.perf: PerfSampler | None = None
        if performance:
            self.perf = PerfSampler(runtime, every)
            self.registry.register(self.perf)

    def render(self) -> bytes:
        return generate_latest(self.registry)
