"""Time variants of the CUDA scan against each other on this machine's GPU: other versions of
scan_cuda.cu and other launch constants, each checked against the reference first.

    python tools/scan_variants.py scan_cuda.cu other.cu
    python tools/scan_variants.py scan_cuda.cu scan_cuda.cu:BWD_THREADS=128:BWD_MIN_BLOCKS=4
    python tools/scan_variants.py --rounds 5 --shapes 0,2 scan_cuda.cu other.cu

A variant is a source file, optionally followed by `:NAME=VALUE` launch constants of scan_cuda.py
(FWD_SEGMENT, FWD_THREADS, FWD_MIN_BLOCKS, BWD_THREADS, BWD_MIN_BLOCKS). Each is compiled by NVRTC
as scan_cuda.cu is (a cache entry of its own), then checked against selective_scan_ref in float32
and bfloat16 with the chunk states recomputed, kept, and kept every second chunk; a variant off
by more than the tests' tolerance is reported and not timed. The others are timed in turn,
--rounds times: both directions, bf16, bench.py's scan shapes, the no-grad forward and the
forward+backward back to back, states recomputed (the model's default) and kept; medians in ms.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import bench  # noqa: E402
import cli  # noqa: E402
import scan  # noqa: E402
import scan_cuda  # noqa: E402
from timing import leaves_of, scan_inputs, token_major  # noqa: E402

CONSTANTS = ("FWD_SEGMENT", "FWD_THREADS", "FWD_MIN_BLOCKS", "BWD_THREADS", "BWD_MIN_BLOCKS")
DEFAULTS = {name: getattr(scan_cuda, name) for name in CONSTANTS}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # tests/test_scan_cuda.py's, of any output or gradient
CHECKS = [(torch.float32, 200, 77), (torch.bfloat16, 736, 257), (torch.bfloat16, 3072, 130)]  # (dtype, E, L)
STATES = {"recomputed": 0, "kept": 1, "kept every 2nd": 2}  # save_every
TIMED = ("recomputed", "kept")


def parse_variant(text):
    """'FILE[:NAME=VALUE...]' -> (FILE, {NAME: VALUE}); a bad one raises ValueError saying why."""
    path, *settings = text.split(":")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    constants = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in CONSTANTS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{setting!r}: a setting is NAME=VALUE, NAME one of {', '.join(CONSTANTS)}, "
                             f"VALUE a positive integer")
        constants[name] = int(value)
    return path, constants


def use(path, constants):
    """Make scan_cuda compile and launch `path` with `constants` (the others at their defaults)."""
    for name, value in {**DEFAULTS, **constants}.items():
        setattr(scan_cuda, name, value)
    scan_cuda.SOURCE = os.path.abspath(path)
    scan_cuda._source.cache_clear()
    scan_cuda._loaded.clear()


def run_with(save_every):
    return lambda a: scan.bimamba_scan(**a, backend="cuda", save_every=save_every)


def worst_errors(device):
    """{(dtype, E, L, states): the largest relative error of y and of every gradient}."""
    to_mamba_layout = lambda y: y.transpose(1, 2)  # noqa: E731
    return {(dtype, E, L, states): max(bench.check_scan((2, token_major, run_with(save_every), to_mamba_layout),
                                                        dtype, device, E, L).values())
            for dtype, E, L in CHECKS for states, save_every in STATES.items()}


def main(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="FILE[:NAME=VALUE...]", help="the variants to compare")
    parser.add_argument("--rounds", type=int, default=3, help="times each variant is timed, in turn (default 3)")
    parser.add_argument("--shapes", default=None, help="comma list of indices into bench.py's SCAN_SHAPES")
    args = parser.parse_args(argv)
    variants = []
    for text in args.variants:
        try:
            variants.append((text, *parse_variant(text)))
        except ValueError as e:
            parser.error(f"variant {text!r}: {e}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    shapes = bench.index_list(args.shapes, bench.SCAN_SHAPES, "--shapes", parser)
    if not torch.cuda.is_available() or not scan_cuda.available():
        parser.error(f"needs a GPU the CUDA scan runs on: {scan_cuda.why_unavailable() or 'no CUDA GPU'}")
    device = torch.device("cuda")

    correct = []
    for name, path, constants in variants:
        use(path, constants)
        try:
            errors = worst_errors(device)
        except RuntimeError as e:  # a source that does not compile, a launch that fails
            print(f"{name}: not timed: {str(e).splitlines()[0]}")
            continue
        worst = max(errors.values())
        off = [key for key, err in errors.items() if err > TOLERANCE[key[0]]]
        print(f"{name}: largest relative error {worst:.2e}" + (f"; over the tolerance at {off}: not timed" if off else ""))
        if not off:
            correct.append((name, path, constants))

    for label, batch, E, L in shapes:
        times = {}
        inputs = {states: leaves_of(token_major(scan_inputs(batch, E, L, torch.bfloat16, device, n_dir=2)))
                  for states in TIMED}
        for _ in range(args.rounds):
            for name, path, constants in correct:
                use(path, constants)
                for states in TIMED:
                    t_fwd, _, t_back_to_back = bench.time_scan(run_with(STATES[states]), inputs[states], device)
                    times.setdefault((name, states), []).append((1e3 * t_fwd, 1e3 * t_back_to_back))
        print(f"\n{label} ({batch}, {E}, {L}), ms, medians of {args.rounds}:")
        for name, *_ in correct:
            print(f"  {name:50s}" + "".join(
                f"  {states}: fwd {statistics.median(t[0] for t in times[name, states]):.3f}"
                f" fwd+bwd {statistics.median(t[1] for t in times[name, states]):.3f}" for states in TIMED))
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
