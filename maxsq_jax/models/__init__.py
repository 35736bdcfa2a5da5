"""Models: DeepLab-v2 ResNet-101 (DeeplabMulti of the reference) and PyTorch weight conversion."""

from maxsq_jax.models.convert import load_converted_variables, merge_into, torch_state_dict_to_variables
from maxsq_jax.models.deeplab import DeepLabV2, feature_size
from maxsq_jax.models.layers import BatchNorm, max_pool_ceil, resize_bilinear_align_corners

__all__ = [
    "DeepLabV2",
    "BatchNorm",
    "feature_size",
    "load_converted_variables",
    "max_pool_ceil",
    "merge_into",
    "resize_bilinear_align_corners",
    "torch_state_dict_to_variables",
]
