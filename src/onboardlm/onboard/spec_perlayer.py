"""PerLayerInputSpec: per-layer inputs (Gemma 4's per-layer embeddings), as the analyzer measured them.

Beside the hidden states, every decoder layer receives a small vector of its own per token: the model
computes ``[B, S, num_hidden_layers, width]`` once per forward from a second token embedding (a
packed table of ``num_hidden_layers * width`` columns) and a projection of the input embeddings
(normalised per layer), and layer ``i`` takes slice ``i``. The layer mixes it in after attention and
feed-forward, before its output scale::

    h = h + norm(up(act(gate(h)) * per_layer_input))

Expressions are over ``config``, as in the other specs; ``width`` is the config field whose 0 builds
none of it (the lean file keeps both ways).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerLayerInputSpec:
    argument: str  # the decoder layer's parameter that receives it, e.g. "per_layer_input"
    width: str  # config field of the per-layer width, e.g. "hidden_size_per_layer_input" (0: none)
    rows: str  # expression of the per-layer table's rows, e.g. "config.vocab_size_per_layer_input"
    # model level (attributes of the module that holds the layers)
    table: str  # the packed per-layer token embedding, num_hidden_layers * width columns
    table_scale: str | None  # expression the table's rows are multiplied by (None: 1)
    table_class: str | None  # the scaled embedding class of the token embeddings that applies it
    projection: str  # linear hidden -> num_hidden_layers * width of the input embeddings
    projection_scale: str | None  # expression multiplying the projection's output (None: 1)
    projection_norm: str  # norm of width ``width``, over each layer's slice of the projection
    combine_scale: str | None  # (normalised projection + table rows) * this (None: 1)
    # layer level (attributes of the decoder layer)
    gate: str  # linear hidden -> width
    up: str  # linear width -> hidden
    norm: str  # norm of the up projection's output, before the residual add
    act_attr: str  # the layer's activation module
    act: str  # config expression of the activation's name, e.g. "config.hidden_activation"
    num_layers: int = 0  # of the analyzed (tiny) config, for reports
