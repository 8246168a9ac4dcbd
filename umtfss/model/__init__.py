"""The Transformer FSS model with prototype-aware cross-attention (paper Fig. 2, Eq. 1-6)."""

from umtfss.model.attention import MultiHeadAttention, PrototypeCrossAttention, TransformerBlock, VanillaCrossAttention
from umtfss.model.fss import FSSModel, build_model
from umtfss.model.prototypes import Clusters, hamming_kmeans, lloyd_kmeans

__all__ = [
    "Clusters",
    "FSSModel",
    "MultiHeadAttention",
    "PrototypeCrossAttention",
    "TransformerBlock",
    "VanillaCrossAttention",
    "build_model",
    "hamming_kmeans",
    "lloyd_kmeans",
]
