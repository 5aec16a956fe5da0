"""llama.cpp runs in a child process: when its native code dies by a signal (SIGILL from AMX instructions a
virtual machine lists but refuses, as a plain `pip install 'lmtune[gguf]'` builds them on this project's
machines), the export ends with one line naming the signal, its likely cause and the fix, a non-zero exit,
and no file, instead of the lmtune process dying without a word.

The crash is real: a stand-in `llama_cpp` package put first on the child's import path kills its own process
with SIGILL exactly where the real library would (loading the file, quantizing), after the quantizer has
written half a file.
"""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
from conftest import run

from lmtune.export import llamacpp

FAKE_LLAMA_CPP = '''
import os, resource, signal

LLAMA_FTYPE_MOSTLY_Q4_K_M, LLAMA_FTYPE_MOSTLY_Q5_K_M, LLAMA_FTYPE_MOSTLY_Q6_K = 15, 17, 18


def _die():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), signal.SIG{name})


class _Params:
    pass


def llama_model_quantize_default_params():
    return _Params()


def llama_model_quantize(source, target, params):
    with open(target, "wb") as f:
        f.write(b"GGUF" + bytes(1000))  # half a file, as a crash during the write leaves it
    _die()


class Llama:
    def __init__(self, *args, **kwargs):
        _die()
'''


def _crashing_llama_cpp(tmp_path, monkeypatch, name: str = "ILL"):
    package = tmp_path / "fake-site" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_LLAMA_CPP.replace("{name}", name)), encoding="utf-8")
    (package / "llama_chat_format.py").write_text("Jinja2ChatFormatter = None\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(llamacpp, "available", lambda: True)  # the parent never imports llama_cpp itself


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_sigill_while_checking_the_file_is_one_line_and_leaves_nothing(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    _crashing_llama_cpp(tmp_path, monkeypatch)
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", out / "m.gguf", "--quant", "f16")
    line = _one_error_line(err)
    assert code == 2
    assert "SIGILL" in line and "AMX" in line and "loading the exported file" in line and "nothing was written" in line
    assert llamacpp.REBUILD_WITHOUT_AMX in line and "--force-reinstall" in line and "-mno-amx-tile" in line
    assert list(out.iterdir()) == []  # the export process lived on, and removed its temporary file


def test_sigill_in_the_k_quantizer_keeps_the_previous_file(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    _crashing_llama_cpp(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"previous file")
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", out / "m.gguf", "--quant", "q4_k_m",
                       "--overwrite")
    line = _one_error_line(err)
    assert code == 2 and "SIGILL" in line and "quantizing to q4_k_m" in line and "AMX" in line
    assert (out / "m.gguf").read_bytes() == b"previous file"
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]  # neither the f32 intermediate nor the half file


def test_other_signals_are_named_without_the_amx_advice(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    _crashing_llama_cpp(tmp_path, monkeypatch, name="SEGV")
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", tmp_path / "m.gguf", "--quant", "f16")
    line = _one_error_line(err)
    assert code == 2 and "SIGSEGV" in line and "AMX" not in line and "nothing was written" in line
    assert "memory runs out" in llamacpp.crash_message(signal.SIGKILL, "quantizing to q6_k")


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
def test_the_child_reports_a_file_llama_cpp_refuses(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(Exception) as caught:
        llamacpp.check(bad, [[1, 2, 3]], ["x"], [{"role": "user", "content": "x"}])
    assert "could not load" in str(caught.value) and "nothing was written" in str(caught.value)
