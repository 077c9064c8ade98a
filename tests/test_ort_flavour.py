"""ONNX Runtime is used only when exactly one flavour is installed."""

from __future__ import annotations

from importlib import metadata

import pytest

from cwca_export import ort


def _fake_versions(monkeypatch, present):
    def version(name):
        if name in present:
            return "1.31.1"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ort.metadata, "version", version)
    ort.require_onnxruntime.cache_clear()


def test_this_environment_has_exactly_one_flavour():
    assert len(ort.installed_flavours()) == 1
    ort.require_onnxruntime.cache_clear()
    assert ort.require_onnxruntime().InferenceSession


def test_both_flavours_are_refused(monkeypatch):
    _fake_versions(monkeypatch, {"onnxruntime", "onnxruntime-gpu"})
    with pytest.raises(ImportError, match="both onnxruntime and onnxruntime-gpu"):
        ort.require_onnxruntime()
    ort.require_onnxruntime.cache_clear()


def test_missing_runtime_names_the_extra(monkeypatch):
    _fake_versions(monkeypatch, set())
    with pytest.raises(ImportError, match=r"cwca-export\[cpu\]"):
        ort.require_onnxruntime()
    ort.require_onnxruntime.cache_clear()
