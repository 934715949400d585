"""Each bad-input case in its own process on the GPU machine: does the clear error come back as a
Python exception, or does the process die? (A segfault was seen there on a CUDA input error.)"""

import subprocess
import sys

CASES = {
    "cpu_fake_quant_bad_range": "dsg_ext.fake_quant(torch.randn(4), 0.1, 0, 5, 1)",
    "cpu_adaround_scalar_zp": "dsg_ext.adaround(torch.randn(8,4), torch.zeros(8,4), torch.rand(8)+.1, 8, 0, 15, 0)",
    "cuda_slack_mixed_device": "dsg_ext.bn_stat_slack_loss(torch.randn(2,3,4,4,device='cuda'), torch.zeros(3), torch.ones(3,device='cuda'))",
    "cuda_fake_quant_bad_range": "dsg_ext.fake_quant(torch.randn(4,device='cuda'), 0.1, 0, 5, 1)",
    "cuda_adaround_scalar_zp": "dsg_ext.adaround(torch.randn(8,4,device='cuda'), torch.zeros(8,4,device='cuda'), torch.rand(8,device='cuda')+.1, 8, 0, 15, 0)",
    "torch_own_cuda_error": "torch.randn(2,3,device='cuda') @ torch.randn(4,5,device='cuda')",
}

if sys.argv[1:] == ["--cpu"]:  # a CPU-only build: the CPU cases, and the op called directly
    CASES = {k: v for k, v in CASES.items() if k.startswith("cpu")}
    CASES["cpu_fake_quant_axis0"] = "dsg_ext.fake_quant(torch.randn(4,3), torch.ones(3), torch.zeros(3), 5, 1, 1)"
    CASES["cpu_direct_op_no_grad"] = "torch.ops.dsg_ext.fake_quant(torch.randn(4), torch.ones(1), torch.zeros(1), 5, 1, None, 1.0)"
    CASES["cpu_slack_bad_channels"] = "dsg_ext.bn_stat_slack_loss(torch.randn(2,3,4,4), torch.zeros(4), torch.ones(4))"

for name, stmt in CASES.items():
    code = f"import torch, dsg_ext\ntry:\n    {stmt}\n    print('NO ERROR')\nexcept Exception as e:\n    print('raised', type(e).__name__, str(e).splitlines()[0][:150])\n"
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=60)
    tail = (p.stdout + p.stderr).strip().splitlines()
    print(f"{name}: rc {p.returncode}: {tail[-1] if tail else ''}", flush=True)
    if p.returncode != 0:
        print("   " + "\n   ".join(tail[-8:]))
