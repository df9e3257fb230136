"""Byte-level BPE tokenizers (HF `tokenizers`): train one on a corpus, or load one from `tokenizer.json`.

The bundled tokenizer (`trainer/data/assets/stdlib_bpe_4k.json`) was trained with `hylo tokenize` on the bundled
corpus (the Python standard library's source), so the default run needs no network and no training step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hylo.trainer.errors import ConfigError, DataError

EOS = "<|endoftext|>"
# End-of-document tokens in the order they are looked for: hylo's (GPT-2's), Llama 3's, Llama 2's and Mistral's
EOS_TOKENS = (EOS, "<|end_of_text|>", "</s>")
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "stdlib_bpe_4k.json"


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path | None = None) -> Tokenizer:
    """Train a byte-level BPE with EOS as its only special token (id 0); save to `out` if given."""
    if vocab_size < 257 + 1:
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    return tok


def load_tokenizer(path: str | Path = "") -> Tokenizer:
    """Load `path` (empty = the bundled tokenizer); errors say what is wrong and how to get a tokenizer."""
    path = Path(path) if path else BUNDLED_TOKENIZER
    if not path.is_file():
        raise DataError(
            f"tokenizer file '{path}' does not exist; set data.tokenizer to a tokenizer.json, leave it empty for "
            "the bundled one, or train one with `hylo tokenize --input DATA --output tokenizer.json`"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
        raise DataError(f"'{path}' is not a valid tokenizer.json ({err}); retrain it with `hylo tokenize`") from None
    if not any(tok.token_to_id(token) is not None for token in EOS_TOKENS):
        raise DataError(f"tokenizer '{path}' has none of the end-of-document tokens {list(EOS_TOKENS)}, which "
                        "separate packed documents")
    return tok


def eos_token(tokenizer: Tokenizer) -> str:
    """The end-of-document token: hylo's own, or the one a Hugging Face tokenizer of the Llama family uses."""
    return next(token for token in EOS_TOKENS if tokenizer.token_to_id(token) is not None)


def eos_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(eos_token(tokenizer))
