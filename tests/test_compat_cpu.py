"""The CPU compatibility layer: Megatron-Core GPTModel forward+backward under gloo, TP=2 and PP=2."""
import os
import re

import pytest
import torch

from conftest import torchrun

SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "compat_fwd_bwd.py")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is active only on CPU")


def test_install_is_idempotent_and_cpu_only():
    from megatron_jai.compat import cpu

    assert cpu.is_active()
    assert cpu.install() and cpu.install()
    assert torch.cuda.current_device() == "cpu"
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_gpt_forward_backward(tp, pp):
    out = torchrun(2, SCRIPT, tp, pp).stdout
    # Both ranks print to one pipe: their lines may interleave, so count the markers.
    assert sorted(re.findall(r"OK rank=(\d)", out)) == ["0", "1"], out
