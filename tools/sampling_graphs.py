"""Wall time of sampling with the model's calls launched op by op (eager) and replayed from CUDA
graphs (sample.py's default on a GPU), on randomly initialised DiS models: DDPM, 50 steps,
classifier-free guidance 1.5 (each call a batch of twice the images), bf16.

    python tools/sampling_graphs.py                       # DiS-S/2 at batch 16 and 128, DiS-H/2 at 8 and 32
    python tools/sampling_graphs.py --cases DiS-S/2:64

A case is MODEL:BATCH at 32x32 (DiS-H/2 on 4 latent channels and 1,000 classes, the others on 3
channels and 10 classes). Each sampling run is timed twice each way, in turn, synchronised; the
faster of the two is printed, with the ratio. Both ways give the same samples bit for bit
(tests/test_sample.py).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import model as dis  # noqa: E402
from cli import OneLineParser  # noqa: E402
from diffusion import create_diffusion, generate  # noqa: E402

DEFAULT_CASES = ["DiS-S/2:16", "DiS-S/2:128", "DiS-H/2:8", "DiS-H/2:32"]
STEPS, CFG = 50, 1.5


def parse_case(text):
    """'MODEL:BATCH' -> (MODEL, BATCH); ValueError saying why for a bad one."""
    name, _, batch = text.partition(":")
    if name not in dis.DiS_models or not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"a case is MODEL:BATCH, MODEL one of {', '.join(dis.DiS_models)}, BATCH a positive integer")
    return name, int(batch)


def seconds(model, diffusion, noise, labels, cuda_graphs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, diffusion, noise, labels, CFG, "ddpm", bf16=True, cuda_graphs=cuda_graphs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL:BATCH")
    args = parser.parse_args(argv)
    cases = []
    for text in args.cases:
        try:
            cases.append(parse_case(text))
        except ValueError as e:
            parser.error(f"--cases {text}: {e}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (CUDA graphs)")
    torch.manual_seed(0)
    diffusion = create_diffusion(str(STEPS))
    for name, batch in cases:
        channels, classes = (4, 1000) if name.startswith("DiS-H") else (3, 10)
        model = dis.DiS_models[name](img_size=32, channels=channels, num_classes=classes).cuda().eval()
        noise = torch.randn(batch, channels, 32, 32, device="cuda")
        labels = torch.arange(batch, device="cuda") % classes
        times = {False: [], True: []}
        for graphs in (False, True, False, True):
            times[graphs].append(seconds(model, diffusion, noise, labels, graphs))
        eager, graphed = min(times[False]), min(times[True])
        print(f"{name} batch {batch} (x2 with cfg), ddpm {STEPS} steps: eager {eager:.2f} s, graphed {graphed:.2f} s, "
              f"{eager / graphed:.2f}x", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
