"""annoloop configuration: one documented YAML of defaults, overridable by a file and environment variables."""

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
