"""Rotary position embedding of DeepSeek-V2's decoupled RoPE part, with YaRN and linear scaling.

The released model rotates interleaved pairs (x[2i], x[2i+1]); frequencies, the YaRN ramp and the cos/sin mscale
follow the released code, computed in float32 like it. YaRN also scales the softmax (``yarn_get_mscale(factor,
mscale_all_dim) ** 2``, see ``DeepseekV2Config.softmax_scale``).
"""
import math

import numpy as np
from mindspore import nn, ops, Tensor
from mindspore.common import dtype as mstype

__all__ = ["yarn_get_mscale", "rope_tables", "RotaryEmbedding", "apply_rotary"]


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention scale: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_find_correction_dim(num_rotations, dim, base, max_position_embeddings):
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings):
    low = math.floor(_yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(_yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def _yarn_linear_ramp_mask(low, high, dim):
    if low == high:
        high += 0.001  # prevent a zero division
    linear = (np.arange(dim, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(linear, 0, 1).astype(np.float32)


def rope_tables(config, num_positions: int):
    """cos/sin tables (num_positions, qk_rope_head_dim), each frequency repeated for its interleaved pair."""
    dim, base = config.qk_rope_head_dim, np.float32(config.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base ** exponents)).astype(np.float32)                # (dim/2,)
    positions = np.arange(num_positions, dtype=np.float32)
    mscale = 1.0
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        positions = positions / np.float32(scaling["factor"])
    elif config.rope_type == "yarn":
        factor = float(scaling["factor"])
        original = scaling.get("original_max_position_embeddings", 4096)
        low, high = _yarn_find_correction_range(scaling.get("beta_fast", 32), scaling.get("beta_slow", 1),
                                                dim, float(base), original)
        extra = inv_freq
        inter = (np.float32(1.0) / (np.float32(factor) * base ** exponents)).astype(np.float32)
        keep = np.float32(1.0) - _yarn_linear_ramp_mask(low, high, dim // 2)              # 1 = extrapolate
        inv_freq = (inter * (np.float32(1.0) - keep) + extra * keep).astype(np.float32)
        mscale = yarn_get_mscale(factor, scaling.get("mscale", 1)) / \
            yarn_get_mscale(factor, scaling.get("mscale_all_dim", 0))
    freqs = np.outer(positions, inv_freq).astype(np.float32)                               # (pos, dim/2)
    cos = (np.cos(freqs) * np.float32(mscale)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(mscale)).astype(np.float32)
    return np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)                          # (pos, dim)


class RotaryEmbedding(nn.Cell):
    """Holds the cos/sin tables; gives them for a prefix (training, prefill) or per-row positions (decode)."""

    def __init__(self, config, num_positions: int):
        super().__init__()
        cos, sin = rope_tables(config, num_positions)
        self.cos = Tensor(cos, mstype.float32)
        self.sin = Tensor(sin, mstype.float32)

    def construct(self, seq_len: int, positions=None):
        """The first seq_len positions: (s, d) each; positions (b, s) int32: (b, 1, s, d) each."""
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]                                  # (s, d)
        cos = ops.gather(self.cos, positions, 0)                                           # (b, s, d)
        sin = ops.gather(self.sin, positions, 0)
        return ops.expand_dims(cos, 1), ops.expand_dims(sin, 1)                            # (b, 1, s, d)


def apply_rotary(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position angle: the released model's RoPE.

    x: (..., d); cos/sin broadcast to x, each angle repeated for both members of its pair.
    """
    dtype = x.dtype
    x32 = ops.cast(x, mstype.float32)
    pairs = ops.reshape(x32, x32.shape[:-1] + (x32.shape[-1] // 2, 2))                      # (..., d/2, 2)
    even, odd = ops.split(pairs, 1, -1)                                                     # (..., d/2, 1)
    rotated = ops.reshape(ops.concat((-odd, even), -1), x32.shape)                         # (-x1, x0, -x3, x2 ...)
    return ops.cast(x32 * cos + rotated * sin, dtype)
