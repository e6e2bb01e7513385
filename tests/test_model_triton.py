"""The model on the "triton" backend equals the eager reference model: on CPU the Triton kernels run in
Triton's interpreter (kernels not registered for "triton" fall back to "torch"), so the model is kept
to one block each side and a batch of two."""
import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Model
from aimv2.reference_model import ReferenceAIMv2Model
from helpers import assert_close
from test_model import assert_same_loss_and_grads, randomize_norms

# fp32 with Triton dots, which may round operands to tf32 on a GPU
TOL = 3e-4


@pytest.mark.skipif(ak.unavailable_reason("triton") is not None, reason="the triton backend cannot run here")
def test_model_on_triton_matches_eager_reference(device):
    cfg = AIMv2Config.preset("tiny", enc_depth=1, dec_depth=1, max_text_len=12)
    model = AIMv2Model(cfg).to(device)
    randomize_norms(model)
    reference = ReferenceAIMv2Model(cfg).to(device)
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size, (2, cfg.max_text_len), device=device)
    tokens[1, 8:] = cfg.pad_id
    prefix = torch.tensor([3, 40], device=device)

    with ak.use_backend("triton"):
        ours = model(images, tokens, prefix)
        theirs = reference(images, tokens, prefix)  # plain PyTorch: no aimv2_kernels op inside
        assert_same_loss_and_grads(model, ours, reference, theirs, TOL, 3 * TOL)
        with torch.no_grad():  # inference path: bidirectional encoder
            assert_close(model.encoder(images), reference.encoder(images), TOL, "bidirectional features")
