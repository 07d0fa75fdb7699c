"""`fedlora bench dp`: the cost of DP-SGD over plain LoRA training, measured in one run.

Plain LoRA steps, DP steps with Opacus's GradSampleModule and DP steps with the fast
LoRA path (privacy/lora_grad_sample.py) run on the same model, batch and optimizer,
interleaved round by round (the order rotates each round), so that load from other
processes and thermal drift hit all of them alike; the reported step time is the
median over rounds. A step is what the training loop does: forward, per-sequence loss,
backward, (DP: clip, noise, scale) optimizer step, zero_grad. The learning rate is 0 so
every step sees the same weights (an SGD step costs the same at any lr), which also lets
the benchmark check that both DP paths give the same per-example gradient norms.

Peak memory is measured in separate, untimed steps after the timed rounds (the median
of up to three per variant). CUDA: torch.cuda.max_memory_allocated over the step (absolute, model included).
CPU: the peak resident set size above the RSS at the step's start, sampled every
millisecond by a thread reading /proc/self/statm, after malloc_trim so that memory freed
by earlier steps is not silently reused (no tracemalloc, which would slow every step).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from fedlora.base_model import enable_checkpointing
from fedlora.config import ConfigError
from fedlora.simulations.model_presets import DTYPES, PRESETS, build_bench_model

DP_CHOICES = ("both", "fast", "opacus")


@dataclass
class BenchOptions:
    model: str = "default"
    batch: int = 64
    seq: int = 64
    rank: int = 8
    targets: str = "qv"
    device: str = "cpu"
    dtype: str = "fp32"
    task: str = "auto"
    steps: int = 10  # timed rounds; each round runs one step of every variant
    warmup: int = 1
    dp_impl: str = "both"
    checkpointing: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0


def check_options(options: BenchOptions) -> None:
    for key in ("batch", "seq", "rank", "steps"):
        if getattr(options, key) <= 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(options, key)!r}")
    if options.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {options.warmup!r}")
    if options.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {options.device!r}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available on this machine")
    if options.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.dp_impl not in DP_CHOICES:
        raise ConfigError(f"--dp-impl must be one of {', '.join(DP_CHOICES)}, got {options.dp_impl!r}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include reusable free memory
        pass


class PeakMemory:
    """Peak memory of the code inside `with`, in MB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _malloc_trim()
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (max(self._peak, _rss_bytes()) - self._base) / 2**20


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step (absolute: model, activations, gradients)"
    return "peak RSS above the step's starting RSS, sampled every 1 ms from /proc/self/statm, after malloc_trim"


def bench_dp(options: BenchOptions) -> dict:
    """Run the benchmark; returns the JSON-ready result."""
    from opacus import __version__ as opacus_version

    from fedlora.client.local_training import forward_logits, sequence_losses
    from fedlora.privacy.dp_sgd import choose_impl, private_optimizer
    from fedlora.privacy.lora_grad_sample import uncovered_parameters

    check_options(options)
    device = torch.device(options.device)
    bench = build_bench_model(options.model, batch=options.batch, seq=options.seq, rank=options.rank,
                              targets=options.targets, dtype=options.dtype, device=options.device,
                              task=options.task, seed=options.seed)
    model, batch, task = bench.model, bench.batch, bench.task
    if options.checkpointing:
        enable_checkpointing(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    fast_covers = choose_impl(model, "auto") == "fast"
    variants = ["plain"]
    if options.dp_impl in ("both", "opacus"):
        variants.append("opacus")
    if options.dp_impl == "fast" and not fast_covers:
        raise ConfigError(f"--dp-impl fast: trainable parameters outside nn.Linear: {', '.join(uncovered_parameters(model)[:3])}")
    if options.dp_impl in ("both", "fast") and fast_covers:
        variants.append("fast")  # else DP training itself falls back to Opacus, measured above

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def loss_of(forward_model: torch.nn.Module) -> torch.Tensor:
        return sequence_losses(forward_logits(forward_model, batch), batch["labels"], task).mean()

    def timed(forward_model: torch.nn.Module, step_optimizer: torch.optim.Optimizer, memory: PeakMemory | None) -> float:
        """Seconds of forward, backward and optimizer step (under `memory` if given)."""
        with memory or _Nothing():
            sync()
            start = time.perf_counter()
            loss_of(forward_model).backward()
            step_optimizer.step()
            sync()
            return time.perf_counter() - start

    def step(variant: str, memory: PeakMemory | None = None) -> tuple[float, torch.Tensor | None]:
        """One training step; returns its seconds and (memory steps, DP) per-example norms."""
        torch.manual_seed(options.seed)  # same dropout masks for every variant (MiniLM trains with dropout)
        if variant == "plain":
            seconds = timed(model, optimizer, memory)
            optimizer.zero_grad(set_to_none=True)
            return seconds, None
        generator = torch.Generator(device=device).manual_seed(options.seed)
        with private_optimizer(model, optimizer, options.noise_multiplier, options.max_grad_norm, options.batch,
                               generator=generator, impl=variant) as (forward_model, dp_optimizer):
            seconds = timed(forward_model, dp_optimizer, memory)
            norms = None
            if memory is not None:
                n = options.batch
                norms = torch.sqrt(sum((p.grad_sample.double().reshape(n, -1) ** 2).sum(1) for p in dp_optimizer.params))
            dp_optimizer.zero_grad(set_to_none=True)
        return seconds, norms

    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_number in range(options.warmup + options.steps):
        order = variants[round_number % len(variants):] + variants[: round_number % len(variants)]
        for variant in order:
            seconds, _ = step(variant)
            if round_number >= options.warmup:
                times[variant].append(seconds * 1000)
    peak_samples: dict[str, list[float]] = {v: [] for v in variants}
    norms: dict[str, torch.Tensor] = {}
    for _ in range(min(3, options.steps)):  # the median of up to 3 samples per variant
        for variant in variants:
            memory = PeakMemory(device)
            _, variant_norms = step(variant, memory)
            peak_samples[variant].append(memory.peak_mb)
            if variant_norms is not None:
                norms[variant] = variant_norms
    peaks = {v: statistics.median(s) for v, s in peak_samples.items()}

    median = {v: statistics.median(t) for v, t in times.items()}
    dp = "fast" if "fast" in variants else "opacus"  # what DP training uses with privacy.dp_impl = "auto"
    result: dict = {
        "model": options.model,
        "description": bench.description,
        "task": task,
        "device": options.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": options.dtype,
        "batch": int(batch["input_ids"].shape[0]),
        "seq": int(batch["input_ids"].shape[1]),
        "rank": options.rank,
        "targets": options.targets,
        "checkpointing": options.checkpointing,
        "steps": options.steps,
        "dp_impl": dp,
        "plain_ms": median["plain"],
        "dp_ms": median[dp],
        "ratio": median[dp] / median["plain"],
        "plain_peak_mb": peaks["plain"],
        "dp_peak_mb": peaks[dp],
        "fast_covers": fast_covers,
        "memory_method": memory_method(device),
        "torch": torch.__version__,
        "opacus": opacus_version,
    }
    for v in ("opacus", "fast"):
        if v in variants:
            result[f"{v}_ms"] = median[v]
            result[f"{v}_ratio"] = median[v] / median["plain"]
            result[f"{v}_peak_mb"] = peaks[v]
    if "opacus" in norms and "fast" in norms:
        # Same weights, batch and dropout masks: the two DP paths must agree.
        diff = ((norms["fast"] - norms["opacus"]).abs() / norms["opacus"].clamp(min=1e-12)).max()
        result["per_example_norm_max_rel_diff"] = float(diff)
    # The fastest step of each variant: less sensitive to other load on the machine than the median.
    result["min_ms"] = {v: min(ts) for v, ts in times.items()}
    result["times_ms"] = {v: [round(t, 2) for t in ts] for v, ts in times.items()}
    result["options"] = asdict(options)
    return result


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores visible)"


def format_table(result: dict) -> str:
    """The result as a small readable table."""
    lines = [
        f"model   {result['description']}",
        f"batch   {result['batch']} x {result['seq']} tokens, LoRA r={result['rank']} on {result['targets']}, "
        f"{result['dtype']} base, checkpointing {'on' if result['checkpointing'] else 'off'}",
        f"device  {result['device']}: {result['device_name']}, {result['threads']} threads; "
        f"median of {result['steps']} interleaved steps",
        "",
        f"{'':<22}{'median ms':>10}{'x plain':>10}{'min ms':>10}{'peak MB':>10}",
        f"{'plain LoRA':<22}{result['plain_ms']:>10.1f}{1.0:>10.2f}{result['min_ms']['plain']:>10.1f}"
        f"{result['plain_peak_mb']:>10.1f}",
    ]
    for v, label in (("opacus", "DP, Opacus hooks"), ("fast", "DP, fast LoRA path")):
        if f"{v}_ms" in result:
            lines.append(f"{label:<22}{result[f'{v}_ms']:>10.1f}{result[f'{v}_ratio']:>10.2f}{result['min_ms'][v]:>10.1f}"
                         f"{result[f'{v}_peak_mb']:>10.1f}")
    if not result["fast_covers"]:
        lines.append("(the fast path does not cover this model: DP falls back to Opacus)")
    if "per_example_norm_max_rel_diff" in result:
        lines.append(f"per-example norms, fast vs Opacus: max relative difference {result['per_example_norm_max_rel_diff']:.1e}")
    lines.append(f"peak memory: {result['memory_method']}")
    return "\n".join(lines)


