"""aimv2_kernels.integrations: patched models compute what they computed before, forward and
backward, keep their weights and keys, and a call that patches nothing says so."""
import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import aimv2_kernels as ak
from aimv2_kernels.integrations import NothingPatchedError, patch_timm_aimv2, patch_transformers_aimv2, swap_modules
from helpers import assert_close
from optional import import_or_skip

Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel = import_or_skip(
    "transformers", "Aimv2Config", "Aimv2Model", "Aimv2VisionConfig", "Aimv2VisionModel")

BACKENDS = ["torch", "triton"]  # "triton" runs the kernels in the interpreter on CPU
TOL = 2e-5  # fp32, with reduction orders that differ from eager PyTorch's


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere (norm weights around 1), so no test passes on ones and zeros."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and "norm" in name else 0.1 * noise)
    return model


def _vision_config(**kw):
    # 3 x 3 = 9 patches (not a power of two), head dim 32, an odd SwiGLU width
    base = dict(hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=2, image_size=42,
                patch_size=14, rms_norm_eps=1e-5)
    return Aimv2VisionConfig(**{**base, **kw})


def _features_and_grads(model, pixels, **kw):
    out = model(pixels, **kw)
    # not randn_like: transformers' features are a transposed view, ours are contiguous
    cotangent = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(3))
    loss = (out.last_hidden_state * cotangent).sum() + out.pooler_output.square().sum()
    loss.backward()
    return out.last_hidden_state.detach(), out.pooler_output.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_vision_model_matches_unpatched(backend):
    model = _randomize(Aimv2VisionModel(_vision_config()))
    reference = copy.deepcopy(model)
    swaps = patch_transformers_aimv2(model)
    # per layer: 2 norms, MLP, attention; plus the patch-embedding norm and the final norm
    assert len(swaps) == 2 * 4 + 2
    assert {s.before for s in swaps} == {"Aimv2RMSNorm", "Aimv2MLP", "Aimv2Attention"}
    assert isinstance(model.encoder.layers[0].attention, type(reference.encoder.layers[0].attention))

    pixels = torch.randn(3, 3, 42, 42)
    with ak.use_backend(backend):
        feats, pooled, grads = _features_and_grads(model, pixels)
    want_feats, want_pooled, want_grads = _features_and_grads(reference, pixels)
    assert_close(feats, want_feats, TOL, "last_hidden_state")
    assert_close(pooled, want_pooled, TOL, "pooler_output")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, TOL, f"grad of {name}")


def test_patch_keeps_parameters_keys_and_state_dict_round_trip():
    model = _randomize(Aimv2VisionModel(_vision_config()))
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    patch_transformers_aimv2(model)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # an optimizer built before still works
    assert list(model.state_dict()) == keys_before
    fresh = Aimv2VisionModel(_vision_config())
    fresh.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 42, 42)
    assert_close(model(pixels).last_hidden_state, fresh(pixels).last_hidden_state, TOL, "reloaded")


def test_patched_attention_takes_prefix_len():
    """model(pixels, prefix_len=m) equals the unpatched model given the dense prefix-causal mask."""
    model = _randomize(Aimv2VisionModel(_vision_config()))
    reference = copy.deepcopy(model)
    patch_transformers_aimv2(model)
    pixels, prefix = torch.randn(3, 3, 42, 42), torch.tensor([1, 4, 8])
    dense = ak.reference.prefix_visibility(9, prefix).unsqueeze(1)  # (B, 1, S, S) bool, True = visible
    with torch.no_grad():
        got = model(pixels, prefix_len=prefix).last_hidden_state
        want = reference(pixels, attention_mask=dense).last_hidden_state
        bidirectional = reference(pixels).last_hidden_state
    assert_close(got, want, TOL, "prefix-causal features")
    assert (got - bidirectional).abs().max() > 1e-3  # the mask really changed something


def test_full_model_patches_only_its_vision_tower():
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                eos_token_id=2)
    model = _randomize(Aimv2Model(Aimv2Config(vision_config=_vision_config().to_dict(), text_config=text)))
    reference = copy.deepcopy(model)
    swaps = patch_transformers_aimv2(model)
    assert swaps and all(s.name.startswith("vision_model.") for s in swaps)
    assert type(model.text_model.encoder.layers[0].ffn) is type(reference.text_model.encoder.layers[0].ffn)
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert_close(model.get_image_features(pixels).pooler_output, reference.get_image_features(pixels).pooler_output,
                     TOL, "image features")


def test_patching_twice_or_the_wrong_model_is_reported():
    model = Aimv2VisionModel(_vision_config())
    patch_transformers_aimv2(model)
    with pytest.raises(NothingPatchedError, match="already patched"):
        patch_transformers_aimv2(model)
    with pytest.warns(UserWarning, match="patched nothing"):
        assert patch_transformers_aimv2(model, strict=False) == []
    with pytest.raises(TypeError, match="Aimv2VisionModel"):
        patch_transformers_aimv2(nn.Linear(4, 4))


def test_unsupported_head_dim_is_left_alone_with_a_warning():
    model = Aimv2VisionModel(_vision_config(hidden_size=48, num_attention_heads=2))  # head dim 24
    with pytest.warns(UserWarning, match="head dim 24"):
        swaps = patch_transformers_aimv2(model)
    assert swaps and not any(s.before == "Aimv2Attention" for s in swaps)


# ---- swap_modules --------------------------------------------------------------------------------

class LlamaStyleMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, dim, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ReleasedSwiGLUFFN(nn.Module):  # the released AIMv2 FFN layout: fc1 gate, fc3 up, fc2 down
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc3, self.fc2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.silu(self.fc1(x)) * self.fc3(x))


class GeluMLP(LlamaStyleMLP):  # same shape, other activation: must be passed over
    def __init__(self, dim, hidden):
        super().__init__(dim, hidden)
        self.act_fn = nn.GELU()


class Nested(nn.Module):
    def __init__(self, dim=24, hidden=40):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"norm": nn.RMSNorm(dim), "mlp": LlamaStyleMLP(dim, hidden)}),  # eps=None: machine eps
            nn.ModuleDict({"norm": nn.RMSNorm(dim, elementwise_affine=False), "mlp": ReleasedSwiGLUFFN(dim, hidden)}),
        ])
        self.other = nn.Sequential(nn.RMSNorm((3, dim)), GeluMLP(dim, hidden))

    def forward(self, x):
        x = self.norm(x)
        for block in self.blocks:
            x = x + block["mlp"](block["norm"](x))
        return self.other[1](self.other[0](x.reshape(-1, 3, x.shape[-1])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_modules_replaces_nested_norms_and_swiglus(backend):
    model = _randomize(Nested())
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"other\.0 .*normalized_shape.*other\.1 .*GELU"):
        swaps = ak.swap_modules(model)
    assert [(s.name, s.before) for s in swaps] == [
        ("norm", "RMSNorm"), ("blocks.0.norm", "RMSNorm"), ("blocks.0.mlp", "LlamaStyleMLP"),
        ("blocks.1.norm", "RMSNorm"), ("blocks.1.mlp", "ReleasedSwiGLUFFN")]
    x = torch.randn(2, 6, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with ak.use_backend(backend):
        out = model(x)
        out.square().sum().backward()
    want = reference(x_ref)
    want.square().sum().backward()
    assert_close(out, want, TOL, "output")
    assert_close(x.grad, x_ref.grad, TOL, "input grad")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, TOL, f"grad of {name}")


def test_swap_modules_on_a_model_without_matches_says_so():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    with pytest.raises(NothingPatchedError, match="patched nothing in Sequential.*LayerNorm"):
        swap_modules(model)
    with pytest.warns(UserWarning, match="patched nothing"):
        assert swap_modules(model, strict=False) == []
    with pytest.raises(TypeError, match="torch.nn.Module"):
        swap_modules("not a model")


def test_swap_modules_leaves_our_own_modules_alone():
    model = nn.Sequential(ak.nn.RMSNorm(16), ak.nn.SwiGLU(16, 32))
    with pytest.raises(NothingPatchedError):
        swap_modules(model)


def test_timm_aimv2_patch():
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - timm also fails through its torchvision import
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})")
    model = _randomize(timm.create_model("aimv2_large_patch14_224", pretrained=False, img_size=42, embed_dim=64,
                                         depth=2, num_heads=2, num_classes=0))
    reference = copy.deepcopy(model)
    swaps = patch_timm_aimv2(model)
    assert {s.before for s in swaps} == {"RmsNorm", "SwiGLU", "Attention"}
    x = torch.randn(2, 3, 42, 42)
    got, want = model.forward_features(x), reference.forward_features(x)
    assert_close(got, want, TOL, "timm features")
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, TOL, f"grad of {name}")


# ---- docs ----------------------------------------------------------------------------------------

def test_plain_loop_example_in_the_docs_runs():
    """The first python block of docs/integrations.md (single ops in a plain PyTorch loop) runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["losses"][-1] < namespace["losses"][0]  # it trains
