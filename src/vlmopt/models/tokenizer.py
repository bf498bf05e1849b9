"""Offline word-level tokenizers for tiny models, trained on a dataset's own text in milliseconds."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "train_word_tokenizer"]

#: Special tokens in id order: pad=0, bos=1, eos/sep=2, unk=3, image=4.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def train_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train a lowercase word-level tokenizer on ``texts``.

    Every word and punctuation mark seen becomes one token, so a tiny model never has to
    spell. Encoding adds ``<s>`` … ``</s>``; decoding joins words with single spaces.
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        unk_token="<unk>",
        cls_token="<s>",
        model_max_length=128,
    )
