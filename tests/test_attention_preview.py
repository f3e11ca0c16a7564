"""PLADIS Attention Preview: its maps against float64 references, and the node on small host models."""
import pytest
import torch

from host_dits import build_dit, dit_conditioning, latent_shape, on_this_host
from host_models import build_unet, conditioning
from pladis_core.preview import token_maps
from reference import entmax_ref, logits_ref

LABEL, GAP = 20, 4


def qkv(n=12, keys=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, 8, generator=g) * 2 for length in (n, keys))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_cross_attention_maps_are_the_columns_of_the_three_weight_matrices(alpha):
    q, k = qkv()
    z = logits_ref(q, k)
    dense, sparse = entmax_ref(z, 1.0)[..., 4], entmax_ref(z, alpha)[..., 4]
    maps = token_maps(q, k, 4, 2.0, alpha)
    for got, ref in zip(maps, (dense, sparse, dense + 2.0 * (sparse - dense))):
        assert (got.double() - ref.mean(1)).abs().max() < 1e-5


def test_joint_attention_maps_follow_the_joint_weights():
    q, k = qkv(n=10, keys=16)
    z = logits_ref(q, k)
    text = slice(0, 6)
    mass = entmax_ref(z, 1.0)[..., text].sum(-1)
    dense = entmax_ref(z, 1.0)[..., 2]
    sparse = mass * entmax_ref(z[..., text], 1.5)[..., 2]
    maps = token_maps(q, k, 2, 2.0, 1.5, text=text)
    for got, ref in zip(maps, (dense, sparse, dense + 2.0 * (sparse - dense))):
        assert (got.double() - ref.mean(1)).abs().max() < 1e-5


def test_a_masked_token_has_no_weight_in_any_map():
    q, k = qkv()
    keep = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    keep[..., 4] = False
    assert torch.equal(token_maps(q, k, 4, 2.0, 1.5, mask=keep), torch.zeros(3, 2, 12))


CASES = {
    "sd15": lambda: (build_unet("sd15"), conditioning("sd15", 1), torch.zeros(1, 4, 8, 8)),
    "sdxl": lambda: (build_unet("sdxl"), conditioning("sdxl", 1), torch.zeros(1, 4, 8, 8)),
    **{kind: (lambda kind=kind: (build_dit(kind), dit_conditioning(kind, 1), torch.zeros(latent_shape(kind))))
       for kind in ("flux", "sd3", "qwen_image", "lumina2", "wan", "wan_i2v", "pixart", "hunyuan_dit",
                    # text last, text after the image keys, joint attention without the host's options, video cross-attention
                    "hidream", "hunyuan_video", "mochi", "cascade_c", "ernie", "ltxv", "kandinsky5") if on_this_host(kind)},
}


@pytest.fixture(scope="module")
def preview(host):
    return lambda *args, **kwargs: host.node("PladisAttentionPreview").execute(*args, **kwargs).result[0]


def panels(image):
    width = (image.shape[2] - 2 * GAP) // 3
    return [image[0, LABEL:, i * (width + GAP) : i * (width + GAP) + width] for i in range(3)]


@pytest.mark.parametrize("kind", list(CASES))
def test_preview_grid_on_every_kind_of_model(preview, kind):
    model, positive, samples = CASES[kind]()
    with torch.inference_mode():
        image = preview(model, positive, {"samples": samples}, token_index=3, step_percent=0.4)
        plain = preview(model, positive, {"samples": samples}, token_index=3, step_percent=0.4, scale=0.0)
    ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)
    height, width = samples.shape[-2] * ratio, samples.shape[-1] * ratio
    assert image.shape == (1, LABEL + height, 3 * width + 2 * GAP, 3) and image.dtype == torch.float32
    dense, sparse, pladis = panels(image)
    assert not torch.equal(dense, sparse) and not torch.equal(dense, pladis) and not torch.equal(sparse, pladis)
    plain_dense, _, plain_pladis = panels(plain)
    assert torch.equal(plain_pladis, plain_dense)  # lambda 0: the PLADIS map is the dense one
    assert (image[0, :LABEL] < 0.5).any()  # the labels are drawn


def test_the_incoming_model_keeps_its_patches_and_bad_inputs_are_refused(host, preview):
    model, positive, samples = CASES["sd15"]()
    patched = host.node("ApplyPLADIS").execute(model).result[0]
    before = dict(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    with torch.inference_mode():
        preview(patched, positive, {"samples": samples})
    assert patched.model_options["transformer_options"]["patches_replace"]["attn2"] == before
    with pytest.raises(ValueError, match=r"token_index 77 is outside this prompt's 77 tokens \(0-76\)"):
        preview(model, positive, {"samples": samples}, token_index=77)
    with pytest.raises(ValueError, match=r"alpha must lie between 1.0 and 2.0"):
        preview(model, positive, {"samples": samples}, alpha=2.5)
