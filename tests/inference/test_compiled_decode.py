"""The compiled one-token decode step: the same logits as the eager loop, one graph per cache bucket, its one-row
matmuls really decomposed (the lever), used for single answers only, and chosen by "auto" only where it pays."""

import pytest
import torch

from lmtune import cli, compiling
from lmtune.errors import ModelError
from lmtune.decoding import CompiledDecoder, decode
from lmtune.inference import compiled_decode
from lmtune.inference.batching import context_length
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import inference_autocast, load_for_inference, padding_id
from lmtune.config import GenerateConfig

from conftest import run

needs_compiler = pytest.mark.skipif(compiling.cpp_compiler() is None,
                                    reason="torch.compile needs a C++ compiler on a CPU")
FORCED = [7, 19, 3, 44, 12, 30, 5, 61, 9, 27]  # the tokens both ways are fed, whatever their logits say


def _logits_of(run_decode) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def choose(logits):
        seen.append(logits[0].clone())
        return torch.tensor([FORCED[len(seen) - 1]])

    run_decode(choose)
    return seen


def _distance(a, b) -> float:
    return float(1 - torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def compiled_tiny(tiny_llama_dir):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loaded = load_for_inference(tiny_llama_dir, dtype="bfloat16")
    decoder = CompiledDecoder(loaded.model, context_length(loaded), strict=True)
    return loaded, decoder


@needs_compiler
def test_compiled_step_gives_the_eager_logits_and_compiles_once_per_bucket(compiled_tiny, tiny_llama_dir):
    from torch._dynamo.utils import counters

    loaded, decoder = compiled_tiny
    prompt = [1, 40, 41, 42, 43, 44]
    fed = len(FORCED)
    compiled = _logits_of(lambda choose: decoder.decode(prompt, fed, choose, lambda t: [False]))
    assert counters["stats"]["unique_graphs"] == 1  # really compiled, not silently eager
    # Every one-row matmul of the step became a fused multiply-and-sum: 7 per layer and the output head.
    layers = loaded.model.config.num_hidden_layers
    assert counters["inductor"]["decompose_mm"] >= 7 * layers + 1

    def eager_decode(model):
        return lambda choose: decode(model, [prompt], padding_id(loaded.tokenizer), fed, choose, lambda t: [False])

    with inference_autocast(loaded):
        eager = _logits_of(eager_decode(loaded.model))
    reference = _logits_of(eager_decode(load_for_inference(tiny_llama_dir, dtype="float32").model))
    assert len(compiled) == len(eager) == len(reference) == fed
    for c, e, r in zip(compiled, eager, reference):
        # As close to the fp32 logits as eager bf16 decoding is (both round to bf16, in different places).
        assert _distance(c, r) <= 2 * _distance(e, r) + 1e-4

    # Other prompt and answer lengths in the same cache bucket reuse the graph: no compile per request.
    _logits_of(lambda choose: decoder.decode(prompt[:3], 5, choose, lambda t: [False]))
    _logits_of(lambda choose: decoder.decode(list(range(1, 300)), 2, choose, lambda t: [False]))
    assert counters["stats"]["unique_graphs"] == 1


@needs_compiler
def test_single_answers_use_the_compiled_step_and_batches_do_not(compiled_tiny, monkeypatch):
    loaded, decoder = compiled_tiny
    calls = []
    real = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda *a: (calls.append(a[0]), real(*a))[1])
    monkeypatch.setattr(loaded, "compiled_decoder", decoder)
    cfg = GenerateConfig(greedy=True, max_new_tokens=6, repetition_penalty=1.0)
    batched = generate_batch(loaded, ["Học máy là gì?", "LoRA là gì?"], cfg, batch_size=2)
    assert calls == [] and all(a.new_tokens > 0 for a in batched)
    single = generate_batch(loaded, ["Học máy là gì?"], cfg, batch_size=1)
    assert len(calls) == 1 and single[0].new_tokens > 0
    # A prompt and answer longer than the model's context are left to the eager loop (and its own check).
    assert not decoder.fits(context_length(loaded), 1)


def test_buckets_grow_by_four_and_stop_at_the_context():
    decoder = CompiledDecoder.__new__(CompiledDecoder)
    decoder.context_length = 8192
    assert [decoder.bucket(n) for n in (1, 512, 513, 2048, 2049, 8192)] == [512, 512, 2048, 2048, 8192, 8192]
    assert decoder.bucket(8193) is None
    decoder.context_length = 1000
    assert decoder.bucket(600) == 1000


def test_auto_compiles_only_where_it_pays_and_can_work(tiny_llama_dir, tiny_bloom_dir, monkeypatch):
    bf16 = load_for_inference(tiny_llama_dir, dtype="bfloat16")
    fp32 = load_for_inference(tiny_llama_dir, dtype="float32")
    bloom = load_for_inference(tiny_bloom_dir, dtype="bfloat16")

    def decide(loaded, setting="auto", one_answer=False):
        return compiling.decide_decoding(setting, loaded.model, loaded.device, loaded.compute_dtype, one_answer)

    assert decide(bf16, False) == (False, "off (generate.compile false)")
    assert "small enough" in decide(bf16)[1]  # the tiny model's tokens are fast anyway
    assert decide(bf16, True) == (True, "on (generate.compile true)")
    # Forced or not: the step runs on bf16 or fp32 weights, never fp16 (nor a mix of weight and compute dtypes).
    fp16 = load_for_inference(tiny_llama_dir, dtype="float16")
    assert decide(fp16, True)[0] is False and "bf16 or fp32 weights" in decide(fp16, True)[1]
    assert decide(fp32, True) == (True, "on (generate.compile true)")
    # An adapter on a bf16 base keeps its LoRA weights in fp32 (peft): still a bf16 model the step can run.
    from conftest import lora_llama

    adapted = lora_llama(tiny_llama_dir, torch.bfloat16)
    assert {p.dtype for p in adapted.parameters()} == {torch.bfloat16, torch.float32}
    assert compiling.decide_decoding(True, adapted, "cpu", torch.bfloat16, False) == (True, "on (generate.compile true)")
    monkeypatch.setattr(compiling, "COMPILE_WORTH_BYTES", 0)
    assert decide(fp32)[0] and decide(fp32)[1].startswith("on:")  # a CPU without native bf16 decodes in fp32
    assert decide(bf16) == (True, decide(bf16)[1]) and decide(bf16)[1].startswith("on:")
    assert "one answer" in decide(bf16, one_answer=True)[1] and not decide(bf16, one_answer=True)[0]
    assert "bloom" in decide(bloom)[1] and not decide(bloom)[0]
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: None)
    assert "no C++ compiler" in decide(bf16)[1] and not decide(bf16)[0]
    assert not decide(bf16, True)[0]  # forced: refused with the reason, not a compiler traceback later


def test_forcing_the_compiled_step_where_it_cannot_work_is_a_clear_error(tiny_llama_dir, capsys):
    fp16 = load_for_inference(tiny_llama_dir, dtype="float16")
    with pytest.raises(ModelError, match="generate.compile true: the compiled decode step needs bf16 or fp32 weights"):
        compiled_decode.enable(fp16, True, one_answer=False, log=lambda m: None)
    code, out, err = run(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "Học máy là gì?", "--dtype",
                         "float16", "--generate.compile", "true")
    assert code == cli.EXIT_USER_ERROR and "needs bf16 or fp32 weights" in err and "Traceback" not in err


@needs_compiler
def test_compiled_step_on_fp32_weights_gives_the_eager_fp32_logits(tiny_llama_dir):
    """A CPU without native bf16 decodes in fp32: there the compiled step must give the eager loop's logits to fp32
    rounding (only the summation order of the decomposed matmuls differs)."""
    loaded = load_for_inference(tiny_llama_dir, dtype="float32")
    decoder = CompiledDecoder(loaded.model, context_length(loaded), strict=True)
    prompt = [1, 40, 41, 42, 43, 44]
    compiled = _logits_of(lambda choose: decoder.decode(prompt, len(FORCED), choose, lambda t: [False]))
    eager = _logits_of(lambda choose: decode(loaded.model, [prompt], padding_id(loaded.tokenizer), len(FORCED), choose,
                                             lambda t: [False]))
    assert len(compiled) == len(eager) == len(FORCED)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_the_web_uis_try_page_answers_through_the_compiled_step(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import QA, train_config, write_jsonl
    from lmtune.inference.batching import run_batch
    from lmtune.inference.chat import answer_row
    from lmtune.training.train import train
    from lmtune.ui.workspace import LoadedModels

    run_dir = tmp_path / "run"
    train(train_config(tiny_llama_dir, write_jsonl(tmp_path / "qa.jsonl", QA), run_dir, **{"train.max_steps": 2}),
          log=lambda _: None)
    models = LoadedModels()
    tuned = models.get(run_dir, "tuned", True)  # the run's generate.compile, forced here for the tiny model
    assert isinstance(tuned.compiled_decoder, CompiledDecoder)
    calls = []
    real = tuned.compiled_decoder.decode
    monkeypatch.setattr(tuned.compiled_decoder, "decode", lambda *a: (calls.append(a[0]), real(*a))[1])
    pieces = []
    prompt = tuned.template.prompt_ids(tuned.tokenizer, "Học máy là gì?")
    row = answer_row(GenerateConfig(greedy=True, max_new_tokens=5, repetition_penalty=1.0), prompt, 5, pieces.append)
    run_batch(tuned, [row])  # what the Try page's /api/chat runs
    assert calls == [prompt] and row.ids and row.finish_reason
    # "auto" leaves a model this small eager, as chat does.
    assert models.get(run_dir, "base", "auto").compiled_decoder is None
