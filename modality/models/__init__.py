"""One-channel classifiers over timm networks."""

from modality.models.classifier import ModalityClassifier
from modality.models.networks import REFERENCE_NETWORKS, create_network

__all__ = ["REFERENCE_NETWORKS", "ModalityClassifier", "create_network"]
