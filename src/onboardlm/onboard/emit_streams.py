"""Emitter of hyper-connections (spec_streams.HyperConnectionSpec): the stream mixers' classes, once
per class, and the helpers a decoder layer that keeps the streams calls around each block.

A layer keeps ``[B, S, n, hidden]`` streams (``streams_in`` views a ``flat`` layout so); around a
block it calls ``collapsed, post, comb = self.<mixer>(streams)``, runs the block on ``collapsed``
(after the layer's own norm, where it has one) and ``streams = streams_update(streams, out, post,
comb)``: ``comb^T @ streams + post * out`` (``comb`` None: the streams carried as they are). The
model copies the embedding into every stream (``streams_expand``) and folds them with the head
before the final norm.
"""

from __future__ import annotations

from onboardlm.onboard.generate import render
from onboardlm.onboard.spec_streams import HyperConnectionSpec, StreamMixerSpec

__all__ = ["hyper_connection_source", "stream_layer_lines", "streams_helpers"]


def _mixers(spec: HyperConnectionSpec) -> list[StreamMixerSpec]:
    """One mixer spec per class, the fullest first (a gated class serves as its own head)."""
    by_class: dict[str, StreamMixerSpec] = {}
    for mixer in (*spec.mixers, spec.head):
        known = by_class.get(mixer.class_name)
        if known is None or len(mixer.params) > len(known.params):
            by_class[mixer.class_name] = mixer
    return list(by_class.values())


def streams_helpers(spec: HyperConnectionSpec) -> str:
    """The module-level helpers: copy the embedding into the streams, view the layers' layout, and
    add a block's output back."""
    flat = spec.layout == "flat"
    lines = [
        "def streams_expand(hidden_states: torch.Tensor, count: int) -> torch.Tensor:",
        '    """The embedding copied into ``count`` residual streams ``[B, S, count, hidden]``."""',
        "    return hidden_states.unsqueeze(2).expand(-1, -1, count, -1).contiguous()",
        "",
        "",
        "def streams_update(",
        "    streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor | None",
        ") -> torch.Tensor:",
        '    """``comb^T @ streams + post * out`` in fp32 (``comb`` None: the streams carried as they are)."""',
        "    carried = streams.float() if comb is None else torch.matmul(comb.float().transpose(-1, -2), streams.float())",
        "    return (post.float().unsqueeze(-1) * out.float().unsqueeze(-2) + carried).to(streams.dtype)",
    ]
    if flat:
        lines += [
            "",
            "",
            "def streams_in(streams: torch.Tensor, count: int) -> torch.Tensor:",
            '    """The checkpoint\'s flat ``[B, S, count * hidden]`` streams viewed ``[B, S, count, hidden]``."""',
            "    return streams.unflatten(-1, (count, -1))",
        ]
    return "\n".join(lines) + "\n"


def hyper_connection_source(spec: HyperConnectionSpec, config_class: str) -> str:
    """The classes of the stream mixers and head, then the helpers."""
    blocks = []
    for mixer in _mixers(spec):
        lowrank = mixer.constant("lowrank") or ""
        blocks.append(
            render(
                "hyper_connection.py.j2",
                mixer=mixer,
                streams=spec.streams,
                streams_field=spec.streams.removeprefix("config."),
                config_class=config_class,
                lowrank=lowrank,
            )
        )
    blocks.append(streams_helpers(spec))
    return "\n\n".join(block.rstrip() + "\n" for block in blocks)


def stream_layer_lines(
    spec: HyperConnectionSpec, steps: list[tuple[str, str | None, str]], count: str
) -> list[str]:
    """A decoder layer's forward body that keeps the streams: for each ``(mixer, norm, call)`` step,
    the mixer collapses the streams, the block ``call`` (its input written ``{x}``) runs on the
    collapsed state (through ``self.<norm>`` where the layer has one) and its output is added back.
    ``hidden_states`` comes in and goes out in the checkpoint's layout; ``count`` is the expression
    of the stream count."""
    flat = spec.layout == "flat"
    lines = [f"streams = streams_in(hidden_states, {count})" if flat else "streams = hidden_states"]
    for mixer, norm, call in steps:
        block_input = "collapsed" if norm is None else f"self.{norm}(collapsed)"
        lines += [
            f"collapsed, post, comb = self.{mixer}(streams)",
            f"out = {call.format(x=block_input)}",
            "streams = streams_update(streams, out, post, comb)",
        ]
    lines.append("return streams.flatten(2)" if flat else "return streams")
    return lines
