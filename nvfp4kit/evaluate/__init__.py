"""Measuring quality: perplexity of causal LMs, sentence-embedding similarity of encoders, and the
per-layer report (scale statistics, weight error, charts) of a quantized model."""

from .embedding import EmbeddingSimilarity, compare_embeddings, embed, pooling_mode, split_sentences
from .perplexity import Perplexity, perplexity
from .report import LayerRow, layer_rows, plot_layer_errors

__all__ = ["EmbeddingSimilarity", "LayerRow", "Perplexity", "compare_embeddings", "embed", "layer_rows",
           "perplexity", "plot_layer_errors", "pooling_mode", "split_sentences"]
