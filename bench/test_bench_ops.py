"""pytest-benchmark suite, CPU: each fused op against plain PyTorch and torch.compile of it, same run.

    python -m pytest bench --benchmark-group-by=param:workload --benchmark-columns=median,iqr,rounds

Compare the medians within one group (one workload); bench/run.py prints the same comparison as
ratios together with the ratio to the memory floor.
"""

import pytest
import workloads as benchmarks

WORKLOADS = {
    wl.name: wl
    for wl in benchmarks.make_workloads("cpu", "cpu", compile_plain=True) + benchmarks.synthesis_workloads("cpu", "cpu")
    + benchmarks.adaround_layer_workloads("cpu", "cpu") + benchmarks.layer_workloads("cpu", "cpu")
}
CASES = [(name, impl) for name, wl in WORKLOADS.items() for impl in wl.impls]


@pytest.mark.parametrize(
    "workload,impl", CASES, ids=[f"{n}-{'compiled' if i == 'plain_compiled' else i}" for n, i in CASES]
)
def test_op(benchmark, workload, impl):
    wl = WORKLOADS[workload]
    benchmark.group = f"{workload} ({wl.description})"
    benchmark.extra_info["bytes_moved"] = wl.bytes_moved
    fn = wl.impls[impl]
    fn()  # warm-up (and compilation for the torch.compile baseline)
    benchmark(fn)
