"""aimv2-export and AIMv2Encoder.from_pretrained: a training checkpoint becomes a folder that
transformers' Aimv2VisionModel loads without a warning and with the same features, and that we read
back, as we read folders transformers writes. Everything is built from tiny configs: nothing is
downloaded. Tests that need transformers skip without it."""
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import warnings

import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Encoder, AIMv2Model
from aimv2 import checkpoint as ckpt
from aimv2.export import export_encoder, main, transformers_config_dict
from aimv2.interop import transformers_config_kwargs
from helpers import assert_close
from optional import import_or_skip

LEARNED = AIMv2Config.preset("tiny", enc_depth=2, dec_depth=1)
NATIVE = AIMv2Config.preset("tiny", enc_depth=2, dec_depth=1, native=True)
CONFIGS = {"learned": LEARNED, "native": NATIVE}
CONFIG_KEYS = {"architectures", "attention_dropout", "dtype", "hidden_act", "hidden_size", "image_size",
               "initializer_range", "intermediate_size", "is_native", "mlp_bias", "model_type",
               "num_attention_heads", "num_channels", "num_hidden_layers", "patch_size", "qkv_bias",
               "rms_norm_eps", "use_head"}


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


def _transformers():
    transformers = import_or_skip("transformers")
    import_or_skip("transformers", "Aimv2VisionModel")
    return transformers


def _randomize(module: torch.nn.Module) -> None:
    """Every weight random, norms included, so a swapped or dropped tensor shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


def _save_trained_checkpoint(config: AIMv2Config, out_dir, step: int = 7) -> tuple[str, AIMv2Model]:
    """A checkpoint in the trainer's format (the keys `Trainer.save` writes) of a random model."""
    model = AIMv2Model(config)
    _randomize(model)
    path = ckpt.checkpoint_path(str(out_dir), step)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint({
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {},
        "rng": ckpt.capture_rng_state(), "data": {"position": step}, "train_config": {"preset": "tiny"},
        "model_config": dataclasses.asdict(config), "metrics": {"skipped": 0},
    }, path)
    return path, model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(kind, run dir, our encoder in eval mode, export folder) for a learned and a native model."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    with ak.use_backend("torch"):
        torch.manual_seed(0)
        _, model = _save_trained_checkpoint(CONFIGS[request.param], root / "run")
        out = export_encoder(root / "run", root / "export")
    return request.param, root / "run", model.encoder.eval(), out


@contextlib.contextmanager
def _transformers_messages():
    """Every warning and every transformers log record at WARNING or above, while the block runs.
    transformers' logger does not propagate to the root logger, so caplog would miss it."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    logger, handler = logging.getLogger("transformers"), Collect(level=logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _load_in_transformers(folder):
    transformers = _transformers()
    with _transformers_messages() as messages:
        model, info = transformers.Aimv2VisionModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    assert messages == []
    return model.eval()


def _safetensors(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


# ---- what the export writes ----------------------------------------------------------------------

def test_export_writes_a_config_and_the_encoder_weights(exported):
    kind, _, encoder, out = exported
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert [e for e in os.listdir(os.path.dirname(out)) if e.startswith(".")] == []  # no temporary left
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert set(config) == CONFIG_KEYS
    assert config["model_type"] == "aimv2_vision_model" and config["architectures"] == ["Aimv2VisionModel"]
    assert config["use_head"] is False and config["is_native"] is (kind == "native") and config["dtype"] == "float32"
    assert {k: config[k] for k in transformers_config_kwargs(encoder.config)} == transformers_config_kwargs(encoder.config)
    metadata, tensors = _safetensors(out)
    assert metadata == {"format": "pt"}
    _assert_same_state(tensors, {k: v.detach() for k, v in encoder.to_transformers_state_dict().items()})
    assert ("embeddings.position_embedding.weight" in tensors) is (kind == "learned")


def test_transformers_loads_the_export_without_warnings_and_gives_our_features(exported):
    kind, _, encoder, out = exported
    hf = _load_in_transformers(out)
    assert hf.config.is_native is (kind == "native") and not hf.config.use_head
    with torch.no_grad():
        if kind == "learned":
            images = torch.randn(3, 3, 32, 32)
            assert_close(encoder(images), hf(pixel_values=images).last_hidden_state, 1e-5, "features")
        else:  # two sizes: ours packed in one pass, transformers one image at a time
            images = [torch.randn(3, 16, 40), torch.randn(3, 36, 12)]
            per_image, _ = encoder.features(images)
            for i, image in enumerate(images):
                expected = hf(pixel_values=image.unsqueeze(0)).last_hidden_state[0]
                assert per_image[i].shape == expected.shape
                assert_close(per_image[i], expected, 1e-5, f"image {i} features")


def test_from_pretrained_reads_our_export(exported):
    _, _, encoder, out = exported
    loaded = AIMv2Encoder.from_pretrained(out)
    assert not loaded.training and not any(p.is_meta for p in loaded.parameters())
    assert loaded.config.native == encoder.config.native and loaded.config.enc_depth == 2
    _assert_same_state(loaded.state_dict(), encoder.state_dict())
    double = AIMv2Encoder.from_pretrained(out, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in double.parameters())


def test_a_bfloat16_export_holds_bfloat16_tensors(exported, tmp_path):
    _, run, encoder, _ = exported
    out = export_encoder(run, tmp_path / "bf16", dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    _, tensors = _safetensors(out)
    expected = {k: v.detach().to(torch.bfloat16) for k, v in encoder.to_transformers_state_dict().items()}
    _assert_same_state(tensors, expected)
    loaded = AIMv2Encoder.from_pretrained(out)
    _assert_same_state(loaded.state_dict(), {k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()})
    hf = _load_in_transformers(out)
    assert all(torch.equal(hf.state_dict()[k].to(torch.bfloat16), v) for k, v in expected.items())


def test_a_trainer_checkpoint_exports(tmp_path):
    """One real training step, so the checkpoint is exactly what aimv2-train writes."""
    from aimv2.train import train
    from aimv2.train_config import TrainConfig

    run = tmp_path / "run"
    train(TrainConfig(model={"enc_depth": 2, "dec_depth": 1}, max_text_len=16, steps=1, batch_size=4, workers=0,
                      progress=False, ckpt_every=1, keep_checkpoints=0, out=str(run), backend="torch",
                      eval_samples=0, prediction_images=0))
    assert os.path.isfile(run / "config.json")  # the run's own config.json: not mistaken for a model folder
    out = export_encoder(run, tmp_path / "export")
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(run)))["model"]
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    _assert_same_state(AIMv2Encoder.from_pretrained(out).state_dict(), encoder_state)
    with pytest.raises(FileNotFoundError, match="training run directory"):
        AIMv2Encoder.from_pretrained(run)
    try:
        _transformers()
    except pytest.skip.Exception:
        return
    _load_in_transformers(out)


# ---- reading folders others wrote ------------------------------------------------------------------

def _hf_vision_model(config: AIMv2Config, use_head: bool = True):
    transformers = _transformers()
    kwargs = transformers_config_kwargs(config) | dict(use_head=use_head)
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**kwargs)).eval()
    _randomize(model)
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("shards", [False, True])
def test_from_pretrained_reads_a_transformers_folder(tmp_path, kind, shards):
    """save_pretrained of Aimv2VisionModel with its pooling head (dropped), in one file or sharded."""
    hf = _hf_vision_model(CONFIGS[kind], use_head=True)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shards else "5GB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") is shards
    loaded = AIMv2Encoder.from_pretrained(tmp_path)
    _assert_same_state(loaded.state_dict(), AIMv2Encoder.from_transformers(hf).state_dict())


def test_from_pretrained_reads_a_full_aimv2_model_folder(tmp_path):
    """A CLIP-style Aimv2Model (vision + text + projections), as the released -lit checkpoints: only
    the vision_model weights are read."""
    transformers = _transformers()
    config = transformers.Aimv2Config(
        vision_config=transformers_config_kwargs(LEARNED) | dict(use_head=True),
        text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=63),
        projection_dim=32)
    model = transformers.Aimv2Model(config).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "aimv2"
    loaded = AIMv2Encoder.from_pretrained(tmp_path)
    _assert_same_state(loaded.state_dict(), AIMv2Encoder.from_transformers(model.vision_model).state_dict())


def test_from_pretrained_reads_pytorch_model_bin(exported, tmp_path):
    _, _, encoder, out = exported
    _, tensors = _safetensors(out)
    shutil.copy(os.path.join(out, "config.json"), tmp_path / "config.json")
    torch.save(tensors | {"head.cls_token": torch.zeros(1, 1, 64)}, tmp_path / "pytorch_model.bin")
    _assert_same_state(AIMv2Encoder.from_pretrained(tmp_path).state_dict(), encoder.state_dict())


def _fake_hub_cache(cache, repo_id: str, folder) -> None:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_from_pretrained_finds_a_repo_in_the_local_hub_cache_only(exported, tmp_path):
    import_or_skip("huggingface_hub")
    _, _, encoder, out = exported
    _fake_hub_cache(tmp_path, "someone/aimv2-tiny", out)
    loaded = AIMv2Encoder.from_pretrained("someone/aimv2-tiny", cache_dir=tmp_path)
    _assert_same_state(loaded.state_dict(), encoder.state_dict())
    with pytest.raises(FileNotFoundError, match=r"neither a local directory nor a repo in the local Hugging Face hub cache.*hf download apple/aimv2"):
        AIMv2Encoder.from_pretrained("apple/aimv2-large-patch14-224", cache_dir=tmp_path / "empty")


# ---- errors ------------------------------------------------------------------------------------------

def test_from_pretrained_names_what_is_missing(exported, tmp_path):
    _, _, _, out = exported
    with pytest.raises(FileNotFoundError, match="no such directory"):
        AIMv2Encoder.from_pretrained(tmp_path / "nowhere" / "export")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AIMv2Encoder.from_pretrained(tmp_path / "empty")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(os.path.join(out, "config.json"), only_config / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        AIMv2Encoder.from_pretrained(only_config)


def _edited_copy(out, tmp_path, config_edit=None, weights_edit=None):
    from safetensors.torch import save_file

    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    if config_edit:
        config = json.loads((copy / "config.json").read_text())
        config_edit(config)
        (copy / "config.json").write_text(json.dumps(config))
    if weights_edit:
        _, tensors = _safetensors(copy)
        weights_edit(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(qkv_bias=True), "qkv_bias"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(model_type="vit"), "not an AIMv2 vision config"),
    (lambda c: c.update(model_type="aimv2"), "remote-code"),
])
def test_from_pretrained_refuses_unsupported_configs(exported, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        AIMv2Encoder.from_pretrained(_edited_copy(exported[3], tmp_path, config_edit=edit))


def test_from_pretrained_refuses_weights_that_do_not_match(exported, tmp_path):
    copy = _edited_copy(exported[3], tmp_path, weights_edit=lambda t: t.pop("rms_norm.weight"))
    with pytest.raises(ValueError, match=r"missing \['rms_norm.weight'\]"):
        AIMv2Encoder.from_pretrained(copy)


def test_export_refuses_a_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        export_encoder(tmp_path / "step_00000001.pt", tmp_path / "out")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        export_encoder(tmp_path / "empty-run", tmp_path / "out")
    path, _ = _save_trained_checkpoint(LEARNED, tmp_path / "run")
    with open(path, "r+b") as f:  # one flipped byte: the checksum catches it
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        export_encoder(path, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_export_refuses_a_non_empty_out_dir_unless_overwrite(exported, tmp_path):
    _, run, encoder, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    export_encoder(run, out)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        export_encoder(run, out, dtype="float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # untouched
    export_encoder(run, out, dtype="float16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the old export nor a temporary left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not look like a model export"):
        export_encoder(run, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_crash_while_writing_leaves_no_export(exported, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export_encoder(exported[1], tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_re_export_of_an_export_changes_the_dtype(exported, tmp_path):
    _, _, encoder, out = exported
    again = export_encoder(out, tmp_path / "fp16", dtype=torch.float16)
    _, tensors = _safetensors(again)
    _assert_same_state(tensors, {k: v.detach().half() for k, v in encoder.to_transformers_state_dict().items()})


def test_the_config_dict_is_what_transformers_writes():
    transformers = _transformers()
    for config in CONFIGS.values():
        written = transformers.Aimv2VisionConfig(**transformers_config_kwargs(config)).to_dict()
        ours = transformers_config_dict(config)
        assert {k: written[k] for k in ours if k not in ("architectures", "dtype")} == \
               {k: v for k, v in ours.items() if k not in ("architectures", "dtype")}


# ---- command line ------------------------------------------------------------------------------------

def test_cli(exported, tmp_path, capsys):
    _, run, _, _ = exported
    assert main([str(run), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "bfloat16" in printed and "step 7" in printed
    _, tensors = _safetensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert main([str(run), str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "out2")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run), str(tmp_path / "out3"), "--dtype", "int8"])
