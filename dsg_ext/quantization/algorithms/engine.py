"""The reconstruction loop of one layer or block, three ways (``AdaRoundConfig.engine``):

- ``loop``: the plain PyTorch loop, as BRECQ's code runs it -- each iteration draws its batch indices
  on the host, copies them to the device (a host sync on CUDA), anneals beta in Python;
- ``device``: the same iterations with every piece of state on the device -- all batch indices drawn
  up front (same generator, same values) and kept there, beta and lambda read from device tables by a
  device iteration counter, Adam's step count on the device -- so no iteration needs the host;
- ``graph``: ``device``'s step (quantized forward, loss, backward, optimiser) captured once in a CUDA
  graph and replayed, one launch per iteration (CUDA only).

``auto`` picks ``graph`` on CUDA and ``device`` elsewhere. All three run the same schedule on the same
batches; the results agree to float rounding (``python_tests/quantization/test_engine.py``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...errors import QuantizationError
from ..config import ENGINES  # noqa: F401 (re-exported; the names live with the options)

GRAPH_WARMUP = 3  # eager iterations on a side stream before capture (they are iterations of the schedule)
# A learned scale is kept at or above this fraction of its starting value after every step: Adam moves a
# parameter by about its learning rate per step whatever its size, and Genie's 1e-4 for weight scales
# would drive EfficientNet-Lite0's smallest per-channel scales (~1e-5) negative within a few steps.
SCALE_FLOOR = 0.01


def scale_group(params: Sequence[Tensor], lr: float) -> dict:
    """An Adam parameter group of learned scales, each with its floor (SCALE_FLOOR x its start)."""
    return {"params": list(params), "lr": lr, "floor": [SCALE_FLOOR * p.detach().clone() for p in params]}


@torch.no_grad()
def project(opt: torch.optim.Optimizer) -> None:
    """Clamps every learned scale to its floor (a projected step; device-side, no sync)."""
    for group in opt.param_groups:
        for p, floor in zip(group["params"], group.get("floor", ())):
            torch.maximum(p, floor, out=p)


def schedule(config, it: int) -> Tuple[float, float]:
    """(beta, lambda) of iteration ``it``: the regularizer off and beta at its start during the warm-up,
    then beta annealed linearly from beta_start to beta_end (AdaRound)."""
    warm = int(config.warmup * config.iterations)
    if it < warm:
        return config.beta_start, 0.0
    frac = (it - warm) / max(1, config.iterations - warm)
    return config.beta_start + (config.beta_end - config.beta_start) * frac, config.reg_weight


def resolve_engine(engine: str, device: str) -> str:
    """The engine ``engine`` means on ``device``; a CUDA graph asked for off CUDA is refused."""
    on_cuda = torch.device(device).type == "cuda"
    if engine == "auto":
        return "graph" if on_cuda else "device"
    if engine == "graph" and not on_cuda:
        raise QuantizationError(f"reconstruction engine 'graph' needs a CUDA device, got {device!r}: "
                                "use engine 'device' or 'loop'")
    return engine


def reconstruction_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), mean over the rest (AdaRound/BRECQ)."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def optimise_loop(unit, run, quantizers, groups, x_q: Tensor, target: Tensor, config, gen: torch.Generator,
                  device: str, step: Callable[[], None]) -> Tuple[Optional[float], float, str]:
    """The plain loop: Adam on the rounding variables (and the scales being learned). Returns (loss of
    the first batch, seconds, "loop")."""
    opt = torch.optim.Adam(groups)
    start_loss = None
    t0 = time.perf_counter()
    for it in range(config.iterations):
        idx = torch.randint(0, x_q.shape[0], (min(config.batch_size, x_q.shape[0]),), generator=gen).to(device)
        beta, lam = schedule(config, it)
        for wq in quantizers:
            wq.set_beta(beta)
        opt.zero_grad(set_to_none=True)
        rec = reconstruction_loss(run(unit, x_q[idx]), target[idx])
        loss = rec + lam * sum(wq.last_reg for wq in quantizers) if lam else rec
        loss.backward()
        opt.step()
        project(opt)
        if it == 0:
            start_loss = float(rec.detach())
        step()
    _synchronize(device)
    return start_loss, time.perf_counter() - t0, "loop"


class DeviceStep:
    """One reconstruction iteration whose inputs and batch indices live on the device. ``resident``
    (a CUDA graph's step): beta, lambda and the iteration counter are read from device tables too, so
    a call reads nothing from the host; otherwise beta and lambda are host numbers (no sync either),
    and the fused regularizer of ``dsg_ext.adaround`` is used."""

    def __init__(self, unit, run, quantizers: Sequence, x_q: Tensor, target: Tensor, config,
                 gen: torch.Generator, device: str, resident: bool):
        n, batch = config.iterations, min(config.batch_size, x_q.shape[0])
        # the plain loop's draws, in its order (one randint per iteration from the same CPU generator)
        self.indices = torch.randint(0, x_q.shape[0], (n, batch), generator=gen).to(device)
        self.table = [schedule(config, it) for it in range(n)]
        self.resident, self.host_it = resident, 0
        if resident:
            self.betas = torch.tensor([b for b, _ in self.table], dtype=torch.float32, device=device)
            self.lams = torch.tensor([lam for _, lam in self.table], dtype=torch.float32, device=device)
            self.it = torch.zeros((), dtype=torch.int64, device=device)
            self.first_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.unit, self.run, self.quantizers, self.x_q, self.target = unit, run, list(quantizers), x_q, target
        self._betas = [wq.beta for wq in self.quantizers]  # restored by release()

    def __call__(self, opt: torch.optim.Optimizer) -> None:
        if self.resident:
            at = self.it.view(1)
            idx = self.indices.index_select(0, at).view(-1)
            beta = self.betas.index_select(0, at).view(())  # a tensor: the regularizer reads it on the device
            lam = self.lams.index_select(0, at).view(())
        else:
            idx = self.indices[self.host_it]
            beta, lam = self.table[self.host_it]
        for wq in self.quantizers:
            wq.set_beta(beta)
        rec = reconstruction_loss(self.run(self.unit, self.x_q.index_select(0, idx)), self.target.index_select(0, idx))
        if self.resident:
            loss = rec + lam * sum(wq.last_reg for wq in self.quantizers)
            self.first_loss.copy_(torch.where(self.it == 0, rec.detach().float(), self.first_loss))
            self.it.add_(1)
        else:
            loss = rec + lam * sum(wq.last_reg for wq in self.quantizers) if lam else rec
            if self.host_it == 0:
                self.first_loss = rec.detach().float()
        self.host_it += 1
        loss.backward()
        opt.step()
        project(opt)

    def release(self) -> None:
        for wq, beta in zip(self.quantizers, self._betas):
            wq.set_beta(beta)


def optimise_device(unit, run, quantizers, groups, x_q: Tensor, target: Tensor, config, gen: torch.Generator,
                    device: str, step: Callable[[], None], graph: bool, fallback: bool = False,
                    resident: Optional[bool] = None) -> Tuple[Optional[float], float, str]:
    """The ``device`` engine, or with ``graph`` the same step replayed from a CUDA graph (``resident``,
    default ``graph``: the step reads its schedule on the device, as captured; tests run it eagerly).
    ``fallback`` (engine "auto"): a step that cannot be captured runs on eagerly, with a warning.
    Returns (loss of the first batch, seconds, the engine that ran)."""
    t0 = time.perf_counter()
    on_cuda = torch.device(device).type == "cuda"
    # capturable: Adam keeps its step count on the device (needed in a graph, and no host sync)
    opt = torch.optim.Adam(groups, capturable=on_cuda, foreach=True)
    body = DeviceStep(unit, run, quantizers, x_q, target, config, gen, device, graph if resident is None else resident)
    try:
        eager = config.iterations if not graph else min(config.iterations, GRAPH_WARMUP)
        stream = torch.cuda.Stream(device) if graph and on_cuda else None  # warm-up off the capture stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(eager):
                opt.zero_grad(set_to_none=True)
                body(opt)
                step()
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        ran = "graph" if graph else "device"
        if eager < config.iterations:
            try:
                g = _capture(body, opt, quantizers_generators(unit))
            except QuantizationError as e:
                if not fallback:
                    raise
                warnings.warn(f"{e}; this unit runs on with the device engine", stacklevel=2)
                g, ran = None, "device"
                opt.zero_grad(set_to_none=True)
            for _ in range(config.iterations - eager):
                if g is not None:
                    g.replay()
                else:  # the captured step's body, eagerly (its state is on the device: it resumes exactly)
                    opt.zero_grad(set_to_none=True)
                    body(opt)
                step()
        _synchronize(device)
        return float(body.first_loss), time.perf_counter() - t0, ran
    finally:
        body.release()


def quantizers_generators(unit) -> List[torch.Generator]:
    """The generators the unit's activation quantizers draw from (QDrop): a graph replays their draws."""
    gens = []
    for m in unit.modules():
        g = getattr(m, "drop_generator", None)
        if g is not None and getattr(m, "drop_prob", 0) > 0 and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _capture(body: DeviceStep, opt: torch.optim.Optimizer, generators: Sequence[torch.Generator]):
    graph = torch.cuda.CUDAGraph()
    if generators and not hasattr(graph, "register_generator_state"):
        raise QuantizationError(f"this torch ({torch.__version__}) cannot replay QDrop's random draws in a CUDA graph "
                                "(CUDAGraph.register_generator_state is missing): use engine 'device'")
    for g in generators:
        graph.register_generator_state(g)
    opt.zero_grad(set_to_none=True)  # the captured backward then writes (not accumulates) the gradients
    try:
        with torch.cuda.graph(graph):
            body(opt)
    except RuntimeError as e:
        raise QuantizationError(f"the reconstruction step could not be captured in a CUDA graph ({e}); "
                                "use engine 'device' or 'loop'") from e
    return graph

