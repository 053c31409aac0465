"""The error every configuration check raises (light: no torch, no Hydra)."""


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
