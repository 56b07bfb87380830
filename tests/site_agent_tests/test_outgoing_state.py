"""A hop's outgoing tensors: float32 CPU copies of the trained state, refused if not finite."""

from __future__ import annotations

import pytest
import torch

from site_agent.tasks._state import outgoing


def test_outgoing_tensors_are_contiguous_float32_copies_in_name_order() -> None:
    trained = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    state = {"b": trained.t(), "a": torch.ones(2)}  # "b" is a transposed (strided) view
    sent = outgoing(state)
    assert list(sent) == ["a", "b"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sent.values())
    assert torch.equal(sent["b"], trained.t().float())
    trained.zero_()  # training goes on after the hand back: what was sent stays as it was
    state["a"].fill_(5)
    assert sent["b"].sum().item() == sum(range(12)) and torch.equal(sent["a"], torch.ones(2))


def test_outgoing_tensors_name_each_non_finite_one() -> None:
    state = {f"t{i}": torch.ones(3) for i in range(4)}
    state["t1"][0] = float("nan")
    state["t3"][2] = float("-inf")
    with pytest.raises(ValueError, match=r"non-finite values in \['t1', 't3'\]"):
        outgoing(state)
