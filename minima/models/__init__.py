"""Models: the networks of the papers (:mod:`~minima.models.zoo`), the registry and the one way every model is
built (:mod:`~minima.models.registry`), and the import-trust policy (:mod:`~minima.models.trust`). The names below
are the public API."""

from minima.models.registry import (
    REGISTRY,
    TORCHVISION_PREFIX,
    ModelInfo,
    available_models,
    build_model,
    count_parameters,
    default_data,
    has_batchnorm,
    instantiate,
    is_convolutional,
    model_info,
    model_kind,
    resolve_model,
)
from minima.models.trust import (
    TRUST_ENV,
    ModelSpecError,
    UntrustedImportError,
    own_import,
    trusted_modules,
)
from minima.models.zoo import (
    C1,
    C2,
    KERAS_BN_EPS,
    MLP,
    VGG11BN,
    fc_tanh,
    load_imagenet_weights,
    mobilenet_v2,
    textbook_order,
    vgg11,
)

__all__ = [
    "C1", "C2", "KERAS_BN_EPS", "MLP", "REGISTRY", "TORCHVISION_PREFIX", "TRUST_ENV", "VGG11BN", "ModelInfo",
    "ModelSpecError", "UntrustedImportError", "available_models", "build_model", "count_parameters", "default_data",
    "fc_tanh", "has_batchnorm", "instantiate", "is_convolutional", "load_imagenet_weights", "mobilenet_v2",
    "model_info", "model_kind", "own_import", "resolve_model", "textbook_order", "trusted_modules", "vgg11",
]
