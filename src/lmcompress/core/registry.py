"""Registries of pydantic config classes that form a discriminated union.

A stage or a loss declares its name once, as the `Literal` of its discriminator field
(`stage: Literal["distill"]`, `type: Literal["logits"]`); `@registry.register` files the class under that
name, and `registry.union()` is the `Annotated[A | B | ..., Field(discriminator=...)]` a recipe field uses.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T", bound=type[BaseModel])


class Registry(Generic[T]):
    def __init__(self, discriminator: str, what: str):
        self.discriminator = discriminator
        self.what = what  # "recipe stage", "distillation loss": used in error messages
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: file `cls` under the single `Literal` value of its discriminator field."""
        field = cls.model_fields.get(self.discriminator)
        values = typing.get_args(field.annotation) if field is not None else ()
        if field is None or typing.get_origin(field.annotation) is not typing.Literal or len(values) != 1:
            raise TypeError(f"{cls.__name__}: a {self.what} class declares `{self.discriminator}: Literal['<name>']`")
        name = values[0]
        if name in self._classes and self._classes[name] is not cls:
            raise TypeError(f"{self.what} {name!r} is registered twice ({self._classes[name].__name__}, {cls.__name__})")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> T:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def union(self) -> Any:
        """The discriminated union of every registered class (import their modules first)."""
        classes = tuple(self._classes.values())
        if not classes:
            raise TypeError(f"no {self.what} is registered")
        member = classes[0] if len(classes) == 1 else typing.Union[classes]  # noqa: UP007 (built at run time)
        return Annotated[member, Field(discriminator=self.discriminator)]
