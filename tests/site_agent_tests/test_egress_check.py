"""The finishing site's egress check refuses a non-finite or malformed adapter with the one-line
error the bundle codec gives, whichever way the codec reads the bundle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from protocols.checkpoint import CheckpointManifest, TensorSpec, bundle_metadata, sha256_hex
from site_agent.hop_runner import HopRunner
from site_agent.task_checks import HopFailure

MANIFEST = CheckpointManifest(task_type="seq-classification", base_model_sha256="ab" * 32,
                              run_id="r", hop_id="h", producer_site="site-a")  # fmt: skip


class _Declared:
    """A trainer as the egress check asks it: the adapter's declared tensors."""

    def trainable_state(self, spec: Any, dataset: Any) -> tuple[TensorSpec, ...]:
        return (TensorSpec("a", "F32", (2, 3)), TensorSpec("b", "F32", (4,)))


def _payload(**changes: np.ndarray) -> bytes:
    tensors = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32), **changes}
    return safetensors.numpy.save(tensors, metadata=bundle_metadata(MANIFEST, {"r": 8}))


def _egress(payload: bytes) -> str:
    return HopRunner._check_egress(_Declared(), None, None, payload, 1 << 20)  # type: ignore[arg-type]


def test_a_finite_adapter_of_the_declared_tensors_leaves_with_its_hash() -> None:
    payload = _payload()
    assert _egress(payload) == sha256_hex(payload)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_adapter_is_refused_at_egress_with_the_one_line_error(bad: float) -> None:
    values = np.zeros(4, np.float32)
    values[2] = bad
    with pytest.raises(HopFailure) as refused:
        _egress(_payload(b=values))
    assert refused.value.code == "egress-refused"
    assert str(refused.value) == "tensor 'b' holds NaN or infinite values"


def test_a_corrupt_or_undeclared_adapter_is_refused_at_egress() -> None:
    with pytest.raises(HopFailure, match="not a valid safetensors file") as refused:
        _egress(_payload()[:-2])
    assert refused.value.code == "egress-refused"
    with pytest.raises(HopFailure, match=r"declared trainable state \(undeclared: c\)"):
        _egress(_payload(c=np.ones(1, np.float32)))
