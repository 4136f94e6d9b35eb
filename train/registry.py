"""A name -> definition registry: tasks (`train.tasks`), gradient-combination methods (`train.combine`) and
ensemble node types (`ensemble.spec`) are each one of these."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of definitions by their `.name`. `register` refuses a name twice; `lookup` of an unknown name is a
    ValueError whose message `unknown(name, known_names)` lists what is registered."""

    def __init__(self, what: str, unknown: Callable[[str, list[str]], str]):
        super().__init__()
        self.what, self._unknown = what, unknown

    def register(self, item: T) -> T:
        name = item.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ValueError(self._unknown(name, list(self))) from None
