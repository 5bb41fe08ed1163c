"""The CUDA warm-up of ``Runner.run`` replays one batch of each shape the timed run will see, so the
prefill graph of each padded width and the decode graphs of each batch size are captured before it."""

from __future__ import annotations

from onboardlm.runtime.runner import _first_of_each_shape


def test_one_batch_per_size_and_width_in_first_seen_order() -> None:
    a, b, c, d = [1, 2, 3], [4, 5], [6] * 9, [7, 8, 9]
    batches = [[a, b], [b, a], [c, a], [d], [b]]
    warmed = _first_of_each_shape(batches)
    assert warmed == [[a, b], [c, a], [d], [b]]  # [b, a] has the shape (2, 3) of [a, b]
    shapes = {(len(batch), max(map(len, batch))) for batch in batches}
    assert {(len(batch), max(map(len, batch))) for batch in warmed} == shapes
