"""Sample images from a trained DiS: a PNG grid, or an .npz for the ADM evaluator / fid.py.

    python sample.py --ckpt results/000-DiS-S-2/checkpoints/0100000.pt --cfg 1.5      # grid -> sample.png
    python sample.py --ckpt CKPT --sampler dpm++ --num-sampling-steps 25 --cfg 1.5     # 10x fewer model calls
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000              # -> samples/NAME.npz
    python sample.py --ckpt dis_h2_256.pth --model DiS-H/2 --image-size 256 --cfg 1.5  # original checkpoint
    python sample.py --ckpt CKPT --export dis-s2-fashion                               # safetensors + config.json
    python sample.py --ckpt owner/dis-s2-fashion --cfg 1.5                             # from the Hugging Face hub

--ckpt takes a train.py checkpoint (which records the model, image size, classes and latent
(VAE) settings, so none of them need repeating), a folder written by --export (or the Hugging
Face hub id of one), or a checkpoint of the original implementation (a bare state dict, or
{"model": ...} / {"ema": ...}, with the same parameter names); for the latter give --model,
--image-size, --num-classes and, in pixel space, --channels (DiT's defaults: a
class-conditional model of ImageNet 256 in SD-VAE latent space). The EMA weights are used
unless --no-use-ema.

Data flows: noise (B, C, h, w) and labels -> a sampler of diffusion.py running the model
--num-sampling-steps times: ddpm (ancestral, the paper's 250 steps), ddim (deterministic) or
dpm++ (DPM-Solver++(2M), deterministic) or dpm++sde (its stochastic form) -> VAE decoder in latent
space -> uint8 images (B, H, W, C). Classifier-free guidance when --cfg-scale != 1; with
--cfg-interval LOW HIGH only at the steps t of the 1000-step process with LOW <= t/1000 <= HIGH
(0: data, 1: pure noise), the conditional model alone elsewhere (at half the cost). On a GPU
the model's calls are replayed from CUDA graphs (graphs.py; --no-cuda-graphs: op by op).

With --num-samples the images go to `--sample-dir/NAME.npz` in the ADM evaluator's format:
arr_0 uint8 (N, H, W, C) (C = 1 for grayscale data), arr_1 int64 labels (N,) when
class-conditional, and `meta`, a JSON string of the sampling settings, also written to
NAME.json beside it with a grid of the first 100 images in NAME.png. The work is split into
batches of --per-proc-batch-size, batch i going to rank i mod world size; every batch is
written to `NAME/batch_NNNNNN.npz` as it finishes, and its noise and labels depend only on
(--seed, i), so an interrupted run, restarted with the same command (any number of
processes), skips the batches on disk and produces the same .npz as an uninterrupted one.

--export DIR writes the chosen weights (EMA by default) as DIR/model.safetensors with
DIR/config.json (model name and configuration, image size, classes, VAE), then exits; upload
the folder to the hub (huggingface-cli upload owner/name DIR) to share it.
"""
import argparse
import hashlib
import json
import os
import sys

import torch

import model as dis
from cli import OneLineParser, at_least, check_exist, check_ranges, input_errors, nearest_existing
from diffusion import DIFFUSION_STEPS, SAMPLERS, create_diffusion, generate, sampler_respacing
from distributed import process_group
from scan import BACKENDS, resolve_backend
from storage import (CheckpointError, export_model, grid_labels, is_hub_id, load_model, save_grid, to_uint8,
                     write_samples_npz, write_text)

DDIM_COUNTS = sorted({len(range(0, DIFFUSION_STEPS, stride)) for stride in range(1, DIFFUSION_STEPS)})
CHECKS = {  # flag: (test, what it accepts); a flag left out (None) is not tested
    "num_sampling_steps": (lambda v: 2 <= v <= DIFFUSION_STEPS, f"in 2..{DIFFUSION_STEPS}"),
    "cfg_scale": at_least(0, ">= 0 (1: no guidance)"),
    **{name: at_least(1, "positive") for name in ("per_proc_batch_size", "num_samples", "cfg_channels", "image_size",
                                                  "channels", "embed_dim", "depth")},
    "num_classes": at_least(0, ">= 0 (0: unconditional)"), "seed": at_least(0, ">= 0"),
}


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = OneLineParser(prog="sample.py", description=__doc__.split("\n")[0])
    ckpt = parser.add_argument_group("weights")
    ckpt.add_argument("--ckpt", required=True,
                      help="a train.py checkpoint, a folder written by --export, the Hugging Face hub id of one "
                           "(owner/name), or a state dict of the original DiS")
    ckpt.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True)
    ckpt.add_argument("--vae", default=None,
                      help="override the checkpoint's VAE (hub id or local directory); for original checkpoints: "
                           "'auto' (latent from 256 px), 'none', 'ema', 'mse', a hub id or a directory")
    ckpt.add_argument("--export", default=None, metavar="DIR",
                      help="write the weights as DIR/model.safetensors and DIR/config.json, then exit")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                          help="ddpm: ancestral (the paper's); ddim: deterministic, DDIM's stride; "
                               "dpm++: DPM-Solver++(2M), deterministic; dpm++sde: its stochastic (SDE) form")
    sampling.add_argument("--num-sampling-steps", type=int, default=250,
                          help=f"model evaluations per image (2..{DIFFUSION_STEPS}; ddim: a count an integer stride "
                               f"gives, e.g. 10, 25, 50, 100, 250)")
    sampling.add_argument("--cfg-scale", "--cfg", dest="cfg_scale", type=float, default=1.0,
                          help="classifier-free guidance scale >= 0; 1 = none (the paper's FID setting), 0 = the "
                               "unconditional model")
    sampling.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                          help="guide only the steps t with LOW <= t/1000 <= HIGH (0: data, 1: pure noise); "
                               "default: every step")
    sampling.add_argument("--cfg-channels", type=int, default=None,
                          help="guide only the first N noise channels; 3 reproduces the original code's quirk")
    sampling.add_argument("--class-labels", type=int, nargs="+", default=None,
                          help="labels to sample (cycled for --num-samples); default: a grid of classes, or uniform")
    sampling.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0)
    sampling.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                          help="bf16: autocast of the model; fp32 uses TF32 matmuls on CUDA; auto (default): bf16 "
                               "on CUDA (the same Frechet distance at 1.5x the speed, BENCHMARKS.md), fp32 elsewhere")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="sample.png", help="the grid's path when --num-samples is not given")
    output.add_argument("--num-samples", type=int, default=None, help="write this many samples to an .npz")
    output.add_argument("--per-proc-batch-size", type=int, default=64)
    output.add_argument("--sample-dir", default="samples")
    output.add_argument("--fid-ref", default=None,
                        help="reference images or statistics for fid.py (a folder, ADM .npz or statistics .npz)")
    output.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for --fid-ref")
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--scan-backend", choices=["auto", *BACKENDS], default="auto")
    hardware.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                          help="auto: CUDA when available (one GPU per process under torchrun)")
    hardware.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                          help="replay the model's calls from CUDA graphs (graphs.py; the same samples, less time "
                               "launching kernels); default: on with a CUDA device")
    original = parser.add_argument_group("original-implementation checkpoints (the others record these)")
    original.add_argument("--model", choices=list(dis.DiS_models), default="DiS-H/2")
    original.add_argument("--embed-dim", type=int, default=None, help="override the hidden size of --model")
    original.add_argument("--depth", type=int, default=None, help="override the depth of --model (even)")
    original.add_argument("--image-size", type=int, default=256)
    original.add_argument("--num-classes", type=int, default=1000, help="0 for unconditional")
    original.add_argument("--channels", type=int, default=None, help="image channels in pixel space (default 3)")
    original.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    original.add_argument("--skip", choices=["concat", "add", "none"], default="concat")
    original.add_argument("--cond", choices=["token", "adaln"], default="token")
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args, parser


def check_args(args, parser):
    """Every numeric and path argument in its range, or parser.error naming it (exit code 2)."""
    if not os.path.exists(args.ckpt) and not is_hub_id(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: no such file or folder (nor a Hugging Face hub id owner/name)")
    check_ranges(args, parser, CHECKS)
    steps = args.num_sampling_steps
    if args.sampler == "ddim" and steps not in DDIM_COUNTS:
        near = sorted(DDIM_COUNTS, key=lambda n: abs(n - steps))[:2]
        parser.error(f"--num-sampling-steps {steps} with --sampler ddim: no integer stride gives {steps} of the "
                     f"{DIFFUSION_STEPS} steps; nearest that do: {', '.join(map(str, sorted(near)))}")
    if args.cfg_interval is not None and not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        parser.error(f"--cfg-interval LOW HIGH needs 0 <= LOW <= HIGH <= 1, not {args.cfg_interval[0]:g} "
                     f"{args.cfg_interval[1]:g}")
    if args.depth is not None and args.depth % 2:
        parser.error(f"--depth must be even (depth/2 blocks on each side of the middle block), not {args.depth}")
    if any(c < 0 for c in args.class_labels or []):
        parser.error(f"--class-labels must be >= 0, not {min(args.class_labels)}")
    check_exist(parser, (("--fid-ref", args.fid_ref), ("--inception-weights", args.inception_weights)))
    if args.fid_ref is not None:
        import fid  # with torchvision's Inception network: seconds to import, so only for --fid-ref
        if not args.num_samples:
            parser.error("--fid-ref needs --num-samples (the FID of the written .npz)")
        try:  # before sampling: the weights are looked for (or downloaded) now rather than after hours of it
            fid.find_weights(args.inception_weights)
        except fid.FIDError as e:
            parser.error(f"--inception-weights: {e}")
    for flag, path in (("--sample-dir", args.sample_dir), ("--export", args.export)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path} is a file; give a folder")
    if args.num_samples is None and args.export is None and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give the grid's file name, e.g. "
                     f"{os.path.join(args.out, 'sample.png')}")
    grid_folder = None if args.num_samples or args.export else os.path.dirname(os.path.abspath(args.out))
    for flag, path in (("--sample-dir", args.sample_dir if args.num_samples else None), ("--export", args.export),
                       ("--out", grid_folder)):
        if path is not None and not writable(path):
            parser.error(f"{flag} {path}: cannot write there (a file in the way, or no permission)")
    if 0 <= args.cfg_scale < 1:
        print(f"warning: --cfg-scale {args.cfg_scale:g} < 1 moves the samples from the conditional towards the "
              f"unconditional model (0: unconditional; 1: no guidance)", file=sys.stderr)
    if args.cfg_interval is not None and args.cfg_scale == 1:
        print("warning: --cfg-interval has no effect at --cfg-scale 1 (no guidance)", file=sys.stderr)


def writable(folder):
    """Whether files can be created in `folder` or, where it does not exist, in its nearest existing parent."""
    folder = nearest_existing(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def check_against_model(args, parser, model):
    """The arguments that depend on the model: class labels, guidance and guided channels."""
    if model.num_classes == 0 and (args.class_labels or args.cfg_scale != 1):
        parser.error("--class-labels and --cfg-scale need a class-conditional model; this one is unconditional")
    bad = [c for c in args.class_labels or [] if c >= model.num_classes]
    if bad:
        parser.error(f"--class-labels {bad} are outside the model's classes 0..{model.num_classes - 1}")
    if args.cfg_channels is not None and args.cfg_channels > model.in_channels:
        parser.error(f"--cfg-channels must be in 1..{model.in_channels} (the model's noise channels), "
                     f"not {args.cfg_channels}")


def npz_name(args, info):
    """The .npz's name: the checkpoint and the settings that change the samples."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.ckpt)))[0]
    name = f"{stem}-{info['weights']}-{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale:g}"
    if args.cfg_interval is not None:
        name += f"-interval{args.cfg_interval[0]:g}-{args.cfg_interval[1]:g}"
    if args.precision != "fp32":
        name += f"-{args.precision}"
    if args.class_labels or args.cfg_channels:
        name += "-" + hashlib.sha256(repr((args.class_labels, args.cfg_channels)).encode()).hexdigest()[:8]
    return f"{name}-seed{args.seed}-n{args.num_samples}"


def load(args, parser, device, load_decoder=True, scan_backend="auto"):
    """load_model with the command line's settings; a problem with the checkpoint, the model
    settings or the VAE is a usage error (one line, exit status 2)."""
    original = dict(model=args.model, image_size=args.image_size, num_classes=args.num_classes, channels=args.channels,
                    embed_dim=args.embed_dim, depth=args.depth, learn_sigma=args.learn_sigma, skip=args.skip,
                    cond=args.cond)
    try:
        with input_errors(parser):  # storage.model_config and data.load_vae end with SystemExit(message)
            return load_model(args.ckpt, device, args.use_ema, args.vae, original, load_decoder, scan_backend)
    except CheckpointError as e:
        parser.error(f"--ckpt: {e}")


def scan_backend_on(args, parser, device):
    """The scan backend that --scan-backend runs on the device (the CUDA scan is compiled here)."""
    try:
        return resolve_backend(device, args.scan_backend)
    except ValueError as e:
        parser.error(f"--scan-backend: {e}")


def write_grid(args, model, diffusion, vae, info, device):
    """One image per label (a grid of classes by default), with a bar over the sampling steps."""
    labels, count = (torch.tensor(args.class_labels), len(args.class_labels)) if args.class_labels \
        else grid_labels(model.num_classes)
    torch.manual_seed(args.seed)
    noise = torch.randn(count, model.in_channels, model.img_size, model.img_size, device=device)
    images = generate(model, diffusion, noise, None if labels is None else labels.to(device), args.cfg_scale,
                      args.sampler, vae, args.cfg_channels, args.precision == "bf16", args.cfg_interval, progress=True,
                      cuda_graphs=args.cuda_graphs)
    save_grid(to_uint8(images), args.out, min(10, count), json.dumps(info))
    print(f"Saved {args.out}")
    return args.out


def main(argv=None):
    args, parser = parse_args(argv)
    if args.export:
        model, _, info = load(args, parser, "cpu", load_decoder=False)
        try:
            export_model(args.export, model, info)
        except OSError as e:
            raise SystemExit(f"--export: cannot write {e.filename}: {e.strerror}")
        print(f"Exported {info['architecture']} ({info['weights']} weights) to {args.export}")
        return args.export
    with process_group(args.device) as (rank, world, device):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32, as DiT's sampler
        if args.precision == "auto":
            args.precision = "bf16" if device.type == "cuda" else "fp32"
        if args.cuda_graphs and device.type != "cuda":
            parser.error(f"--cuda-graphs needs a CUDA device; this run is on {device.type}")
        args.cuda_graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
        backend = scan_backend_on(args, parser, device)
        model, vae, info = load(args, parser, device, scan_backend=backend)
        check_against_model(args, parser, model)
        diffusion = create_diffusion(sampler_respacing(args.sampler, args.num_sampling_steps),
                                     learn_sigma=model.out_channels == 2 * model.in_channels,
                                     diffusion_steps=DIFFUSION_STEPS)
        info.update(sampler=args.sampler, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                    cfg_interval=args.cfg_interval, cfg_channels=args.cfg_channels, seed=args.seed,
                    class_labels=args.class_labels, precision=args.precision, num_samples=args.num_samples)
        if rank == 0:
            interval = "" if args.cfg_interval is None else " in t/1000 [{:g}, {:g}]".format(*args.cfg_interval)
            print(f"{info['architecture']}, {info['weights']} weights, scan backend {backend}, "
                  f"{args.sampler} {args.num_sampling_steps} steps, cfg {args.cfg_scale:g}{interval}, "
                  f"{world} process(es) on {device}")
        try:
            if not args.num_samples:
                return write_grid(args, model, diffusion, vae, info, device) if rank == 0 else args.out
            path = write_samples_npz(model, diffusion, vae, args.num_samples, args.per_proc_batch_size,
                                     args.sample_dir, npz_name(args, info), args.seed, args.cfg_scale, args.sampler,
                                     args.class_labels, args.precision, args.cfg_channels, info, rank, world, device,
                                     cfg_interval=args.cfg_interval, cuda_graphs=args.cuda_graphs)
        except OSError as e:  # a full disk, a folder removed meanwhile: the samples on disk stay, resumable
            raise SystemExit(f"cannot write {e.filename}: {e.strerror}")
        if args.fid_ref and rank == 0:
            import fid
            try:
                metrics = fid.evaluate(path, args.fid_ref, weights=args.inception_weights)
            except fid.FIDError as e:
                raise SystemExit(f"--fid-ref: {e}")
            print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None))
            info["metrics"] = metrics
            write_text(path[: -len(".npz")] + ".json", json.dumps(info) + "\n")
        return path


if __name__ == "__main__":
    main()
