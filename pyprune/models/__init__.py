"""Model zoo and model loading.

Zoo (``build_model(name)``): CIFAR ResNet-20/32/44/56/110 (option-A
shortcuts, load the akamaster pretrained checkpoints), pre-activation
ResNet-164, VGG-11/13/16/19 with BN, DenseNet-40 and DenseNet-BC-100. All
trace with ``torch.fx.symbolic_trace``. torchvision's classifiers are reachable
as ``torchvision:NAME`` (:mod:`.torchvision_zoo`), built on demand, not registered.

Importing this package imports every zoo module, which registers its models.
"""

from .registry import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    ModelSpec,
    available_models,
    build_model,
    get_spec,
    register_model,
)

# Imported for their registrations; order fixes nothing but reads top-down.
from .resnet_cifar import ResNetCifar, ZeroPadShortcut, resnet_cifar
from .preresnet import PreResNet, preresnet
from .vgg import VGG, vgg
from .densenet import DenseNet, densenet40, densenet_bc100

from .torchvision_zoo import TORCHVISION_PREFIX, is_torchvision_arch, torchvision_models, torchvision_spec

from .loaded import DEFAULT_INPUT_SHAPE, LoadedModel
from .loading import (
    ModelLoadError,
    build_user_model,
    load_pickled_module,
    load_state_dict_file,
    load_weights,
    resolve_model,
)
from .pretrained import (
    PRETRAINED,
    PretrainedCheckpoint,
    default_cache_dir,
    default_search_dirs,
    find_or_fetch_pretrained,
    pretrained_archs,
)

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "ModelSpec",
    "available_models",
    "build_model",
    "get_spec",
    "register_model",
    "ResNetCifar",
    "ZeroPadShortcut",
    "resnet_cifar",
    "PreResNet",
    "preresnet",
    "VGG",
    "vgg",
    "DenseNet",
    "densenet40",
    "densenet_bc100",
    "TORCHVISION_PREFIX",
    "is_torchvision_arch",
    "torchvision_models",
    "torchvision_spec",
    "DEFAULT_INPUT_SHAPE",
    "LoadedModel",
    "ModelLoadError",
    "build_user_model",
    "load_pickled_module",
    "load_state_dict_file",
    "load_weights",
    "resolve_model",
    "PRETRAINED",
    "PretrainedCheckpoint",
    "default_cache_dir",
    "default_search_dirs",
    "find_or_fetch_pretrained",
    "pretrained_archs",
]
