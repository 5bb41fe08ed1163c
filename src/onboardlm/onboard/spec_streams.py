"""Spec of hyper-connections: several residual streams mixed by learned weights around each block,
measured by :mod:`onboardlm.onboard.analyze_streams`.

The common part of DeepSeek-V4's mHC, HY-V4's independent hyper-connections and Qwen4-Exp's gated
residual: the embedding is copied into ``n`` streams; before each block a mixer reads all streams and
gives the block its input (a weighted sum of the streams) and ``n`` weights that add the block's
output back to each stream (``h_s <- R(h)_s + post_s * block_out``, ``R`` the identity or a
doubly-stochastic mix of the streams); after the last layer a head folds the streams into one hidden
state before the final norm. What differs is how the mixing weights are computed (the ``form``).

Like the other block specs, values that come from the config are Python expressions over ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: ``sigmoid``: one projection of the flattened, RMS-scaled streams gives pre and post logits,
#: ``pre = sigmoid(l * scale + base) + eps`` (HY-V4); ``sinkhorn``: the same plus an ``n x n`` residual
#: mix, a softmax made doubly stochastic by Sinkhorn-Knopp iterations (DeepSeek-V4's mHC);
#: ``gated``: a grouped RMSNorm of the streams, per-channel input weights from a low-rank
#: ``sigmoid(up(silu(down(x) / d)))``, the block input their mean, and ``inject = m * sigmoid(w(x) / d)``
#: (Qwen4-Exp's gated residual).
MixerForm = Literal["sigmoid", "sinkhorn", "gated"]
#: ``split``: the layers carry ``[B, S, n, hidden]``; ``flat``: ``[B, S, n * hidden]`` (stream-major).
StreamLayout = Literal["split", "flat"]


@dataclass(frozen=True)
class StreamMixerSpec:
    """One module that mixes the streams: a decoder layer's mixer before a block, or the head that
    folds the streams after the last layer. ``params`` maps each parameter role to its checkpoint
    name (relative to the module); ``constants`` maps each constant of the form to a config
    expression or a literal (``norm_eps``, ``eps``, ``post_scale``, ``post_eps``, ``iterations``,
    ``norm_offset``, ``divisor``, ``inject_scale``)."""

    attr: str
    form: MixerForm
    params: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, str], ...] = ()
    class_name: str = ""

    def constant(self, name: str) -> str | None:
        return dict(self.constants).get(name)

    def param(self, role: str) -> str | None:
        return dict(self.params).get(role)


@dataclass(frozen=True)
class HyperConnectionSpec:
    """The residual streams of a model: how many (``streams``, a config expression), how the layers
    lay them out, the mixers of each decoder layer in call order, and the head that folds them."""

    streams: str
    streams_value: int
    layout: StreamLayout
    mixers: tuple[StreamMixerSpec, ...]
    head: StreamMixerSpec

    @property
    def form(self) -> MixerForm:
        return self.mixers[0].form if self.mixers else self.head.form

    def describe(self) -> str:
        forms = {
            "sigmoid": "sigmoid pre/post weights",
            "sinkhorn": "sigmoid pre/post weights and a Sinkhorn residual mix",
            "gated": "gated low-rank input weights and sigmoid injection",
        }
        mixers = ", ".join(m.attr for m in self.mixers)
        return (
            f"{self.streams_value} residual streams ({self.streams}, {self.layout} layout) mixed by {mixers}"
            f" ({forms[self.form]}) and folded by {self.head.attr}"
        )
