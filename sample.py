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
import json
import os

import numpy as np
import torch

import model as dis
from diffusion import create_diffusion, generate
from distributed import process_group
from scan import BACKENDS, active_scan_backend, set_scan_backend
from storage import grid_labels, load_checkpoint, load_model, save_grid, to_uint8, write_samples_npz, write_text


# ----------------------------------------------------------------------------- FID

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
            name = (f"{os.path.splitext(os.path.basename(args.ckpt))[0]}-{info['weights']}-{args.sampler}"
                    f"{args.num_sampling_steps}-cfg{args.cfg_scale:g}-seed{args.seed}-n{args.num_samples}")
            path = write_samples_npz(model, diffusion, vae, args.num_samples, args.per_proc_batch_size,
                                     args.sample_dir, name, args.seed, args.cfg_scale, args.sampler, args.class_labels,
                                     args.precision, args.cfg_channels, info, rank, world, device)
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
