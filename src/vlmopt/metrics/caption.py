"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) as the COCO caption evaluation computes them.

Captions are lower-cased and tokenized with the Stanford PTB tokenizer shipped in pycocoevalcap, punctuation
tokens are dropped, and pycocoevalcap's own scorers are applied, exactly as its ``COCOEvalCap`` does
(https://github.com/salaniz/pycocoevalcap, itself a port of https://github.com/tylin/coco-caption; see Chen
et al., "Microsoft COCO Captions", https://arxiv.org/abs/1504.00325). Values are those pycocoevalcap returns:
BLEU, METEOR and ROUGE-L in 0..1, CIDEr unscaled (it is not multiplied by 100). SPICE is left out because it
downloads Stanford CoreNLP at first use. The tokenizer and METEOR run in Java, so ``java`` must be on PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from vlmopt.metrics.vqa import check_ids

__all__ = [
    "CAPTION_METRICS",
    "CaptionEvaluation",
    "caption_scores",
    "caption_scores_per_sample",
    "evaluate_captions",
]

log = logging.getLogger(__name__)

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"

# Characters the Java tokenizer treats as line breaks. pycocoevalcap only replaces "\n"; any other break
# inside a caption would shift every later caption onto the wrong image, so they all become spaces.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})


@dataclass(frozen=True)
class CaptionEvaluation:
    """Corpus-level scores and the per-sample scores the same scorers returned.

    Corpus BLEU is computed from corpus n-gram counts and CIDEr's document frequencies come from all
    references, so neither corpus value is the mean of the per-sample values (METEOR's is not either).
    """

    corpus: dict[str, float]
    per_sample: dict[str, dict[str, float]]


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run as Java programs, "
            "but no 'java' executable is on PATH (install a JRE, e.g. openjdk-17-jre-headless)"
        )


def _validated(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    check_ids(predictions, references, "predictions", "references")
    refs: dict[str, list[str]] = {}
    for sample_id, captions in references.items():
        if isinstance(captions, str):
            raise TypeError(f"references[{sample_id!r}] must be a list of captions, not a string")
        refs[sample_id] = list(captions)
        if not refs[sample_id]:
            raise ValueError(f"references[{sample_id!r}] is empty: every sample needs at least one reference")
        if not all(isinstance(c, str) for c in refs[sample_id]):
            raise TypeError(f"references[{sample_id!r}] must contain only strings")
        if not isinstance(predictions[sample_id], str):
            raise TypeError(f"predictions[{sample_id!r}] must be a string, got {type(predictions[sample_id]).__name__}")
    return refs


def _ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Tokenize as pycocoevalcap's PTBTokenizer does, but with the temporary file in the system temp dir.

    pycocoevalcap writes its input file next to the jar, which fails in a read-only environment; the
    command, the jar and the punctuation filter are pycocoevalcap's own.
    """
    keys = [k for k, caps in captions.items() for _ in caps]
    text = "\n".join(c.translate(_LINE_BREAKS) for caps in captions.values() for c in caps)
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    fd, path = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        cmd = ["java", "-cp", str(jar), _PTB_CLASS, "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(keys) or any(lines[len(keys) :]):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(keys)} captions")
    tokenized: dict[str, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, lines, strict=False):
        words = [w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS]
        tokenized[key].append(" ".join(words))
    return tokenized


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    meteor = Meteor()  # starts a JVM
    try:
        return meteor.compute_score(gts, res)
    finally:
        # If compute_score failed it still holds the lock that Meteor.__del__ takes to stop the JVM.
        if meteor.lock.locked():
            meteor.lock.release()
        del meteor


def evaluate_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> CaptionEvaluation:
    """Score one predicted caption per sample against that sample's reference captions.

    ``predictions`` maps sample id to the generated caption (empty strings allowed); ``references`` maps
    the same ids to non-empty lists of reference captions.
    """
    refs = _validated(predictions, references)
    _require_java()
    ids = list(refs)
    gts = _ptb_tokenize(refs)
    res = _ptb_tokenize({i: [predictions[i]] for i in ids})

    corpus: dict[str, float] = {}
    per_sample: dict[str, dict[str, float]] = {i: {} for i in ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        corpus[name] = float(score)
        for i, s in zip(ids, scores, strict=True):
            per_sample[i][name] = float(s)

    bleu, bleu_per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        record(f"Bleu_{n + 1}", bleu[n], bleu_per_sample[n])
    log.info("computing METEOR for %d captions", len(ids))
    record("METEOR", *_meteor(gts, res))
    record("ROUGE_L", *Rouge().compute_score(gts, res))
    record("CIDEr", *Cider().compute_score(gts, res))
    return CaptionEvaluation(corpus=corpus, per_sample=per_sample)


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus-level ``Bleu_1..4``, ``METEOR``, ``ROUGE_L`` and ``CIDEr`` of the predictions."""
    return evaluate_captions(predictions, references).corpus


def caption_scores_per_sample(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Per-sample scores (sample id -> metric -> value), as the scorers return them for each caption."""
    return evaluate_captions(predictions, references).per_sample
