"""What ``run_mindformer.py`` runs, and the tools around a run:

- ``runner.py``: MindFormers' flags and ``--a.b.c value`` overrides applied to the YAML, one-line errors.
- ``training.py``: train / finetune through MindFormers' Trainer; ``train_step.py``: the CPU train step and the
  LossGuard callback; ``optim.py``: ``CpuAdamW``; ``cpu_barrier.py``: MindFormers' checkpoint-loading barrier on a
  distributed CPU run.
- ``predict.py``: generation (the evaluations of ``evaluation/`` build their model through it).
- ``launcher.py``: the Python behind ``scripts/msrun_launcher.sh`` (command splitting, the master probe, the report
  of a failed worker's log).
"""
