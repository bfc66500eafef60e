"""Planning, in plain Python (no MindSpore import: it runs on a login node before a job is started):

- ``inventory.py``: every weight of the model, its name, shape and how each parallel axis cuts it (written once);
  what one process holds of it (``LocalShape``).
- ``chunks.py``, ``capacity.py``: how the attention's work is cut into static pieces; rows per expert of the
  capacity dispatch.
- ``counts.py``: parameter counts (total, activated, LoRA adapters).
- ``memory.py`` (CLI ``deepseek2-plan-memory``) and ``activations.py``: bytes per card of a YAML, the smallest
  cluster that fits.
- ``parallel_check.py`` (CLI ``deepseek2-parallel-check``): a YAML's parallel_config against its model_config.
- ``layout.py``: the semi-auto layout of Ascend training (op strategies) and pipeline placement, applied to a built
  network by the training runner.
"""
