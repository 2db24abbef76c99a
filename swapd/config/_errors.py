"""Error type raised for any problem found while loading a configuration."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration could not be loaded.

    ``str(err)`` is always a single line of the form::

        <file>: model '<id>': key '<key>': <message>

    where the model part and the key part are left out when they do not apply.
    """

    def __init__(
        self,
        file: str,
        model: str | None,
        key: str | None,
        message: str,
    ) -> None:
        self.file = file
        self.model = model
        self.key = key
        # keep the rendered error on one line no matter where the text came from
        self.message = " ".join(str(message).split())
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.file]
        if self.model is not None:
            parts.append(f"model '{self.model}'")
        if self.key:
            parts.append(f"key '{self.key}'")
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._render()
