"""Evaluating a PRM: ProcessBench-style first-error F1 and best-of-N selection, on any model and data
(`prmserve eval processbench|best-of-n`); the bundled model's word-problem task is one case of them."""

from prmserve.evaluation.synthetic_task import accuracy_by_kind, held_out_quality, prm_scorer

__all__ = ["accuracy_by_kind", "held_out_quality", "prm_scorer"]
