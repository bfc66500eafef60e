"""Weight-only quantization of DeepSeek-V2 (W8A16, W4A16): round-to-nearest int8 / int4 projections with float
scales, activations in the compute dtype.

- ``settings.py``: ``model.model_config.quantization_config``, checked (``QuantSettings``), and the stored shapes;
  plain Python. Which weights are quantized is the inventory's (``planning.inventory.quantized``).
- ``rtn.py``: quantize, dequantize and int4 packing in numpy (the converter, the loaders, the tests).
"""
