"""model.py: an adapter given with a base it was not trained on is refused with one line, on every command."""

from __future__ import annotations

import pytest
from conftest import QA, make_bloom_tokenizer, run, write_jsonl


@pytest.fixture(scope="module")
def wider_bloom_dir(tmp_path_factory) -> str:
    """A BLOOM of the same architecture and vocabulary as the tiny one, but twice as wide: peft's size mismatch."""
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = make_bloom_tokenizer()
    folder = tmp_path_factory.mktemp("models") / "wider-bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("other", ["wider_bloom_dir", "tiny_llama_dir"])  # same layers, other shapes; other layers
@pytest.mark.parametrize("command", ["merge", "generate", "eval"])
def test_an_adapter_on_another_base_is_one_line_naming_its_base(request, capsys, trained_bloom, tiny_bloom_dir, tmp_path,
                                                                 command, other):
    adapter = trained_bloom[0].output_dir
    base = request.getfixturevalue(other)
    args = {"merge": ["--output-dir", tmp_path / "merged"],
            "generate": ["--prompt", "Học máy là gì?", "--max-new-tokens", 2],
            "eval": ["--data", write_jsonl(tmp_path / "qa.jsonl", QA[:1]), "--output-dir", tmp_path / "eval",
                     "--max-new-tokens", 2]}[command]
    capsys.readouterr()  # the fixtures' progress bars
    code, out, err = run(capsys, command, "--adapter", adapter, "--model", base, *args)
    assert code == 2
    assert "Traceback" not in err and "size mismatch" not in err
    (line,) = [line for line in err.splitlines() if "error" in line.lower()]  # besides the loading progress bars
    assert line.startswith("error: the adapter") and f"was trained on {tiny_bloom_dir} and does not fit {base}" in line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()
