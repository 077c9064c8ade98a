"""Device memory of a CUDA session, read through nvidia-smi: checked against a stand-in nvidia-smi."""

from __future__ import annotations

import os
import stat

from cwca_export.exporter.measure import device_used_bytes, process_device_bytes

# answers like nvidia-smi 550's for --format=csv,noheader,nounits, chosen by the query flag
FAKE = """#!/bin/sh
case "$*" in
  *--query-gpu=memory.used*) echo "${FAKE_USED:-1000}" ;;
  *--query-compute-apps=pid,used_memory*) printf "%s" "${FAKE_APPS}" ;;
  *) exit 6 ;;
esac
"""


def _fake_smi(tmp_path, monkeypatch, apps: str, used: str) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(FAKE, encoding="utf-8")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPS", apps)
    monkeypatch.setenv("FAKE_USED", used)


def test_the_process_own_figure_is_read_when_it_is_listed(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, apps="111, 300\n4242, 1536\n", used="2048")
    got, method = process_device_bytes("0", 4242, used_before=0)
    assert got == 1536 * 2**20
    assert "device memory of this process on GPU 0" in method


def test_the_device_growth_is_read_when_the_process_is_not_listed(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, apps="111, 300\n", used="2048")
    assert device_used_bytes("0") == 2048 * 2**20
    got, method = process_device_bytes("0", 4242, used_before=512 * 2**20)
    assert got == (2048 - 512) * 2**20
    assert "growth of GPU 0's used memory" in method


def test_no_nvidia_smi_means_not_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi on it
    assert device_used_bytes("0") is None
    assert process_device_bytes("0", 4242, used_before=None) == (None, "not measured (nvidia-smi is not available)")
