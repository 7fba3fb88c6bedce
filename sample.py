"""Sample images from a trained DiS: a PNG grid, or an .npz for the ADM evaluator / fid.py.

    python sample.py --ckpt results/000-DiS-S-2/checkpoints/0100000.pt --cfg 1.5      # grid -> sample.png
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000              # -> samples/NAME.npz
    python sample.py --ckpt dis_h2_256.pth --model DiS-H/2 --image-size 256 --cfg 1.5  # original checkpoint

Checkpoints written by train.py record the model, image size, classes and latent (VAE)
settings, so none of them need repeating. Checkpoints of the original implementation (a bare
state dict, or {"model": ...} / {"ema": ...}) have the same parameter names; for them give
--model, --image-size, --num-classes and, in pixel space, --channels (DiT's defaults: a
class-conditional model of ImageNet 256 in SD-VAE latent space). The EMA weights are used
unless --no-use-ema.

Data flows: noise (B, C, h, w) and labels -> DDPM (250 steps by default) or DDIM sampler
(diffusion.py), with classifier-free guidance when --cfg > 1 -> VAE decoder in latent space ->
uint8 images (B, H, W, C).

With --num-samples the images go to `--sample-dir/NAME.npz` in the ADM evaluator's format:
arr_0 uint8 (N, H, W, C) (C = 1 for grayscale data), arr_1 int64 labels (N,) when
class-conditional, and `meta`, a JSON string of the sampling settings, also written to
NAME.json beside it with a grid of the first 100 images in NAME.png. The work is split into
batches of --per-proc-batch-size, batch i going to rank i mod world size; every batch is
written to `NAME/batch_NNNNNN.npz` as it finishes, and its noise and labels depend only on
(--seed, i), so an interrupted run, restarted with the same command (any number of
processes), skips the batches on disk and produces the same .npz as an uninterrupted one.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import model as dis
from diffusion import create_diffusion
from scan import BACKENDS, scan_backend

SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # DiT's --vae choices
LATENT_FROM = 256  # --vae auto: latent space from this image size up, as in the paper (ImageNet 256/512)
DIS_KEYS = ("pos_embed", "patch_embed.proj.weight", "final_layer.linear.weight")


# ----------------------------------------------------------------------------- set-up

def derived_seed(*parts):
    """A 63-bit seed from ints and strings, the same in every process, run and Python version."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def process_group(kind="auto"):
    """Context giving (rank, world size, device). Under torchrun: one process per GPU with NCCL,
    or gloo on CPU; otherwise a single process. kind: auto, cpu or cuda. A process group created
    here is destroyed on exit; an existing one is reused and left to its owner."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = torch.cuda.is_available() and kind != "cpu"
    owns_group = not dist.is_initialized()
    if "RANK" not in os.environ:
        rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if owns_group:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield rank, world, device
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def set_scan_backend(name):
    """--scan-backend: 'auto' lets scan.py pick the fastest on the device; others are forced."""
    if name == "auto":
        os.environ.pop("DIS_SCAN_BACKEND", None)
    else:
        os.environ["DIS_SCAN_BACKEND"] = name


def active_scan_backend(device, say=print):
    """The scan backend that runs on `device`, or SystemExit with the reason. The CUDA scan's
    extension is compiled here (on first use, one to three minutes, announced through `say`),
    before anything is timed."""
    try:
        backend = scan_backend(device)
        if backend == "cuda":
            import scan_cuda
            if not scan_cuda.loaded():
                say("Loading the CUDA scan extension (compiled on first use: one to three minutes)")
            scan_cuda.build()
        return backend
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e))


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


# ----------------------------------------------------------------------------- the model

def parse_model_name(name):
    """'DiS-S/2' -> ('S', 2)."""
    if name not in dis.DiS_models:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(dis.DiS_models)}")
    size, patch = name.split("-")[1].split("/")
    return size, int(patch)


def model_config(name, img_size, channels, num_classes, embed_dim=None, depth=None, **options):
    """Constructor keywords of model.DiS for the named size, with optional width/depth overrides;
    `options`: learn_sigma, drop_path_rate, class_dropout_prob, skip, cond, dt_init."""
    size, patch = parse_model_name(name)
    if img_size % patch:
        raise SystemExit(f"the model input is {img_size}x{img_size}, which the patch size {patch} of {name} does not "
                         f"divide; pick an --image-size (in latent space: divided by the VAE's downsampling) "
                         f"divisible by {patch}")
    default_dim, default_depth = dis.SIZES[size]
    return dict(img_size=img_size, patch_size=patch, channels=channels, num_classes=num_classes,
                embed_dim=embed_dim or default_dim, depth=depth or default_depth, **options)


def describe(state_dict):
    """What a DiS state dict holds, read off its shapes: 'DiS-S/2 (D=368, depth 24) at 32x32, ...'."""
    dim, patch = state_dict["pos_embed"].shape[-1], state_dict["patch_embed.proj.weight"].shape[-1]
    channels = state_dict["patch_embed.proj.weight"].shape[1]
    depth = 2 * len({key.split(".")[1] for key in state_dict if key.startswith("in_blocks.")})
    table = state_dict.get("label_emb.embedding_table.weight")
    classes = 0 if table is None else table.shape[0] - 1
    adaln = "mid_block.adaLN_modulation.1.weight" in state_dict
    side = math.isqrt(state_dict["pos_embed"].shape[1] - (0 if adaln else 1 + (classes > 0))) * patch
    out = state_dict["final_layer.linear.weight"].shape[0] // patch ** 2
    name = next((f"DiS-{s}/{patch} " for s, shape in dis.SIZES.items() if shape == (dim, depth)), "DiS ")
    return (f"{name}(D={dim}, depth {depth}{', adaLN' if adaln else ''}) at {side}x{side} with {channels} channels, "
            f"{classes} classes, {'learned' if out == 2 * channels else 'fixed'} sigma")


def load_checkpoint(path, mmap=False):
    """A checkpoint file -> dict, loaded safely (tensors and plain containers only); mmap=True
    maps the tensors from the file (shared by the processes of one machine) instead of reading them."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle errors of every kind: not a torch checkpoint, or one holding arbitrary objects
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def pick_weights(ckpt, use_ema, path):
    """(which, state dict) to sample with: the EMA weights by default, else the raw model's;
    which is "ema", "model" or "raw" (a bare state dict)."""
    key = "ema" if use_ema and "ema" in ckpt else "model" if "model" in ckpt else "raw"
    state_dict = ckpt if key == "raw" else ckpt[key]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved dicts carry module.
    if not all(k in state_dict for k in DIS_KEYS):
        raise SystemExit(f"{path} holds no DiS weights: neither a DiS state dict nor 'model'/'ema' entries with one "
                         f"(a DiS state dict has {', '.join(DIS_KEYS)}, ...)")
    if use_ema and key == "model":
        print(f"{path} has no EMA weights; sampling with 'model'")
    return key, state_dict


def load_model(args, ckpt, device):
    """(DiS in eval mode on device, VAE or None, info dict) for a train.py checkpoint or, given
    --model and friends, a bare state dict of the original implementation."""
    weights, state_dict = pick_weights(ckpt, args.use_ema, args.ckpt)
    if "config" in ckpt:  # ours: everything is recorded
        config = ckpt["config"]
        vae_name = ckpt["args"]["vae"] if args.vae in (None, "auto") else SD_VAES.get(args.vae, args.vae)
        image_size, model_name = ckpt["args"]["image_size"], ckpt["args"]["model"]
        vae = load_vae(vae_name, device) if vae_name != "none" else None
    else:
        image_size, model_name = args.image_size, args.model
        vae_name = resolve_vae(args.vae, image_size)
        vae = load_vae(vae_name, device) if vae_name != "none" else None
        if vae is not None and image_size % vae_downsampling(vae):
            raise SystemExit(f"--image-size {image_size} is not divisible by the VAE's downsampling "
                             f"{vae_downsampling(vae)}")
        size = image_size // vae_downsampling(vae) if vae else image_size
        channels = vae.config.latent_channels if vae else (args.channels or 3)
        config = model_config(args.model, size, channels, args.num_classes, args.embed_dim, args.depth,
                              learn_sigma=args.learn_sigma, skip=args.skip, cond=args.cond)
    model = dis.DiS(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state_dict.items()}:
        raise SystemExit(f"{args.ckpt} holds {describe(state_dict)}, but the settings ask for "
                         f"{describe(model.state_dict())}; pass the checkpoint's --model, --image-size, --num-classes "
                         f"and --channels")
    model.load_state_dict(state_dict)
    info = dict(ckpt=os.path.abspath(args.ckpt), model=model_name, architecture=describe(state_dict), weights=weights,
                image_size=image_size, vae=vae_name, num_classes=model.num_classes)
    return model.to(device).eval(), vae, info


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def generate(model, diffusion, noise, labels=None, cfg_scale=1.0, sampler="ddpm", vae=None, cfg_channels=None,
             bf16=False):
    """noise (B, C, h, w), labels (B,) or None -> images (B, C_img, H, W) in [-1, 1].

    With labels and cfg_scale != 1 the batch is doubled with the null class and the model's
    guided forward is used (DiT's convention). Pixel-space samples have x_0 clipped to [-1, 1]
    at each step (ADM); latents are not clipped and go through the VAE decoder in float32.
    """
    fn, kwargs, guided = model, {}, labels is not None and cfg_scale != 1
    if labels is not None:
        kwargs["y"] = labels
    if guided:
        noise = torch.cat([noise, noise])
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, model.num_classes)]), cfg_scale=cfg_scale,
                      cfg_channels=cfg_channels)
        fn = model.forward_with_cfg
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=bf16):
        x = loop(fn, noise.shape, noise=noise, clip_denoised=vae is None, model_kwargs=kwargs, device=noise.device)
    if guided:
        x = x[: len(labels)]
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return x.clamp(-1, 1)


def to_uint8(images):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 numpy, as ADM stores samples."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_labels(num_classes, rows=10, columns=10):
    """Labels of a rows x columns grid with one class per row, classes spread over the range
    (0..9 for 10 classes); None for unconditional models. Returns (labels or None, count)."""
    if num_classes == 0:
        return None, rows * columns
    classes = torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()
    return classes.repeat_interleave(columns), len(classes) * columns


def save_grid(images, path, columns, text=None):
    """Tile uint8 images (B, H, W, C) into one PNG (grayscale for C = 1) with a 2-pixel black
    border, written atomically; `text` goes into the PNG's metadata."""
    b, h, w, c = images.shape
    rows = math.ceil(b / columns)
    canvas = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = image
    info = PngInfo()
    if text:
        info.add_text("dis", text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    write_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def save_npz(path, **arrays):
    """np.savez written atomically."""
    write_atomically(path, lambda f: np.savez(f, **arrays))


def write_atomically(path, write, mode="wb"):
    """write(f) into path + ".tmp", then rename it over path: an interrupted run never leaves a
    half-written file, and the previous version stays intact until the new one is complete."""
    with open(path + ".tmp", mode) as f:
        write(f)
    os.replace(path + ".tmp", path)


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text), "w")


def batch_inputs(i, count, shape, num_classes, class_labels, seed, device):
    """Noise (count, *shape) and labels (count,) or None of batch i, seeded by (seed, i) alone.
    The default generator is seeded too, since the DDPM sampler draws its noise from it."""
    torch.manual_seed(derived_seed(seed, "batch", i))
    noise = torch.randn(count, *shape, device=device)
    if num_classes == 0:
        return noise, None
    if class_labels:
        start = i * count
        return noise, torch.tensor([class_labels[(start + j) % len(class_labels)] for j in range(count)], device=device)
    return noise, torch.randint(0, num_classes, (count,), device=device)


def sample_npz(args, model, vae, diffusion, info, rank, world, device):
    """Write args.num_samples samples to sample_dir/NAME.npz (see the module docstring); returns its path."""
    name = (f"{os.path.splitext(os.path.basename(args.ckpt))[0]}-{info['weights']}-{args.sampler}"
            f"{args.num_sampling_steps}-cfg{args.cfg_scale:g}-seed{args.seed}-n{args.num_samples}")
    final, batch_dir = os.path.join(args.sample_dir, name + ".npz"), os.path.join(args.sample_dir, name)
    if os.path.isfile(final):
        if rank == 0:
            print(f"{final} exists already")
        return final
    if rank == 0:
        os.makedirs(batch_dir, exist_ok=True)
    barrier()
    per_batch = args.per_proc_batch_size
    batches = math.ceil(args.num_samples / per_batch)
    batch_path = lambda i: os.path.join(batch_dir, f"batch_{i:06d}.npz")
    todo = [i for i in range(rank, batches, world) if not os.path.isfile(batch_path(i))]
    shape = (model.in_channels, model.img_size, model.img_size)
    for i in tqdm(todo, desc=f"sampling ({world} processes)", disable=rank != 0):
        count = min(per_batch, args.num_samples - i * per_batch)
        noise, labels = batch_inputs(i, per_batch, shape, model.num_classes, args.class_labels, args.seed, device)
        noise, labels = noise[:count], None if labels is None else labels[:count]
        images = generate(model, diffusion, noise, labels, args.cfg_scale, args.sampler, vae, args.cfg_channels,
                          args.precision == "bf16")
        arrays = {"images": to_uint8(images)}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        save_npz(batch_path(i), **arrays)
    barrier()
    if rank == 0:
        images, labels = [], []
        for i in range(batches):  # one file open at a time: there can be more batches than file handles
            with np.load(batch_path(i)) as part:
                images.append(part["images"])
                if model.num_classes:
                    labels.append(part["labels"])
        images, meta = np.concatenate(images), json.dumps(info)
        arrays = dict(arr_0=images, meta=np.array(meta))
        if model.num_classes:
            arrays["arr_1"] = np.concatenate(labels).astype(np.int64)
        save_npz(final, **arrays)
        write_text(os.path.join(args.sample_dir, name + ".json"), meta + "\n")
        save_grid(images[:100], os.path.join(args.sample_dir, name + ".png"), min(10, len(images)), meta)
        shutil.rmtree(batch_dir)
        print(f"Saved {final} [arr_0 {images.dtype} {images.shape}]")
    barrier()
    return final


def fid_of(npz_path, reference, weights=None):
    """fid.evaluate on an .npz of samples (grayscale replicated to RGB, as the Inception net needs)."""
    import fid
    with np.load(npz_path) as npz:
        images = npz["arr_0"]
    samples = npz_path if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
    try:
        return fid.evaluate(samples, reference, weights=weights)
    except fid.FIDError as e:
        raise SystemExit(f"FID: {e}")


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint, or a state dict of the original DiS")
    parser.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cfg", "--cfg-scale", dest="cfg_scale", type=float, default=1.0,
                        help="classifier-free guidance scale; 1 = none (the paper's FID setting)")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="guide only the first N noise channels; 3 reproduces the original code's quirk")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (cycled for --num-samples); default: a grid of classes, or uniform")
    parser.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast of the model (CUDA); fp32 uses TF32 matmuls on CUDA")
    parser.add_argument("--scan-backend", choices=["auto", *BACKENDS], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available (one GPU per process under torchrun)")
    parser.add_argument("--out", default="sample.png", help="the grid's path when --num-samples is not given")
    parser.add_argument("--num-samples", type=int, default=None, help="write this many samples to an .npz")
    parser.add_argument("--per-proc-batch-size", type=int, default=64)
    parser.add_argument("--sample-dir", default="samples")
    parser.add_argument("--fid-ref", default=None,
                        help="reference images or statistics for fid.py (a folder, ADM .npz or statistics .npz)")
    parser.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for --fid-ref")
    parser.add_argument("--vae", default=None,
                        help="override the checkpoint's VAE (hub id or local directory); for original checkpoints: "
                             "'auto' (latent from 256 px), 'none', 'ema', 'mse', a hub id or a directory")
    original = parser.add_argument_group("original-implementation checkpoints (train.py checkpoints record these)")
    original.add_argument("--model", choices=list(dis.DiS_models), default="DiS-H/2")
    original.add_argument("--embed-dim", type=int, default=None, help="override the hidden size of --model")
    original.add_argument("--depth", type=int, default=None, help="override the depth of --model")
    original.add_argument("--image-size", type=int, default=256)
    original.add_argument("--num-classes", type=int, default=1000, help="0 for unconditional")
    original.add_argument("--channels", type=int, default=None, help="image channels in pixel space (default 3)")
    original.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    original.add_argument("--skip", choices=["concat", "add", "none"], default="concat")
    original.add_argument("--cond", choices=["token", "adaln"], default="token")
    args = parser.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be positive")
    return args


def check_labels(args, model):
    if model.num_classes == 0 and (args.class_labels or args.cfg_scale != 1):
        raise SystemExit("this model is unconditional: --class-labels and --cfg need a class-conditional model")
    bad = [c for c in args.class_labels or [] if not 0 <= c < model.num_classes]
    if bad:
        raise SystemExit(f"--class-labels {bad} are outside the model's classes 0..{model.num_classes - 1}")


def main(argv=None):
    args = parse_args(argv)
    set_scan_backend(args.scan_backend)
    with process_group(args.device) as (rank, world, device):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32, as DiT's sampler
        model, vae, info = load_model(args, load_checkpoint(args.ckpt), device)
        check_labels(args, model)
        respacing = f"ddim{args.num_sampling_steps}" if args.sampler == "ddim" else str(args.num_sampling_steps)
        diffusion = create_diffusion(respacing, learn_sigma=model.out_channels == 2 * model.in_channels)
        info.update(sampler=args.sampler, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                    cfg_channels=args.cfg_channels, seed=args.seed, class_labels=args.class_labels,
                    precision=args.precision, num_samples=args.num_samples)
        if rank == 0:
            print(f"{info['architecture']}, {info['weights']} weights, scan backend {active_scan_backend(device)}, "
                  f"{args.sampler} {args.num_sampling_steps} steps, cfg {args.cfg_scale:g}, "
                  f"{world} process(es) on {device}")
        if args.num_samples:
            path = sample_npz(args, model, vae, diffusion, info, rank, world, device)
            if args.fid_ref and rank == 0:
                metrics = fid_of(path, args.fid_ref, args.inception_weights)
                print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None))
                info["metrics"] = metrics
                write_text(path[: -len(".npz")] + ".json", json.dumps(info) + "\n")
            return path
        if rank == 0:
            labels, count = (torch.tensor(args.class_labels), len(args.class_labels)) if args.class_labels \
                else grid_labels(model.num_classes)
            torch.manual_seed(args.seed)
            noise = torch.randn(count, model.in_channels, model.img_size, model.img_size, device=device)
            images = generate(model, diffusion, noise, None if labels is None else labels.to(device), args.cfg_scale,
                              args.sampler, vae, args.cfg_channels, args.precision == "bf16")
            save_grid(to_uint8(images), args.out, min(10, count), json.dumps(info))
            print(f"Saved {args.out}")
        return args.out


if __name__ == "__main__":
    main()
