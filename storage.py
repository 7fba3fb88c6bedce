"""What is written to and read from disk: checkpoints (ours and the original implementation's),
the model configuration they record, sample grids and .npz files, all written atomically."""
import json
import math
import os
import re
import shutil

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import model as dis
from data import SD_VAES, load_vae, resolve_vae, vae_downsampling
from diffusion import SAMPLERS, check_cfg_interval, generate
from distributed import barrier, derived_seed

DIS_KEYS = ("pos_embed", "patch_embed.proj.weight", "final_layer.linear.weight")


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or used; the message is one line that names it."""


def read_checkpoint(path, mmap=False):
    """A torch checkpoint file -> dict, loaded safely (tensors and plain containers only); mmap=True
    maps the tensors from the file (shared by the processes of one machine) instead of reading them."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle errors of every kind: not a torch checkpoint, or one holding arbitrary objects
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}): not a PyTorch checkpoint, or "
                              f"one holding objects other than tensors and plain containers")


def load_checkpoint(path, mmap=False):
    """read_checkpoint for scripts: a problem ends the program with its one-line message."""
    try:
        return read_checkpoint(path, mmap)
    except CheckpointError as e:
        raise SystemExit(str(e))


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def pick_weights(ckpt, use_ema, path):
    """(which, state dict) to sample with: the EMA weights by default, else the raw model's;
    which is "ema", "model" or "raw" (a bare state dict)."""
    key = "ema" if use_ema and "ema" in ckpt else "model" if "model" in ckpt else "raw"
    state_dict = ckpt if key == "raw" else ckpt[key]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds no state dict under {key!r}")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved dicts carry module.
    if not all(k in state_dict for k in DIS_KEYS):
        raise CheckpointError(f"{path} holds no DiS weights: neither a DiS state dict nor 'model'/'ema' entries with "
                              f"one (a DiS state dict has {', '.join(DIS_KEYS)}, ...)")
    if use_ema and key == "model":
        print(f"{path} has no EMA weights; sampling with 'model'")
    return key, state_dict


# ----------------------------------------------------------------------------- weights in and out

EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def is_hub_id(source):
    """'owner/name' that is no local path: a model on the Hugging Face hub."""
    return (not os.path.exists(source) and HUB_ID.fullmatch(source) is not None
            and not source.endswith(CHECKPOINT_SUFFIXES))


def locate(source):
    """A checkpoint's local path: `source` itself, or for a hub id the folder that
    huggingface_hub downloads it to (only model.safetensors and config.json; cached)."""
    if not is_hub_id(source):
        if not os.path.exists(source):
            raise CheckpointError(f"checkpoint {source} not found")
        return source
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(source, allow_patterns=[EXPORT_WEIGHTS, EXPORT_CONFIG])
    except Exception as e:  # offline, unknown repository, no permission: every failure is the same to the user
        raise CheckpointError(f"{source} is no local file or folder, and the Hugging Face hub could not provide it "
                              f"({type(e).__name__}: {first_line(e)[:200]}); offline? Download it where you are "
                              f"online (huggingface-cli download {source} --local-dir DIR) and pass DIR")


def read_export(folder):
    """(state dict, recorded settings) of a folder written by export_model."""
    paths = [os.path.join(folder, name) for name in (EXPORT_WEIGHTS, EXPORT_CONFIG)]
    if not all(os.path.isfile(p) for p in paths):
        raise CheckpointError(f"folder {folder} holds no {EXPORT_WEIGHTS} and {EXPORT_CONFIG} (written by sample.py "
                              f"--export); for a train.py run give one of its checkpoints/NNNNNNN.pt")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        with open(paths[1]) as f:
            record = json.load(f)
        state_dict = load_file(paths[0])
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the export in {folder}: {type(e).__name__}: {first_line(e)}")
    missing = [k for k in ("model", "image_size", "vae", "config") if k not in record]
    if missing:
        raise CheckpointError(f"{paths[1]} lacks {', '.join(missing)}")
    return state_dict, record


def load_weights(source, use_ema=True):
    """(state dict, which weights, recorded settings or None) of a checkpoint: a train.py
    checkpoint (EMA weights unless use_ema=False), a state dict of the original implementation
    (bare or under "model"/"ema"; nothing recorded), a folder written by export_model, or the
    Hugging Face hub id of one. Recorded settings: model (name), image_size, vae, config
    (model.DiS's keywords)."""
    path = locate(source)
    if os.path.isdir(path):
        state_dict, record = read_export(path)
        return state_dict, record.get("weights", "ema"), record
    ckpt = read_checkpoint(path)
    which, state_dict = pick_weights(ckpt, use_ema, source)
    if "config" not in ckpt:
        return state_dict, which, None
    args = ckpt["args"]
    return state_dict, which, dict(model=args["model"], image_size=args["image_size"], vae=args["vae"],
                                   config=ckpt["config"])


ORIGINAL_SETTINGS = dict(model="DiS-H/2", image_size=256, num_classes=1000, channels=None, embed_dim=None, depth=None,
                         learn_sigma=True, skip="concat", cond="token")


def original_record(vae_name, vae, settings):
    """The settings a train.py checkpoint records, for a state dict of the original implementation:
    `settings` (keys of ORIGINAL_SETTINGS, DiT's ImageNet 256 by default) and its VAE or None."""
    o = {**ORIGINAL_SETTINGS, **settings}
    if vae is not None and o["image_size"] % vae_downsampling(vae):
        raise CheckpointError(f"--image-size {o['image_size']} is not divisible by the VAE's downsampling "
                              f"{vae_downsampling(vae)}")
    size = o["image_size"] // vae_downsampling(vae) if vae else o["image_size"]
    channels = vae.config.latent_channels if vae else (o["channels"] or 3)
    config = model_config(o["model"], size, channels, o["num_classes"], o["embed_dim"], o["depth"],
                          learn_sigma=o["learn_sigma"], skip=o["skip"], cond=o["cond"])
    return dict(model=o["model"], image_size=o["image_size"], vae=vae_name, config=config)


RUNTIME_OPTIONS = ("scan_backend", "scan_save_every", "recompute_scan_inputs")  # model.DiS keywords that are not part of the weights


def load_model(source, device="cpu", use_ema=True, vae=None, original=None, load_decoder=True, scan_backend="auto"):
    """(DiS in eval mode on device, VAE or None, info dict) for any checkpoint load_weights reads.

    vae: None or "auto" for the recorded VAE; else "ema", "mse", "none", a hub id or a folder.
    original: settings of ORIGINAL_SETTINGS for a state dict of the original implementation,
    which records none. load_decoder=False skips the VAE where the checkpoint records the model
    configuration (a state dict of the original needs it to size the model). scan_backend: the
    model's (see scan.resolve_backend).
    info: ckpt, model, architecture, weights, image_size, vae, num_classes, config (the
    architecture's keywords of model.DiS, without runtime options)."""
    state_dict, weights, record = load_weights(source, use_ema)
    if record is not None:
        vae_name = record["vae"] if vae in (None, "auto") else SD_VAES.get(vae, vae)
        decoder = load_vae(vae_name, device) if vae_name != "none" and load_decoder else None
    else:
        vae_name = resolve_vae(vae, {**ORIGINAL_SETTINGS, **(original or {})}["image_size"])
        decoder = load_vae(vae_name, device) if vae_name != "none" else None
        record = original_record(vae_name, decoder, original or {})
    config = {k: v for k, v in record["config"].items() if k not in RUNTIME_OPTIONS}
    model = dis.DiS(**config, scan_backend=scan_backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state_dict.items()}:
        raise CheckpointError(f"{source} holds {describe(state_dict)}, but the settings ask for "
                              f"{describe(model.state_dict())}; pass the checkpoint's --model, --image-size, "
                              f"--num-classes and --channels")
    model.load_state_dict(state_dict)
    info = dict(ckpt=source if is_hub_id(source) else os.path.abspath(source), model=record["model"],
                architecture=describe(state_dict), weights=weights, image_size=record["image_size"], vae=vae_name,
                num_classes=model.num_classes, config=config)
    return model.to(device).eval(), decoder, info


def export_model(folder, model, info):
    """Write the model's weights to folder/model.safetensors and, to folder/config.json, what
    load_model needs to rebuild it: model (name), image_size, num_classes, vae, weights (which
    weights of the checkpoint), architecture and config (model.DiS's keywords)."""
    from safetensors.torch import save
    os.makedirs(folder, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state_dict, metadata={"format": "pt"})
    write_atomically(os.path.join(folder, EXPORT_WEIGHTS), lambda f: f.write(weights))
    record = {k: info[k] for k in ("model", "image_size", "num_classes", "vae", "weights", "architecture", "config")}
    write_text(os.path.join(folder, EXPORT_CONFIG), json.dumps(record, indent=2) + "\n")
    return folder


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
    half-written file, and the previous version stays intact until the new one is complete. If
    writing raises (a full disk, Ctrl-C), the .tmp file is removed and the error raised again."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass  # never created, or already gone: the first error is the one to report
        raise


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text), "w")


# ----------------------------------------------------------------------------- sample .npz files

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


def write_samples_npz(model, diffusion, vae, num_samples, batch_size, out_dir, name, seed=0, cfg_scale=1.0,
                      sampler="ddpm", class_labels=None, precision="fp32", cfg_channels=None, info=None,
                      rank=0, world=1, device="cpu", progress=True, cfg_interval=None, cuda_graphs=False):
    """Sample num_samples images into out_dir/name.npz in the ADM evaluator's format; returns its path.

    arr_0: uint8 (N, H, W, C) (C = 1 for grayscale data); arr_1: int64 labels (N,) when the model
    is class-conditional; meta: `info` (a dict of the settings) as a JSON string, also written
    to name.json beside it with a grid of the first 100 images in name.png.
    The work is split into batches of batch_size, batch i going to rank i mod world; every batch
    is written to out_dir/name/batch_NNNNNN.npz as it finishes, and its noise and labels depend
    only on (seed, i), so an interrupted run, started again with the same arguments (any world
    size), skips the batches on disk and produces the same .npz as an uninterrupted one. Every
    rank must call this (it holds barriers). class_labels: labels cycled over the samples, or
    None for uniform random classes. precision: "fp32" or "bf16" (autocast of the model).
    sampler, cfg_scale, cfg_channels, cfg_interval, cuda_graphs: see diffusion.generate. progress:
    bars over the batches and the steps of each (rank 0).
    """
    check_sampling_arguments(model, num_samples=num_samples, batch_size=batch_size, cfg_scale=cfg_scale,
                             class_labels=class_labels, precision=precision, rank=rank, world=world)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    check_cfg_interval(cfg_interval)
    final, batch_dir = os.path.join(out_dir, name + ".npz"), os.path.join(out_dir, name)
    if os.path.isfile(final):
        if rank == 0:
            print(f"{final} exists already")
        return final
    os.makedirs(batch_dir, exist_ok=True)
    batches = math.ceil(num_samples / batch_size)
    batch_path = lambda i: os.path.join(batch_dir, f"batch_{i:06d}.npz")
    todo = [i for i in range(rank, batches, world) if not os.path.isfile(batch_path(i))]
    shape = (model.in_channels, model.img_size, model.img_size)
    for i in tqdm(todo, desc=f"sampling ({world} processes)", disable=rank != 0 or not progress):
        count = min(batch_size, num_samples - i * batch_size)
        noise, labels = batch_inputs(i, batch_size, shape, model.num_classes, class_labels, seed, device)
        noise, labels = noise[:count], None if labels is None else labels[:count]
        images = generate(model, diffusion, noise, labels, cfg_scale, sampler, vae, cfg_channels, precision == "bf16",
                          cfg_interval, progress and rank == 0, cuda_graphs)
        arrays = {"images": to_uint8(images)}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        save_npz(batch_path(i), **arrays)
    barrier()
    if rank == 0:
        gather_batches(final, [batch_path(i) for i in range(batches)], model.num_classes > 0, info or {})
        shutil.rmtree(batch_dir)
    barrier()
    return final


def gather_batches(final, paths, labelled, info):
    """The batch files, in order, -> one ADM .npz at `final`, with its .json and .png beside it."""
    images, labels = [], []
    for path in paths:  # one file open at a time: there can be more batches than file handles
        with np.load(path) as part:
            images.append(part["images"])
            if labelled:
                labels.append(part["labels"])
    images, meta = np.concatenate(images), json.dumps(info)
    arrays = dict(arr_0=images, meta=np.array(meta))
    if labelled:
        arrays["arr_1"] = np.concatenate(labels).astype(np.int64)
    save_npz(final, **arrays)
    stem = final[: -len(".npz")]
    write_text(stem + ".json", meta + "\n")
    save_grid(images[:100], stem + ".png", min(10, len(images)), meta)
    print(f"Saved {final} [arr_0 {images.dtype} {images.shape}]")


def check_sampling_arguments(model, num_samples, batch_size, cfg_scale, class_labels, precision, rank, world):
    """ValueError naming the first argument of write_samples_npz outside its range."""
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, not {num_samples!r}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0 (1: no guidance), not {cfg_scale!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} must be in 0..world-1 for world {world!r}")
    if model.num_classes == 0 and (class_labels or cfg_scale != 1):
        raise ValueError("class_labels and cfg_scale != 1 need a class-conditional model; this one is unconditional")
    bad = [c for c in class_labels or [] if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"class_labels {bad} are outside the model's classes 0..{model.num_classes - 1}")
