"""accelerate placement: resident device maps score like one device; offloaded weights are refused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sample_text, save_tiny_model

from cwca_export.scoring import score


def test_device_map_with_resident_weights_matches_and_offload_is_refused(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=4)
    kwargs = dict(method="gradnorm", num_samples=4, seq_len=16, progress=False)
    text = [sample_text() * 4]
    reference = score(str(model_dir), text, **kwargs)
    placed = score(str(model_dir), text, device_map="auto", max_memory={"cpu": "1GiB"}, **kwargs)
    np.testing.assert_allclose(placed.zeta2, reference.zeta2, rtol=1e-5)
    # a cap below the model's size makes accelerate offload weights to disk: no gradients there
    with pytest.raises(ValueError, match="offloaded"):
        score(str(model_dir), text, device_map="auto", max_memory={"cpu": "200KiB"}, **kwargs)
