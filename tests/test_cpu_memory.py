"""Memory that stays flat over a long CPU run (lmtune/cpu_memory.py): oneDNN's primitive cache capped when lmtune is
imported, the user's own capacity kept, glibc's free heap pages given back, and the training loop trimming every
few optimizer steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import QA, train_config, write_jsonl
from lmtune import cpu_memory
from lmtune.config import ConfigError


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "ONEDNN_VERBOSE")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


@pytest.mark.parametrize("env, expected", [
    ({}, "64"),
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, "1024"),  # the user's own value is kept
    ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "8"}, None),  # as is one under oneDNN's older name
])
def test_importing_lmtune_caps_the_onednn_cache_unless_the_user_set_it(env, expected):
    done = _python("import os, lmtune; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))", env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(expected)


# bf16 forward and backward passes through an MLP on 150 micro-batch sizes, as a training run on varying lengths
# makes them: oneDNN compiles primitives for each size. The heap is trimmed before the end is read, so what is left
# of the growth is live memory, mostly the primitives kept.
GROWTH_OVER_150_SIZES = """
    import lmtune, torch
    from lmtune.cpu_memory import trim_heap

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    up = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    down = torch.nn.Linear(1536, 576, bias=False).to(torch.bfloat16)

    def step(rows):
        x = torch.randn(rows, 576, dtype=torch.bfloat16, requires_grad=True)
        down(torch.nn.functional.silu(up(x))).float().sum().backward()

    for rows in (64, 128):
        step(rows)
    start = rss_kb()
    for rows in range(200, 800, 4):
        step(rows)
    trim_heap()
    print("GROWTH_KB", rss_kb() - start)
"""


def _growth_kb(env: dict[str, str]) -> int:
    done = _python(GROWTH_OVER_150_SIZES, env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("GROWTH_KB")[1].split()[0])


@pytest.mark.skipif(cpu_memory._glibc_malloc_trim() is None, reason="the C library is not glibc")
def test_the_capped_cache_keeps_memory_from_growing_with_every_new_size():
    uncapped = _growth_kb({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})  # oneDNN's own default
    if uncapped < 200_000:
        pytest.skip(f"bf16 matmuls keep no large oneDNN primitives on this CPU (grew {uncapped} kB)")
    capped = _growth_kb({})
    assert capped < 0.6 * uncapped, (capped, uncapped)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(cpu_memory._glibc_malloc_trim() is None, reason="the C library is not glibc")
def test_trim_heap_gives_freed_heap_memory_back():
    # 3,000 blocks of 64 KB (below glibc's mmap threshold, so they live in the heap), every 100th kept: the freed
    # ones stay in the heap, held apart by the kept ones, until trimmed.
    import torch

    blocks = [torch.ones(16 * 1024) for _ in range(3000)]
    kept = blocks[::100]
    before_free = _rss_kb()
    del blocks
    freed = _rss_kb()
    assert cpu_memory.trim_heap() is True
    trimmed = _rss_kb()
    assert before_free - freed < 40_000, "glibc gave the blocks back unasked: nothing left to measure"
    assert freed - trimmed > 150_000, (before_free, freed, trimmed)  # most of the 190 MB freed comes back
    assert len(kept) == 30


@pytest.mark.parametrize("value, expected", [(None, cpu_memory.TRIM_HEAP_EVERY), ("0", 0), ("3", 3)])
def test_trim_heap_every_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("LMTUNE_TRIM_HEAP_EVERY", raising=False)
    else:
        monkeypatch.setenv("LMTUNE_TRIM_HEAP_EVERY", value)
    assert cpu_memory.trim_heap_every() == expected


def test_a_bad_trim_interval_is_named(monkeypatch):
    monkeypatch.setenv("LMTUNE_TRIM_HEAP_EVERY", "often")
    with pytest.raises(ConfigError, match=r"LMTUNE_TRIM_HEAP_EVERY='often': expected a whole number of optimizer steps"):
        cpu_memory.trim_heap_every()


@pytest.mark.parametrize("every, expected_steps", [("3", [3, 6, 9]), ("0", [])])
def test_cpu_training_trims_the_heap_every_few_optimizer_steps(tmp_path, monkeypatch, tiny_bloom_dir, every,
                                                               expected_steps):
    import lmtune.training.train as train_module

    monkeypatch.setenv("LMTUNE_TRIM_HEAP_EVERY", every)
    steps: list[int] = []
    state = {}
    real_callback = cpu_memory.trim_heap_callback

    def recording_callback(n):
        callback = real_callback(n)
        real_step_end = callback.on_step_end

        def on_step_end(args, trainer_state, control, **kwargs):
            state["step"] = trainer_state.global_step
            return real_step_end(args, trainer_state, control, **kwargs)

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(train_module, "trim_heap_callback", recording_callback)
    monkeypatch.setattr(cpu_memory, "trim_heap", lambda: steps.append(state["step"]) or True)
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    config = train_config(tiny_bloom_dir, data, tmp_path / "out", **{"train.epochs": 5, "train.batch_size": 2})
    train_module.train(config, log=lambda _: None)
    assert steps == expected_steps  # 4 pairs in batches of 2, 5 epochs: 10 optimizer steps


def test_rounded_widths_train_the_same_loss_and_gradients(tiny_llama_dir, llama_tokenizer):
    from conftest import lora_llama

    from lmtune.data.collate import Collator
    from lmtune.data.readers import Example
    from lmtune.data.template import PromptTemplate
    from lmtune.data.tokenize import tokenize_example
    from lmtune.training.loss import answer_only_loss, causal_lm_of

    template = PromptTemplate.for_tokenizer(llama_tokenizer, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), llama_tokenizer, template, 512) for r in QA]
    model = lora_llama(tiny_llama_dir)
    results = []
    for multiple in (1, 32):
        batch = Collator(llama_tokenizer, width_multiple=multiple)(samples)
        model.zero_grad()
        loss = answer_only_loss(causal_lm_of(model), **batch)
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (narrow, loss1, grads1), (wide, loss32, grads32) = results
    assert wide % 32 == 0 and wide > narrow  # the rounded batch really is wider
    torch.testing.assert_close(loss32, loss1, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads32.keys() and grads1
    for name in grads1:
        torch.testing.assert_close(grads32[name], grads1[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device, dtype, setting, expected", [
    ("cpu", torch.bfloat16, 0, cpu_memory.CPU_BF16_MAX_WIDTH_MULTIPLE),  # chosen: a CPU in bf16, lengths unknown
    ("cpu", torch.float32, 0, 1),  # chosen: fp32 keeps memory flat without it
    ("cuda", torch.bfloat16, 0, 1),
    ("cpu", torch.bfloat16, 1, 1),  # the user's setting wins
    ("cpu", torch.float32, 16, 16),
])
def test_the_width_multiple_is_chosen_for_the_device_unless_set(tmp_path, tiny_bloom_dir, llama_tokenizer, device,
                                                              dtype, setting, expected):
    from lmtune.model import Precision
    from lmtune.training.methods import method_for

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    config = train_config(tiny_bloom_dir, data, tmp_path / "out", **{"data.pad_to_multiple_of": setting})
    method = method_for(config)
    method.arrange(None, None, Precision(device, dtype), log=lambda _: None)  # unpacked: only the precision is read
    assert method.collator(llama_tokenizer).width_multiple == expected


@pytest.mark.parametrize("lengths, expected", [
    ([66] * 10, 8),  # short samples: rounding to 32 would pad 66 to 96
    ([40, 60, 70, 90, 500], 8),  # the median decides, not the longest
    ([190] * 10, 16),
    ([300, 280, 260], 32),
    ([4000] * 3, 32),  # never above the upper bound
    ([5, 7], 8),  # never below the lower bound
    ([], 32),  # lengths unknown
])
def test_the_cpu_width_multiple_follows_the_median_length(lengths, expected):
    multiple = cpu_memory.cpu_bf16_width_multiple(lengths)
    assert multiple == expected
    if lengths:  # the padding it can add stays within about an eighth of a median-length micro-batch
        median = sorted(lengths)[len(lengths) // 2]
        assert multiple <= max(cpu_memory.CPU_BF16_MIN_WIDTH_MULTIPLE, median / cpu_memory.WIDTH_ROUNDING_SHARE)


def test_a_bf16_cpu_run_rounds_widths_by_its_datas_lengths(tmp_path, tiny_bloom_dir, llama_tokenizer):
    from types import SimpleNamespace

    from lmtune.model import Precision
    from lmtune.training.methods import method_for

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    config = train_config(tiny_bloom_dir, data, tmp_path / "out")
    method = method_for(config)
    samples = [{"input_ids": [1] * n} for n in (60, 66, 70, 75, 80)]
    method.arrange(SimpleNamespace(samples=samples, packing=None), None, Precision("cpu", torch.bfloat16),
                   log=lambda _: None)
    assert method.collator(llama_tokenizer).width_multiple == 8
