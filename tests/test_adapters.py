"""Every (model family x method) pair runs the whole AdapterTester checklist (tests/testers.py)."""

import pytest
import torch

from families import COGVIDEOX, FLUX, FLUX2, HUNYUAN, HUNYUAN15, LTX, LTX2, MOCHI, SD3, SD_UNET, SDXL_UNET, SKYREELS_V2, WAN
from testers import AdapterTester

pytestmark = pytest.mark.cpu


class TestWanRadial(AdapterTester):
    family, method = WAN, "radial"
    sparse = dict(dense_steps=0, dense_layers=0, block_size=32, decay=0.5)
    # 4 latent frames of 16 x 16 tokens: distances <= 3 pass the frequency gate, a huge decay
    # keeps every pair (7 frames of 8 x 8 would gate distances 4-6)
    full = dict(dense_steps=0, dense_layers=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=13, size=256)


class TestWanNeighborhood(AdapterTester):
    family, method = WAN, "neighborhood"
    sparse = dict(dense_steps=0, dense_layers=0, kernel_size=(3, 5, 5), stride=(1, 2, 1))
    full = dict(dense_steps=0, dense_layers=0, kernel_size=(7, 8, 8))  # the whole 7 x 8 x 8 grid


class TestHunyuanRadial(AdapterTester):
    family, method = HUNYUAN, "radial"
    sparse = dict(dense_steps=0, block_size=32, decay=0.3)
    full = dict(dense_steps=0, block_size=64, decay=1000.0)


class TestWanNeighborhoodTiled(AdapterTester):
    family, method = WAN, "neighborhood"
    sparse = dict(dense_steps=0, dense_layers=0, kernel_size=(3, 5, 5), reorder=True)
    full = dict(dense_steps=0, dense_layers=0, kernel_size=(7, 8, 8), reorder=True)


class TestHunyuanNeighborhood(AdapterTester):
    family, method = HUNYUAN, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(3, 3, 5), dilation=(1, 2, 1))
    full = dict(dense_steps=0, kernel_size=(4, 16, 16))


class TestFluxClear(AdapterTester):
    family, method = FLUX, "clear"
    sparse = dict(radius=3)
    full = dict(radius=10)  # reaches every pair of the 8 x 8 grid


class TestFluxClearPooled(AdapterTester):
    family, method = FLUX, "clear"
    sparse = dict(radius=2, down_factor=2, reorder=False)
    full = dict(radius=10)


class TestFluxNeighborhood(AdapterTester):
    family, method = FLUX, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(1, 3, 5), stride=(1, 1, 2))
    full = dict(dense_steps=0, kernel_size=8)


class TestSD3Clear(AdapterTester):
    family, method = SD3, "clear"
    sparse = dict(radius=3)
    full = dict(radius=10)


class TestSD3Neighborhood(AdapterTester):
    family, method = SD3, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=3)
    full = dict(dense_steps=0, kernel_size=8)


class TestFlux2Clear(AdapterTester):
    family, method = FLUX2, "clear"
    sparse = dict(radius=3)
    full = dict(radius=10)


class TestFlux2Neighborhood(AdapterTester):
    family, method = FLUX2, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(1, 5, 3))
    full = dict(dense_steps=0, kernel_size=8)


class TestCogVideoXRadial(AdapterTester):  # text before the video: radial runs it in [video; text] order
    family, method = COGVIDEOX, "radial"
    sparse = dict(dense_steps=0, block_size=16, decay=0.3)
    full = dict(dense_steps=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=32)  # 16 x 16 tokens per frame: every distance passes radial's gate


class TestCogVideoXNeighborhood(AdapterTester):
    family, method = COGVIDEOX, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(3, 3, 5))
    full = dict(dense_steps=0, kernel_size=(4, 8, 8))


class TestLTXRadial(AdapterTester):
    family, method = LTX, "radial"
    sparse = dict(dense_steps=0, dense_layers=0, block_size=16, decay=0.3)
    full = dict(dense_steps=0, dense_layers=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=16)


class TestLTXNeighborhood(AdapterTester):
    family, method = LTX, "neighborhood"
    sparse = dict(dense_steps=0, dense_layers=0, kernel_size=(3, 3, 5))
    full = dict(dense_steps=0, dense_layers=0, kernel_size=(4, 8, 8))


class TestLTX2Radial(AdapterTester):  # the video self-attention; audio, text and cross-modal attentions stay stock
    family, method = LTX2, "radial"
    sparse = dict(dense_steps=0, dense_layers=0, block_size=16, decay=0.3)
    full = dict(dense_steps=0, dense_layers=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=16)


class TestLTX2Neighborhood(AdapterTester):
    family, method = LTX2, "neighborhood"
    sparse = dict(dense_steps=0, dense_layers=0, kernel_size=(3, 3, 5))
    full = dict(dense_steps=0, dense_layers=0, kernel_size=(4, 8, 8))


class TestSkyReelsV2Radial(AdapterTester):
    family, method = SKYREELS_V2, "radial"
    sparse = dict(dense_steps=0, dense_layers=0, block_size=32, decay=0.5)
    full = dict(dense_steps=0, dense_layers=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=32)


class TestSkyReelsV2Neighborhood(AdapterTester):
    family, method = SKYREELS_V2, "neighborhood"
    sparse = dict(dense_steps=0, dense_layers=0, kernel_size=(3, 5, 5))
    full = dict(dense_steps=0, dense_layers=0, kernel_size=(4, 8, 8))


class TestMochiRadial(AdapterTester):
    family, method = MOCHI, "radial"
    sparse = dict(dense_steps=0, block_size=16, decay=0.3)
    full = dict(dense_steps=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=32)


class TestMochiNeighborhood(AdapterTester):
    family, method = MOCHI, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(3, 3, 5))
    full = dict(dense_steps=0, kernel_size=(4, 8, 8))


class TestHunyuanVideo15Radial(AdapterTester):
    family, method = HUNYUAN15, "radial"
    sparse = dict(dense_steps=0, block_size=16, decay=0.3)
    full = dict(dense_steps=0, block_size=64, decay=1000.0)
    full_shape = dict(frames=4, size=16)


class TestHunyuanVideo15Neighborhood(AdapterTester):
    family, method = HUNYUAN15, "neighborhood"
    sparse = dict(dense_steps=0, kernel_size=(3, 3, 5))
    full = dict(dense_steps=0, kernel_size=(4, 8, 8))


# -- U-Nets (SD 1.5 layout: the trained testbed U-Net; SDXL layout: a tiny pipeline) ------------

class TestSDMswMsa(AdapterTester):
    family, method = SD_UNET, "msw-msa"
    sparse = dict(shifts="cyclic")
    full = None  # windows have no full-density setting (a quarter of the score matrix by construction)


class TestSDRauNet(AdapterTester):
    family, method = SD_UNET, "rau-net"
    sparse = dict(t1=1.0, t2=1.0)
    full = None
    needs_pipeline = True


class TestSDHiDiffusion(AdapterTester):
    family, method = SD_UNET, "hidiffusion"
    sparse = dict(seed=3)
    full = None
    needs_pipeline = True


class TestSDTome(AdapterTester):
    family, method = SD_UNET, "tome"
    sparse = dict(ratio=0.5)
    full = None


class TestSDAgentTome(AdapterTester):
    family, method = SD_UNET, "agent+tome"
    sparse = dict(end=1.0)
    full = None


class TestSDHiDiffusionTome(AdapterTester):
    family, method = SD_UNET, "hidiffusion+tome"
    sparse = dict(t1=1.0, ratio=0.3)
    full = None
    needs_pipeline = True


class TestSDXLHiDiffusion(AdapterTester):
    family, method = SDXL_UNET, "hidiffusion"
    sparse = dict(t1=1.0, t2=1.0)
    full = None
    needs_pipeline = True


class TestSDXLAgent(AdapterTester):
    family, method = SDXL_UNET, "agent"
    sparse = dict(agents="pool", end=1.0)
    full = None


def test_ltx2_perturbed_processor_keeps_the_pipelines_stg():
    """LTX-2.3's STG-capable processor: the mirror matches it with STG on one block for one sample,
    for all samples (V, no attention), and radial changes only the unperturbed attention."""
    import diffattn
    from diffattn_testbed.tiny import ltx2_inputs, tiny_ltx2_transformer

    model = tiny_ltx2_transformer(perturbed=True)
    for mask in (torch.tensor([1.0, 0.0]).view(2, 1, 1), torch.zeros(2, 1, 1)):
        inputs = ltx2_inputs(spatio_temporal_guidance_blocks=[1], perturbation_mask=mask)
        with torch.no_grad():
            stock = model(**inputs)
            with diffattn.apply(model, "radial", dense_steps=10_000):  # dense schedule: the mirror itself
                mirrored = model(**inputs)
            with diffattn.apply(model, "radial", dense_steps=0, dense_layers=0, block_size=16, decay=0.3, backend="sdpa") as handle:
                sparse = model(**inputs)
        for a, b in zip(stock, mirrored):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert handle.summary()["method_calls"] == (2 if mask.sum() > 0 else 1)  # block 1 perturbed for all: V, no call
        assert (sparse[0] - stock[0]).abs().max() > 1e-5


def test_ltx2_refuses_diffattn_guidance_naming_its_own_stg():
    import diffattn
    from diffattn_testbed.tiny import tiny_ltx2_transformer

    model = tiny_ltx2_transformer()
    with pytest.raises(NotImplementedError, match="LTX-2 pipelines run their own STG"):
        diffattn.apply(model, "stg")
    assert not any(type(p).__module__.startswith("diffattn") for p in model.attn_processors.values())


def test_ltx2_split_rope_mirror_and_a_full_window_equal_stock():
    """rope_type="split" (the other RoPE layout LTX-2 checkpoints use): the mirror is the stock
    processor, and a window covering the whole grid gives the dense output."""
    import diffattn
    from diffattn_testbed.tiny import ltx2_inputs, tiny_ltx2_transformer

    model = tiny_ltx2_transformer()
    model = type(model)(**{**model.config, "rope_type": "split"}).eval()
    inputs = ltx2_inputs()
    with torch.no_grad():
        stock = model(**inputs)
        with diffattn.apply(model, "radial", dense_steps=10_000):
            mirrored = model(**inputs)
        with diffattn.apply(model, "neighborhood", dense_steps=0, dense_layers=0, kernel_size=(4, 8, 8), backend="sdpa") as handle:
            full = model(**inputs)
    assert handle.summary()["method_calls"] == 2
    for a, b, c in zip(stock, mirrored, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
