"""BLEU-4 and ROUGE-1/2/L of generated answers against references, correct for Chinese.

Both come from the reference packages, not from code of ours:
- BLEU-4: `sacrebleu.corpus_bleu` with `tokenize="zh"` (each CJK character a token, the rest by sacrebleu's
  13a rules). Corpus BLEU, as sacrebleu and WMT report it (not a mean of sentence scores).
- ROUGE: Google's `rouge-score` (the re-implementation of ROUGE-1.5.5 that HF `evaluate` wraps), mean F1 over
  rows. Its default tokenizer keeps only `[a-z0-9]` and so scores every Chinese answer 0; we hand it
  sacrebleu's zh tokenizer instead, so ROUGE counts the same tokens BLEU does: CJK per character (the usual
  choice for Chinese ROUGE, e.g. LCSTS and CLUE; no segmenter dictionary to change the numbers), latin words
  whole and lower-cased (rouge-score's default case rule).
Scores are on a 0-100 scale.
"""

from __future__ import annotations

from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class CJKTokenizer:
    """rouge-score's tokenizer interface (`tokenize(text) -> list[str]`) over sacrebleu's zh tokenizer."""

    def __init__(self) -> None:
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

        self._zh = TokenizerZh()

    def tokenize(self, text: str) -> list[str]:
        return self._zh(text.strip()).lower().split()


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CJKTokenizer())


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{"bleu4", "rouge1", "rouge2", "rougeL"} (0-100) of `predictions` against `references`, row by row."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = {"bleu4": sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score}
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    scorer = _rouge_scorer()
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():  # score(target, prediction)
            totals[name] += score.fmeasure
    scores.update({name: 100 * total / len(predictions) for name, total in totals.items()})
    return scores
