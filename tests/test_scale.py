"""Past one process: two gloo processes under torchrun train like one process with the same global batch, and
only rank 0 writes; --bf16 and --compile are refused in one line where they cannot work.

Run: python -m pytest tests/test_scale.py -q   (about half a minute)
"""
import json
import subprocess
import sys

import pytest
import torch

import train
from test_train import ENV, ROOT, assert_one_line_error, load, run

# answers of unequal length (a place, a caption), so the ranks' shares of answer tokens differ; LwF's penalty is
# a mean over each rank's answer tokens, which the shares must weight right
ARGS = ["--strategy", "replay+lwf", "--tasks", "ground,caption", "--steps", "30", "--base-steps", "5",
        "--n-train", "40", "--n-test", "8", "--n-base", "40", "--buffer-size", "10", "--device", "cpu"]


def test_two_gloo_processes_train_like_one(tmp_path):
    one = run("train.py", *ARGS, "--run-dir", tmp_path / "one", "--cache-dir", tmp_path / "cache")
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                str(ROOT / "train.py"), *ARGS, "--run-dir", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache")]
    two = subprocess.run(torchrun, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and "| 2 processes" in two.stdout  # rank 1 prints nothing
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    # each rank takes half of every batch and DDP averages the gradients: the same steps up to float rounding
    a, b = (load(tmp_path / d / "task2-caption.pt") for d in ("one", "two"))
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if k.endswith("attn.qkv.bias"):  # not the key bias: softmax ignores a score added to every key, so
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]  # its gradient is rounding noise, which AdamW
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)  # scales up to full-size steps
    flat = [[a for row in r["matrix"] for a in row] for r in (r1, r2)]
    assert flat[0] == pytest.approx(flat[1], abs=12.5)  # at most one of 8 test rows answered otherwise
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    train.atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    train.atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --bf16 is accepted")
def test_bf16_without_cuda_is_refused_in_one_line(tmp_path):
    proc = run("train.py", *ARGS, "--bf16", "--run-dir", tmp_path / "r", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(proc, "--bf16 needs a CUDA device", "cpu")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU torch.compile needs no C++ compiler of ours")
def test_compile_where_torch_compile_cannot_work_is_refused_in_one_line(tmp_path):
    env = {**ENV, "CXX": "/bin/false"}  # no working C++ compiler: inductor cannot build its CPU kernels
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *ARGS, "--compile", "--run-dir", str(tmp_path / "r"),
                           "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(proc, "--compile does not work here")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_compiled_run_with_the_kernel_finishes(tmp_path):
    """--bf16 --compile with attention.cu in the loop: 3 heads of 96 dims make head size 32, which the kernel
    covers (the tiny preset's 24 is not). load_cuda_attention prints 'compiling attention.cu', and without a
    warning the kernel ran."""
    flags = [a if a != "cpu" else "cuda" for a in ARGS]
    flags += ["--n-head", "3", "--bf16", "--compile", "--attn", "cuda"]
    proc = run("train.py", *flags, "--run-dir", tmp_path / "r", "--cache-dir", tmp_path / "c", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiling attention.cu" in proc.stdout and "CUDA attention unavailable" not in proc.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["config"]["model"]["n_head"] == 3 and results["config"]["model"]["attn"] == "cuda"
    assert results["config"]["train"]["bf16"] is True and all(torch.isfinite(torch.tensor(results["final_loss"])))
