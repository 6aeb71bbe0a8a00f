"""medfed: federated learning of MedViTV2 for medical image classification, on Flower."""

__version__ = "0.1.0"
