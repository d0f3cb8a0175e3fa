"""benchmarks/xformers_check.py: xformers counts as running only when an op of its own namespaces is in the
profiler trace and PyTorch's attention kernels are not, never because it imports; every outcome is a report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from xformers_check import ran_own_kernel, xformers_ops  # noqa: E402


@torch.library.custom_op("xformers_flash::test_own", mutates_args=())
def _own(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v  # its own computation


@torch.library.custom_op("xformers_flash::test_pt", mutates_args=())
def _pt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)  # as xformers' '-pt' operators: PyTorch's kernel inside


def _trace(fn) -> list[str]:
    q = torch.randn(1, 2, 8, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(q, q, q)
    return [e.key for e in prof.key_averages()]


def test_an_op_of_xformers_namespaces_with_no_pytorch_attention_kernel_is_what_counts():
    # xformers calls its kernels through the dispatcher (torch.ops.<namespace>.<op>), as here
    own = _trace(torch.ops.xformers_flash.test_own)
    assert xformers_ops(own) == ["xformers_flash::test_own"] and ran_own_kernel(own)
    handed_over = _trace(torch.ops.xformers_flash.test_pt)
    assert xformers_ops(handed_over) == ["xformers_flash::test_pt"] and not ran_own_kernel(handed_over)
    assert not ran_own_kernel(_trace(F.scaled_dot_product_attention))
    assert xformers_ops(["aten::_efficient_attention_forward", "xformers::efficient_attention_forward_cutlass",
                         "xformers_flash3::flash_fwd", "my_xformers::op", "xformers"]) == [
        "xformers::efficient_attention_forward_cutlass", "xformers_flash3::flash_fwd"]  # fmt: skip


def _check(tmp_path, pythonpath: str = "") -> dict:
    out = tmp_path / "xf.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)}
    cmd = [sys.executable, str(ROOT / "benchmarks/xformers_check.py"), "--size", "tiny", "--img-size", "32",
           "--batch", "2", "--dtype", "fp32", "--steps", "1", "--warmup", "0", "--device", "cpu", "--label", "here",
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_without_xformers_the_report_says_so_and_times_sdpa_only(tmp_path):
    rep = _check(tmp_path)
    assert rep["env"] == "here" and rep["xformers"] == "?"
    assert rep["ran_kernel"] is False and rep["error"] == "xformers does not import here"
    assert rep["img_s"] is None and rep["sdpa_img_s"] > 0 and rep["loss_rel_diff"] is None


def test_an_xformers_that_imports_but_never_runs_its_op_is_not_running(tmp_path):
    # the stand-in wheel imports (version 0.0.35, built for torch 2.10.0); on the CPU the model's attention
    # never calls it, so the trace holds no xformers op: not running, and no speed under its name
    rep = _check(tmp_path, str(ROOT / "tests" / "fake_xformers"))
    assert (rep["xformers"], rep["xformers_built_for_torch"]) == ("0.0.35", "2.10.0+cu128")
    assert rep["ran_kernel"] is False and rep["xformers_ops"] == [] and "no op of xformers" in rep["error"]
    assert rep["loss_rel_diff"] == 0.0 and rep["grad_rel_diff"] == 0.0  # both ran the same SDPA
    assert rep["img_s"] is None and rep["sdpa_img_s"] > 0
