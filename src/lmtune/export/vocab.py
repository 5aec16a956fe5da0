"""The tokenizer as llama.cpp's vocabulary: tokens, merges or scores, special ids, and the pre-tokenizer name.

Mirrors llama.cpp's converter (`get_vocab_base`, `get_vocab_base_pre`, `_set_vocab_sentencepiece`,
`_create_vocab_sentencepiece`, `_set_vocab_llama_hf`), working from the loaded tokenizer (the one training used)
rather than from files in a folder: byte-level BPE vocabularies as llama.cpp's "gpt2" tokenizer, SentencePiece BPE
ones (Llama 2, Mistral v0.1 to v0.3, TinyLlama) as its "llama" tokenizer. The pre-tokenizer name is found by
hashing the tokenizer's ids on the converter's test string; each family lists the hashes of its published
vocabularies (lmtune.families).
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

from ..families import FAMILIES
from .errors import ExportError

# pre-tokenizer (the regex that splits text before BPE), which llama.cpp re-implements by name.
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# hash -> llama.cpp pre-tokenizer name: GPT-2's own, and the published vocabularies of every family in the table.
KNOWN_PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai-community/gpt2
    **{digest: name for family in FAMILIES.values() for digest, name in family.pre_tokenizers.items()},
}

# Split regexes as tokenizer.json spells them -> the llama.cpp pre-tokenizer implementing the same split
# (llama.cpp's llama-vocab.cpp regexes for these names; transformers' GGUF reader maps the names back to these).
SPLIT_REGEX_PRE_TOKENIZERS = {
    # Qwen2 / Qwen2.5 (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX): single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Llama 3: digits in groups of up to three
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # BLOOM
    r" ?[^(\s|[.,!?…。，、।۔،])]+": "bloom",
}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; without the right one llama.cpp warns
    "GENERATION QUALITY WILL BE DEGRADED" and splits text differently from training."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    # Not a published vocabulary the table knows (e.g. a tokenizer trained or extended for this model): name the
    # split by its rule instead. A lone ByteLevel pre-tokenizer with its regex is GPT-2's split exactly ("gpt-2");
    # a Split by one of the regexes below, then ByteLevel without its own regex, is that model family's split.
    pre = _backend(tokenizer).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in SPLIT_REGEX_PRE_TOKENIZERS:
            return SPLIT_REGEX_PRE_TOKENIZERS[pattern]
    raise ExportError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}, test-string hash {digest}) "
                      "is not one llama.cpp knows; llama.cpp would split text differently from training")


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def _has(node, test) -> bool:
    if isinstance(node, dict):
        return test(node) or any(_has(v, test) for v in node.values())
    if isinstance(node, list):
        return any(_has(v, test) for v in node)
    return False


def _is_byte_level(spec: dict) -> bool:
    def byte_level(node: dict) -> bool:
        return node.get("type") == "ByteLevel"

    return spec.get("model", {}).get("type") == "BPE" and _has(spec.get("pre_tokenizer"), byte_level) and _has(spec.get("decoder"), byte_level)


def _spaces_as_metaspace(node: dict) -> bool:
    # SentencePiece's "▁" for spaces: transformers' converted Llama tokenizers use a Metaspace pre-tokenizer
    # (transformers 5) or a Replace(" ", "▁") normalizer (the tokenizer.json files of Llama 2 and Mistral).
    return node.get("type") == "Metaspace" or (node.get("type") == "Replace" and node.get("content") == "\u2581")


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """A SentencePiece BPE vocabulary as transformers holds it: BPE over characters with byte fallback (<0x0A>)
    and spaces spelled "▁". llama.cpp's "llama" tokenizer runs exactly this algorithm; it has none that
    reproduces a SentencePiece Unigram model (T5-style) in its "llama" type."""
    model = spec.get("model", {})
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and (_has(spec.get("pre_tokenizer"), _spaces_as_metaspace) or _has(spec.get("normalizer"), _spaces_as_metaspace)))


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text, as llama.cpp's tokenizer.ggml.add_space_prefix says."""
    def prefixing(node: dict) -> bool:
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
        return node.get("type") == "Prepend" and node.get("prepend") == "\u2581"

    return _has(spec.get("pre_tokenizer"), prefixing) or _has(spec.get("normalizer"), prefixing)


def sentencepiece_space_prefix(tokenizer) -> bool | None:
    """None for a tokenizer exported as a byte-level BPE; for a SentencePiece one, whether it puts "▁" before text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    return _adds_space_prefix(spec) if _is_sentencepiece_bpe(spec) else None


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id




def adds_bos(tokenizer) -> bool:
    return _adds(tokenizer, tokenizer.bos_token_id, first=True)


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to flag special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def add_vocabulary(writer, tokenizer, vocab_size: int) -> str:
    """Tokens, types, merges (or scores), special ids: the converter's get_vocab_base + SpecialVocab, from the
    loaded tokenizer (the one training used) rather than from files in a folder. Returns the pre-tokenizer name."""
    import gguf

    spec = _backend(tokenizer)
    sentencepiece = _is_sentencepiece_bpe(spec)
    if not sentencepiece and not _is_byte_level(spec):
        model = spec.get("model", {})
        kind = "SentencePiece Unigram (T5-style)" if model.get("type") == "Unigram" else \
            f"{model.get('type')}{' without byte fallback' if model.get('type') == 'BPE' else ''}"
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers (BLOOM, SmolLM2, Qwen2, Llama 3) and SentencePiece "
                          f"BPE ones (Llama 2, Mistral v0.1-v0.3, TinyLlama); this one is {kind}, which llama.cpp's tokenizers "
                          "would not split as training did")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{vocab_size} embedding rows")
    if sentencepiece:
        pre = "default"
        tokens, scores, types = _sentencepiece_vocabulary(tokenizer, spec, vocab_size)
        # Mirrors the converter's _set_vocab_sentencepiece: model "llama", pre-tokenizer "default", scores, no merges
        # (llama.cpp's "llama" tokenizer merges by token score). add_space_prefix is written as the tokenizer does it
        # (LlamaModel.set_vocab writes it from tokenizer_config.json's add_prefix_space when that is set).
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        pre = pre_tokenizer_name(tokenizer)
        tokens, types = _byte_level_vocabulary(tokenizer, vocab, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = spec["model"].get("merges") or []
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Written explicitly: llama.cpp's default (BOS on for SentencePiece, per model for BPE) would otherwise decide
    # whether a BOS starts every prompt, and a BOS training never saw (or a missing one) changes every answer.
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    return pre


def _byte_level_vocabulary(tokenizer, vocab: dict[str, int], vocab_size: int):
    import gguf

    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if index in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[index].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece_model(tokenizer, pieces: dict[str, int]):
    """The tokenizer's own SentencePiece model file (tokenizer.model, beside a Llama 2 or Mistral checkpoint), loaded,
    if there is one, the `sentencepiece` package is installed, and its pieces are the tokenizer's (ids included)."""
    candidates = [getattr(tokenizer, "vocab_file", None), tokenizer.init_kwargs.get("vocab_file")]
    if tokenizer.name_or_path:
        candidates.append(Path(tokenizer.name_or_path) / "tokenizer.model")
    path = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if path is None:
        return None
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        return None  # the scores are rebuilt from the merges instead, and the check proves the tokenization
    model = SentencePieceProcessor()
    try:
        model.LoadFromFile(str(path))
    except (OSError, RuntimeError):
        return None
    same = all(pieces.get(model.IdToPiece(i), i) == i for i in range(model.vocab_size()))
    return model if same and model.vocab_size() <= len(pieces) else None


def _sentencepiece_vocabulary(tokenizer, spec: dict, vocab_size: int):
    """(tokens, scores, types) of a SentencePiece BPE vocabulary, as the converter's _create_vocab_sentencepiece makes
    them from tokenizer.model: rows without a token are "[PAD<id>]" (UNUSED, score -10000); each piece has its score
    and its type (UNKNOWN, CONTROL, UNUSED, BYTE for "<0x0A>"-style byte pieces, NORMAL); then every added token of the
    tokenizer (transformers' added_tokens_decoder, which is what the converter reads from tokenizer_config.json)
    overrides its row with score -1000, as CONTROL when special (or looking special), else USER_DEFINED with "▁"
    spelled as a space.

    Without tokenizer.model (transformers 5 saves tokenizer.json only, so every folder lmtune merges has none),
    the converter falls back to _set_vocab_llama_hf (gguf's LlamaHfVocab), which gives every token the score -1000.
    That is not followed here: llama.cpp's "llama" tokenizer merges the adjacent pair whose joined token scores
    highest, so equal scores would merge left to right. Each token's score is instead minus the rank of the first
    merge that makes it: the order in which transformers' BPE (and SentencePiece, whose merges transformers built
    from these very scores) makes tokens. The export's llama.cpp check proves the result tokenizes like training.
    """
    import gguf

    pieces: dict[str, int] = spec["model"]["vocab"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    model = _sentencepiece_model(tokenizer, pieces)
    if model is not None:
        for i in range(min(model.vocab_size(), vocab_size)):
            tokens[i], scores[i] = model.IdToPiece(i), model.GetScore(i)
            types[i] = (gguf.TokenType.UNKNOWN if model.IsUnknown(i) else gguf.TokenType.CONTROL if model.IsControl(i)
                        else gguf.TokenType.UNUSED if model.IsUnused(i) else gguf.TokenType.BYTE if model.IsByte(i)
                        else gguf.TokenType.NORMAL)
    else:
        merges = spec["model"].get("merges") or []
        rank: dict[str, int] = {}
        for number, merge in enumerate(merges):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, number)
        specials = set(tokenizer.all_special_ids)
        for piece, i in pieces.items():
            tokens[i] = piece
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                types[i], scores[i] = gguf.TokenType.BYTE, 0.0
            elif i == tokenizer.unk_token_id:
                types[i], scores[i] = gguf.TokenType.UNKNOWN, 0.0
            elif i in specials:
                types[i], scores[i] = gguf.TokenType.CONTROL, 0.0
            else:
                # Single characters are never a merge's result; below every merged token, they are never preferred.
                types[i], scores[i] = gguf.TokenType.NORMAL, -float(rank.get(piece, len(merges)))
    for i, added in tokenizer.added_tokens_decoder.items():
        token = added.content
        if added.special or _looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")  # the converter pre-normalizes user-defined spaces
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = token
    return tokens, scores, types
