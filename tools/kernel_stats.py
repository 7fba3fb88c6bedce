"""Compile scan_triton's kernels for the H100 (sm_90a) without a GPU and print, per kernel and
BLOCK_E, the registers and spills that ptxas reports, counts of the PTX instructions that
cost a one-warp program most (cross-thread shuffles, barriers, shared-memory traffic), and the
machine (SASS) instructions by opcode, from the nvdisasm that ships with Triton.

    python tools/kernel_stats.py                           # T = 4, BLOCK_E 8 and 16
    python tools/kernel_stats.py --chunk 2 --block-e 8,16,32
    python tools/kernel_stats.py --save-every 2            # the states of every other chunk only
    python tools/kernel_stats.py --cuda                    # scan_cuda.cu's kernels instead (NVRTC; a minute)
    python tools/kernel_stats.py --cuda --lines "bwd_kernel<dis::bf16, dis::bf16, 0"   # its loop by source line
    python tools/kernel_stats.py --cuda --lines "bwd_kernel<dis::bf16, dis::bf16, 0" --loop 0   # another loop

With --cuda it compiles scan_cuda.cu as scan_cuda.py does (NVRTC, for the H100/H200's sm_90), every
program (input dtype, saved states' dtype), and also counts the global loads whose result an
instruction uses within the next 8 (each makes its warp wait out the load's whole latency there):
in scan_cuda.cu only those before the segment loops and, in 16-bit types, those of `advance`
(save_every > 1) should.

Static counts, not timings: a guide for kernel work without a GPU, which must still be measured
(bench.py). "chunk loops" are the instructions of each direction's loop over chunks, the part
that runs L/T times; the other counts are over the whole kernel (both directions unrolled).
The counts depend on the Triton version, which chooses the layouts: run this with the Triton you
will time (PYTHONPATH=<another Triton>); tools/triton_versions.py times another version's kernels.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import scan_triton  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
NVDISASM = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
FP32_ARGS = {"hs_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr", "dbias_ptr", "A_ptr", "D_ptr", "bias_ptr"}
UNIT_STRIDES = ("su_e", "sd_e", "sB_n", "sC_n", "sz_e", "sy_e", "sdy_e")
OPS = ("shfl.sync", "bar.sync", "st.shared", "ld.shared", "ex2.approx", "fma.rn.f32", "ld.global", "st.global")
# A SASS instruction line as nvdisasm prints it: address comment, optional predicate, opcode.
SASS_PREFIX = r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?"
SASS_LINE = re.compile(SASS_PREFIX + r"([A-Z][A-Z0-9_.]*)", re.M)


def compile_for_h100(kernel, constants, num_warps=1):
    """Compile as a launch on DiS's 16-byte aligned tensors would be compiled: the unit channel
    strides specialised to the constant 1 (as Triton does), every pointer and other stride
    divisible by 16. Without these the counts describe a different kernel (no vector loads)."""
    constants = dict(constants, **{name: 1 for name in UNIT_STRIDES if name in kernel.arg_names})
    signature = {name: "constexpr" if name in constants else ("*fp32" if name in FP32_ARGS else "*bf16")
                 if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name not in constants and (name.endswith("_ptr") or name.startswith("s"))}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_report(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return f"{regs.group(1) if regs else '?'} registers, spills {spills.group(1)}/{spills.group(2)} B"


def disassemble(cubin, line_info=False):
    """The SASS of a compiled kernel, as nvdisasm prints it; with line_info, each run of
    instructions preceded by the source line it comes from (a cubin compiled with -lineinfo)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([NVDISASM, "-c", *(["-g"] if line_info else []), f.name], capture_output=True,
                              text=True).stdout


def sass_opcodes(sass, top=10):
    """Total SASS instructions of a kernel and its `top` most frequent opcodes."""
    ops = collections.Counter(m.group(1).split(".")[0] for m in SASS_LINE.finditer(sass))
    return f"SASS {sum(ops.values())}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(top))


def loop_spans(lines):
    """(first, last) line indices of the SASS loops (a backward branch to an earlier label), in order."""
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:", line)}
    spans = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            spans.append((labels[target.group(1)], i))
    return spans


def loops(lines):
    """(first, last, instructions) of the SASS loops of more than one instruction, in order."""
    spans = [(a, b, sum(1 for x in lines[a:b + 1] if SASS_LINE.match(x))) for a, b in loop_spans(lines)]
    return [span for span in spans if span[2] > 1]


def loop_lengths(sass):
    """Instruction counts of the SASS loops, in order."""
    return [n for _, _, n in loops(sass.splitlines())]


def instructions_per_source_line(sass, loop=None):
    """{source line: Counter of opcodes} of the instructions in a kernel's loop number `loop` (in
    loop_lengths' order; None: the longest), those of loops nested in it left out (SASS from
    disassemble(..., line_info=True))."""
    lines = sass.splitlines()
    spans = loop_spans(lines)
    found = loops(lines)
    if loop is not None and not 0 <= loop < len(found):
        raise SystemExit(f"--loop must be 0..{len(found) - 1} (the kernel has {len(found)} loops), not {loop}")
    first, last, _ = max(found, key=lambda span: span[1] - span[0]) if loop is None else found[loop]
    nested = [(a, b) for a, b in spans if first < a and b < last]
    counts, source = collections.defaultdict(collections.Counter), None
    for i in range(first, last + 1):
        at = re.search(r"//## File .*, line (\d+)", lines[i])
        if at:
            source = int(at.group(1))
        elif SASS_LINE.match(lines[i]) and not any(a <= i <= b for a, b in nested):
            counts[source][SASS_LINE.match(lines[i]).group(1).split(".")[0]] += 1
    return counts


def cuda_kernels(line_info=False):
    """scan_cuda.cu's kernels compiled by NVRTC for sm_90, as scan_cuda.py compiles them: {name
    expression: (ptxas report, SASS)} for every program; line_info: SASS with source lines."""
    import torch
    import scan_cuda
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    kernels = {}
    for dtype, states_dtype in ((f32, f32), (bf16, bf16), (bf16, f32), (f16, f32), (f16, f16)):
        options = ("--ptxas-options=-v", *(("-lineinfo",) if line_info else ()))
        program = scan_cuda.compile_program(dtype, states_dtype, "sm_90", options=options)
        reports = {}
        for block in program.log.split("Compiling entry function '")[1:]:
            regs = re.search(r"Used (\d+) registers", block)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
            reports[block.split("'")[0]] = (f"{regs.group(1) if regs else '?'} registers, "
                                            f"spills {'/'.join(spills.groups()) if spills else '?'} B")
        bodies = dict(re.findall(r"\.text\.(\w+):\n(.*?)(?=\n\s*\.section|\Z)",
                                 disassemble(program.image, line_info), re.S))
        for name, lowered in program.names.items():
            kernels[name] = (reports.get(lowered, "?"), bodies.get(lowered, ""))
    return kernels


def sass_operands(line):
    """(opcode, operands) of one SASS instruction line (its predicate dropped)."""
    text = re.sub(SASS_PREFIX, "", line).split(";")[0].strip()
    op, _, rest = text.partition(" ")
    return op, [x.strip() for x in rest.split(",")]


def loads_used_at_once(sass, within=8):
    """How many global loads have their result read by one of the next `within` instructions."""
    lines = [x for x in sass.splitlines() if SASS_LINE.match(x)]
    count = 0
    for i, line in enumerate(lines):
        op, args = sass_operands(line)
        if not op.startswith("LDG"):
            continue
        for later in lines[i + 1:i + 1 + within]:
            op2, args2 = sass_operands(later)
            reads = args2 if op2.startswith("ST") else args2[1:]  # a store reads all its operands
            if any(re.search(rf"\b{args[0]}\b", x) for x in reads):
                count += 1
                break
    return count


def main_cuda(lines_of=None, loop=None, top=40):
    kernels = cuda_kernels(line_info=lines_of is not None)
    if lines_of is not None:
        source = open(os.path.join(ROOT, "scan_cuda.cu")).read().splitlines()
        chosen = [name for name in kernels if lines_of in name]
        if not chosen:
            raise SystemExit(f"--lines {lines_of!r} is in no kernel's name; the kernels: {', '.join(kernels)}")
        for name in chosen:
            counts = instructions_per_source_line(kernels[name][1], loop)
            which = "its longest loop" if loop is None else f"its loop {loop}"
            print(f"{name}: loops {loop_lengths(kernels[name][1])}; {which}, "
                  f"{sum(sum(c.values()) for c in counts.values())} instructions (nested loops left out), "
                  f"by scan_cuda.cu line")
            for line, ops in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))[:top]:
                text = source[line - 1].strip()[:70] if line else "?"
                print(f"{sum(ops.values()):5d}  {line}: {text:70s} {dict(ops.most_common(4))}")
        return
    for name, (report, sass) in kernels.items():
        print(f"{name}: {report}")
        print(f"    {sass_opcodes(sass)}")
        print(f"    loops: {loop_lengths(sass)} instructions")
        print(f"    global loads used within 8 instructions: {loads_used_at_once(sass)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Registers, spills and instruction counts of the scan kernels, "
                                                 "compiled for the H100 without a GPU.")
    parser.add_argument("--cuda", action="store_true", help="scan_cuda.cu's kernels instead of scan_triton's")
    parser.add_argument("--lines", default=None, metavar="NAME",
                        help="with --cuda: the instructions of the longest loop (or --loop N) of each kernel whose "
                             "name contains NAME (e.g. 'bwd_kernel<dis::bf16, dis::bf16, 0'), by source line")
    parser.add_argument("--loop", type=int, default=None, metavar="N",
                        help="with --lines: loop N (from 0, in the order the loops are listed) instead of the "
                             "longest, e.g. 0 for the backward kernel's loop with every chunk's state saved, the "
                             "path training takes (its longest is the save_every > 1 path's)")
    parser.add_argument("--chunk", type=int, default=scan_triton.SCAN_CHUNK["cuda"], metavar="T",
                        help="Triton: steps per chunk")
    parser.add_argument("--block-e", default="8,16", help="Triton: comma list of BLOCK_E (channels per program)")
    parser.add_argument("--save-every", type=int, default=1, help="Triton: keep the state of every Nth chunk")
    args = parser.parse_args(argv)
    try:
        args.block_e = [int(b) for b in args.block_e.split(",")]
    except ValueError:
        parser.error(f"--block-e must be a comma list of integers, not {args.block_e!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.lines is not None and not args.cuda:
        raise SystemExit("--lines applies to scan_cuda.cu's kernels: add --cuda")
    if args.loop is not None and args.lines is None:
        raise SystemExit("--loop chooses the loop --lines breaks down: add --cuda --lines NAME")
    if args.cuda:
        return main_cuda(args.lines, args.loop)
    T = args.chunk
    common = dict(ND=2, N=16, NP=16, T=T, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, ACC=tl.float32,
                  SAVE_EVERY=args.save_every)
    for name, kernel, extra in (("forward", scan_triton._scan_fwd_kernel, {"SAVE_STATES": True}),
                                ("backward", scan_triton._scan_bwd_kernel, {})):
        for block_e in args.block_e:
            asm = compile_for_h100(kernel, dict(common, BLOCK_E=block_e, **extra)).asm
            counts = ", ".join(f"{op} {len(re.findall(re.escape(op), asm['ptx']))}" for op in OPS)
            print(f"{name} T={T} BLOCK_E={block_e}: {ptxas_report(asm['ptx'])}; {counts}")
            sass = disassemble(asm["cubin"])
            print(f"    {sass_opcodes(sass)}")
            print(f"    chunk loops: {loop_lengths(sass)} instructions (Triton {triton.__version__})")


if __name__ == "__main__":
    main()
