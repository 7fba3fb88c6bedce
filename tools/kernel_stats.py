"""Compile scan_triton's kernels for the H100 (sm_90a) without a GPU and print, per kernel and
BLOCK_E, the registers and spills that ptxas reports, counts of the PTX instructions that
cost a one-warp program most (cross-thread shuffles, barriers, shared-memory traffic), and the
machine (SASS) instructions by opcode, from the nvdisasm that ships with Triton.

    python tools/kernel_stats.py                 # T = 4, BLOCK_E 8 and 16
    T=2 BLOCK_E=8,16,32 python tools/kernel_stats.py
    DIS_SCAN_SAVE_EVERY=2 python tools/kernel_stats.py   # the states of every other chunk only

Static counts, not timings: a guide for kernel work between GPU sessions, which must still
measure (bench.py). "chunk loops" are the instructions of each direction's loop over chunks, the
part that runs L/T times; the other counts are over the whole kernel (both directions unrolled).
The counts depend on the Triton version, which chooses the layouts: with Triton 3.6 (the GPU
machine's) the backward pass at BLOCK_E 8 has 1037 instructions per chunk, with 3.8
(requirements.txt's) 746. Run this with the Triton you will time (PYTHONPATH=<another Triton>);
tools/triton_versions.py times the other version's kernels on the GPU machine.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def disassemble(cubin):
    """The SASS of a compiled kernel, as nvdisasm prints it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True).stdout


def sass_opcodes(sass, top=10):
    """Total SASS instructions of a kernel and its `top` most frequent opcodes."""
    ops = collections.Counter(m.group(1).split(".")[0] for m in
                              re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))
    return f"SASS {sum(ops.values())}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(top))


def loop_lengths(sass):
    """Instruction counts of the SASS loops (a backward branch to an earlier label), in order."""
    lines = sass.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:", line)}
    is_instruction = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+\S").match
    lengths = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            lengths.append(sum(1 for x in lines[labels[target.group(1)]:i + 1] if is_instruction(x)))
    return [n for n in lengths if n > 1]


def main():
    T = int(os.environ.get("T", scan_triton.SCAN_CHUNK["cuda"]))
    common = dict(ND=2, N=16, NP=16, T=T, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, ACC=tl.float32,
                  SAVE_EVERY=scan_triton.SCAN_SAVE_EVERY)
    for name, kernel, extra in (("forward", scan_triton._scan_fwd_kernel, {"SAVE_STATES": True}),
                                ("backward", scan_triton._scan_bwd_kernel, {})):
        for block_e in (int(b) for b in os.environ.get("BLOCK_E", "8,16").split(",")):
            asm = compile_for_h100(kernel, dict(common, BLOCK_E=block_e, **extra)).asm
            counts = ", ".join(f"{op} {len(re.findall(re.escape(op), asm['ptx']))}" for op in OPS)
            print(f"{name} T={T} BLOCK_E={block_e}: {ptxas_report(asm['ptx'])}; {counts}")
            sass = disassemble(asm["cubin"])
            print(f"    {sass_opcodes(sass)}")
            print(f"    chunk loops: {loop_lengths(sass)} instructions (Triton {triton.__version__})")


if __name__ == "__main__":
    main()
