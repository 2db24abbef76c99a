"""Immutable result types produced by the loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_GROUP_ID = "(default)"
PID_PLACEHOLDER = "${PID}"


@dataclass(frozen=True)
class Filters:
    """Request-body rewrites applied before a JSON request is forwarded.

    Order (as in llama-swap): strip_params, then set_params, then the
    set_params_by_id entry for the name the client asked for. ``model`` is
    protected and never stripped or set.
    """

    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    set_params_by_id: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def __bool__(self) -> bool:
        return bool(self.strip_params or self.set_params or self.set_params_by_id)


@dataclass(frozen=True)
class Timeouts:
    """Upstream HTTP timeouts in seconds (llama-swap's ``timeouts``); None = no limit (a 0 in the config).

    ``idle_conn`` None means swapd's own reuse window for idle keep-alive
    connections (``upstream.IDLE_REUSE_SECONDS``); ``keepalive`` None sends no
    TCP keep-alive probes. ``tls_handshake`` bounds the TLS handshake of an
    ``https://`` upstream (aiohttp times it together with ``connect``).
    """

    connect: float | None = 30.0
    response_header: float | None = None
    idle_conn: float | None = None
    keepalive: float | None = None
    tls_handshake: float | None = 10.0


@dataclass(frozen=True)
class ClientLimits:
    """What a client may send swapd, and how slowly (swapd's ``clientLimits``)."""

    max_body_bytes: int = 512 * 1024 * 1024  # base64 images and audio need room
    header_timeout: float = 30.0  # first byte of a request to the end of its headers
    body_idle_timeout: float = 60.0  # longest pause while a body is being received
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    max_body_bytes_in_flight: int = 1024 * 1024 * 1024  # request bodies held at once, all clients together


@dataclass(frozen=True)
class PeerConfig:
    """A remote OpenAI-compatible server whose models are addressed as ``peer/model``."""

    id: str
    proxy: str
    api_key: str
    models: tuple[str, ...]
    filters: Filters = field(default_factory=Filters)
    # peers.*.timeouts, with llama-swap's peer defaults (connect 30, keepalive 30, responseHeader 60,
    # tlsHandshake 10, idleConn 90 seconds) where a key is absent
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class Capabilities:
    """A model's ``capabilities`` key (llama-swap's ModelCapConfig), validated.

    All zero values (``empty``) means the key is not configured, as in
    llama-swap; swapd then derives them from the model's GGUF (swapd.modelinfo).
    """

    inputs: tuple[str, ...] = ()  # ``in``: text, audio, image
    outputs: tuple[str, ...] = ()  # ``out``
    tools: bool = False
    reranker: bool = False
    context: int = 0  # tokens; 0 = not stated

    @property
    def empty(self) -> bool:
        return not (self.inputs or self.outputs or self.tools or self.reranker or self.context)


@dataclass(frozen=True)
class ModelConfig:
    id: str
    cmd: tuple[str, ...]
    cmd_stop: tuple[str, ...]
    proxy: str
    port: int | None
    aliases: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    check_endpoint: str
    ttl: float
    unload_timeout: float
    health_check_timeout: float
    unlisted: bool
    use_model_name: str
    name: str
    description: str
    concurrency_limit: int
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    fingerprint: str = ""
    filters: Filters = field(default_factory=Filters)
    send_loading_state: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    api_key: str = ""  # swapd addition: sent to the backend as its own Bearer key; never shown
    # swapd addition: the declared VRAM footprint in MiB: on each of the model's GPUs (a float),
    # or per GPU index (pairs); None when not declared (the vram router then measures or estimates)
    vram: float | tuple[tuple[int, float], ...] | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)  # the ``capabilities`` key; empty when absent
    # swapd addition: a model with ``proxy`` and no ``cmd`` is remote: never started or stopped, always ready
    remote: bool = False
    # swapd addition: headers added to every request to this model (``headers``), macros expanded
    headers: tuple[tuple[str, str], ...] = ()
    # compat.ignoreWebsockets (llama-swap): a websocket through /upstream takes no lease, so it never starts
    # or queues the model, counts toward no concurrencyLimit or TTL, and never holds off a swap
    ignore_websockets: bool = False

    def env_value(self, name: str) -> str | None:
        """The last value ``env`` gives ``name``, or None."""
        found = None
        for key, value in self.env:
            if key == name:
                found = value
        return found

    def stop_command(self, pid: int) -> tuple[str, ...]:
        """cmd_stop with every ``${PID}`` occurrence replaced by ``pid``."""
        text = str(pid)
        return tuple(arg.replace(PID_PLACEHOLDER, text) for arg in self.cmd_stop)


@dataclass(frozen=True)
class VramSettings:
    """``routing.router.settings.vram``: the memory-aware router's knobs."""

    reserve_mib: float = 512.0  # kept free on every GPU
    models_max: int = 0  # most models running at once; 0 = no cap
    pinned: tuple[str, ...] = ()  # never stopped to make room (real model ids)


@dataclass(frozen=True)
class TelemetrySettings:
    """``telemetry``: OpenTelemetry traces (swapd.telemetry.otel). The OTEL_* environment also turns them on."""

    enabled: bool = False
    endpoint: str = ""  # an OTLP/HTTP base URL (``/v1/traces`` is added) ; "" = the environment's
    service_name: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    sample_ratio: float = 1.0
    export_timeout: float = 10.0


@dataclass(frozen=True)
class ObserveSettings:
    """llama-swap's activity, capture and performance keys (swapd.config._observe)."""

    metrics_max_in_memory: int = 1000
    capture_buffer_bytes: int = 5 * 1024 * 1024
    store_path: str = ""
    log_requests: bool = False
    performance_disabled: bool = False
    performance_every: float = 5.0
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    # ui.activity.session_id: the request headers that name a client session, first match wins
    session_id_headers: tuple[str, ...] = ("X-Session-ID", "X-Litellm-Session-Id")


# llama-swap's CORS defaults (internal/config/security.go)
CORS_DEFAULT_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CORS_DEFAULT_HEADERS = ("Content-Type", "Authorization", "Accept", "X-Requested-With")
CORS_DEFAULT_MAX_AGE = 86400


@dataclass(frozen=True)
class CorsSettings:
    """``security.cors``, as llama-swap reads it (swapd.config._cors); swapd.server.cors applies it.

    The default (no ``allowedOrigins``) is llama-swap's permissive policy: any
    origin, answered with ``*``.
    """

    allowed_origins: tuple[str, ...] = ("*",)  # "*" allows any origin; others match case-insensitively
    allow_credentials: bool = False
    allow_private_network: bool = False
    allowed_methods: tuple[str, ...] = CORS_DEFAULT_METHODS
    allowed_headers: tuple[str, ...] = ()  # empty: echo the preflight's Access-Control-Request-Headers
    exposed_headers: tuple[str, ...] = ()
    max_age: int = CORS_DEFAULT_MAX_AGE


@dataclass(frozen=True)
class GroupConfig:
    id: str
    swap: bool
    exclusive: bool
    persistent: bool
    members: tuple[str, ...]


@dataclass(frozen=True)
class ProfileConfig:
    """One entry of ``profiles``: while it is active, a request for a pinned name goes to its target."""

    id: str
    description: str
    # requested name -> target (a model id, alias, peer model or selector); "" switches the name off (404)
    pins: Mapping[str, str] = field(default_factory=dict, hash=False)


SELECTOR_STRATEGIES = ("warm", "pin", "spillover")


@dataclass(frozen=True)
class SelectorConfig:
    """One entry of ``selectors``: a name that picks one of its targets for each request."""

    id: str
    strategy: str  # one of SELECTOR_STRATEGIES
    targets: tuple[str, ...]  # model ids, aliases or peer models, as configured (never another selector)
    spillover: int = 1  # settings.spillover: requests per target before the next one starts
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ModelsDir:
    """``modelsDir`` / ``--models-dir`` (a swapd addition): the folder searched and the models it gave."""

    path: str  # absolute
    # model id -> ${MODEL_PATH}, for the models that came from the folder (not those ``models:`` overrides)
    found: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=False)
class Config:
    path: str
    health_check_timeout: float
    log_level: str
    start_port: int
    global_ttl: float
    unload_timeout: float
    models: Mapping[str, ModelConfig]
    groups: Mapping[str, GroupConfig]
    aliases: Mapping[str, str]
    raw: Mapping[str, Any]
    warnings: tuple[str, ...]
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    # upstream.ignorePaths: /upstream paths that never start a model (static assets)
    upstream_ignore_paths: tuple[Any, ...] = ()
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # allowedHosts, normalised (swapd.config._hosts)
    cors: CorsSettings = field(default_factory=CorsSettings)  # security.cors (swapd.config._cors)
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    preload: tuple[str, ...] = ()
    priority: Mapping[str, int] = field(default_factory=dict)
    include_aliases_in_list: bool = False
    # GPU memory verification after every stop (swapd.gpu): "off", "warn" or "strict".
    vram_check: str = "warn"
    vram_check_timeout: float = 10.0
    # routing.router.use: "vram" sets this (swapd.vram_router reads it); None under groups or matrix
    vram_router: VramSettings | None = None
    # Which router decides evictions: "group" (llama-swap's groups), "matrix" or "vram".
    router: str = "group"
    # The compiled matrix (swapd.matrix.MatrixProgram) when router == "matrix", else None.
    matrix: Any = None
    # metricsMaxInMemory, captureBuffer, store, logRequests, performance, telemetry
    observe: ObserveSettings = field(default_factory=ObserveSettings)
    # ollama.listen: a second address serving the same app for clients wired to Ollama's port ("" = none)
    ollama_listen: str = ""
    # modelsDir (swapd.config._models_dir): the folder whose *.gguf files are models; None when not set
    models_dir: ModelsDir | None = None
    # profiles (none active at start: the Runtime holds which one is) and selectors, by id
    profiles: Mapping[str, ProfileConfig] = field(default_factory=dict)
    selectors: Mapping[str, SelectorConfig] = field(default_factory=dict)

    def resolve(self, name: str) -> ModelConfig | None:
        """Find a model by id, or failing that by alias."""
        model = self.models.get(name)
        if model is not None:
            return model
        real = self.aliases.get(name)
        if real is None:
            return None
        return self.models.get(real)

    def resolve_peer(self, name: str) -> tuple[PeerConfig, str] | None:
        """Find a peer model: ``peer/model``, or an unqualified name exactly one peer offers."""
        peer_id, sep, model = name.partition("/")
        if sep and peer_id in self.peers and model in self.peers[peer_id].models:
            return self.peers[peer_id], model
        owners = [p for p in self.peers.values() if name in p.models]
        if len(owners) == 1:
            return owners[0], name
        return None

    def group_of(self, model_id: str) -> GroupConfig:
        """The group a model belongs to (every model is in exactly one)."""
        for group in self.groups.values():
            if model_id in group.members:
                return group
        raise KeyError(model_id)
