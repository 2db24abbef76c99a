"""``swapd doctor``: check the GPU set-up through NVML and say what needs attention.

Per GPU it reports persistence mode, power draw against the limit, active
clock throttle reasons, the driver version, and memory held by processes that
are not swapd's. Exit status: 0 when nothing needs attention, 1 when something
does, 2 when NVML is unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import psutil

from swapd.gpu import Nvml, NvmlUnavailable, Snapshot, pids_visible, throttle_names

EXIT_OK = 0
EXIT_ATTENTION = 1
EXIT_NO_NVML = 2

PERSISTENCE_ADVICE = (
    "persistence mode is off: an idle GPU can stay in a high power state (50-80 W) after a model "
    "unloads. Enabling the NVIDIA persistence daemon usually fixes it: "
    "sudo systemctl enable --now nvidia-persistenced"
)
# Throttle reasons that point at a problem; the others (idle, application
# clocks, sync boost, the software power cap under load) are normal.
THROTTLE_ADVICE = {
    "hw_power_brake_slowdown": (
        "the hardware power brake is slowing the clocks (an external power-brake signal or a power "
        "supply that cannot follow load spikes). Set a power limit slightly below TDP, e.g. "
        "sudo nvidia-smi -pl {suggest}, and check the power supply and cabling"
    ),
    "hw_slowdown": "hardware slowdown is active (power or thermal protection); check cooling and power delivery",
    "hw_thermal_slowdown": "hardware thermal slowdown is active: the GPU is too hot; check cooling and airflow",
    "sw_thermal_slowdown": "software thermal slowdown is active: the GPU runs hot; check cooling and airflow",
}


@dataclass
class Finding:
    gpu: int | None
    message: str
    attention: bool


@dataclass
class SwapdView:
    """What a running swapd says about its own processes (from /api/gpus)."""

    url: str
    pids: set[int] = field(default_factory=set)
    owners: dict[int, str] = field(default_factory=dict)  # pid -> model
    pid_mode: str = "unknown"
    error: str | None = None


def fetch_swapd(url: str, api_key: str | None = None, timeout: float = 5.0) -> SwapdView:
    view = SwapdView(url)
    req = urllib.request.Request(url.rstrip("/") + "/api/gpus", headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        view.error = f"could not ask swapd at {url}: {getattr(exc, 'reason', None) or exc}"
        return view
    view.pids = {int(p) for p in body.get("swapd_pids") or ()}
    if body.get("swapd_pid"):
        view.pids.add(int(body["swapd_pid"]))
    view.pid_mode = body.get("pid_mode") or "unknown"
    for dev in body.get("devices") or ():
        for entry in dev.get("models") or ():
            for pid in entry.get("pids") or ():
                view.owners[int(pid)] = entry.get("model", "?")
                view.pids.add(int(pid))
    return view


def _name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


def assess(snapshot: Snapshot, swapd: SwapdView | None = None, visible: bool | None = None) -> list[Finding]:
    """Everything doctor says, each marked as needing attention or not."""
    findings: list[Finding] = []
    if swapd is not None and swapd.error:
        findings.append(Finding(None, swapd.error + "; listing every process instead", True))
        swapd = None
    tell_apart = swapd is not None and swapd.pid_mode != "memory_only" and visible is not False
    for dev in snapshot.devices:
        i = dev.index
        if dev.persistence is False:
            findings.append(Finding(i, PERSISTENCE_ADVICE, True))
        for reason in throttle_names(dev.throttle):
            advice = THROTTLE_ADVICE.get(reason)
            if advice is not None:
                suggest = f"{int(dev.power_limit_w * 0.9)}" if dev.power_limit_w else "<watts>"
                findings.append(Finding(i, advice.format(suggest=suggest), True))
        if dev.processes is None:
            findings.append(
                Finding(i, "NVML does not list this GPU's processes here (not supported or no permission)", False)
            )
            continue
        for proc in dev.processes:
            mib = "?" if proc.used_mib is None else f"{proc.used_mib:.0f}"
            name = _name(proc.pid) if visible is not False else None
            who = f"pid {proc.pid}" + (f" ({name})" if name else "")
            if tell_apart and swapd is not None:
                if proc.pid in swapd.pids:
                    owner = swapd.owners.get(proc.pid)
                    whose = f"{who} holds {mib} MiB: swapd's" + (f", model {owner}" if owner else "")
                    findings.append(Finding(i, whose, False))
                else:
                    findings.append(Finding(i, f"{who} holds {mib} MiB and is not one of swapd's processes", True))
            else:
                findings.append(Finding(i, f"{who} holds {mib} MiB", False))
    return findings


def render(snapshot: Snapshot, findings: list[Finding], swapd: SwapdView | None, visible: bool | None) -> str:
    lines = [f"NVIDIA driver {snapshot.driver or 'unknown'}, {len(snapshot.devices)} GPU(s)"]
    if swapd is not None and not swapd.error:
        lines.append(f"swapd at {swapd.url}: {len(swapd.pids)} process(es) of its own")
    elif swapd is None:
        lines.append(
            "not checked against a running swapd (pass --url http://127.0.0.1:8080 to tell its processes apart)"
        )
    if visible is False:
        lines.append("NVML's pids are not visible here (another PID namespace): process names are unknown")
    for dev in snapshot.devices:
        lines.append("")
        lines.append(f"GPU {dev.index}: {dev.name} ({dev.uuid})")
        lines.append(
            f"  memory:       {dev.used_mib:.0f} MiB used of {dev.total_mib:.0f} MiB, {dev.free_mib:.0f} MiB free"
        )
        persistence = "unknown" if dev.persistence is None else "on" if dev.persistence else "off"
        lines.append(f"  persistence:  {persistence}")
        if dev.power_w is None:
            power = "unknown"
        elif dev.power_limit_w:
            share = 100 * dev.power_w / dev.power_limit_w
            power = f"{dev.power_w:.0f} W of {dev.power_limit_w:.0f} W limit ({share:.0f}%)"
        else:
            power = f"{dev.power_w:.0f} W (limit unknown)"
        lines.append(f"  power:        {power}")
        reasons = throttle_names(dev.throttle)
        throttle = ", ".join(reasons) if reasons else "none" if dev.throttle is not None else "unknown"
        lines.append(f"  throttle:     {throttle}")
        mine = [f for f in findings if f.gpu == dev.index]
        procs = [f for f in mine if f.message.startswith("pid ")]
        lines.append(f"  processes:    {'none' if not procs and dev.processes is not None else ''}".rstrip())
        for f in procs:
            lines.append(f"    {'!' if f.attention else '-'} {f.message}")
        for f in mine:
            if not f.message.startswith("pid "):
                lines.append(f"  {'!' if f.attention else '-'} {f.message}")
    for f in findings:
        if f.gpu is None:
            lines.append(f"! {f.message}")
    lines.append("")
    count = sum(f.attention for f in findings)
    lines.append("Nothing needs attention." if count == 0 else f"{count} thing(s) need attention (marked !).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapd doctor",
        description="Check the GPU set-up through NVML: persistence mode, power, throttling, "
        "driver, and GPU memory held by processes that are not swapd's.",
    )
    p.add_argument("--url", help="a running swapd (e.g. http://127.0.0.1:8080) to ask which processes are its own")
    p.add_argument(
        "--api-key", default=os.environ.get("SWAPD_API_KEY"), help="API key for --url (default $SWAPD_API_KEY)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        nvml = Nvml.open_sync()
    except NvmlUnavailable as exc:
        advice = (
            "Nothing can be checked without it: install the NVIDIA driver, or in a container run with the "
            "NVIDIA runtime so that libnvidia-ml.so.1 is visible."
        )
        if args.json:  # still JSON, so a script reading stdout gets a report, not a parse error
            message = f"NVML is not available: {exc}. {advice}"
            report = {
                "nvml_available": False,
                "error": message,
                "driver_version": None,
                "devices": [],
                "findings": [asdict(Finding(None, message, True))],
                "attention": 1,
            }
            print(json.dumps(report, indent=2))
        else:
            print(f"swapd doctor: NVML is not available: {exc}.\n{advice}", file=sys.stderr)
        return EXIT_NO_NVML
    try:
        snapshot = nvml.read_sync(full=True)
    finally:
        nvml.close_sync()
    swapd = fetch_swapd(args.url, args.api_key) if args.url else None
    visible = pids_visible(snapshot.pids())
    findings = assess(snapshot, swapd, visible)
    if args.json:
        report = {
            "nvml_available": True,
            "error": None,
            "driver_version": snapshot.driver,
            "devices": [{**asdict(d), "throttle_reasons": throttle_names(d.throttle)} for d in snapshot.devices],
            "findings": [asdict(f) for f in findings],
            "attention": sum(f.attention for f in findings),
        }
        print(json.dumps(report, indent=2))
    else:
        print(render(snapshot, findings, swapd, visible))
    return EXIT_ATTENTION if any(f.attention for f in findings) else EXIT_OK
