"""PyTorch helpers (edgeq/sources/torch_util.py): a tiny seeded module converted by the real
litert-torch and run by the real LiteRT interpreter; tensor names read back from the file."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require_module

for _mod in ("torch", "litert_torch"):
    require_module(_mod, "the [hf] extra: pip install 'edgeq[hf]'")

import torch  # noqa: E402

from edgeq import tflite_edit as te  # noqa: E402
from edgeq.fidelity import run_model  # noqa: E402
from edgeq.sources.torch_util import litert_convert, short_tensor_names  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + torch.relu(self.proj(x)))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


def _names(model: bytes) -> list[str]:
    return [te.tensor_name(t) for t in te.load(model).subgraphs[0].tensors]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    module = Tiny().eval()
    x = torch.randn(2, 16)
    return module, x, litert_convert(module, (x,), what="tiny", hint="")


def test_converted_names_drop_module_paths_and_keep_class_and_attribute(tiny):
    """litert-torch names every tensor by the qualified class of each module on its path; the file
    keeps the class and attribute names (what a reader of the graph needs) and drops the paths."""
    module, x, model = tiny
    names = _names(model)
    assert not any("torch.nn.modules" in n or "test_torch_util." in n for n in names), names
    assert any("Sequential_blocks/Block_0/Linear_proj" in n for n in names), names
    assert any("Block_1/LayerNorm_norm" in n for n in names), names
    # The same model: the output is PyTorch's.
    out = next(iter(run_model(model, [{"args_0": x.numpy()}]).values()))
    np.testing.assert_allclose(out, module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_short_names_are_smaller_and_leave_the_graph_alone(tiny):
    _, x, model = tiny
    m = te.load(model)
    for t in m.subgraphs[0].tensors:  # as litert-torch wrote them
        t.name = te.tensor_name(t).replace("Block_", "tests.test_torch_util.Block_").replace(
            "Linear_", "torch.nn.modules.linear.Linear_").encode()
    long = te.pack(m)
    short = short_tensor_names(long)
    assert len(short) < len(long) - 200
    assert _names(short) == _names(te.pack(te.load(model)))
    a, b = (next(iter(run_model(mm, [{"args_0": x.numpy()}]).values())) for mm in (long, short))
    np.testing.assert_array_equal(a, b)


def test_names_that_would_collide_are_left_as_they_are(tiny):
    _, _, model = tiny
    m = te.load(model)
    tensors = m.subgraphs[0].tensors
    tensors[0].name, tensors[1].name = b"pkg.one.Same_x", b"pkg.two.Same_x"  # both would become Same_x
    before = te.pack(m)
    assert short_tensor_names(before) == before
