"""Supervised fine-tuning on question/answer pairs and conversations: what LoRA and full fine-tuning share.

The samples follow the label contract of `data.tokenize` (prompt ids exactly as inference builds them, loss on the
answers and their EOS only), batches are right-padded per batch and checked (`data.collate.Collator`), and the loss
is the answer-only loss (`training.loss`): the output head runs only where a token is trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ... import families
from ...cpu_memory import cpu_bf16_width_multiple
from ...data.collate import Collator, render_example
from ...data.packing import PACKED_TOKENS, PackedCollator, pack, pack_length
from ...errors import LmtuneError
from ...data.readers import load_examples
from ...data.source import DataSource
from ...data.split import leaked_questions, split_train_val
from ...data.template import PromptTemplate
from ...data.tokenize import tokenize_examples
from .. import shared_prefix
from ..loss import answer_only_loss, causal_lm_of, make_trainer_class, supports_answer_only
from .base import PreparedData, TrainingMethod


class SupervisedMethod(TrainingMethod):
    merges_micro_batches = True  # the answer-only loss is normalised by the trained tokens of the whole step

    def prepare_data(self, tokenizer, log: Callable[[str], None] = print) -> PreparedData:
        return prepare_data(self.config, tokenizer, log)

    def preflight(self, prepared: PreparedData, tokenizer, log: Callable[[str], None] = print) -> None:
        preflight(prepared, tokenizer, self.config.train.batch_size, log)

    packed_length = 0  # set by arrange when the run trains on packed rows
    width_multiple = 1  # set by arrange: unpacked micro-batch widths are rounded up to a multiple of it

    def arrange(self, prepared: PreparedData, causal_lm, precision, log: Callable[[str], None] = print) -> None:
        d, t = self.config.data, self.config.train
        lengths = [len(s["input_ids"]) for s in prepared.samples] if prepared is not None else []
        self.width_multiple = d.pad_to_multiple_of or (
            cpu_bf16_width_multiple(lengths) if precision.device == "cpu" and precision.bf16 else 1)
        if d.packing is not True:  # "auto": padded micro-batches measured faster (docs/performance.md, "Packed rows")
            if precision.device == "cpu" and prepared is not None and causal_lm is not None:
                line = shared_prefix.describe(prepared.samples, causal_lm, t.share_prefix)
                if line:
                    log(line)
            return
        blocker = packing_blocker(causal_lm)
        if blocker:
            raise LmtuneError(f"data.packing true: {blocker}; set data.packing to auto or false")
        try:
            self.packed_length = pack_length([len(s["input_ids"]) for s in prepared.samples], t.batch_size, d.pack_length)
        except ValueError as error:
            raise LmtuneError(str(error)) from None
        prepared.rows, report = pack(prepared.samples, self.packed_length, t.seed)
        prepared.packing = {"length": report.length, "rows": report.rows, "efficiency": round(report.efficiency, 4)}
        per_row = report.samples / max(1, report.rows)
        log(report.describe() + f"; a micro-batch is one row ({per_row:.1f} samples on average)")

    def collator(self, tokenizer):
        if self.packed_length:
            return PackedCollator(tokenizer, self.packed_length)
        return Collator(tokenizer, width_multiple=self.width_multiple)

    def loss(self, model, batch):
        batch = {k: v for k, v in batch.items() if k != PACKED_TOKENS}  # a count for the log, not a model input
        lm = causal_lm_of(model)
        if not supports_answer_only(lm):
            return model(**batch).loss
        return answer_only_loss(lm, **batch, share_prefix=self.config.train.share_prefix, width_multiple=self.width_multiple)

    def trainer_class(self):
        return make_trainer_class(self.config.train.loraplus_lr_ratio, self.config.train.share_prefix, self.width_multiple)

    def save_common(self, tokenizer, prepared: PreparedData, out: Path) -> None:
        tokenizer.save_pretrained(out)
        prepared.template.save(out)


def packing_blocker(causal_lm) -> str | None:
    """Why this run cannot train on packed rows; None when it can."""
    if not families.packs(causal_lm.config):
        return f"{families.facts(causal_lm.config).name}'s attention does not read packed rows"
    return None


def prepare_data(config, tokenizer, log: Callable[[str], None] = print) -> PreparedData:
    d = config.data
    template = PromptTemplate.for_tokenizer(tokenizer, d.template, d.system_prompt)
    source = DataSource.from_config(d)
    examples, load_report = load_examples(source)
    examples, val_examples = split_train_val(examples, d.val_size, d.seed)
    if d.eval_paths:
        val_examples += load_examples(source.other_files(d.eval_paths))[0]
    last_only = d.train_on_turns == "last"
    samples, token_report = tokenize_examples(examples, tokenizer, template, d.max_length, last_only)
    val_samples = tokenize_examples(val_examples, tokenizer, template, d.max_length, last_only)[0] if val_examples else []
    leaked = leaked_questions(examples, val_examples)
    pairs = load_report.rows_read - load_report.conversations
    kinds = []
    if load_report.columns and pairs:
        q, a, c = load_report.columns
        context = f" context='{c}'" if load_report.has_context else ""  # not a column the file lacks
        kinds.append(f"{pairs} {'pair' if pairs == 1 else 'pairs'} (columns question='{q}' answer='{a}'{context})")
    if load_report.conversations:
        kinds.append(f"{load_report.conversations} conversations ({'every' if not last_only else 'the last'} assistant turn trained)")
    log(f"data: {load_report.summary()}: {', '.join(kinds)};"
        f" {len(samples)} samples, {token_report.tokens} tokens ({token_report.trained_tokens} trained)")
    if token_report.conversations_cut:
        log(f"data: {token_report.conversations_cut} conversations longer than data.max_length={d.max_length} lost their "
            f"{token_report.turns_dropped} earliest turns (cut at turn boundaries; the later turns are trained)")
    if token_report.turn_by_turn:
        log(f"data: the chat template re-tokenizes earlier turns of {token_report.turn_by_turn} conversations; each of "
            "their answers is a sample of its own, after exactly the prompt chat builds")
    if load_report.skipped_empty:
        log(f"data: skipped {load_report.skipped_empty} rows with an empty question or answer")
    if load_report.normalized:  # said once: the rows are trained on as prompts are built at inference, in NFC
        log(f"data: normalised {load_report.normalized} of {load_report.rows_read} rows to NFC (they held decomposed "
            f"Unicode, as Unikey's 'Unicode tổ hợp' or some macOS tools write it)")
    if token_report.truncated:
        log(f"data: {token_report.truncated} answers cut at data.max_length={d.max_length} (they lose their EOS)")
    if token_report.dropped_long_prompt:
        log(f"data: dropped {token_report.dropped_long_prompt} samples whose prompt alone exceeds data.max_length")
    if val_examples:
        log(f"validation: {len(val_samples)} samples; {leaked} of their questions also appear in training"
            + (" (they measure memorisation, not generalisation; run `lmtune data clean`)" if leaked else ""))
    return PreparedData(template, samples, load_report, token_report, val_samples, leaked, val_examples)


def preflight(prepared: PreparedData, tokenizer, batch_size: int, log: Callable[[str], None] = print) -> None:
    """Show one example with its trained span and check the label contract on every batch once."""
    # A multi-turn sample shows the most: every turn's span marked.
    shown = max(prepared.samples[:200], key=lambda s: len(s.get("spans") or ()))
    log("pre-flight: one tokenized example (what the loss sees)")
    log(render_example(shown, tokenizer))
    collate = Collator(tokenizer)
    for start in range(0, len(prepared.samples), batch_size):
        collate(prepared.samples[start : start + batch_size])
    log(f"pre-flight: label contract holds on all {math.ceil(len(prepared.samples) / batch_size)} batches")
