"""The scheduler's typed extension points (StartGate, StopGuard), with real
backend processes (the fake backend) behind an in-process scheduler."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from helpers import fake_cmd
from swapd.backend import Backend, State, StopReport
from swapd.config import load_config_text
from swapd.logring import LogRing
from swapd.scheduler import Scheduler, SchedulerError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runtime(*ids: str):
    lines = ["models:"]
    for model_id in ids:
        port = _free_port()
        lines += [f"  {model_id}:", f"    cmd: {fake_cmd(port=str(port))}", f"    proxy: http://127.0.0.1:{port}"]
    config = load_config_text("\n".join(lines) + "\n")
    backends = {m: Backend(mc, logs=LogRing(), session=None) for m, mc in config.models.items()}
    return SimpleNamespace(config=config, backends=backends)


class Gate:
    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.seen: list[str] = []

    async def start_gate(self, backend: Backend) -> None:
        self.seen.append(backend.id)
        if backend.id in self.refuse:
            raise SchedulerError(503, f"not now: {backend.id}", "gated")


class Guard:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    async def stop_guard(self, backend: Backend, reason: str, do_stop) -> StopReport:
        self.calls.append(f"{self.name}:before:{backend.id}:{reason}")
        report = await do_stop()
        self.calls.append(f"{self.name}:after:{backend.state.value}")
        return report


def test_start_gates_run_in_order_and_may_refuse():
    async def main():
        rt = _runtime("a", "b")
        sched = Scheduler(rt)
        first, second = Gate(set()), Gate({"b"})
        sched.add_start_gate(first)
        sched.add_start_gate(second)
        lease = await sched.acquire("a")
        lease.release()
        with pytest.raises(SchedulerError) as info:
            await sched.acquire("b")
        states = {m: b.state for m, b in rt.backends.items()}
        await sched.close()
        return first.seen, second.seen, info.value, states

    first, second, err, states = asyncio.run(main())
    assert first == ["a", "b"] and second == ["a", "b"]
    assert (err.status, err.code) == (503, "gated")
    # "a" was evicted by the swap to "b" (one group), and "b" never started.
    assert states == {"a": State.STOPPED, "b": State.STOPPED}


def test_stop_guards_nest_first_registered_outermost_and_pass_the_report_through():
    async def main():
        rt = _runtime("a")
        sched = Scheduler(rt)
        calls: list[str] = []
        sched.add_stop_guard(Guard("outer", calls))
        sched.add_stop_guard(Guard("inner", calls))
        lease = await sched.acquire("a")
        pid = lease.backend.pid
        lease.release()
        reports = await sched.unload(["a"])
        await sched.unload(["a"])  # already stopped: no guard runs
        await sched.close()
        return calls, reports, pid

    calls, reports, pid = asyncio.run(main())
    assert calls == ["outer:before:a:unload", "inner:before:a:unload", "inner:after:stopped", "outer:after:stopped"]
    assert len(reports) == 1 and reports[0].root_pid == pid and pid in reports[0].pids
