"""The whole model under torch.compile(fullgraph=True): no graph breaks, same loss and gradients."""
import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_model_compiles_fullgraph_and_matches_eager(backend):
    torch.manual_seed(0)
    cfg = AIMv2Config.preset("tiny")
    model = AIMv2Model(cfg).train()
    images = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, cfg.vocab_size, (2, cfg.max_text_len))
    prefix = torch.tensor([3, cfg.num_patches - 1])
    ak.set_backend(backend)  # set_backend, not use_backend: a compiled backward runs outside any block

    eager = model(images, tokens, prefix)
    eager_grads = torch.autograd.grad(eager.total, list(model.parameters()))
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = compiled_model(images, tokens, prefix)
    compiled_grads = torch.autograd.grad(compiled.total, list(model.parameters()))

    for name in ("total", "pixel", "text"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
