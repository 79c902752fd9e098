"""Registry: a name -> object table filled at import time, read when a config names an entry.

One pattern for every extension point (as detectron2/fvcore do): a module that defines a loss, a
memory adapter, a backbone or a dataset registers it under the name a config selects it by,

    @LOSS_REGISTRY.register("my_loss")
    def build_my_loss(cfg): ...

and the build function looks the config's name up with `get`. A name registered at run time (by a
user's own module, imported before training starts) is as valid as a built-in one, because every
check of a configured name asks the registry when it runs, never a list written down earlier.
"""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind, looked up case-insensitively by the value of one config key.

    Args:
        kind: what an entry is, for messages ("loss", "dataset").
        config_key: the key whose value selects an entry ("LOSS.NAME"), named in every error.
    """

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False):
        """Register `obj` under `name`; without `obj`, a decorator that registers what it decorates.

        A name already taken is refused unless `replace` is True (registering twice by accident, e.g.
        two modules choosing the same name, would otherwise silently pick the later one).
        """
        key = self._key(name)

        def add(entry: T) -> T:
            if key in self._entries and not replace:
                raise ValueError(
                    f"{self.config_key} {name!r} is already a registered {self.kind} "
                    f"({self._entries[key]!r}); choose another name or pass replace=True"
                )
            self._entries[key] = entry
            return entry

        if obj is None:
            return add
        return add(obj)

    def get(self, name: str) -> T:
        """The entry registered under `name`, or a one-sentence ValueError listing the registered names.

        A name registered with a trailing colon ("timm:") is a family: it answers every name that starts
        with it ("timm:vit_small_patch16_224"), and the entry reads the rest of the name itself."""
        key = self._key(name)
        family = key.split(":", 1)[0] + ":" if ":" in key else None
        if key not in self._entries and family in self._entries:
            return self._entries[family]
        if key not in self._entries:
            raise ValueError(
                f"{self.config_key} {name!r} is not a known {self.kind}; choose one of {self.names()} "
                f"or register one (README, Extending xbm)"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def unregister(self, name: str) -> T:
        """Remove and return an entry (a test that registers its own entries cleans up with this)."""
        entry = self.get(name)
        del self._entries[self._key(name)]
        return entry

    def _key(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.config_key} must name a {self.kind}, got {name!r}")
        return name.strip().lower()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.config_key!r}, names={self.names()})"
