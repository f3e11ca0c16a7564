"""A checkpoint with the real SD1.5 layout and random weights, for the server test.

The key names and shapes come from ComfyUI's own classes, built on the meta device (no
memory, no time): the SD1.5 UNet, the CLIP-L text encoder and the KL VAE, named as in a
single-file SD1.5 checkpoint (model.diffusion_model., cond_stage_model.transformer.,
first_stage_model.) by ComfyUI's own saving code. The weights are drawn from a seed: matrices
and convolutions uniform with the variance 1/fan_in (so activations keep about unit size),
norm scales in [0.9, 1.1], biases in [-0.02, 0.02]. Drawn and stored as float16: about 2 GB.

    python tests/random_checkpoint.py COMFYUI_ROOT OUT.safetensors

writes the file (through OUT.partial, renamed at the end, so that a reader never sees half
of it) and checks first that ComfyUI's model detection takes the layout for SD1.5.
"""
import inspect
import math
import os
import sys
import time
from pathlib import Path

import torch

from host_models import FULL_WIDTH, SMALL_UNETS

# The SD1.5 UNet as ComfyUI's model detection describes the real checkpoint: the test
# architecture at the real widths.
SD15_UNET = dict(SMALL_UNETS["sd15"]["unet"], **FULL_WIDTH["sd15"])
# The SD1.x KL autoencoder, as comfy.sd.VAE builds it for such a checkpoint.
SD15_VAE = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def checkpoint_layout():
    """{key: shape} of an SD1.5 single-file checkpoint, from ComfyUI's classes (ComfyUI importable)."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(SD15_UNET))
    with torch.device("meta"):
        model = model_config.get_model({})
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD15_VAE), embed_dim=4)
    parts = {"clip_state_dict": clip.state_dict(), "vae_state_dict": vae.state_dict()}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:  # ComfyUI 0.28 asks for it
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    sd = model.state_dict_for_saving(**parts)
    layout = {k: tuple(v.shape) for k, v in sd.items()}

    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects this layout as {type(detected).__name__}, not SD15")
    prefixes = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.")
    stray = [k for k in layout if not k.startswith(prefixes)]
    if stray:
        raise RuntimeError(f"unexpected checkpoint keys: {stray[:5]}")
    return layout


def random_weights(layout, seed=0):
    """float16 tensors for the layout: fan-in scaled matrices, norm scales near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if len(shape) >= 2:
            # Uniform on [-b, b] has variance b^2/3: b = sqrt(3/fan_in) gives 1/fan_in.
            bound = math.sqrt(3.0 / math.prod(shape[1:]))
            out[key] = torch.empty(shape, dtype=torch.float16).uniform_(-bound, bound, generator=gen)
        elif key.endswith("weight"):  # group and layer norm scales
            out[key] = torch.empty(shape, dtype=torch.float16).uniform_(0.9, 1.1, generator=gen)
        else:
            out[key] = torch.empty(shape, dtype=torch.float16).uniform_(-0.02, 0.02, generator=gen)
    return out


def write_checkpoint(path, seed=0):
    """Writes the random SD1.5 checkpoint to path; returns its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file(random_weights(checkpoint_layout(), seed), str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
    return path.stat().st_size


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    root, out = argv[1], argv[2]
    sys.path.insert(0, str(Path(root).resolve()))
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    start = time.monotonic()
    size = write_checkpoint(out)
    print(f"wrote {out}: {size / 2**30:.2f} GiB in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv)
