"""The hand-written decode loop gives exactly the greedy tokens of transformers' own generate(), batched or not."""

from __future__ import annotations

import pytest
import torch

from lmtune.decoding import decode, greedy
from lmtune.model import load_model, resolve_source


def _reference(model, prompts, pad, steps):
    """transformers' generate(), greedy, left padded, never stopping early."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=pad, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("model_dir", ["tiny_bloom_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("lengths", [(5,), (3, 9, 6)])
def test_greedy_tokens_equal_transformers_generate(request, model_dir, lengths):
    model = load_model(resolve_source(request.getfixturevalue(model_dir))).eval()
    torch.manual_seed(0)
    prompts = [torch.randint(4, 500, (n,)).tolist() for n in lengths]
    steps, pad = 12, 3
    chosen: list[list[int]] = [[] for _ in prompts]

    def observe(tokens):
        for row, token in zip(chosen, tokens):
            row.append(token)
        return [False] * len(tokens)

    decode(model, prompts, pad, steps, greedy, observe)
    assert chosen == _reference(model, prompts, pad, steps)


def test_decoding_stops_when_every_row_is_finished(tiny_llama_dir):
    model = load_model(resolve_source(tiny_llama_dir)).eval()
    calls = []

    def observe(tokens):
        calls.append(tokens)
        return [len(calls) >= 2, len(calls) >= 4]

    decode(model, [[5, 6, 7], [8, 9]], 0, 50, greedy, observe)
    assert len(calls) == 4


@pytest.mark.parametrize("model_dir", ["tiny_bloom_dir", "tiny_llama_dir"])
def test_finished_rows_leave_the_batch_and_the_others_answer_the_same(request, model_dir):
    """Compacting the batch as rows finish changes no token of the rows still going, and really shrinks the batch."""
    model = load_model(resolve_source(request.getfixturevalue(model_dir))).eval()
    torch.manual_seed(0)
    prompts = [torch.randint(4, 500, (n,)).tolist() for n in (3, 9, 6, 5, 7, 4)]
    stop_after = [2, 12, 3, 5, 12, 8]  # tokens each row is given before it is told it is finished

    def run(compact_share):
        chosen: list[list[int]] = [[] for _ in prompts]
        widths: list[int] = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)

        def observe(tokens):
            for row, token, limit in zip(chosen, tokens, stop_after):
                if len(row) < limit:
                    row.append(token)
            return [len(row) >= limit for row, limit in zip(chosen, stop_after)]

        try:
            decode(model, prompts, 3, 12, greedy, observe, compact_share=compact_share)
        finally:
            hook.remove()
        return chosen, widths

    kept, kept_widths = run(0)
    compacted, widths = run(0.25)
    assert compacted == kept
    assert kept_widths == [6] * 12
    # 6 rows; after the 2nd token one finished (1/6 < 1/4: stays), after the 3rd two (>= 1/4: both leave), ...
    assert widths[:3] == [6, 6, 6] and widths[3] == 4 and widths[-1] == 2
