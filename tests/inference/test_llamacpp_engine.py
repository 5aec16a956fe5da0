"""generate.engine llama.cpp: answers whose tokens come from llama.cpp on a verified GGUF, exported once and kept."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run

from lmtune.errors import ModelError
from lmtune.export import llamacpp
from lmtune.inference import llamacpp_engine
from lmtune.inference.batching import Row, context_length, run_batch
from lmtune.inference.load import load_for_inference, stop_token_ids

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
QUIET = {"log": lambda _: None}


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path) -> str:
    """A model folder of the test's own: the engine keeps its GGUF inside it."""
    return str(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def _greedy_row(loaded, text: str, max_tokens: int) -> Row:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Row(ids, max_tokens=max_tokens, emit=lambda text, reason: None)


def test_tokens_come_from_llama_cpp_on_a_verified_gguf_kept_in_the_model_folder(model_copy):
    loaded = load_for_inference(model=model_copy, dtype="float32")
    logs: list[str] = []
    engine = llamacpp_engine.enable(loaded, model_copy, None, log=logs.append)
    cached = list((Path(model_copy) / llamacpp_engine.CACHE_FOLDER).glob("*.gguf"))
    assert cached == [engine.path] and engine.path.name.startswith("f16-")
    assert any("export: wrote" in line for line in logs)  # written by the exporter, which verified it
    assert context_length(loaded) == engine.n_ctx == min(512, llamacpp_engine.MAX_CONTEXT)

    row = _greedy_row(loaded, "Học máy là gì?", 12)
    # The torch model's weights no longer matter: llama.cpp reads the file.
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.zero_()
    run_batch(loaded, [row])
    reference = llamacpp.load(engine.path, n_ctx=128, logits_all=False)
    expected = llamacpp.greedy(reference, row.prompt_ids, 12, set(stop_token_ids(loaded)))
    assert row.done and row.ids == expected and len(expected) > 0
    assert row.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_second_run_reuses_the_file_and_changed_weights_replace_it(model_copy):
    loaded = load_for_inference(model=model_copy, dtype="float32")
    first = llamacpp_engine.enable(loaded, model_copy, None, **QUIET).path
    written = first.stat().st_mtime_ns
    logs: list[str] = []
    again = llamacpp_engine.enable(load_for_inference(model=model_copy, dtype="float32"), model_copy, None, log=logs.append)
    assert again.path == first and first.stat().st_mtime_ns == written
    assert logs == [f"engine: llama.cpp on {first} (exported and verified earlier)"]

    weights = Path(model_copy) / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the weights changed
    renewed = llamacpp_engine.enable(load_for_inference(model=model_copy, dtype="float32"), model_copy, None, **QUIET).path
    assert renewed != first and renewed.is_file() and not first.exists()


def test_sampling_with_a_seed_repeats_and_rows_of_a_batch_each_get_their_answer(model_copy):
    loaded = load_for_inference(model=model_copy, dtype="float32")
    llamacpp_engine.enable(loaded, model_copy, None, **QUIET)

    def sampled(seed: int) -> list[int]:
        row = _greedy_row(loaded, "Mạng nơ-ron", 10)
        row.temperature, row.top_p, row.top_k, row.seed = 1.5, 1.0, 0, seed
        run_batch(loaded, [row])
        return row.ids

    assert sampled(3) == sampled(3)
    rows = [_greedy_row(loaded, text, 6) for text in ("Học máy", "Dữ liệu là gì?")]
    alone = []
    for text in ("Học máy", "Dữ liệu là gì?"):
        row = _greedy_row(loaded, text, 6)
        run_batch(loaded, [row])
        alone.append(row.ids)
    run_batch(loaded, rows)
    assert [row.ids for row in rows] == alone and all(row.done for row in rows)


def test_an_adapter_keeps_its_gguf_in_its_own_folder(trained_bloom, tmp_path):
    result = trained_bloom[0]
    adapter = str(shutil.copytree(result.output_dir, tmp_path / "adapter"))
    loaded = load_for_inference(adapter=str(adapter), dtype="float32")
    engine = llamacpp_engine.enable(loaded, None, str(adapter), **QUIET)
    assert engine.path.parent == Path(adapter) / llamacpp_engine.CACHE_FOLDER


def test_generate_command_answers_through_llama_cpp(model_copy, capsys):
    code, out, err = run(capsys, "generate", "--model", model_copy, "--engine", "llama.cpp", "--greedy",
                         "--max-new-tokens", "6", "--dtype", "float32", "--prompt", "Học máy là gì?")
    assert code == 0 and out.strip()
    assert "engine: llama.cpp; exporting a f16 GGUF once" in err


def test_without_the_bindings_the_engine_says_how_to_get_them(model_copy, capsys, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    code, out, err = run(capsys, "generate", "--model", model_copy, "--engine", "llama.cpp", "--prompt", "Học máy là gì?")
    assert code != 0 and "generate.engine llama.cpp needs llama-cpp-python" in err and "Traceback" not in err
    assert not (Path(model_copy) / llamacpp_engine.CACHE_FOLDER).exists()


def test_a_model_on_a_gpu_is_refused():
    class Loaded:
        device, compute_dtype = "cuda", torch.bfloat16

    with pytest.raises(ModelError, match="answers on the CPU"):
        llamacpp_engine.enable(Loaded(), "m", None, **QUIET)


def test_eval_answers_through_llama_cpp_and_says_so_in_its_report(trained_bloom, tmp_path, capsys):
    import json

    from conftest import QA, write_jsonl

    adapter = str(shutil.copytree(trained_bloom[0].output_dir, tmp_path / "adapter"))
    out = tmp_path / "eval"
    code, _, err = run(capsys, "eval", "--adapter", adapter, "--data", write_jsonl(tmp_path / "qa.jsonl", QA[:3]),
                       "--engine", "llama.cpp", "--max-new-tokens", "6", "--output-dir", out)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["engine"] == "llama.cpp"
    assert len(list((Path(adapter) / llamacpp_engine.CACHE_FOLDER).glob("*.gguf"))) == 1


def test_the_try_page_answers_through_llama_cpp_when_the_run_says_so(trained_bloom, tmp_path):
    import yaml

    from lmtune.outputs import CONFIG_FILE
    from lmtune.ui.routes.chat import _generate_config
    from lmtune.ui.workspace import LoadedModels

    run_dir = shutil.copytree(trained_bloom[0].output_dir, tmp_path / "run")
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    config.setdefault("generate", {})["engine"] = "llama.cpp"
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config))
    cfg = _generate_config(run_dir, True, 6)  # what the Try page's /api/chat reads
    tuned = LoadedModels().get(run_dir, "tuned", cfg.compile, cfg.engine)
    assert tuned.compiled_decoder is None and tuned.llama_cpp.path.parent == run_dir / llamacpp_engine.CACHE_FOLDER
    row = _greedy_row(tuned, "Học máy là gì?", 6)
    run_batch(tuned, [row])
    reference = llamacpp.load(tuned.llama_cpp.path, n_ctx=128, logits_all=False)
    assert row.ids == llamacpp.greedy(reference, row.prompt_ids, 6, set(stop_token_ids(tuned)))
