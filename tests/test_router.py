"""The router's decision core: target, running set and config in, the models
that must stop out. Pure calls; no sleeps, no processes, no event loop."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import yaml

from helpers import fake_cmd
from swapd.backend import Backend, State
from swapd.config import load_config_text
from swapd.logring import LogRing
from swapd.router import Decision, GroupRouter, RunningModel
from swapd.scheduler import Scheduler


def config(groups: dict | None = None, models=("a", "b", "c", "d", "e")):
    doc: dict = {"models": {m: {"cmd": "server --port ${PORT}"} for m in models}}
    if groups:
        doc["groups"] = groups
    return load_config_text(yaml.safe_dump(doc))


def running(*ids: str, **in_flight: int) -> dict[str, RunningModel]:
    return {m: RunningModel(m, in_flight.get(m, 0), 100.0 + i) for i, m in enumerate(ids)}


def evict(cfg, target: str, *ids: str, **in_flight: int) -> tuple[str, ...]:
    return GroupRouter().decide(target, running(*ids, **in_flight), cfg).evict


GROUPS = {
    "solo": {"swap": True, "exclusive": True, "members": ["a", "b"]},
    "side": {"swap": False, "exclusive": False, "members": ["c", "d"]},
    "keep": {"swap": True, "exclusive": False, "persistent": True, "members": ["e"]},
}


def test_default_group_swaps_one_model_at_a_time():
    cfg = config()
    assert evict(cfg, "a") == ()
    assert evict(cfg, "a", "b") == ("b",)
    assert evict(cfg, "b", "a", "c", "d") == ("a", "c", "d")


def test_decision_is_a_value_and_sorted():
    decision = GroupRouter().decide("a", running("d", "b", "c"), config())
    assert decision == Decision(("b", "c", "d"))


def test_swap_false_group_runs_side_by_side():
    cfg = config(GROUPS)
    assert evict(cfg, "c", "d") == ()
    assert evict(cfg, "d", "c") == ()


def test_swap_group_evicts_its_other_members():
    cfg = config(GROUPS)
    assert evict(cfg, "a", "b") == ("b",)


def test_exclusive_group_evicts_other_groups_but_not_persistent_ones():
    cfg = config(GROUPS)
    assert evict(cfg, "a", "c", "d", "e") == ("c", "d")
    assert evict(cfg, "b", "a", "c", "e") == ("a", "c")


def test_non_exclusive_group_leaves_other_groups_alone():
    cfg = config(GROUPS)
    assert evict(cfg, "c", "a", "e") == ()
    assert evict(cfg, "e", "a", "c") == ()


def test_a_model_removed_by_a_reload_is_always_evicted():
    cfg = config(GROUPS)
    assert evict(cfg, "c", "gone") == ("gone",)
    assert evict(cfg, "e", "gone", "a") == ("gone",)


def test_the_target_is_never_evicted():
    cfg = config()
    assert evict(cfg, "a", "a", "b") == ("b",)


def test_in_flight_and_last_use_do_not_change_the_group_rule():
    # Waiting for busy models to drain is the scheduler's job, not the router's.
    cfg = config(GROUPS)
    assert evict(cfg, "a", "b", "c", b=3, c=1) == ("b", "c")


def test_the_router_sees_in_flight_counts_and_last_use():
    seen = []

    class Spy(GroupRouter):
        def decide(self, target, running, config):
            seen.append((target, dict(running)))
            return super().decide(target, running, config)

    sched = Scheduler(SimpleNamespace(config=config(), backends={}), router=Spy())
    sched._in_flight["b"] = 2
    sched._last_used["b"] = 7.5
    sched._active["b"] = object()  # a swap bringing "b" in
    assert list(sched._decision_for("a").evict) == ["b"]
    assert seen == [("a", {"b": RunningModel("b", 2, 7.5, "swapping")})]


# -- the scheduler follows whatever router it is given (real backend processes) ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KeepAll:
    def decide(self, target, running, config):
        return Decision()


def test_scheduler_uses_its_router():
    lines = ["models:"]
    for model_id in ("a", "b"):
        port = _free_port()
        lines += [f"  {model_id}:", f"    cmd: {fake_cmd(port=str(port))}", f"    proxy: http://127.0.0.1:{port}"]
    cfg = load_config_text("\n".join(lines) + "\n")

    async def main():
        rt = SimpleNamespace(config=cfg, backends={m: Backend(mc, logs=LogRing(), session=None) for m, mc in cfg.models.items()})
        sched = Scheduler(rt, router=KeepAll())
        for model_id in ("a", "b"):
            (await sched.acquire(model_id)).release()
        states = {m: b.state for m, b in rt.backends.items()}
        await sched.close()
        return states

    # The default group would swap; a router that evicts nothing keeps both.
    assert asyncio.run(main()) == {"a": State.READY, "b": State.READY}
