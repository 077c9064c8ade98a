"""Export backends: one small protocol, a validated registry, and an entry-point group.

This folder installs as ``cwca_export.backends``. Built-in backends (``optimum``, ``onnx``)
register with :func:`register_backend` when their module is imported; third-party packages
expose theirs under the entry-point group ``cwca_export.backends``
(``name = "pkg.module:BackendClass"``). Both are loaded on first lookup, by the registry pattern
estimators and compression methods share (:class:`cwca_export.registry.Registry`).

The artifact contract every backend meets, so that one verifier serves them all:

- ``out_dir/model.onnx`` (external data next to it is allowed) takes ``input_ids`` (B, S)
  int64 and optionally ``attention_mask`` (B, past + S), ``position_ids`` (B, S) and the
  KV cache ``past_key_values.{i}.key`` / ``.value`` (B, kv_heads_i, past, head_dim_i), the
  head counts per layer (head pruning can leave blocks with different counts); it returns
  ``logits`` (B, S, vocab) and, with a cache, ``present.{i}.key`` / ``.value``.
- ``config.json``, ``generation_config.json`` (when the model has one) and the tokenizer
  files lie next to it.

A backend may define ``refusal(model)``: why it would not give a correct artifact for that
model (a message naming an alternative), or None; the export asks it before any work. It may
also define ``config_refusal(config)``, the same for what the model's config alone shows (its
type), which the CLI and recipes ask before the model loads (:func:`check_config`).

A backend may also define ``generate(out_dir, input_ids, attention_mask, new_tokens, ep)``
returning the greedy tokens its own runtime loader produces (Optimum's
``ORTModelForCausalLM``); verification then checks that path too. Under ``export --low-memory``
a float32 artifact is checked without weight prepacking, and ``generate`` is called with
``prepack=False`` as well. A backend takes ``export --low-memory`` only with an export that
reads no weight values after tracing (:func:`weightless_export`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cwca_export.registry import Registry

ENTRY_POINT_GROUP = "cwca_export.backends"
_BUILTIN_MODULES = ("cwca_export.backends.optimum_backend", "cwca_export.backends.onnx_backend")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


# built-ins register through the same decorator third parties use; their heavy imports
# (optimum, torch.onnx) happen inside export(), so loading them stays light
BACKENDS: Registry[type] = Registry(
    "backend",
    flag="--backend",
    group=ENTRY_POINT_GROUP,
    builtins=_BUILTIN_MODULES,
    adopt=lambda name, cls: register_backend(name)(cls),
    name_pattern=_NAME,
)


class UnsupportedModelError(ValueError):
    """The backend cannot produce a correct artifact for this model; the message names an alternative."""


@runtime_checkable
class Backend(Protocol):
    """What an export backend provides.

    ``export`` writes a complete artifact into ``out_dir`` (an empty folder the caller
    created) and returns the paths it wrote; verification happens in the caller. Options a
    backend does not know must raise ``TypeError`` (Python does that for keyword arguments).
    """

    name: str

    def export(self, model: Any, tokenizer: Any, out_dir: Path, **options: Any) -> list[Path]: ...


def weightless_export(backend: Any) -> Callable[..., list[Path]] | None:
    """The backend's export that reads no weight values after tracing, or None if it has none.

    ``export --low-memory`` traces with placeholder weights and writes the real ones into the
    graph itself (:mod:`cwca_export.exporter.placeholders`), so it needs an export that only
    traces. A backend offers one as a ``weightless_export`` method (same arguments as
    ``export``), or declares ``traces_without_weights = True`` when its ``export`` is one.
    """
    method = getattr(backend, "weightless_export", None)
    if callable(method):
        return method
    return backend.export if getattr(backend, "traces_without_weights", False) else None


def check_config(name: str, model_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> None:
    """Raise :class:`UnsupportedModelError` if backend ``name`` refuses the model in ``model_dir``
    for what its config shows (``config_refusal(config)``, when the backend defines it): before the
    model loads, so a model type the backend cannot take fails in seconds, not after a 7B
    load or a recipe's scoring."""
    refusal = getattr(get_backend(name), "config_refusal", None)
    if not callable(refusal):
        return
    from transformers import AutoConfig

    reason = refusal(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                local_files_only=True))
    if reason:
        raise UnsupportedModelError(reason)


def register_backend(name: str):
    """Class decorator that registers a backend under ``name``; refuses duplicates and bad names.

    Example:
        >>> @register_backend("example-noop")
        ... class Noop:
        ...     def export(self, model, tokenizer, out_dir, **options):
        ...         return []
        >>> get_backend("example-noop").name
        'example-noop'
        >>> unregister_backend("example-noop")
    """
    if not _NAME.match(name):
        raise ValueError(f"backend name {name!r}: use 1-32 lower-case letters, digits, '-' or '_'")

    def decorate(cls: type) -> type:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered by {BACKENDS[name].__module__}")
        if not callable(getattr(cls, "export", None)):
            raise TypeError(f"backend {name!r}: {cls.__name__} has no export() method")
        cls.name = name
        BACKENDS.add(name, cls)
        return cls

    return decorate


def unregister_backend(name: str) -> None:
    """Remove a backend (for tests and plug-in reloads)."""
    BACKENDS.remove(name)


def available_backends() -> list[str]:
    """Names of every registered backend, built-in and third-party."""
    return BACKENDS.names()


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``."""
    return BACKENDS.get(name)()
