import io
import pickle

import pytest
import timm
import torch

from conftest import GOLDEN, TINY_VIT, golden_head
from scosparc_core import BackboneUnavailableError, CheckpointError, SCoSPARC, Stage1Head
from scosparc_core.checkpoints import load_backbone_checkpoint, load_head_checkpoint, save_head_checkpoint


def test_head_saves_and_loads_in_the_official_format(tmp_path):
    torch.manual_seed(1)
    head = Stage1Head(32)
    path = tmp_path / "model_combined.pt"
    save_head_checkpoint(head, path)
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == sorted(
        f"encoder_attn.{layer}.{p}" for layer in ("conv", "query_transform", "key_transform") for p in ("weight", "bias")
    )
    assert raw["encoder_attn.conv.weight"].shape == (32, 32, 1, 1)
    other = Stage1Head(32)
    load_head_checkpoint(other, path)
    for a, b in zip(head.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_golden_head_weights_load_through_from_checkpoints(golden, tmp_path):
    path = tmp_path / "head.pt"
    save_head_checkpoint(golden_head(golden), path)
    model = SCoSPARC.from_checkpoints(
        backbone=None, head=path, random_init=True, backbone_name="vit_base_patch8_224", depth=1
    )
    assert torch.equal(model.head.conv.weight, torch.from_numpy(golden["head.encoder_attn.conv.weight"]))


def test_checkpoint_from_a_url(tmp_path):
    import fsspec

    head = Stage1Head(16)
    save_head_checkpoint(head, "memory://ckpt/head.pt")
    other = Stage1Head(16)
    load_head_checkpoint(other, "memory://ckpt/head.pt")
    assert torch.equal(head.key_transform.bias, other.key_transform.bias)
    fsspec.filesystem("memory").rm("/ckpt", recursive=True)


def test_wrong_keys_and_shapes_name_the_file_and_the_keys(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"encoder_attn.conv.weight": torch.zeros(16, 16, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*missing keys.*encoder_attn|bad\.pt.*missing keys.*conv\.bias"):
        load_head_checkpoint(Stage1Head(16), path)
    save_head_checkpoint(Stage1Head(16), path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*shape mismatches.*conv\.weight: file \(16, 16, 1, 1\) vs model \(8, 8, 1, 1\)"):
        load_head_checkpoint(Stage1Head(8), path)
    torch.save({"something.else": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="no 'encoder_attn"):
        load_head_checkpoint(Stage1Head(8), path)


def test_truncated_empty_missing_and_non_dict(tmp_path):
    path = tmp_path / "head.pt"
    save_head_checkpoint(Stage1Head(16), path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable torch checkpoint"):
        load_head_checkpoint(Stage1Head(16), tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: checkpoint file is empty"):
        load_head_checkpoint(Stage1Head(16), tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_head_checkpoint(Stage1Head(16), tmp_path / "nope.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_head_checkpoint(Stage1Head(16), tmp_path / "list.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_carries_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"encoder_attn.conv.bias": torch.zeros(2), "x": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused.*weights_only"):
        load_head_checkpoint(Stage1Head(2), path)
    assert "pwned" not in capsys.readouterr().out


def test_tiny_dino_checkpoint_loads_strict_and_mismatch_is_named():
    from scosparc_core import DinoBackbone

    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=GOLDEN / "tiny_dino_vit.pth", **TINY_VIT)
    assert backbone.embed_dim == 96
    with pytest.raises(CheckpointError, match=r"tiny_dino_vit\.pth: does not fit the backbone.*(missing keys|shape)"):
        DinoBackbone.create("vit_base_patch8_224", checkpoint=GOLDEN / "tiny_dino_vit.pth", embed_dim=96, depth=3, num_heads=3)


def test_official_vit_b8_key_format_loads_strict():
    """The DINO ViT-B/8 release is a plain 150-key state_dict under timm's names: it must load strictly."""
    reference = timm.create_model("vit_base_patch8_224", num_classes=0)
    state = reference.state_dict()
    assert len(state) == 150
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    target = timm.create_model("vit_base_patch8_224.dino", num_classes=0)
    load_backbone_checkpoint(target, buf)
    assert torch.equal(target.blocks[11].attn.qkv.weight, reference.blocks[11].attn.qkv.weight)


def test_pretrained_weights_unreachable_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_head_checkpoint(Stage1Head(768), tmp_path / "head.pt")
    with pytest.raises(BackboneUnavailableError, match="could not fetch.*dino_vitbase8_pretrain.pth"):
        SCoSPARC.from_checkpoints(backbone=None, head=tmp_path / "head.pt", backbone_name="vit_base_patch8_224.dino")


def test_random_init_only_when_asked_and_with_a_warning():
    with pytest.raises(ValueError, match="no stage-1 head checkpoint"):
        SCoSPARC.from_checkpoints(backbone=GOLDEN / "tiny_dino_vit.pth", backbone_name="vit_base_patch8_224", **TINY_VIT)
    with pytest.warns(UserWarning, match="RANDOM"):
        SCoSPARC.from_checkpoints(random_init=True, backbone_name="vit_base_patch8_224", **TINY_VIT)


def test_random_weights_are_the_same_in_every_process_and_leave_the_callers_rng_alone():
    from scosparc_core import DinoBackbone

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="RANDOM"):
        a = DinoBackbone.create("vit_base_patch8_224", random_init=True, **TINY_VIT)
        b = DinoBackbone.create("vit_base_patch8_224", random_init=True, **TINY_VIT)
    assert torch.equal(torch.rand(1), expected_next)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
