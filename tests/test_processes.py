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
    monkeypatch.setattr(model_module, "_SHARE", None)
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


# A neighbour that registers itself exactly as an lmtune process does (processes.register_cpu_user), without
# importing lmtune's dependencies: processes.py alone, loaded from its file.
NEIGHBOUR = """
import importlib.util, pathlib, sys, time
spec = importlib.util.spec_from_file_location("processes", sys.argv[1])
processes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(processes)
folder = pathlib.Path(sys.argv[2])
processes._registry = lambda: folder
sys.argv = ["lmtune", "train"]
processes.register_cpu_user()
print("registered", flush=True)
time.sleep(120)
"""


def _neighbour(registry) -> subprocess.Popen:
    other = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, processes.__file__, str(registry)],
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "registered"
    return other


def _end(other: subprocess.Popen) -> None:
    other.kill()
    other.wait()  # reaped: a zombie still answers signal 0


def test_the_share_grows_back_when_the_other_process_ends(registry, monkeypatch):
    other = _neighbour(registry)
    try:
        assert model_module.configure_cpu_threads(log=lambda m: None) == 2
        said = []
        assert model_module.reclaim_cpu_threads(log=said.append, every=0) is None  # still running
        assert torch.get_num_threads() == 2
    finally:
        _end(other)
    with monkeypatch.context() as later:
        later.setattr(model_module, "RECHECK_SECONDS", 3600.0)
        assert model_module.reclaim_cpu_threads(log=said.append) is None  # read again RECHECK_SECONDS later at most
    assert model_module.reclaim_cpu_threads(log=said.append, every=0) == 4
    assert torch.get_num_threads() == 4
    assert said == [f"CPU: the other lmtune process ended (pid {other.pid}); using 4 of 4 cores now"]
    assert model_module.reclaim_cpu_threads(log=said.append, every=0) is None and len(said) == 1  # nothing to watch


def test_of_two_neighbours_one_ends(registry, monkeypatch):
    monkeypatch.setattr(model_module, "physical_cores", lambda: 6)
    first, second = _neighbour(registry), _neighbour(registry)
    try:
        assert model_module.configure_cpu_threads(log=lambda m: None) == 2
        _end(first)
        said = []
        assert model_module.reclaim_cpu_threads(log=said.append, every=0) == 3
        assert said == [f"CPU: 1 other lmtune process ended (pid {first.pid}); using 3 of 6 cores now, beside 1 "
                        "still running"]
        _end(second)
        assert model_module.reclaim_cpu_threads(log=said.append, every=0) == 6
        assert said[1] == f"CPU: the other lmtune process ended (pid {second.pid}); using 6 of 6 cores now"
    finally:
        _end(first)
        _end(second)


def test_a_thread_count_set_since_is_kept(registry, monkeypatch):
    other = _neighbour(registry)
    try:
        assert model_module.configure_cpu_threads(log=lambda m: None) == 2
        torch.set_num_threads(1)  # the user's choice, after lmtune's
    finally:
        _end(other)
    said = []
    assert model_module.reclaim_cpu_threads(log=said.append, every=0) is None
    assert torch.get_num_threads() == 1 and said == []


def test_omp_num_threads_is_never_changed(registry, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    other = _neighbour(registry)
    try:
        assert model_module.configure_cpu_threads(log=lambda m: None) == 1
    finally:
        _end(other)
    assert model_module.reclaim_cpu_threads(log=print, every=0) is None and torch.get_num_threads() == 1


def test_training_takes_the_cores_back_at_a_step(registry, tiny_llama_dir, qa_file, tmp_path, monkeypatch, capsys):
    """The neighbour ends once this run has taken its share and registered; a step after, the run uses every core."""
    import os
    import threading

    from conftest import train_config

    from lmtune.training.train import train

    monkeypatch.setattr(model_module, "RECHECK_SECONDS", 0.0)
    other = _neighbour(registry)

    def end_when_registered():
        while not (registry / str(os.getpid())).exists() and other.poll() is None:
            threading.Event().wait(0.02)
        _end(other)

    ender = threading.Thread(target=end_when_registered, daemon=True)
    ender.start()
    try:
        said = []
        train(train_config(tiny_llama_dir, qa_file, tmp_path / "a", **{"train.max_steps": 3, "model.device": "cpu",
                                                                       "model.dtype": "float32"}), log=said.append)
    finally:
        ender.join(timeout=30)
        _end(other)
    assert any(line.startswith("CPU: 1 other lmtune process running") and "using 2 of 4 cores" in line for line in said)
    assert f"CPU: the other lmtune process ended (pid {other.pid}); using 4 of 4 cores now" in capsys.readouterr().err
    assert torch.get_num_threads() == 4
