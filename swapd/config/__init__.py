"""Configuration loading for swapd (llama-swap compatible YAML).

    from swapd.config import load_config
    cfg = load_config("config.yaml")
    model = cfg.resolve("gpt-4o-mini")      # model id or alias
    model.cmd, model.proxy, model.port, cfg.group_of(model.id)

Problems raise :class:`ConfigError` (one line naming file, model and key);
non-fatal findings (unknown or not yet implemented keys) are listed in
``Config.warnings``.
"""

from ._errors import ConfigError
from ._keys import (
    DEFAULT_CONCURRENCY_LIMIT,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_START_PORT,
    DEFAULT_UNLOAD_TIMEOUT,
    MIN_HEALTH_CHECK_TIMEOUT,
)
from ._load import load_config, load_config_text
from ._merge import config_dir_files, config_sources, load_config_sources
from ._model import (
    DEFAULT_GROUP_ID,
    PID_PLACEHOLDER,
    Capabilities,
    Config,
    CorsSettings,
    Filters,
    GroupConfig,
    ModelConfig,
    ModelsDir,
    ObserveSettings,
    PeerConfig,
    ProfileConfig,
    SelectorConfig,
    TelemetrySettings,
    Timeouts,
    VramSettings,
)
from ._models_dir import DEFAULT_MODELS_DIR_CMD, models_dir_stamp
from ._vram import parse_vram_size

__all__ = [
    "Capabilities",
    "Config",
    "ConfigError",
    "CorsSettings",
    "DEFAULT_CONCURRENCY_LIMIT",
    "DEFAULT_GROUP_ID",
    "DEFAULT_HEALTH_CHECK_TIMEOUT",
    "DEFAULT_START_PORT",
    "DEFAULT_UNLOAD_TIMEOUT",
    "Filters",
    "GroupConfig",
    "PeerConfig",
    "ProfileConfig",
    "SelectorConfig",
    "Timeouts",
    "VramSettings",
    "ObserveSettings",
    "TelemetrySettings",
    "MIN_HEALTH_CHECK_TIMEOUT",
    "ModelConfig",
    "ModelsDir",
    "DEFAULT_MODELS_DIR_CMD",
    "models_dir_stamp",
    "PID_PLACEHOLDER",
    "load_config",
    "load_config_sources",
    "config_dir_files",
    "config_sources",
    "load_config_text",
    "parse_vram_size",
]
