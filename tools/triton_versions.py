"""Time scan_triton's kernels as another Triton version compiles them, on this machine's GPU.

For a GPU machine whose torch brings another Triton than requirements.txt's, where that version
cannot be installed: both versions give these kernels the same parameters, so the cubin that the
other version compiles (offline: Triton compiles for sm_90a without a GPU) can replace the local
one in the JIT's cache. Three steps:

    python tools/triton_versions.py specs specs.json        # GPU machine: what its JIT compiled
    python tools/triton_versions.py compile specs.json other.json   # machine with the other Triton
    python tools/triton_versions.py bench other.json [REPS [KERNELS]]  # GPU machine: both, alternating

The workload is three of bench.py's scan shapes (both directions, bf16, forward and backward) and
the DiS-S/2 32x32 batch-128 training step. `bench` first checks that the swapped kernels give
the same outputs and gradients, then times local and other cubins alternately. KERNELS (a comma
list, default all of scan_triton's) limits the swap to some kernels, to see which ones differ.
"""
import base64
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = ["_scan_fwd_kernel", "_scan_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel"]
SHAPES = [("DiS-S/2 32x32", 128, 736, 257), ("(32, 768, 1026)", 32, 768, 1026), ("DiS-H/2", 32, 3072, 258)]
MODEL = ("DiS-S/2", 32, 3, 10, 128)  # name, image size, channels, classes, batch


def defined_kernels():
    """The names of scan_triton's Triton kernels (the launched @triton.jit functions, *_kernel)."""
    import triton
    import scan_triton
    return sorted(name for name, fn in vars(scan_triton).items()
                  if name.endswith("_kernel") and isinstance(fn, triton.runtime.jit.KernelInterface))


def kernels_named(names):
    """{name: scan_triton's kernel} for the names; a name that is not one of its kernels stops the
    tool with the names it has."""
    import scan_triton
    defined = defined_kernels()
    missing = [name for name in names if name not in defined]
    if missing:
        raise SystemExit(f"tools/triton_versions.py: scan_triton has no kernel {', '.join(missing)}; "
                         f"its kernels: {', '.join(defined)}")
    return {name: getattr(scan_triton, name) for name in names}


def compiled_kernels():
    """(cache id, JIT function, compiled kernel) for every specialisation compiled so far."""
    for name, fn in kernels_named(KERNELS).items():
        for caches in fn.device_caches.values():
            for key, kernel in caches[0].items():
                yield name + ":" + hashlib.md5(str(key).encode()).hexdigest(), fn, kernel


def run_workload():
    """Runs every scan shape forward and backward and the model's training step once. Returns
    (a function that reruns the scans and gives their outputs and gradients, the scan cases as
    (arguments, leaves, dy), the model)."""
    import torch
    import scan_triton
    from model import DiS_models
    from timing import leaves_of, scan_inputs, throughput, token_major
    device = torch.device("cuda")
    cases = []
    for _, batch, E, L in SHAPES:
        args = leaves_of(token_major(scan_inputs(batch, E, L, torch.bfloat16, device, n_dir=2)))
        leaves = [v for v in args.values() if torch.is_tensor(v) and v.requires_grad]
        dy = torch.randn(batch, L, E, device=device, generator=torch.Generator(device).manual_seed(1)).bfloat16()
        cases.append((args, leaves, dy))

    def scans():
        out = []
        for args, leaves, dy in cases:
            y = scan_triton.bimamba_scan(**args)
            out += [y, *torch.autograd.grad(y, leaves, dy)]
        return out
    scans()
    torch.manual_seed(0)
    name, img, ch, classes, batch = MODEL
    model = DiS_models[name](img_size=img, channels=ch, num_classes=classes, scan_backend="triton").to(device)
    throughput(model, img, ch, classes, batch, device)
    return scans, cases, model


def specs(path):
    run_workload()
    records = {}
    for cid, fn, kernel in compiled_kernels():
        src = kernel.src
        constants = getattr(src, "constexprs", None) or getattr(src, "constants", {})
        name_of = lambda k: fn.arg_names[k[0]] if isinstance(k, tuple) else k  # noqa: E731
        values = {}
        for k, v in constants.items():
            v = getattr(v, "value", v) if type(v).__name__ == "constexpr" else v
            values[name_of(k)] = {"dtype": v.name} if not isinstance(v, (bool, int, float)) else v
        records[cid] = {"kernel": fn.__name__, "signature": dict(src.signature), "constexprs": values,
                        "attrs": {name_of(k): v for k, v in src.attrs.items()},
                        "options": {o: getattr(kernel.metadata, o) for o in ("num_warps", "num_stages", "maxnreg")}}
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    print(f"{len(records)} specialisations written to {path}")


def n_params(ptx):
    return ptx.split(".entry", 1)[1].split(")", 1)[0].count(".param")


def compile_specs(path, out):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    with open(path) as f:
        records = json.load(f)
    result = {}
    for cid, r in records.items():
        fn = kernels_named([r["kernel"]])[r["kernel"]]
        constants = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in r["constexprs"].items()}
        attrs = {(fn.arg_names.index(k),): v for k, v in r["attrs"].items()}
        source = triton.compiler.ASTSource(fn=fn, signature=r["signature"], constexprs=constants, attrs=attrs)
        options = {k: v for k, v in r["options"].items() if v is not None}
        c = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        result[cid] = {"cubin": base64.b64encode(c.asm["cubin"]).decode(), "shared": c.metadata.shared,
                       "params": n_params(c.asm["ptx"])}
    with open(out, "w") as f:
        json.dump({"triton": triton.__version__, "kernels": result}, f)
    print(f"{len(result)} kernels compiled by Triton {triton.__version__} into {out}")


def swap_in(kernel, cubin, shared):
    """Make the compiled kernel load `cubin` (with `shared` bytes of shared memory) at its next launch."""
    from triton.compiler.compiler import make_backend
    kernel.kernel = cubin
    kernel.asm["cubin"] = cubin
    kernel.metadata = kernel.metadata._replace(shared=shared)
    kernel.packed_metadata = make_backend(kernel.metadata.target).pack_metadata(kernel.metadata)
    kernel.module = kernel.function = kernel._run = None


def bench_versions(path, reps=3, kernels=",".join(KERNELS)):
    import torch
    import triton
    import scan_triton
    from timing import measure, throughput
    with open(path) as f:
        other = json.load(f)
    kernels_named(kernels.split(","))
    device = torch.device("cuda")
    scans, cases, model = run_workload()
    versions = {triton.__version__: {}, other["triton"]: {}}
    for cid, fn, kernel in compiled_kernels():
        if fn.__name__ not in kernels.split(","):
            continue
        o = other["kernels"].get(cid)
        if o is None:
            raise SystemExit(f"{cid} was not in the specs: run `specs` again on this machine")
        if n_params(kernel.asm["ptx"]) != o["params"]:
            raise SystemExit(f"{cid}: kernel parameters differ between the versions")
        versions[triton.__version__][cid] = (kernel, kernel.kernel, kernel.metadata.shared)
        versions[other["triton"]][cid] = (kernel, base64.b64decode(o["cubin"]), o["shared"])

    def use(version):
        for kernel, cubin, shared in versions[version].values():
            swap_in(kernel, cubin, shared)
        for tuned in (scan_triton._scan_fwd_tuned, scan_triton._scan_bwd_tuned):
            tuned.cache.clear()  # let the autotuner choose again among this version's kernels
    outputs = {}
    for v in versions:
        use(v)
        outputs[v] = scans()
    a, b = outputs.values()
    err = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
              for x, y in zip(a, b))
    print(f"{len(versions[triton.__version__])} kernels swapped ({kernels}); largest relative difference of outputs and "
          f"gradients between the versions: {err:.1e}", flush=True)
    ms = lambda fn: 1e3 * measure(fn, device, warmup=5, repeat=30)  # noqa: E731
    name, img, ch, classes, batch = MODEL
    times = {}
    for _ in range(int(reps)):
        for v in versions:
            use(v)
            for (label, *_), (args, leaves, dy) in zip(SHAPES, cases):
                t = ms(lambda: torch.autograd.grad(scan_triton.bimamba_scan(**args), leaves, dy))
                times.setdefault((label, v), []).append(t)
            times.setdefault((name, v), []).append(throughput(model, img, ch, classes, batch, device)[0])
    print("| Triton | " + " | ".join(f"{label} fwd+bwd ms" for label, *_ in SHAPES) + f" | {name} train img/s |")
    print("|---" * (len(SHAPES) + 2) + "|")
    for v in versions:
        cells = [", ".join(f"{t:.2f}" for t in times[(label, v)]) for label, *_ in SHAPES]
        cells.append(", ".join(f"{t:.0f}" for t in times[(name, v)]))
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    commands = {"specs": specs, "compile": compile_specs, "bench": bench_versions}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
