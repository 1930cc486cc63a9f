"""The model file: bit-exact round trip, and a clear refusal for every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factory import make_model_file
from model_factory import read_model_file as _read
from model_factory import rewrite_model_file as _rewrite
from safetensors.torch import save_file

from TextureStarGANCore import model_file as ckpt
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.model_file import (
    CARD_FIELDS,
    FORMAT_VERSION,
    ModelFileError,
    compute_domain_styles,
    instantiate,
    load_model_file,
    make_model_card,
    save_model_file,
    weights_from_networks,
)
from TextureStarGANCore.networks import build_networks
from TextureStarGANCore.preprocessing import PreprocessSpec

torch.set_num_threads(min(2, torch.get_num_threads()))

# Narrow networks: the checks are about the file, not the model size.
TINY = ModelConfig.small(num_domains=3, base_width=8, max_width=32, mapping_hidden=32, style_dim=16)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "good.safetensors", config=TINY)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(path: Path, *patterns: str) -> str:
    before = _sha(path) if path.is_file() else None
    with pytest.raises(ModelFileError) as info:
        load_model_file(path)
    msg = str(info.value)
    for p in patterns:
        assert p.lower() in msg.lower(), f"{p!r} not in: {msg}"
    if before is not None:
        assert _sha(path) == before  # loading never modifies the file
    return msg


# ----------------------------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(3)
    nets = build_networks(TINY)
    styles = compute_domain_styles(nets["mapping_network"], TINY.num_domains, num_latents=64, seed=5)
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=3.0)
    card = make_model_card(
        config=TINY,
        domains=DEFAULT_SIMULATED_DOMAINS,
        preprocessing=spec,
        training={
            "data": "sim", "iterations": 1200, "texture_loss": True, "code_version": "abc", "config": {}
        },
        num_latents=64,
        style_seed=5,
        metrics={"fid": {"B30f->BONE": 12.5}},
    )
    path = save_model_file(
        tmp_path / "m.safetensors", config=TINY, weights=weights_from_networks(nets), domain_styles=styles,
        card=card,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the umask decides, as for every other output

    mf = load_model_file(path)
    assert mf.config == TINY and mf.preprocessing == spec and mf.trained
    assert mf.domains == list(DEFAULT_SIMULATED_DOMAINS)
    assert mf.card == json.loads(json.dumps(card)) and mf.card["format_version"] == FORMAT_VERSION
    assert torch.equal(mf.domain_styles, styles)
    for net in ("generator", "mapping_network", "style_encoder"):
        original = nets[net].state_dict()
        assert mf.state_dicts[net].keys() == original.keys()
        for k, v in original.items():
            assert torch.equal(mf.state_dicts[net][k], v), f"{net}.{k}"

    loaded = instantiate(mf)
    assert set(loaded) == {"generator", "mapping_network", "style_encoder"}
    assert all(not m.training for m in loaded.values())
    assert all(not p.requires_grad for m in loaded.values() for p in m.parameters())
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(loaded["generator"](x, styles[:2]), nets["generator"].eval()(x, styles[:2]))


def test_domain_styles_are_the_seeded_mean_of_mapping_styles() -> None:
    torch.manual_seed(0)
    f = build_networks(TINY)["mapping_network"]
    a = compute_domain_styles(f, 3, num_latents=300, seed=7, batch=128)
    b = compute_domain_styles(f, 3, num_latents=300, seed=7, batch=300)
    assert a.shape == (3, TINY.style_dim) and torch.allclose(a, b, atol=1e-6)
    z = torch.randn(300, TINY.latent_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        direct = f(z, torch.full((300,), 1, dtype=torch.long)).mean(0)
    assert torch.allclose(a[1], direct, atol=1e-5)
    assert not torch.allclose(a, compute_domain_styles(f, 3, num_latents=300, seed=8), atol=1e-4)


def test_factory_file_is_valid_and_untrained(good_file: Path) -> None:
    mf = load_model_file(good_file)
    assert not mf.trained and mf.card["training"]["iterations"] == 0
    assert [d.name for d in mf.domains] == ["B30f", "BONE", "STANDARD"]
    assert mf.preprocessing.canvas_size == TINY.img_size
    # Same seed -> same file contents (weights and styles).
    again = make_model_file(good_file.with_name("again.safetensors"), config=TINY)
    assert _read(again)[1]["weights_sha256"] == _read(good_file)[1]["weights_sha256"]


# ----------------------------------------------------------------------------------------------- refusals
def test_missing_file_and_folder(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.safetensors", "not found")
    _refused(tmp_path, "not a file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _refused(tmp_path / "empty.safetensors", "empty")


def test_default_model_path_message() -> None:
    if ckpt.DEFAULT_MODEL_PATH.exists():
        pytest.skip("a default model is bundled")
    with pytest.raises(ModelFileError, match="not been trained yet"):
        load_model_file(None)


class _Booby:
    """Unpickling this creates a marker folder: proof of whether a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pickle_file_is_refused_without_unpickling(tmp_path: Path, monkeypatch, zipped: bool) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"  # the name lies; the content decides
    torch.save({"generator": _Booby(marker)}, path, _use_new_zipfile_serialization=zipped)

    def forbidden(*a, **k):
        raise AssertionError("a deserializer that can run code was called")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    _refused(path, "pickle", "not loaded", "safetensors")
    assert not marker.exists()


def test_plain_pickle_and_other_formats(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    p.write_bytes(pickle.dumps({"a": 1}))
    _refused(p, "pickle")
    np.save(tmp_path / "b.npy", np.zeros(3))
    _refused(tmp_path / "b.npy", "numpy")
    (tmp_path / "c.safetensors").write_text("hello world, not a model at all")
    _refused(tmp_path / "c.safetensors", "not a safetensors file")


def test_truncated_files_are_refused(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    for cut in (4, 8 + header_len // 2, 8 + header_len + 10, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        _refused(p, "truncated or corrupt")


def test_corrupt_bytes_are_refused(good_file: Path, tmp_path: Path) -> None:
    data = bytearray(good_file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[8 + header_len + 1000] ^= 0x10  # inside the weights: parses, but the checksum catches it
    p = tmp_path / "flip.safetensors"
    p.write_bytes(bytes(flipped))
    _refused(p, "corrupt", "checksum")
    broken = bytearray(data)
    broken[8 + 1 : 8 + 4] = b"\x00\xff\x01"  # garbage inside the JSON header
    p2 = tmp_path / "header.safetensors"
    p2.write_bytes(bytes(broken))
    _refused(p2, "corrupt")


def test_unknown_format_version(good_file: Path, tmp_path: Path) -> None:
    p = _rewrite(good_file, tmp_path / "v2.safetensors", card=lambda c: c.update(format_version=2))
    _refused(p, "format version 2", "not supported", "update")


def test_not_a_harmonization_model(good_file: Path, tmp_path: Path) -> None:
    p = _rewrite(good_file, tmp_path / "f.safetensors", metadata=lambda m: m.update(format="other"))
    _refused(p, "not a CT harmonization model")
    p = _rewrite(good_file, tmp_path / "j.safetensors", metadata=lambda m: m.update(model_card="{oops"))
    _refused(p, "not valid JSON")
    ts, _ = _read(good_file)
    save_file(ts, str(tmp_path / "nometa.safetensors"))
    _refused(tmp_path / "nometa.safetensors", "not a CT harmonization model")


@pytest.mark.parametrize("field", CARD_FIELDS)
def test_missing_card_field(good_file: Path, tmp_path: Path, field: str) -> None:
    p = _rewrite(good_file, tmp_path / "m.safetensors", card=lambda c: c.pop(field))
    _refused(p, "missing field", field)


def _set(path: str, value) -> Callable[[dict], None]:
    def change(card: dict) -> None:
        *parents, last = path.split(".")
        d = card
        for k in parents:
            d = d[int(k)] if k.isdigit() else d[k]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("architecture.img_size", 100, "power of 2"),
        ("architecture.style_dim", _DELETE, None),  # default 64 then disagrees with the 16-wide tensors
        ("domains.1.kernel", _DELETE, "kernel"),
        ("domains.1.id", 5, "ids must be 0..2"),
        ("domains.2.name", "b30F", "unique"),
        ("preprocessing.canvas_size", 70, "multiple of 4"),
        ("preprocessing.hu_window", [100, -100], "hu_window"),
        ("target_styles.method", "", "target_styles.method"),
        ("training.iterations", -1, "iterations"),
        ("training.iterations", True, "iterations"),
        ("training.texture_loss", "yes", "texture_loss"),
        ("training.code_version", _DELETE, "code_version"),
        ("metrics", [], "metrics"),
        ("created", "yesterday", "ISO date"),
    ],
)
def test_bad_card_fields(good_file: Path, tmp_path: Path, path: str, value, message: str | None) -> None:
    p = _rewrite(good_file, tmp_path / "m.safetensors", card=_set(path, value))
    msg = _refused(p)
    if message:
        assert message.lower() in msg.lower(), msg
    else:
        assert "shape" in msg


def test_domain_count_mismatch(good_file: Path, tmp_path: Path) -> None:
    p = _rewrite(good_file, tmp_path / "a.safetensors", card=lambda c: c["domains"].pop())
    _refused(p, "2 domains listed", "num_domains=3")

    def fewer_styles(ts: dict) -> None:
        ts["domain_styles"] = ts["domain_styles"][:2].contiguous()

    p = _rewrite(good_file, tmp_path / "b.safetensors", tensors=fewer_styles)
    _refused(p, "domain styles", "(2, 16)", "(3, 16)")


def test_tensors_not_matching_the_config(good_file: Path, tmp_path: Path) -> None:
    p = _rewrite(good_file, tmp_path / "miss.safetensors", tensors=lambda ts: ts.pop("generator.stem.weight"))
    _refused(p, "do not match the architecture", "1 missing", "generator.stem.weight")
    p = _rewrite(good_file, tmp_path / "extra.safetensors", tensors=lambda ts: ts.update(x=torch.zeros(2)))
    _refused(p, "1 unexpected", "['x']")

    def reshape(ts: dict) -> None:
        ts["style_encoder.heads.0.weight"] = torch.zeros(16, 7)

    _refused(_rewrite(good_file, tmp_path / "shape.safetensors", tensors=reshape), "style_encoder.heads.0")
    # The card claims a wider network than the stored weights.
    p = _rewrite(good_file, tmp_path / "wide.safetensors", card=_set("architecture.base_width", 16))
    _refused(p, "do not match the architecture", "unexpected")

    def to_half(ts: dict) -> None:
        for k in ts:
            ts[k] = ts[k].half()

    _refused(_rewrite(good_file, tmp_path / "half.safetensors", tensors=to_half), "float32")


def test_non_finite_weights(good_file: Path, tmp_path: Path) -> None:
    def poison(ts: dict) -> None:
        ts["generator.decoder.0.conv1.weight"][0, 0, 0, 0] = float("nan")

    _refused(_rewrite(good_file, tmp_path / "nan.safetensors", tensors=poison), "non-finite", "decoder.0")

    def inf_style(ts: dict) -> None:
        ts["domain_styles"][1, 3] = float("inf")

    _refused(_rewrite(good_file, tmp_path / "inf.safetensors", tensors=inf_style), "NaN/Inf", "domain_styles")


# -------------------------------------------------------------------------------------------- save refusals
def test_save_refuses_bad_input_and_writes_nothing(good_file: Path, tmp_path: Path) -> None:
    mf = load_model_file(good_file)
    weights = {f"{n}.{k}": v for n, sd in mf.state_dicts.items() for k, v in sd.items()}
    args = dict(config=mf.config, weights=weights, domain_styles=mf.domain_styles, card=mf.card)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match=r"\.safetensors"):
        save_model_file(out / "m.pt", **args)
    with pytest.raises(ModelFileError, match="does not exist"):
        save_model_file(out / "sub" / "m.safetensors", **args)
    with pytest.raises(ModelFileError, match="differs from the config"):
        save_model_file(out / "m.safetensors", **(args | {"config": ModelConfig.small()}))
    bad = dict(weights)
    bad["generator.stem.bias"] = bad["generator.stem.bias"].clone().fill_(float("nan"))
    with pytest.raises(ModelFileError, match="refusing to save"):
        save_model_file(out / "m.safetensors", **(args | {"weights": bad}))
    with pytest.raises(ModelFileError, match="missing"):
        save_model_file(out / "m.safetensors", **(args | {"weights": {}}))
    with pytest.raises(ModelFileError, match="missing field"):
        save_model_file(out / "m.safetensors", **(args | {"card": {"domains": []}}))
    for bad_metric in (float("nan"), np.float32(1)):
        with pytest.raises(ModelFileError, match="not valid JSON"):
            bad_card = mf.card | {"metrics": {"x": bad_metric}}
            save_model_file(out / "m.safetensors", **(args | {"card": bad_card}))
    assert list(out.iterdir()) == []
    # A valid save replaces an existing file atomically.
    target = out / "m.safetensors"
    target.write_bytes(b"old")
    save_model_file(target, **args)
    assert load_model_file(target).config == mf.config and list(out.iterdir()) == [target]


def test_model_kind_comes_from_the_architecture(good_file: Path, tmp_path: Path) -> None:
    mf = load_model_file(good_file)
    assert mf.kind == ckpt.KIND_STARGAN and mf.supported_pixel_mm is None  # no 'kind': StarGAN v2
    p = _rewrite(good_file, tmp_path / "k.safetensors", card=_set("architecture.kind", "stargan_v2"))
    assert load_model_file(p).kind == "stargan_v2"
    p = _rewrite(good_file, tmp_path / "u.safetensors", card=_set("architecture.kind", "other"))
    _refused(p, "unknown model kind 'other'", "update this software")
    # A StarGAN v2 card that claims to be a kernel-transfer model lacks that kind's fields.
    p = _rewrite(good_file, tmp_path / "kt.safetensors", card=_set("architecture.kind", "kernel_transfer"))
    _refused(p, "missing field", "supported_pixel_mm")
