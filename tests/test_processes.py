"""Sharing the CPU: an lmtune process that starts while another computes takes its share of the cores."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmtune import model as model_module
from lmtune import processes


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "_registry", lambda: tmp_path / "cpu")
    monkeypatch.setattr(processes, "_REGISTERED", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(model_module, "physical_cores", lambda: 4)
    threads = torch.get_num_threads()
    yield tmp_path / "cpu"
    torch.set_num_threads(threads)


def test_a_process_beside_a_running_one_takes_its_share_and_says_so(registry):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        registry.mkdir()
        (registry / str(other.pid)).write_text("lmtune serve --model m")
        (registry / "999999999").write_text("lmtune train")  # a process that no longer exists: stale, removed
        said = []
        assert model_module.configure_cpu_threads(log=said.append) == 2
        assert said == [f"CPU: 1 other lmtune process running (pid {other.pid}: lmtune serve --model m); using 2 of 4 "
                        "cores so they do not slow each other down (OMP_NUM_THREADS=N sets it)"]
        assert not (registry / "999999999").exists()
        import os

        assert (registry / str(os.getpid())).is_file()  # registered for the processes that start after it
    finally:
        other.kill()


def test_alone_it_uses_every_core(registry):
    said = []
    assert model_module.configure_cpu_threads(log=said.append) == 4 and said == []


def test_the_users_thread_count_wins(registry, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    registry.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (registry / str(other.pid)).write_text("lmtune serve")
        assert model_module.configure_cpu_threads(log=lambda m: None) == 3
    finally:
        other.kill()


def test_a_process_that_stops_computing_leaves_the_cores_to_the_next(registry):
    import os

    model_module.configure_cpu_threads()
    assert (registry / str(os.getpid())).is_file()
    processes.unregister_cpu_user()  # the web UI after an estimate: a training started next takes every core
    assert not (registry / str(os.getpid())).exists() and processes.other_cpu_users() == []
    model_module.configure_cpu_threads()  # computing again (a model loaded for a chat): registered again
    assert (registry / str(os.getpid())).is_file()
