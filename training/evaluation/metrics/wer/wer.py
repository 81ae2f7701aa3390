"""Word error rate as a local `evaluate` metric (the hub's "wer" script cannot be fetched offline).

Predictions and references are compared as given; callers normalize text first. The score is the
corpus-level WER: total edits over total reference words, computed by jiwer.
"""

import datasets
import evaluate
import jiwer

_DESCRIPTION = "Corpus-level word error rate: (substitutions + deletions + insertions) / reference words."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of hypothesis strings.
    references: list of reference strings (each with at least one word).
Returns:
    wer: float, and the edit counts behind it (substitutions, deletions, insertions, words).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Wer(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if any(not r.split() for r in references):
            raise ValueError("wer: every reference needs at least one word")
        # A blank hypothesis counts as all deletions.
        out = jiwer.process_words(references, [p if p.strip() else "" for p in predictions])
        words = out.substitutions + out.deletions + out.hits
        return {
            "wer": (out.substitutions + out.deletions + out.insertions) / words,
            "substitutions": out.substitutions,
            "deletions": out.deletions,
            "insertions": out.insertions,
            "words": words,
        }
