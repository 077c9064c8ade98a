"""The backend registry refuses malformed and duplicate names and loads third-party plug-ins."""

from __future__ import annotations

from importlib import metadata

import pytest

from cwca_export import backends, registry


class _Dummy:
    def export(self, model, tokenizer, out_dir, **options):
        return []


@pytest.fixture
def clean_registry():
    before = dict(backends.BACKENDS)  # built-ins register on first lookup: snapshot them too
    yield
    for name in set(backends.BACKENDS) - set(before):
        backends.unregister_backend(name)


def test_builtin_backends_are_registered():
    assert {"optimum", "onnx"} <= set(backends.available_backends())


def test_register_and_lookup(clean_registry):
    backends.register_backend("dummy")(_Dummy)
    assert "dummy" in backends.available_backends()
    assert isinstance(backends.get_backend("dummy"), backends.Backend)


@pytest.mark.parametrize("name", ["", "Bad", "has space", "x" * 40])
def test_malformed_names_are_refused(name):
    with pytest.raises(ValueError, match="backend name"):
        backends.register_backend(name)


def test_duplicates_and_missing_export_are_refused(clean_registry):
    backends.register_backend("dummy")(_Dummy)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("dummy")(_Dummy)
    with pytest.raises(TypeError, match="export"):
        backends.register_backend("noexport")(type("NoExport", (), {}))


def test_unknown_backend_names_the_available_ones(clean_registry):
    backends.register_backend("dummy")(_Dummy)
    with pytest.raises(ValueError, match="choose one of: .*dummy.* \\(--backend\\)"):
        backends.get_backend("nope")


def test_entry_point_group_is_loaded(clean_registry, monkeypatch):
    ep = metadata.EntryPoint(
        name="thirdparty", value=f"{__name__}:_Dummy", group=backends.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(
        registry.metadata, "entry_points",
        lambda group: [ep] if group == backends.ENTRY_POINT_GROUP else [],
    )
    backends.BACKENDS.refresh()
    assert "thirdparty" in backends.available_backends()
    assert backends.get_backend("thirdparty").name == "thirdparty"
