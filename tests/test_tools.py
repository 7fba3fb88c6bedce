"""The developer tools in tools/ still fit the code they inspect (no GPU needed)."""
import importlib.util
import inspect
import os
import re

import pytest

import scan_triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_versions_lists_every_kernel_of_scan_triton():
    """KERNELS (the tool's default: "all of scan_triton's") names exactly scan_triton's
    @triton.jit functions named *_kernel, as its source defines them."""
    tool = load_tool("triton_versions")
    defined = re.findall(r"^@triton\.jit\ndef (\w+_kernel)\(", inspect.getsource(scan_triton), re.M)
    assert len(defined) >= 4
    assert sorted(tool.KERNELS) == sorted(defined)
    assert set(tool.kernels_named(tool.KERNELS)) == set(defined)


def test_triton_versions_stops_on_a_kernel_scan_triton_lacks():
    tool = load_tool("triton_versions")
    with pytest.raises(SystemExit, match="scan_triton has no kernel _conv_dx_kernel; its kernels: .*_conv_bwd_kernel"):
        tool.kernels_named(["_scan_fwd_kernel", "_conv_dx_kernel"])


@pytest.fixture(scope="module")
def backward_sass():
    """(kernel_stats, SASS with source lines) of the bf16 backward kernel of direction 0, sm_90."""
    import torch

    import scan_cuda
    try:
        scan_cuda.nvrtc_version()
    except Exception as e:  # the tool needs NVRTC, as scan_cuda does
        pytest.skip(f"no NVRTC here: {e}")
    tool = load_tool("kernel_stats")
    program = scan_cuda.compile_program(torch.bfloat16, torch.bfloat16, "sm_90", options=("-lineinfo",))
    name = next(n for n in program.names if "scan_bwd_kernel<dis::bf16, dis::bf16, 0" in n)
    return tool, re.search(rf"\.text\.{program.names[name]}:\n(.*?)(?=\n\s*\.section|\Z)",
                           tool.disassemble(program.image, line_info=True), re.S).group(1)


def test_kernel_stats_counts_the_backward_loop_by_source_line(backward_sass):
    """--cuda --lines: every instruction of the backward kernel's segment loop (the nested
    `advance` loop left out) is counted once, under a line of scan_cuda.cu; the exp2 of the
    recurrence is there as MUFU instructions."""
    tool, sass = backward_sass
    counts = tool.instructions_per_source_line(sass)
    lines = sass.splitlines()
    spans = tool.loop_spans(lines)
    first, last = max(spans, key=lambda span: span[1] - span[0])
    in_loop = sum(1 for x in lines[first:last + 1] if tool.SASS_LINE.match(x))
    inner = [(a, b) for a, b in spans if first < a and b < last]
    outermost = [(a, b) for a, b in inner if not any(c < a and b < d for c, d in inner)]  # loops in loops once
    nested = sum(1 for a, b in outermost for x in lines[a:b + 1] if tool.SASS_LINE.match(x))
    assert sum(sum(c.values()) for c in counts.values()) == in_loop - nested > 0
    source = open(os.path.join(REPO, "scan_cuda.cu")).read().splitlines()
    ex2 = next(i + 1 for i, text in enumerate(source) if "ex2.approx.ftz.f32" in text)
    assert counts[ex2]["MUFU"] > 0 and None not in counts


def test_kernel_stats_breaks_down_the_loop_asked_for(backward_sass):
    """--loop N: loop N of those listed. The backward kernel's first loop is the chunk loop with
    every chunk's state saved (no loop nested in it), shorter than the save_every > 1 path's."""
    tool, sass = backward_sass
    lengths = tool.loop_lengths(sass)
    first = tool.instructions_per_source_line(sass, loop=0)
    assert sum(sum(c.values()) for c in first.values()) == lengths[0] < max(lengths)
    with pytest.raises(SystemExit, match=f"--loop must be 0..{len(lengths) - 1}"):
        tool.instructions_per_source_line(sass, loop=len(lengths))


def test_scan_variants_reads_a_variant_as_a_file_and_launch_constants(tmp_path):
    tool = load_tool("scan_variants")
    source = os.path.join(REPO, "scan_cuda.cu")
    assert tool.parse_variant(source) == (source, {})
    assert tool.parse_variant(f"{source}:BWD_THREADS=128:BWD_MIN_BLOCKS=4") == (
        source, {"BWD_THREADS": 128, "BWD_MIN_BLOCKS": 4})
    for bad, message in ((f"{source}:BWD_THREAD=128", "NAME one of FWD_SEGMENT"),
                         (f"{source}:BWD_THREADS=0", "VALUE a positive integer"),
                         (f"{source}:BWD_THREADS", "a setting is NAME=VALUE"),
                         (str(tmp_path / "missing.cu"), "no such file")):
        with pytest.raises(ValueError, match=message):
            tool.parse_variant(bad)


def test_scan_variants_sets_and_restores_the_launch_constants():
    """use() gives scan_cuda the variant's source and constants, and every constant the variant
    does not name its default again (a variant does not inherit the one before's)."""
    import scan_cuda
    tool = load_tool("scan_variants")
    saved = scan_cuda.SOURCE, {name: getattr(scan_cuda, name) for name in tool.CONSTANTS}
    try:
        tool.use(os.path.join(REPO, "scan_cuda.cu"), {"BWD_THREADS": 128})
        assert scan_cuda.BWD_THREADS == 128
        tool.use(os.path.join(REPO, "scan_cuda.cu"), {"FWD_SEGMENT": 4})
        assert scan_cuda.BWD_THREADS == saved[1]["BWD_THREADS"] and scan_cuda.FWD_SEGMENT == 4
    finally:
        tool.use(*saved)
    assert scan_cuda.SOURCE == saved[0] and all(getattr(scan_cuda, k) == v for k, v in saved[1].items())


@pytest.mark.parametrize("argv, message", [
    (["scan_cuda.cu:BWD_THREAD=3"], "variant 'scan_cuda.cu:BWD_THREAD=3': 'BWD_THREAD=3': a setting is NAME=VALUE"),
    (["--rounds", "0", "scan_cuda.cu"], "--rounds must be at least 1, not 0"),
])
def test_scan_variants_refuses_bad_arguments_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        load_tool("scan_variants").main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--cases", "DiS-S/2"], "--cases DiS-S/2: a case is MODEL:BATCH"),
    (["--cases", "DiS-Q/2:8"], "--cases DiS-Q/2:8: a case is MODEL:BATCH"),
])
def test_sampling_graphs_refuses_bad_cases_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("sampling_graphs").main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
