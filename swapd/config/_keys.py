"""Config keys llama-swap knows, and swapd's defaults for them."""

from __future__ import annotations

import re

# Never stripped or set by filters: routing depends on them (llama-swap's list).
PROTECTED_PARAMS = frozenset({"model"})

# ------------------------------------------------------------------ defaults

DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_START_PORT = 5800
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_GLOBAL_TTL = 0
DEFAULT_CONCURRENCY_LIMIT = 10
COMFYUI_MODEL_ID = "comfyui_auto"
COMFYUI_MIN_CONCURRENCY = 50
DEFAULT_PROXY = "http://localhost:${PORT}"
DEFAULT_CHECK_ENDPOINT = "/health"
MODEL_TTL_INHERIT = -1
MAX_PORT = 65535

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT_VALUES = ("proxy", "upstream", "both", "none")
MODALITIES = ("text", "audio", "image")
VRAM_CHECK_MODES = ("off", "warn", "strict")
DEFAULT_VRAM_CHECK = "warn"
DEFAULT_VRAM_CHECK_TIMEOUT = 10.0

# Every key llama-swap understands at the top level.
KNOWN_TOP_LEVEL_KEYS = (
    "healthCheckTimeout",
    "logRequests",
    "logLevel",
    "logTimeFormat",
    "logToStdout",
    "metricsMaxInMemory",
    "captureBuffer",
    "store",
    "ui",
    "performance",
    "globalTTL",
    "unloadTimeout",
    "models",
    "profiles",
    "selectors",
    "routing",
    "groups",
    "matrix",
    "macros",
    "startPort",
    "hooks",
    "sendLoadingState",
    "includeAliasesInList",
    "apiKeys",
    "peers",
    "upstream",
    "security",
    # swapd's own keys
    "vramCheck",
    "vramCheckTimeout",
    "clientLimits",
    "allowedHosts",
    "telemetry",
    "modelsDir",
    "ollama",
)
KNOWN_SECURITY_KEYS = ("cors",)
KNOWN_CORS_KEYS = (
    "allowedOrigins",
    "allowCredentials",
    "allowPrivateNetwork",
    "allowedMethods",
    "allowedHeaders",
    "exposedHeaders",
    "maxAge",
)
KNOWN_COMPAT_KEYS = ("ignoreWebsockets",)
KNOWN_CLIENT_LIMIT_KEYS = ("maxBodyMB", "headerTimeout", "bodyIdleTimeout", "keepaliveTimeout", "maxBodyBytesInFlight")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}

# Accepted, but swapd does not act on them (yet).
NOT_IMPLEMENTED_KEYS: tuple[str, ...] = ()

KNOWN_MODEL_KEYS = (
    "cmd",
    "cmdStop",
    "proxy",
    "aliases",
    "env",
    "checkEndpoint",
    "ttl",
    "unloadTimeout",
    "unlisted",
    "useModelName",
    "name",
    "description",
    "concurrencyLimit",
    "filters",
    "macros",
    "metadata",
    "sendLoadingState",
    "timeouts",
    "compat",
    "capabilities",
    "healthCheckTimeout",
    "apiKey",  # swapd addition: the backend's own key, sent instead of the client's credential
    "headers",  # swapd addition: headers added to every request to the model
    "vram",  # swapd addition: the declared VRAM footprint (the vram router)
)

KNOWN_GROUP_KEYS = ("swap", "exclusive", "persistent", "members")
KNOWN_MATRIX_KEYS = ("vars", "evict_costs", "sets")


# ------------------------------------------------------------------- helpers
