import pytest
import torch

from scosparc_core.modeling import Stage1Head, full_matrix_stage1
from scosparc_core.modeling.stage1 import STAGE1_CENTER, STAGE1_TEMPERATURE


def random_head(dim, seed=0):
    torch.manual_seed(seed)
    return Stage1Head(dim)


@pytest.mark.parametrize("n,p,c", [(2, 49, 32), (3, 784, 64), (7, 16, 8)])
def test_linear_form_equals_full_matrix(n, p, c):
    head = random_head(c, seed=n)
    tokens = torch.randn(n, p, c) * 3
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), full_matrix_stage1(head, tokens), atol=1e-5, rtol=0)


def test_chunking_does_not_change_the_result():
    head = random_head(16)
    tokens = torch.randn(9, 25, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(tokens, chunk=2), head(tokens, chunk=64), atol=1e-6, rtol=0)


def test_group_of_one_corresponds_with_itself():
    head = random_head(16)
    tokens = torch.randn(1, 25, 16)
    with torch.no_grad():
        w = head(tokens)
        # rep = scale * q . K_self / P, min-max, sigmoid: computed here the long way
        x = head.embed(tokens[0])
        q = head._linear(head.query_transform, x)
        k = head._linear(head.key_transform, x)
        rep = q @ k.sum(0) * head.scale / 25
        r = (rep - rep.min()) / (rep.max() - rep.min())
        expected = torch.sigmoid((r - STAGE1_CENTER) / STAGE1_TEMPERATURE)
    assert w.shape == (1, 25) and torch.isfinite(w).all()
    torch.testing.assert_close(w[0], expected, atol=1e-5, rtol=0)


def test_empty_group_and_constant_tokens():
    head = random_head(8)
    with torch.no_grad():
        assert head(torch.zeros(0, 4, 8)).shape == (0, 4)
        flat = head(torch.ones(3, 4, 8))  # every patch alike: min-max has no range
    floor = torch.sigmoid(torch.tensor(-STAGE1_CENTER / STAGE1_TEMPERATURE))
    torch.testing.assert_close(flat, floor.expand(3, 4))


def test_head_width_follows_backbone():
    from conftest import tiny_model

    model = tiny_model()
    assert model.head.dim == model.backbone.embed_dim == 96
    assert model.head.conv.weight.shape == (96, 96, 1, 1)


def test_any_cut_of_the_group_gives_the_same_weights_bit_for_bit():
    """Token sums per micro-batch with one key transform for the group, and rep per chunk of any size (one image
    included): the weights of ViT-B/8-wide tokens equal the forward on the whole group, to the bit."""
    head = random_head(768)
    tokens = torch.randn(37, 784, 768)
    with torch.no_grad():
        whole = head(tokens)
        for mb in (32, 5, 1):
            sums = torch.cat([tokens[s:s + mb].sum(dim=1) for s in range(0, len(tokens), mb)])
            key_sums = head.keys_from_token_sums(sums, 784)
            assert torch.equal(key_sums, head.key_sums(tokens)), mb
            assert torch.equal(head.weights(tokens, key_sums, key_sums.sum(dim=0), 37, chunk=mb), whole), mb
