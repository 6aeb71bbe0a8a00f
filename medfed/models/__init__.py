"""Models: MedViTV2, its KAN feed-forward and dilated neighborhood attention."""

from ._registry import create_model, list_models, register_model, registered_name
from .medvitv2 import MedViTV2
from .neighborhood_attention import NeighborhoodAttention2D, neighborhood_attention

__all__ = [
    "MedViTV2",
    "NeighborhoodAttention2D",
    "create_model",
    "list_models",
    "neighborhood_attention",
    "register_model",
    "registered_name",
]
