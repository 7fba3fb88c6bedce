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
