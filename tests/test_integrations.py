"""aimv2_kernels.integrations: patched models compute what they computed before, forward and
backward, keep their weights and keys, and a call that patches nothing says so."""
import copy
import re
import warnings
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


def test_unsupported_head_dim_is_left_to_transformers_and_reported():
    model = Aimv2VisionModel(_vision_config(hidden_size=48, num_attention_heads=2))  # head dim 24
    with pytest.warns(UserWarning, match="head dim 24"):
        report = patch_transformers_aimv2(model)
    attention = [s for s in report if s.before == "Aimv2Attention"]
    # the attention layers only get prefix_len merged into transformers' mask, and the report says so
    assert [s.after for s in attention] == ["PrefixMaskedAimv2Attention"] * 2
    assert all("head dim 24" in s.runs and not s.runs.startswith("aimv2_kernels") for s in attention)
    assert all(s.runs == "aimv2_kernels" for s in report if s.before != "Aimv2Attention")
    table = str(report)
    assert len(table.splitlines()) == len(report) and "encoder.layers.1.attention" in table


# ---- prefix_len on every path: token 0 must not see the last patch ------------------------------

def _last_patch_leak(features_of, patch: int = 14) -> float:
    """max |d features[:, 0] / d pixels of the last patch|: exactly 0 when prefix_len=1 is honoured
    (token 0 then sees itself only), clearly > 0 when attention is bidirectional."""
    pixels = torch.randn(2, 3, 3 * patch, 3 * patch, generator=torch.Generator().manual_seed(5)).requires_grad_()
    features_of(pixels)[:, 0].sum().backward()
    return pixels.grad[..., -patch:, -patch:].abs().max().item()


HF_PATHS = {  # path -> (config changes, patch keywords, call keywords, train mode)
    "our kernel": ({}, {}, {}, False),
    "attention dropout": ({"attention_dropout": 0.5}, {}, {}, True),
    "attention_mask": ({}, {}, {"attention_mask": torch.ones(2, 1, 9, 9, dtype=torch.bool)}, False),
    "output_attentions": ({}, {}, {"output_attentions": True}, False),
    "head dim 8, skipped": ({"hidden_size": 16}, {}, {}, False),
    "attention=False": ({}, {"attention": False}, {}, False),
}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("path", list(HF_PATHS))
def test_transformers_prefix_len_is_kept_on_every_path(path, impl):
    config_kw, patch_kw, call_kw, train = HF_PATHS[path]
    model = _randomize(Aimv2VisionModel(_vision_config(**config_kw, attn_implementation=impl))).train(train)
    assert model.config._attn_implementation == impl
    assert _last_patch_leak(lambda px: model(px, **call_kw).last_hidden_state) > 1e-4  # unpatched: it leaks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped paths warn; what matters here is what runs
        patch_transformers_aimv2(model, **patch_kw)
    assert _last_patch_leak(lambda px: model(px, prefix_len=1, **call_kw).last_hidden_state) == 0


def test_prefix_len_with_an_unmergeable_attention_implementation_is_refused():
    model = Aimv2VisionModel(_vision_config(hidden_size=16, attn_implementation="sdpa"))  # head dim 8: skipped
    with pytest.warns(UserWarning):
        patch_transformers_aimv2(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix_len cannot be honoured by attn_implementation='flash_attention_2'"):
        model(torch.randn(1, 3, 42, 42), prefix_len=1)


@pytest.mark.parametrize("prefix_len", [None, 1])
def test_output_attentions_returns_one_map_per_layer(prefix_len):
    """transformers' own expectation: one (B, H, S, S) map per layer, as the unpatched model gives."""
    model = _randomize(Aimv2VisionModel(_vision_config(attn_implementation="eager")))
    reference = copy.deepcopy(model)
    patch_transformers_aimv2(model)
    pixels = torch.randn(2, 3, 42, 42)
    mask = None if prefix_len is None else ak.reference.prefix_visibility(9, torch.tensor([1, 1])).unsqueeze(1)
    with torch.no_grad():
        got = model(pixels, output_attentions=True, prefix_len=prefix_len)
        # eager adds its mask to the scores: the reference gets an additive one
        additive = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        want = reference(pixels, output_attentions=True, attention_mask=additive)
    assert len(got.attentions) == 2 and all(a.shape == (2, 2, 9, 9) for a in got.attentions)
    for layer, (a, b) in enumerate(zip(got.attentions, want.attentions)):
        assert_close(a, b, TOL, f"attention map of layer {layer}")
    if prefix_len is not None:
        assert (got.attentions[0][..., 0, 1:] == 0).all()  # token 0 sees itself only
    assert_close(got.last_hidden_state, want.last_hidden_state, TOL, "features")


# ---- modules whose forward a hook replaced -------------------------------------------------------

def _count_kernel_calls(monkeypatch) -> dict:
    """Counts the calls reaching our attention and RMSNorm ops from the patched modules."""
    from aimv2_kernels.integrations import fused
    from aimv2_kernels.ops import norm as norm_ops

    calls = {"attention": 0, "rms_norm": 0}

    def counted(name, op):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fused, "prefix_causal_attention", counted("attention", fused.prefix_causal_attention))
    monkeypatch.setattr(norm_ops, "rms_norm", counted("rms_norm", norm_ops.rms_norm))
    return calls


def test_accelerate_offloaded_model_runs_the_patch(monkeypatch):
    """A model whose modules carry accelerate's hooks (as from_pretrained(device_map=...) and offloading
    leave them) is patched through the hooks: our ops run and prefix_len holds."""
    accelerate = pytest.importorskip("accelerate")
    model = _randomize(Aimv2VisionModel(_vision_config()))
    reference = copy.deepcopy(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # weights on meta, loaded by the hooks
    assert any("_hf_hook" in vars(m) for m in model.modules())
    report = patch_transformers_aimv2(model)
    assert len(report) == 10
    calls = _count_kernel_calls(monkeypatch)
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        got = model(pixels).last_hidden_state
    assert calls == {"attention": 2, "rms_norm": 6}  # 2 layers x (attention, 2 norms), embedding and final norm
    assert_close(got, reference(pixels).last_hidden_state, TOL, "offloaded, patched features")
    assert _last_patch_leak(lambda px: model(px, prefix_len=1).last_hidden_state) == 0


def test_a_forward_replaced_on_the_instance_is_refused_before_anything_changes():
    model = Aimv2VisionModel(_vision_config())
    attention = model.encoder.layers[1].attention
    attention.forward = lambda *args, **kwargs: type(attention).forward(attention, *args, **kwargs)  # a wrapper
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.attention \(Aimv2Attention\) has its forward replaced"):
        patch_transformers_aimv2(model)
    assert [type(m) for m in model.modules()] == classes  # nothing was patched


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


def _timm_aimv2(**kw):
    """A small timm AIMv2 (3 x 3 patches, no class token) with random weights. timm imports torchvision,
    made importable in the tests by tests/torchvision_shim.py (see conftest.py)."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - timm also fails through its torchvision import
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})")
    base = dict(pretrained=False, img_size=42, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    return _randomize(timm.create_model("aimv2_large_patch14_224", **{**base, **kw}))


def test_timm_aimv2_patch():
    model = _timm_aimv2()
    reference = copy.deepcopy(model)
    swaps = patch_timm_aimv2(model)
    assert {s.before for s in swaps} == {"VisionTransformer", "RmsNorm", "SwiGLU", "Attention"}
    x = torch.randn(2, 3, 42, 42)
    got, want = model.forward_features(x), reference.forward_features(x)
    assert got.shape == (2, 9, 64)
    assert_close(got, want, TOL, "timm features")
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, TOL, f"grad of {name}")


def test_timm_prefix_len_matches_the_dense_mask():
    model = _timm_aimv2()
    reference = copy.deepcopy(model)
    patch_timm_aimv2(model)
    x, prefix = torch.randn(3, 3, 42, 42), torch.tensor([1, 4, 8])
    dense = ak.reference.prefix_visibility(9, prefix).unsqueeze(1)
    with torch.no_grad():
        want = reference.forward_features(x, attn_mask=dense)
        assert_close(model.forward_features(x, prefix_len=prefix), want, TOL, "prefix-causal features")
        assert_close(model(x, prefix_len=prefix), reference(x, attn_mask=dense), TOL, "prefix-causal pooled output")
        assert (want - reference.forward_features(x)).abs().max() > 1e-3  # the mask really changed something


TIMM_PATHS = {  # path -> (create_model changes, patch keywords, call keywords, train mode)
    "our kernel": ({}, {}, {}, False),
    "attention dropout": ({"attn_drop_rate": 0.5}, {}, {}, True),
    "attn_mask": ({}, {}, {"attn_mask": torch.ones(2, 1, 9, 9, dtype=torch.bool)}, False),
    "head dim 8, skipped": ({"embed_dim": 16}, {}, {}, False),
    "attention=False": ({}, {"attention": False}, {}, False),
}


@pytest.mark.parametrize("path", list(TIMM_PATHS))
def test_timm_prefix_len_is_kept_on_every_path(path):
    create_kw, patch_kw, call_kw, train = TIMM_PATHS[path]
    model = _timm_aimv2(**create_kw).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped paths warn; what matters here is what runs
        report = patch_timm_aimv2(model, **patch_kw)
    assert all(s.runs for s in report)
    assert _last_patch_leak(lambda px: model.forward_features(px, **call_kw)) > 1e-4  # no prefix: bidirectional
    assert _last_patch_leak(lambda px: model.forward_features(px, prefix_len=1, **call_kw)) == 0


def test_timm_prefix_len_with_gradient_checkpointing_is_refused():
    model = _timm_aimv2()
    patch_timm_aimv2(model)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="prefix_len cannot be combined with timm's gradient checkpointing"):
        model(torch.randn(1, 3, 42, 42), prefix_len=1)


# ---- docs ----------------------------------------------------------------------------------------

def test_plain_loop_example_in_the_docs_runs():
    """The first python block of docs/integrations.md (single ops in a plain PyTorch loop) runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/integrations.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["losses"][-1] < namespace["losses"][0]  # it trains
