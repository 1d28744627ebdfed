"""Everything that attaches encoder states to the frozen decoder. Modality-agnostic."""
from adapters.cross_attention import CrossAttentionBlock, MediaContext
from adapters.fusion import CrossAttentionFusion
from adapters.tokens import MediaTokenEmbedding

__all__ = ["CrossAttentionBlock", "MediaContext", "CrossAttentionFusion", "MediaTokenEmbedding"]
