"""Packed varlen forward == padded forward (left and right padding) == one forward per sequence."""

import pytest
import torch
from test_model_parity import random_model

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6)  # fmt: skip
LENGTHS = [7, 1, 19, 12]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = random_model(0, **SMALL)
    seqs = [torch.randint(0, 257, (n,)) for n in LENGTHS]
    with torch.no_grad():
        singles = [model(s[None])[0] for s in seqs]
    return model, seqs, singles


def test_packed_equals_per_sequence(setup):
    model, seqs, singles = setup
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu)
    assert packed.shape == (sum(LENGTHS), 257)
    for i, single in enumerate(singles):
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_equals_per_sequence(setup, side):
    model, seqs, singles = setup
    t = max(LENGTHS)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert out.shape == (len(seqs), t, 257)
    for i, (s, single) in enumerate(zip(seqs, singles, strict=True)):
        where = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(out[i, where], single, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(out[i, mask[i] == 0]) == 0


def test_gradients_flow_through_packed_forward(setup):
    model, seqs, _ = setup
    cu = torch.tensor([0, 7, 8], dtype=torch.int32)
    model.zero_grad()
    model(torch.cat(seqs[:2]), cu_seqlens=cu).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].self_attn.sinks.grad.abs().sum() > 0
    model.zero_grad()


def test_gradient_checkpointing_gives_same_gradients(setup):
    model, seqs, _ = setup
    ids = seqs[2][None]
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.gradient_checkpointing = False
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_clear_errors(setup):
    model, seqs, _ = setup
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.cat(seqs[:2]), cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 5))
