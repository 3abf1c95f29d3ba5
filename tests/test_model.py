"""The model: logits match transformers' GPTNeoXForCausalLM on random checkpoints it wrote, across head sizes,
both residual modes and partial rotary; the KV cache and logits_at are exact shortcuts; bf16 stays close to fp32;
activation checkpointing changes nothing but memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_scale, hf_tiny
from minicalm import load_model

V = 128


def ids(B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("rotary_pct", [1.0, 0.25])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("hs", [64, 80, 96, 128])
def test_logits_match_transformers(tmp_path, hs, parallel, rotary_pct, sharded):
    folder, hf = hf_tiny(tmp_path, hidden_size=2 * hs, num_attention_heads=2, intermediate_size=4 * hs,
                         use_parallel_residual=parallel, rotary_pct=rotary_pct, vocab_size=V,
                         max_shard_size="100KB" if sharded else None)
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    model = load_model(folder, dtype=torch.float32)
    cfg = model.config
    assert (cfg.head_size, cfg.use_parallel_residual, cfg.rotary_pct) == (hs, parallel, rotary_pct)
    x = ids()
    with torch.no_grad():
        want, got = hf(x).logits, model(x)
    assert got.shape == (2, 24, V)
    assert_close_to_scale(got, want)


def test_tied_embeddings_match_transformers(tmp_path):
    folder, hf = hf_tiny(tmp_path, tie_word_embeddings=True)
    model = load_model(folder)
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    x = ids()
    with torch.no_grad():
        assert_close_to_scale(model(x), hf(x).logits)


def test_logits_at_equals_slicing_full_logits(tiny_checkpoint):
    model = load_model(tiny_checkpoint[0])
    x = ids(3, 10)
    with torch.no_grad():
        full = model(x)
        mask = torch.zeros(3, 10, dtype=torch.bool)
        mask[0, 9], mask[1, 4], mask[1, 7], mask[2, 0] = True, True, True, True
        # the head runs on fewer rows (another matmul shape): equal to rounding, not bit for bit
        assert_close_to_scale(model(x, logits_at=mask), full[mask])                   # (N, V)
        idx = torch.tensor([-1, 2])
        assert_close_to_scale(model(x, logits_at=idx), full[:, idx])                  # (B, K, V)


@pytest.mark.parametrize("P", [1, 7])
def test_chunked_forward_through_the_cache_equals_full_forward(tiny_checkpoint, P):
    model = load_model(tiny_checkpoint[0])
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        head = model(x[:, :P], cache=cache, start=0)
        tail = model(x[:, P:], cache=cache, start=P)
    assert_close_to_scale(head, full[:, :P])   # other attention shapes: equal to rounding
    assert_close_to_scale(tail, full[:, P:])


def test_cache_refuses_to_overflow(tiny_checkpoint):
    model = load_model(tiny_checkpoint[0])
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="holds 8 positions"), torch.no_grad():
        model(ids(1, 9), cache=cache)


# bf16 against fp32 on the same file. Stated tolerance: the largest logit error is at most 2% of the largest fp32
# logit (bf16 keeps 8 significant bits, so ~0.4% per rounding; a 2-layer model measures ~1%). Rotary positions
# near 2000 (OpenCALM's 2048 context) check that cos/sin stay in fp32: bf16 positions there are 8 apart.
BF16_REL_TOL = 0.02


def bf16_forward(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's bf16 logits, through torch's math attention kernel where its CPU flash attention cannot run in
    bf16. torch 2.13 packs bf16 operands for AMX when the CPU has AMX, with code it compiles only into its AVX-512
    kernels: under ATEN_CPU_CAPABILITY=avx2 or default on such a CPU (as CI's reruns force) it raises "pack_vnni2 is
    only supported when avx512 is supported". torch's failure, not the model's: its bf16 path is checked all the
    same."""
    try:
        return model(x, positions=positions)
    except RuntimeError as e:
        if "pack_vnni2" not in str(e):
            raise
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return model(x, positions=positions)


@pytest.mark.parametrize("first_position", [0, 1984])
def test_bf16_is_close_to_fp32(tmp_path, first_position):
    folder, _ = hf_tiny(tmp_path, initializer_range=0.1, max_position_embeddings=2048)
    fp32, bf16 = load_model(folder, dtype=torch.float32), load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    x = ids(2, 64)
    pos = torch.arange(first_position, first_position + 64).expand(2, 64)
    with torch.no_grad():
        want, got = fp32(x, positions=pos), bf16_forward(bf16, x, pos)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max()
    assert err <= BF16_REL_TOL * want.abs().max(), f"bf16 error {err:.4f} vs logit scale {want.abs().max():.3f}"


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint):
    x = ids(2, 16)

    def loss_and_grads(grad_checkpoint: bool):
        model = load_model(tiny_checkpoint[0]).train()
        model.grad_checkpoint = grad_checkpoint
        calls = []
        for block in model.gpt_neox.layers:
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)

    loss0, g0, calls0 = loss_and_grads(False)
    loss1, g1, calls1 = loss_and_grads(True)
    assert (calls0, calls1) == (2, 4)   # with checkpointing each block runs again in backward
    # Exact, on every kernel set: the recompute runs the same ops on the same shapes in the same process.
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(g0[n] is not None for n in g0)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n   # the recompute is the same arithmetic: bit-identical


@pytest.mark.parametrize("P", [1, 9])
def test_shared_prefix_gives_the_logits_of_every_row_in_full(tiny_checkpoint, P):
    """loss.shared_prefix_hidden runs the rows' common first P tokens once, from the model's public pieces, and
    continues each row from their keys and values."""
    from minicalm.loss import shared_prefix_hidden

    model = load_model(tiny_checkpoint[0])
    x = ids(3, 16)
    x[:, :P] = x[0, :P]
    x[1, P] = (x[0, P] + 1) % V   # rows differ right after the prefix
    with torch.no_grad():
        full, shared = model(x), model.logits(shared_prefix_hidden(model, x, P))
        mask = torch.zeros(3, 16, dtype=torch.bool)
        mask[0, 2], mask[1, P], mask[2, 15] = True, True, True      # in the prefix, at its end, after it
        picked = model.logits(shared_prefix_hidden(model, x, P)[mask])
    assert_close_to_scale(shared, full)   # other matmul shapes: equal to rounding
    assert_close_to_scale(picked, full[mask])
    for bad in (0, 16):
        with pytest.raises(ValueError, match="shared prefix of"):
            shared_prefix_hidden(model, x, bad)
