"""ResNet / ResNeXt / wide ResNet bodies with an FPN, declaring every output's name, channels and stride.

This package depends only on torch and torchvision and can be imported into any detector::

    from backbone import build_backbone
    bb = build_backbone("resnet50", weights="/path/to/resnet50-11ad3fa6.pth", trainable_stages=3)
    bb.out_channels                 # 256, torchvision's convention
    bb.feature_info.names()         # ('p2', 'p3', 'p4', 'p5', 'p6')
    bb.feature_info.reduction()     # (4, 8, 16, 32, 64), timm's convention
    bb.output_shape()["p3"]         # ShapeSpec(channels=256, ..., stride=8), detectron2's convention
    features = bb(images)           # OrderedDict p2..p6 (a dict in TorchScript)
    build_backbone("resnet18", torchvision_names=True).feature_info.names()  # ('0', '1', '2', '3', 'pool')
    build_backbone("resnet50", dcn_stages=("c3", "c4", "c5"))  # DCNv2 3x3 convs in C3-C5 (ModulatedDeformConv2d)
"""

from .build import BackboneWithFPN, build_backbone, load_backbone_weights, torchvision_level_names
from .config import ARCHITECTURES, BackboneConfig, FPNConfig
from .deform import ModulatedDeformConv2d
from .features import FeatureInfo, FeatureSpec, ShapeSpec
from .fpn import FPN
from .norm import FrozenBatchNorm2d
from .resnet import BasicBlock, Bottleneck, ResNetBody
from .summary import summarize
from .weights import WeightsError, is_state_dict, load_state_dict_checked, read_checkpoint, safe_load

__all__ = [
    "ARCHITECTURES",
    "FPN",
    "BackboneConfig",
    "BackboneWithFPN",
    "BasicBlock",
    "Bottleneck",
    "FPNConfig",
    "FeatureInfo",
    "FeatureSpec",
    "FrozenBatchNorm2d",
    "ModulatedDeformConv2d",
    "ResNetBody",
    "ShapeSpec",
    "WeightsError",
    "build_backbone",
    "is_state_dict",
    "load_backbone_weights",
    "load_state_dict_checked",
    "read_checkpoint",
    "safe_load",
    "summarize",
    "torchvision_level_names",
]
