from .checks import check_cfg
from .defaults import get_cfg
from .loading import ConfigError, load_cfg

__all__ = ["get_cfg", "load_cfg", "check_cfg", "ConfigError"]
