"""Quality against cost of the samplers on a class-conditional Fashion-MNIST DiS: a markdown
table of the Fashion-MNIST yardstick's Frechet distance (FD) and class accuracy per setting,
with the model evaluations per image and the sampling wall time.

    python tools/sampler_table.py --ckpt results/000-DiS-S-2/checkpoints/0400000.pt --out sampler_table.md
    python tools/sampler_table.py --ckpt CKPT --settings ddpm250 dpm++25 --num-samples 500

Every setting samples the same --num-samples images: the same noise and the same labels
(the 10 classes in turn), seeded by --seed, in batches of --batch-size, so the rows differ only
by their sampler, steps, guidance and precision. The yardstick (yardstick.evaluate) measures
the FD of the samples in the feature space of a small Fashion-MNIST classifier and the share
of samples that classifier assigns to the class they were drawn for. "evals/image" counts
images through the network per sample (a guided step counts two); the wall time covers
sampling only, with the device synchronised.
"""
import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import yardstick  # noqa: E402
from diffusion import (DIFFUSION_STEPS, SAMPLERS, check_cfg_interval, create_diffusion, generate,  # noqa: E402
                       sampler_respacing, space_timesteps)
from scan import BACKENDS, resolve_backend  # noqa: E402
from storage import CheckpointError, batch_inputs, load_model, to_uint8, write_text  # noqa: E402


NUMBER = r"[0-9]+(?:\.[0-9]+)?"
SAMPLER_NAME = "|".join(map(re.escape, sorted(SAMPLERS, key=len, reverse=True)))  # dpm++sde before dpm++
SETTING_NAME = re.compile(f"(?P<sampler>{SAMPLER_NAME})(?P<steps>[1-9][0-9]*)(?:-cfg(?P<cfg>{NUMBER}))?"
                          f"(?:-in(?P<low>{NUMBER})-(?P<high>{NUMBER}))?(?:-(?P<precision>bf16|fp32))?")
# The default table, the most telling first (the table is written after each row): the paper's
# DDPM 250, the fast samplers at 10-50 steps, bf16, guidance scales and intervals.
DEFAULT_SETTINGS = ["ddpm250", "dpm++25", "dpm++10", "dpm++15", "dpm++50", "ddim25", "ddim10", "ddim50",
                    "dpm++25-bf16", "dpm++25-cfg1.5", "dpm++25-cfg2", "dpm++25-cfg3", "dpm++25-cfg2-in0.1-0.7",
                    "dpm++25-cfg3-in0.1-0.7"]


def parse_setting(name):
    """A setting from its name, SAMPLER STEPS [-cfgSCALE] [-inLOW-HIGH] [-bf16|-fp32], e.g.
    "dpm++25-cfg2-in0.1-0.7": DPM-Solver++ in 25 steps, guidance scale 2 applied where t/T is in
    [0.1, 0.7], float32 (the default precision). Raises argparse.ArgumentTypeError."""
    match = SETTING_NAME.fullmatch(name)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{name!r}: expected SAMPLER STEPS [-cfgSCALE] [-inLOW-HIGH] [-bf16|-fp32] with SAMPLER one of "
            f"{', '.join(SAMPLERS)}, e.g. dpm++25-cfg2-in0.1-0.7")
    try:  # the respacing's own rule (e.g. at most T steps)
        space_timesteps(DIFFUSION_STEPS, sampler_respacing(match["sampler"], int(match["steps"])))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{name!r}: {e}") from None
    cfg = float(match["cfg"] or 1)
    interval = None if match["low"] is None else (float(match["low"]), float(match["high"]))
    try:
        check_cfg_interval(interval)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name!r}: the interval needs 0 <= LOW <= HIGH <= 1") from None
    if interval is not None and cfg == 1:
        raise argparse.ArgumentTypeError(f"{name!r}: an interval needs a guidance scale (-cfgSCALE) other than 1")
    return dict(sampler=match["sampler"], steps=int(match["steps"]), cfg=cfg, interval=interval,
                precision=match["precision"] or "fp32")


def named_setting(name):
    """argparse type of --settings: (name, setting)."""
    return name, parse_setting(name)


def counting_forward(model):
    """Wrap model.forward to count the images it processes; returns the counter (a one-item list)."""
    images, forward = [0], model.forward

    def counted(x, t, y=None):
        images[0] += len(x)
        return forward(x, t, y)
    model.forward = counted
    return images


def sample_setting(model, spec, num_samples, batch_size, seed, device):
    """uint8 samples (N, H, W, C), their labels (N,), evaluations per image and seconds."""
    diffusion = create_diffusion(sampler_respacing(spec["sampler"], spec["steps"]),
                                 learn_sigma=model.out_channels == 2 * model.in_channels)
    shape = (model.in_channels, model.img_size, model.img_size)
    classes = list(range(model.num_classes))
    counter = counting_forward(model)
    images, labels, seconds = [], [], 0.0
    try:
        for i in range((num_samples + batch_size - 1) // batch_size):
            count = min(batch_size, num_samples - i * batch_size)
            noise, y = batch_inputs(i, batch_size, shape, model.num_classes, classes, seed, device)
            noise, y = noise[:count], y[:count]
            synchronize(device)
            start = time.perf_counter()
            x = generate(model, diffusion, noise, y, spec["cfg"], spec["sampler"], None,
                         bf16=spec["precision"] == "bf16", cfg_interval=spec["interval"])
            synchronize(device)
            seconds += time.perf_counter() - start
            images.append(to_uint8(x))
            labels.append(y.cpu().numpy())
    finally:
        del model.forward
    return np.concatenate(images), np.concatenate(labels), counter[0] / num_samples, seconds


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows):
    """Markdown table of the measured rows."""
    lines = ["| setting | sampler | steps | cfg | interval t/T | precision | FD | accuracy | evals/image | seconds |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for name, spec, result in rows:
        interval = "all" if spec["interval"] is None else "[{:g}, {:g}]".format(*spec["interval"])
        lines.append(f"| {name} | {spec['sampler']} | {spec['steps']} | {spec['cfg']:g} | {interval} | "
                     f"{spec['precision']} | {result['fd']:.3f} | {result['accuracy']:.4f} | "
                     f"{result['evals']:.1f} | {result['seconds']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--ckpt", required=True, help="a class-conditional Fashion-MNIST DiS (anything sample.py reads)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--settings", nargs="+", type=named_setting, metavar="NAME",
                        default=[named_setting(name) for name in DEFAULT_SETTINGS],
                        help="SAMPLER STEPS [-cfgSCALE] [-inLOW-HIGH] [-bf16|-fp32], SAMPLER one of "
                             f"{', '.join(SAMPLERS)} (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (doubled when guided)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--scan-backend", choices=["auto", *BACKENDS], default="auto")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a file name")
    return args, parser


def main(argv=None):
    args, parser = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        backend = resolve_backend(device, args.scan_backend)
    except ValueError as e:
        parser.error(f"--scan-backend: {e}")
    try:
        model, vae, info = load_model(args.ckpt, device, load_decoder=False, scan_backend=backend)
    except CheckpointError as e:
        parser.error(f"--ckpt: {e}")
    side = yardstick.IMAGE_SIZE
    if (model.num_classes, model.in_channels, model.img_size, info["vae"]) != (len(yardstick.CLASSES), 1, side, "none"):
        parser.error(f"--ckpt holds {info['architecture']} ({info['vae']} VAE); the yardstick needs a "
                     f"class-conditional (10 classes) grayscale pixel-space Fashion-MNIST model at {side}x{side}")
    try:
        _, reference = yardstick.load_yardstick(device=device)
    except yardstick.YardstickError as e:
        parser.error(f"yardstick: {e}")
    header = (f"{info['architecture']}, {info['weights']} weights, {args.num_samples} samples per setting, seed "
              f"{args.seed}, on {device}; the yardstick's classifier: test accuracy {reference['test_accuracy']:.4f}, "
              f"FD of {yardstick.SETTINGS['test_images']} real training images against the test images "
              f"{reference['fd_train_test']:.3f}")
    print(header)
    rows = []
    for name, spec in args.settings:
        images, labels, evals, seconds = sample_setting(model, spec, args.num_samples, args.batch_size, args.seed,
                                                        device)
        result = dict(yardstick.evaluate(images, labels, device=device, progress=False), evals=evals, seconds=seconds)
        rows.append((name, spec, result))
        print(f"{name}: FD {result['fd']:.3f}, accuracy {result['accuracy']:.4f}, {evals:.1f} evals/image, "
              f"{seconds:.1f} s", flush=True)
        if args.out:  # after every row: an interrupted run keeps the rows it measured
            command = "python tools/sampler_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
            write_text(args.out, f"{header}\n\n    {command}\n\n{table(rows)}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
