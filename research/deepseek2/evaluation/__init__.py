"""Evaluating a checkpoint:

- ``heldout.py`` (CLI ``deepseek2-evaluate``): the held-out loss (mean cross-entropy per target token, perplexity)
  on a MindRecord.
- ``humaneval.py`` (CLI ``deepseek2-humaneval``; ``deepseek2-humaneval-check`` for a samples file): HumanEval pass@k,
  every completion run in ``sandbox.py`` (own namespaces, throw-away directory, limits, no network).
- ``lm_eval_model.py`` (CLI ``deepseek2-lm-eval``): the ``deepseek2-mindspore`` model of lm-evaluation-harness.
"""
