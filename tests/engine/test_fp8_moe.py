"""FP8 MoE experts: the layer's FP8 path against the full-precision reference on the dequantized
experts, and EPLB's slot packing moving FP8 weights together with their block scales."""
from __future__ import annotations

import torch

from engine.config import ParallelConfig
from engine.kernels.fp8_ref import shared_mlp_fp8
from engine.kernels.fused_moe_ref import fused_experts_ref
from engine.layers.mlp import GatedMLP
from engine.layers.moe import FusedMoE
from engine.quantization import FP8_DTYPE, Fp8Config, building_with, dequantize_blocks

BLOCK = (16, 32)


def _fp8_moe(num_slots_extra: int = 0, ep_size: int = 1) -> FusedMoE:
    parallel = ParallelConfig(ep_size=ep_size, num_redundant_experts=num_slots_extra)
    with building_with(Fp8Config(BLOCK, activation_scheme="none")):
        moe = FusedMoE(8, 2, 64, 32, layer_id=0, parallel=parallel)
    moe.dummy_fill(seed=3, std=0.05, prefix="layers.0.mlp.experts")
    return moe


def test_fp8_experts_equal_the_reference_on_dequantized_weights():
    moe = _fp8_moe()
    assert moe.w13.dtype == FP8_DTYPE and moe.w13_scale_inv.shape == (8, 4, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)]).int()
    ids[0, 1] = -1  # an expert owned by another rank
    wts = torch.rand(7, 2, generator=g)
    ref = fused_experts_ref(x, dequantize_blocks(moe.w13, moe.w13_scale_inv, BLOCK),
                            dequantize_blocks(moe.w2, moe.w2_scale_inv, BLOCK), wts, ids)
    torch.testing.assert_close(moe(x, wts, ids), ref, rtol=1e-5, atol=1e-6)


def test_fp8_shared_experts_offer_their_fp8_weights_and_are_added_after_the_routed_sum():
    config = Fp8Config(BLOCK)
    with building_with(config):
        moe = FusedMoE(8, 2, 64, 32, layer_id=0)
        shared = GatedMLP(64, 64)
    moe.dummy_fill(seed=3, std=0.05, prefix="layers.0.mlp.experts")
    g = torch.Generator().manual_seed(1)
    for lin in (shared.gate_up_proj, shared.down_proj):
        fill = torch.randn(lin.weight.shape, generator=g) * 0.05
        lin.weight.data.copy_(fill.to(FP8_DTYPE))
        lin.weight_scale_inv.data.fill_(0.5)
    weights = shared.fp8_weights(config)
    assert weights is not None and weights[0] is shared.gate_up_proj.weight and weights[3].shape == (4, 2)
    assert shared.fp8_weights(Fp8Config(BLOCK, activation_scheme="none")) is None  # other activation scheme
    x = torch.randn(3, 64, generator=g)
    ids = torch.tensor([[0, 5], [-1, 2], [7, 8]], dtype=torch.int32)
    wts = torch.rand(3, 2, generator=g)
    routed = moe(x, wts, ids)
    want = routed + shared_mlp_fp8(x, *weights, BLOCK)
    torch.testing.assert_close(moe(x, wts, ids, shared=shared), want, rtol=0, atol=0)
    torch.testing.assert_close(shared(x), shared_mlp_fp8(x, *weights, BLOCK), rtol=1e-6, atol=1e-6)


def test_eplb_slot_packing_moves_fp8_weights_with_their_scales():
    moe = _fp8_moe(num_slots_extra=2, ep_size=2)  # 5 local slots of (8 + 2) / 2
    with torch.no_grad():
        moe.w13_scale_inv.data[0].mul_(torch.arange(1, 9, dtype=torch.float32).view(4, 2))  # distinct scales
    packed = moe.pack_slot(0)
    assert packed.dtype == torch.uint8 and packed.numel() == moe.packed_numel()
    assert moe.empty_packed().shape == packed.shape
    before = [p.data[0].clone() for p in (moe.w13, moe.w2, moe.w13_scale_inv, moe.w2_scale_inv)]
    moe.unpack_slot(3, packed)
    after = [p.data[3] for p in (moe.w13, moe.w2, moe.w13_scale_inv, moe.w2_scale_inv)]
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    bytes_per_slot = sum(p[0].numel() * p.element_size()
                         for p in (moe.w13, moe.w2, moe.w13_scale_inv, moe.w2_scale_inv))
    assert packed.numel() == bytes_per_slot
