"""The data: the latent space of Stable Diffusion's VAE (its loading and downsampling)."""
import os

SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # DiT's --vae choices
LATENT_FROM = 256  # --vae auto: latent space from this image size up, as in the paper (ImageNet 256/512)


def resolve_vae(name, image_size):
    """--vae value -> hub id or local directory of an AutoencoderKL, or 'none' for pixel space."""
    if name in (None, "auto"):
        return SD_VAES["ema"] if image_size >= LATENT_FROM else "none"
    return SD_VAES.get(name, name)


def load_vae(name, device):
    """A frozen diffusers AutoencoderKL from a hub id or a local directory (diffusers is only
    needed here, so pixel-space runs work without it)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise SystemExit("latent space needs diffusers: pip install diffusers (or use pixel space: --vae none)")
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "this directory has no AutoencoderKL" if os.path.isdir(name) else \
            "it is no local directory and the Hugging Face hub could not provide it (offline?)"
        raise SystemExit(f"cannot load the VAE {name!r}: {where} ({type(e).__name__}); download it where you are "
                         f"online (huggingface-cli download {name} --local-dir DIR) and pass --vae DIR")
    return vae.to(device).eval().requires_grad_(False)


def vae_downsampling(vae):
    """Image side / latent side of an AutoencoderKL (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
