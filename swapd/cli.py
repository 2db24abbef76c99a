"""Command line: flags compatible with llama-swap, startup, signals, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
from typing import TYPE_CHECKING

from aiohttp import web

from swapd import __version__, osutil
from swapd import logging as slog
from swapd.config import ConfigError, config_dir_files, load_config_sources, models_dir_stamp

if TYPE_CHECKING:
    from swapd.server.runtime import Runtime

# llama-swap spells its flags with one dash (Go's flag package); accept both.
_SINGLE_DASH = (
    "config",
    "config-dir",
    "listen",
    "version",
    "watch-config",
    "log-format",
    "tls-cert-file",
    "tls-key-file",
)
DEFAULT_CONFIG = "config.yaml"
DEFAULT_TLS_PORT = 8443  # llama-swap's default port when serving TLS


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "subcommands:\n"
            "  swapd setup [--help]    build llama-server, fetch a small real model, write a quickstart config\n"
            "  swapd doctor [--help]   check the GPUs through NVML (persistence, power, throttling, memory)"
        ),
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"config file (llama-swap format); default {DEFAULT_CONFIG} unless --config-dir or --models-dir is given",
    )
    p.add_argument(
        "--config-dir",
        default=None,
        metavar="DIR",
        help="directory of *.yml/*.yaml files merged in name order (after --config, if given)",
    )
    p.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="serve every *.gguf file under DIR (searched recursively) as a model, run with modelsDir.cmd "
        "(default: llama-server --port ${PORT} -m ${MODEL_PATH}); sets the config's modelsDir.path, "
        "and needs no config file",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=parse_listen,
        help="address to listen on: HOST:PORT, or :PORT for all interfaces (default 127.0.0.1:8080)",
    )
    p.add_argument(
        "--ollama-listen",
        default=None,
        type=parse_listen,
        metavar="ADDR",
        help="also serve on ADDR (e.g. 127.0.0.1:11434) for clients wired to Ollama's port; overrides ollama.listen",
    )
    p.add_argument(
        "--watch-config",
        action="store_true",
        help="reload the config when its files change, or when *.gguf files come or go in the models folder",
    )
    p.add_argument("--tls-cert-file", default=None, metavar="FILE", help="TLS certificate (PEM); serve HTTPS")
    p.add_argument("--tls-key-file", default=None, metavar="FILE", help="TLS private key (PEM) for --tls-cert-file")
    p.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log rendering: console on a terminal, JSON lines otherwise (auto)",
    )
    p.add_argument(
        "--event-loop",
        choices=osutil.EVENT_LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto; it is a dependency on Linux), or asyncio's own",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def tls_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """The server TLS context for ``--tls-cert-file``/``--tls-key-file``; both or neither.

    Raises ValueError with a one-line message when only one is given or the
    pair cannot be loaded, so a bad flag fails at start, not at the first client.
    """
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        given, missing = ("--tls-cert-file", "--tls-key-file") if cert_file else ("--tls-key-file", "--tls-cert-file")
        raise ValueError(f"TLS needs both --tls-cert-file and --tls-key-file; {given} was given without {missing}")
    for flag, path in (("--tls-cert-file", cert_file), ("--tls-key-file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read TLS file {path} ({flag}): {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"cannot load TLS certificate {cert_file} with key {key_file}: expected a PEM certificate "
            f"and its matching private key ({getattr(exc, 'reason', None) or exc})"
        ) from None
    return context


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
    normalised = _normalise_argv(argv)
    args = build_parser().parse_args(normalised)
    if args.version:
        print(f"swapd {__version__}")
        return 0
    if args.config is None and args.config_dir is None and args.models_dir is None:
        args.config = DEFAULT_CONFIG
    try:
        args.ssl_context = tls_context(args.tls_cert_file, args.tls_key_file)
    except ValueError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    if args.ssl_context is not None and not any(a == "--listen" or a.startswith("--listen=") for a in normalised):
        args.listen = (args.listen[0], DEFAULT_TLS_PORT)
    try:
        config = load_config_sources(args.config, args.config_dir, models_dir=args.models_dir)
    except ConfigError as exc:
        print(f"swapd: config error: {exc}", file=sys.stderr)
        return 2
    from swapd.server.observe import apply_log_settings

    args.log_sink = sink = slog.ProxyLog()
    setting_warnings = apply_log_settings(config, sink)
    slog.configure(config.log_level, args.log_format, sink=sink)
    log = slog.get_logger("swapd")
    for warning in (*config.warnings, *setting_warnings):
        log.warning("config.warning", file=config.path, message=warning)
    if config.models_dir is not None:
        log.info("config.models_dir", path=config.models_dir.path, models=sorted(config.models_dir.found))
    if not config.models and not config.peers:
        log.warning(
            "config.no_models",
            file=config.path,
            message="the config defines no models (and no peers): every request for a model gets 404",
        )
    try:
        args.loop_name, loop_factory = osutil.event_loop_factory(args.event_loop)
    except RuntimeError as exc:
        print(f"swapd: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, args))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch this
        pass
    except OSError as exc:
        log.error("swapd.listen_failed", error=str(exc))
        return 1
    return 0


async def serve(config, args) -> None:
    from swapd.backend import CHILDREN
    from swapd.server.app import RUNTIME, create_app
    from swapd.server.observe import apply_log_settings
    from swapd.server.slowclient import Listener
    from swapd.server.webguard import unprotected_listen

    log = slog.get_logger("swapd")
    loop = asyncio.get_running_loop()
    if not osutil.set_child_subreaper():
        log.warning("swapd.no_subreaper", detail="orphaned backend grandchildren will not be reaped by swapd")
    stop_watching_orphans = osutil.watch_orphans(loop, CHILDREN.reap_orphans)

    app = create_app(config)
    rt = app[RUNTIME]
    sink = getattr(args, "log_sink", None)
    apply_log_settings(config, sink, rt.upstream_echo)
    if sink is not None:
        sink.attach(rt.logs, loop)
    ssl_context = getattr(args, "ssl_context", None)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=10.0,
        keepalive_timeout=config.client_limits.keepalive_timeout,
        # after an error that left a client's body unread, read (and drop) it this long before closing,
        # so the client gets the answer instead of a reset; aiohttp's default is 10 s
        lingering_time=2.0,
    )
    await runner.setup()
    host, port = args.listen
    try:
        site = Listener(runner, host, port, header_timeout=config.client_limits.header_timeout, ssl_context=ssl_context)
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    ollama_site = None
    ollama_at = getattr(args, "ollama_listen", None)
    if ollama_at is None and config.ollama_listen:
        ollama_at = parse_listen(config.ollama_listen)
    if ollama_at is not None:
        ollama_site = await _listen_ollama(runner, app, ollama_at, config, site, log)
    shown = f"{host or '*'}:{port}"
    log.info(
        "swapd.listening",
        address=shown,
        url=f"{'https' if ssl_context else 'http'}://{shown}",
        tls=ssl_context is not None,
        version=__version__,
        event_loop=args.loop_name,
        models=len(config.models),
        hint=(
            "serving all interfaces"
            if host in (None, "0.0.0.0", "::")
            else f"only this host can connect; use --listen :{port} to serve all interfaces"
        ),
    )

    rt.listen_host = host  # a name given to --listen is an allowed Host (swapd.server.webguard)
    if unprotected_listen(host, config):
        log.warning(
            "swapd.unprotected",
            address=shown,
            detail="no apiKeys: anyone who can reach this "
            "address can use every model and /unload; set apiKeys, or listen on 127.0.0.1",
        )
    rt.log_sink = sink
    reloader = Reloader(rt, args.config, getattr(args, "config_dir", None), getattr(args, "models_dir", None))
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
        rt.events.close()  # end log streams and SSE clients so they do not hold the shutdown up
        if ollama_site is not None:
            await ollama_site.stop()
        await site.stop()
        await runner.cleanup()
        stop_watching_orphans()
        CHILDREN.reap_orphans()
        log.info("swapd.stopped")


async def _listen_ollama(runner, app, address: tuple[str | None, int], config, main_site, log):
    """The second listener (--ollama-listen / ollama.listen): the same app, plain HTTP, for Ollama's clients."""
    from swapd.server.dialects import OLLAMA_PORTS
    from swapd.server.slowclient import Listener

    host, port = address
    site = Listener(runner, host, port, header_timeout=config.client_limits.header_timeout)
    try:
        await site.start()
    except OSError:
        await main_site.stop()
        await runner.cleanup()
        raise
    app[OLLAMA_PORTS].update(site.ports)  # the set was made with the app; filled in, not replaced
    log.info(
        "swapd.listening_ollama", address=f"{host or '*'}:{port}", routes="/api/chat, /api/generate, /api/tags, ..."
    )
    return site


class Reloader:
    """Reload the config on SIGHUP or when its files change; one reload at a time.

    The config is ``--config`` and/or every ``*.yml``/``*.yaml`` file in
    ``--config-dir``; a file added to or removed from the directory counts as
    a change. A config that fails to load is logged and ignored: the running
    one stays. The models folder (``modelsDir``, ``--models-dir``) is searched
    again on every reload, and with ``--watch-config`` a ``*.gguf`` file that
    comes or goes there is a change too.
    """

    POLL_SECONDS = 1.0

    def __init__(
        self, runtime: Runtime, path: str | None, config_dir: str | None = None, models_dir: str | None = None
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.config_dir = config_dir
        self.models_dir = models_dir  # --models-dir
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._log = slog.get_logger("swapd.config")

    def request(self, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, why: str) -> bool:
        """Load the config's files and hand them to ``Runtime.reload``, which
        applies them (the one place a reload happens)."""
        async with self._lock:
            try:
                new = load_config_sources(
                    self.path, self.config_dir, models_dir=self.models_dir, previous=self.runtime.config
                )
            except ConfigError as exc:
                self._log.error("config.reload_failed", reason=why, error=str(exc), detail="keeping the running config")
                return False
            await self.runtime.reload(new, why)
            return True

    @staticmethod
    def _file_stamp(path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _stamp(self):
        """What the config's files look like now; None while they are briefly missing."""
        stamps = []
        if self.path:
            stamp = self._file_stamp(self.path)
            if stamp is None:
                return None  # an editor replacing the file; look again next time
            stamps.append((self.path, stamp))
        if self.config_dir:
            try:
                files = config_dir_files(self.config_dir)
            except ConfigError:
                return None
            if not files and not self.path and not self.models_dir:
                return None  # as llama-swap: an emptied directory is not reloaded
            for name in files:
                stamps.append((name, self._file_stamp(name)))
        models_dir = self.runtime.config.models_dir
        if models_dir is not None:
            # which *.gguf files are there, not their contents: a file replaced in place is the same model
            stamps.append((models_dir.path, models_dir_stamp(models_dir.path)))
        return tuple(stamps)

    async def watch(self) -> None:
        # A few stat() calls a second: negligible, and it works on every filesystem
        # (editors that replace the file, bind mounts, NFS) where inotify may not.
        last = self._stamp()
        while True:
            await asyncio.sleep(self.POLL_SECONDS)
            stamp = await asyncio.to_thread(self._stamp)  # a models folder may be large, or on NFS
            if stamp is not None and stamp != last:
                last = stamp
                await asyncio.sleep(0.2)  # let the writer finish
                last = await asyncio.to_thread(self._stamp) or last
                await self.reload("file changed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
