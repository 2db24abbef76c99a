"""Command line: flags compatible with llama-swap, startup, signals, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from swapd import __version__, logging as slog, osutil
from swapd.config import ConfigError, load_config

# llama-swap spells its flags with one dash (Go's flag package); accept both.
_SINGLE_DASH = ("config", "listen", "version", "watch-config", "log-format")


def _normalise_argv(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name = arg[1:].split("=", 1)[0]
        if arg.startswith("-") and not arg.startswith("--") and name in _SINGLE_DASH:
            arg = "-" + arg
        out.append(arg)
    return out


def parse_listen(value: str) -> tuple[str | None, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces, as in llama-swap)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid listen address {value!r}; expected HOST:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapd",
        description="Model-swapping reverse proxy for local LLM servers (llama-swap compatible).",
    )
    p.add_argument("--config", default="config.yaml", help="config file (llama-swap format); default config.yaml")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=parse_listen,
        help="address to listen on: HOST:PORT, or :PORT for all interfaces (default 127.0.0.1:8080)",
    )
    p.add_argument("--watch-config", action="store_true", help="reload the config when the file changes")
    p.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log rendering: console on a terminal, JSON lines otherwise (auto)",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


# Subcommands beside the llama-swap compatible server flags. Each module has
# ``main(argv) -> int``.
SUBCOMMANDS = {
    "doctor": "swapd.doctor",  # check the GPU set-up through NVML
    "setup": "swapd.setup",  # build llama-server and fetch the small real model
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(_normalise_argv(argv))
    if args.version:
        print(f"swapd {__version__}")
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"swapd: config error: {exc}", file=sys.stderr)
        return 2
    slog.configure(config.log_level, args.log_format)
    log = slog.get_logger("swapd")
    for warning in config.warnings:
        log.warning("config.warning", file=args.config, message=warning)
    try:
        asyncio.run(serve(config, args))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch this
        pass
    except OSError as exc:
        log.error("swapd.listen_failed", error=str(exc))
        return 1
    return 0


async def serve(config, args) -> None:
    from swapd.backend import CHILDREN
    from swapd.server.app import RUNTIME, create_app

    log = slog.get_logger("swapd")
    loop = asyncio.get_running_loop()
    if not osutil.set_child_subreaper():
        log.warning("swapd.no_subreaper", detail="orphaned backend grandchildren will not be reaped by swapd")
    loop.add_signal_handler(signal.SIGCHLD, CHILDREN.reap_orphans)

    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    host, port = args.listen
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    shown = f"{host or '*'}:{port}"
    log.info(
        "swapd.listening",
        address=shown,
        version=__version__,
        models=len(config.models),
        hint=(
            "serving all interfaces"
            if host in (None, "0.0.0.0", "::")
            else f"only this host can connect; use --listen :{port} to serve all interfaces"
        ),
    )

    reloader = Reloader(app[RUNTIME], args.config)
    loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
    watcher = loop.create_task(reloader.watch()) if args.watch_config else None

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("swapd.shutdown", detail="stopping every backend")
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()
        await reloader.close()
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGCHLD)
        CHILDREN.reap_orphans()
        log.info("swapd.stopped")


class Reloader:
    """Reload the config on SIGHUP or when the file changes; one reload at a time.

    A config that fails to load is logged and ignored: the running one stays.
    """

    POLL_SECONDS = 1.0

    def __init__(self, runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._log = slog.get_logger("swapd.config")

    def request(self, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, why: str) -> bool:
        async with self._lock:
            try:
                new = load_config(self.path)
            except ConfigError as exc:
                self._log.error("config.reload_failed", reason=why, error=str(exc), detail="keeping the running config")
                return False
            for warning in new.warnings:
                self._log.warning("config.warning", file=self.path, message=warning)
            changes = await self.runtime.reload(new)
            self._log.info("config.reloaded", reason=why, **changes)
            return True

    def _stamp(self):
        import os

        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def watch(self) -> None:
        # One stat() a second: negligible, and it works on every filesystem
        # (editors that replace the file, bind mounts, NFS) where inotify may not.
        last = self._stamp()
        while True:
            await asyncio.sleep(self.POLL_SECONDS)
            stamp = self._stamp()
            if stamp is not None and stamp != last:
                last = stamp
                await asyncio.sleep(0.2)  # let the writer finish
                last = self._stamp() or last
                await self.reload("file changed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
