"""The model names a request may give: the base model, its aliases and the LoRA adapters.

`ServedModels` owns the table of names and answers, for each request, which model it runs on and
whether its caller may use it. Every route of every protocol resolves its `model` here (through
`Pipeline.resolve_model`), so an adapter is chosen, and a key's scope applies, the same way
everywhere:
- the base model's `served_name` and its aliases run on the base model; with
  `model.accept_any_name`, so does any unknown name (an adapter's own name still means the adapter);
- each adapter, from `lora.adapters` or loaded at runtime, runs on the base plus its LoRA weights;
- a key limited to some names (`auth.keys[].models`) gets 404 for any other, exactly as for a name
  that does not exist, so the names of other teams' adapters do not leak.

An adapter counts the generations running on it, so unloading one lets them finish before the
engine drops its weights (`remove`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.errors import ModelNotFoundError, ServiceUnavailableError
from server.settings import Settings


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter as the engine knows it: `lora_id` is its number in the engine (never reused
    while the server runs, so the engine's cache cannot mix up two adapters)."""

    name: str
    path: str
    lora_id: int
    created: int = 0
    # Set once the engine has loaded it: before, a request for it is a 503 (a bad adapter reaching the
    # engine with a request, not through add_lora, would kill the engine).
    loaded: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    def began(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What a request's `model` resolved to: the name answers carry, and the adapter (None: the base)."""

    name: str
    adapter: Adapter | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a caller's key allows: `models` None means every name; `admin` may load and unload adapters."""

    models: frozenset[str] | None = None
    admin: bool = False

    def allows(self, name: str) -> bool:
        return self.models is None or name in self.models


EVERYTHING = Grant()  # auth off, and keys from `auth.api_keys` / `auth.api_keys_file`


class ServedModels:
    def __init__(self, settings: Settings, base_name: str | None = None, created: int = 0) -> None:
        """`base_name`: the engine's name for the base model (`model.served_name` unless given)."""
        self.base = ServedModel(base_name or settings.model.served_name)
        self._aliases = set(settings.model.aliases)
        self._accept_any_name = settings.model.accept_any_name
        self._created = created
        # Ids in configuration order: every API process of one engine numbers them alike.
        self._ids = itertools.count(1)
        self._adapters: dict[str, Adapter] = {}
        self.changing = asyncio.Lock()  # one runtime load or unload at a time
        for configured in settings.lora.adapters:
            self._adapters[configured.name] = Adapter(
                configured.name, configured.resolved_path, next(self._ids), created=created
            )

    @property
    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def adapter(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def resolve(self, model: str | None, grant: Grant | None = None) -> ServedModel:
        """The model a request names; ModelNotFoundError if it names none, or none its key may use."""
        grant = grant or EVERYTHING
        served = self._lookup(model)
        if served is None or not grant.allows(served.name):
            raise ModelNotFoundError(self._not_found_message(model, grant), param="model")
        if served.adapter is not None and not served.adapter.loaded:
            raise ServiceUnavailableError(f"the adapter '{served.name}' is still loading; retry shortly")
        return served

    def _lookup(self, model: str | None) -> ServedModel | None:
        if model is None or model == self.base.name or model in self._aliases:
            return self.base
        adapter = self._adapters.get(model)
        if adapter is not None:
            return ServedModel(adapter.name, adapter)
        return self.base if self._accept_any_name else None

    def _not_found_message(self, model: str | None, grant: Grant) -> str:
        visible = [name for name in self.names() if grant.allows(name)]
        served = ", ".join(f"'{name}'" for name in visible) or "none to this key"
        return f"The model '{model}' does not exist; this server serves {served}."

    def names(self) -> list[str]:
        return [self.base.name, *self._adapters]

    def visible(self, grant: Grant) -> list[ServedModel]:
        """The models /v1/models lists to this caller: the base first, then adapters by name order."""
        models = [self.base, *(ServedModel(a.name, a) for a in self._adapters.values())]
        return [model for model in models if grant.allows(model.name)]

    # ---- runtime loading (lora.runtime_loading) ------------------------------------------------

    def taken(self, name: str) -> bool:
        return name == self.base.name or name in self._aliases or name in self._adapters

    def new_adapter(self, name: str, path: str, created: int) -> Adapter:
        """An adapter with the next engine id, not yet served (the engine loads it first)."""
        return Adapter(name, path, next(self._ids), created=created)

    def serve(self, adapter: Adapter) -> None:
        """Serves an adapter the engine has loaded (the caller checked `taken`)."""
        adapter.loaded = True
        self._adapters[adapter.name] = adapter

    def withdraw(self, name: str) -> Adapter | None:
        """Takes the name out of service: new requests get 404 at once; the ones running go on."""
        return self._adapters.pop(name, None)


def grant_of(scope: Mapping[str, Any]) -> Grant:
    """The grant server/edge/auth.py put on the request (every name when auth is off)."""
    grant = scope.get("state", {}).get("grant")
    return grant if isinstance(grant, Grant) else EVERYTHING
