"""Where the floor is: the FLOPs of one training run, and the FLOP/s this CPU achieves on them.

    python bench/flops.py --weights ../shared/weights/mobilenetv2_100.tv_in1k.safetensors --out bench/flops.json

Builds the model as the train step does (params.yaml's `train:` section: model, image size, freeze
depth, channels_last, optimiser), cuts it where the frozen-feature cache cuts it, and:

1. Counts FLOPs with torch's own counter (`torch.utils.flop_counter.FlopCounterMode`, which also
   sees the backward's convolutions and matmuls as autograd runs them): the frozen prefix's forward,
   the tail's forward and forward+backward, per image. The counter counts convolutions and matrix
   products only (multiply-add = 2 FLOPs); BatchNorm, ReLU6, residual additions and the AdamW update
   are left out, as fvcore and thop do: a few percent of the FLOPs, though not of the time (see the
   profile below). torch's formula for a convolution's backward is replaced (`conv_backward_flop`:
   it overcounts grouped convolutions). Forward hooks
   on every Conv2d/Linear count the same multiply-adds by hand, split into depthwise, pointwise
   (1x1) and other convolutions and the classifier: a check on the counter, and the mix that
   decides how fast it can run.
2. Totals one training run as signflow/train.py runs it: the prefix over `cached_views` augmented
   views of each train image and once over each valid image (the feature cache), `epochs` of the
   tail's forward+backward over the train images, and the tail's forward over the valid images after
   every epoch and once more for the temperature fit. The model checks before (check_image_size,
   cut_model, the ONNX export check: 5 images) are included. Image counts: `--train/--valid`
   (the reference split: 1443/309), or those of `--split DIR` (a project's data/split).
3. Times, with the threads training uses (torch's default: one per core; ONNX Runtime gets as many)
   and again on 1 thread, median of `--repeats` after a warm-up: the prefix forward at
   `inference_batch_size` in ONNX Runtime as the cache runs it (and in PyTorch channels_last, for
   comparison); the tail's training step (forward, loss, backward, AdamW step:
   signflow._runners.train_step) at `batch_size` on channels_last float32 features, and its
   forward alone; the tail's validation forward at
   `inference_batch_size`; and a float32 2048x2048 torch.mm as this CPU's practical peak. The
   inputs are real prefix outputs of random images (the speed does not depend on the pixels).
   On 1 thread the work runs in the calling thread, so its CPU time (`time.thread_time`) is the
   time the work actually ran: rates per CPU second that a busy machine does not stretch (on
   oversubscribed cores the wall time of 2 OpenMP threads, which wait on each other, is mostly the
   load's). Then torch.profiler splits `--profile-steps` training steps on 1 thread into
   convolutions (depthwise and the rest), BatchNorm, ReLU6, the optimiser and the rest.
4. Compares with a measured reference run (`--reference`, bench/results.json: the train step's
   seconds and its epoch images/s) to say what share of it the FLOPs explain.

The 1-minute load average is recorded before and after each timing: on a shared machine other
processes slow every figure (the best of the repeats is kept beside the median). Nothing is
asserted. Runs in 1-3 minutes on 2 cores (2 min 40 s at load 7).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from signflow._feature_cache import cached_view_count, cut_model, module_chain, onnx_prefix
from signflow._model import set_train_mode
from signflow._preprocessing import normalize
from signflow._runners import train_step
from signflow.config import load_params
from signflow.train import build_model, create_optimizer

ROOT = Path(__file__).resolve().parents[1]
MATMUL_SIZE = 2048


def conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """A convolution's backward: its forward's FLOPs for the input gradient and again for the weight
    gradient, each when asked for. torch 2.14's own formula counts a grouped convolution's weight
    gradient `groups` times over (a depthwise 3x3 of 960 channels: 960x), which made MobileNetV2's
    tail backward 22x its forward (pytorch/pytorch#183405 divides by the groups)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def counted_flops(run: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and matmuls `run` executes, backward included."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


def conv_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if module.kernel_size == (1, 1):
        return "pointwise"
    return "dense"


@torch.no_grad()
def macs_by_kind(module: nn.Module, batch: torch.Tensor) -> dict[str, int]:
    """Forward multiply-adds per image of every Conv2d and Linear in `module`, by kind, counted by hand."""
    totals = {"depthwise": 0, "pointwise": 0, "dense": 0, "linear": 0}

    def hook(layer: nn.Module, inputs, output: torch.Tensor) -> None:
        per_output = layer.in_features if isinstance(layer, nn.Linear) else layer.weight[0].numel()
        totals[conv_kind(layer)] += output.numel() * per_output // batch.shape[0]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def timed(run: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Seconds of `run`, median and best of `repeats` after `warmup`: wall time, and the CPU time of
    this thread (all of the work at 1 thread, where torch and ONNX Runtime compute in the calling
    thread: the time it actually ran, which other processes do not stretch). With the load before and after."""
    load_before = os.getloadavg()[0]
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return {
        "median_s": statistics.median(wall),
        "best_s": min(wall),
        "samples_s": [round(s, 5) for s in wall],
        "thread_cpu_median_s": statistics.median(cpu),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }


def rate(timing: dict, flops: float) -> dict:
    """GFLOP/s at the median and at the best sample."""
    return {
        **timing,
        "gflop": round(flops / 1e9, 4),
        "gflops_median": round(flops / timing["median_s"] / 1e9, 2),
        "gflops_best": round(flops / timing["best_s"] / 1e9, 2),
        "gflops_per_thread_cpu_s": round(flops / timing["thread_cpu_median_s"] / 1e9, 2),
    }


def without_thread_cpu(timings: dict) -> dict:
    """On several threads this thread's CPU time is only part of the work: not a rate to report."""
    drop = ("thread_cpu_median_s", "gflops_per_thread_cpu_s")
    return {name: {k: v for k, v in timing.items() if k not in drop} for name, timing in timings.items()}


@torch.no_grad()
def tail_macs_by_module(model: nn.Module, cut, features: torch.Tensor) -> dict[str, int]:
    """Forward multiply-adds per image of each module of the tail (its blocks, conv_head, classifier)."""
    chain = module_chain(model)
    names = [name for name, _ in chain][[name for name, _ in chain].index(cut.cut_name) :]
    macs = {}
    for name, module in zip(names, cut.tail, strict=True):
        counted = sum(macs_by_kind(module, features).values())
        if counted:
            macs[name] = counted
        features = module(features)
    return macs


def cfg_classes(cut) -> int:
    """The classes of the new head (the tail's last Linear)."""
    return [m for m in cut.tail.modules() if isinstance(m, nn.Linear)][-1].out_features


def split_counts(split_dir: Path) -> tuple[int, int]:
    from signflow.split_files import read_manifest

    return len(read_manifest(split_dir, "train")), len(read_manifest(split_dir, "valid"))


def build(args: argparse.Namespace):
    """The train step's model, cut where its feature cache cuts it, with the optimiser it trains with."""
    weights = {"weights_file": str(Path(args.weights).resolve())} if args.weights else {"pretrained": False}
    cfg = load_params(args.params).train.model_copy(update=weights)
    torch.manual_seed(0)
    model, prep = build_model(cfg, args.classes, torch.device("cpu"))
    images = torch.randint(0, 256, (cfg.inference_batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    batch = normalize(images, prep).contiguous(memory_format=torch.channels_last)
    cut = cut_model(model, batch[:2])
    if cut is None:
        raise SystemExit(f"{cfg.model} at trainable_blocks={cfg.trainable_blocks} cannot be cut: no feature cache")
    return cfg, model, cut, batch, create_optimizer(cfg, model)


def count(cfg, model, cut, batch, train_images: int, valid_images: int) -> dict:
    """FLOPs per image of each part, and the totals of one training run."""
    one = batch[:1]
    with torch.no_grad():
        features = cut.prefix(batch[: cfg.batch_size]).contiguous(memory_format=torch.channels_last)
    targets = torch.arange(cfg.batch_size) % cfg_classes(cut)
    with torch.no_grad():
        prefix = counted_flops(lambda: cut.prefix(one))
        full = counted_flops(lambda: model(one))
    set_train_mode(model)

    def forward_backward() -> None:
        loss = nn.functional.cross_entropy(cut.tail(features), targets, label_smoothing=cfg.label_smoothing)
        loss.backward()

    tail_forward = counted_flops(lambda: cut.tail(features)) / cfg.batch_size
    tail_train = counted_flops(forward_backward) / cfg.batch_size
    model.zero_grad(set_to_none=True)
    model.eval()
    views = cached_view_count(cfg)
    checks = 3 * full + 4 * prefix + 2 * tail_forward  # check_image_size, cut_model, the ONNX export check
    parts = {
        "prefix_cache": (views * train_images + valid_images) * prefix,
        "tail_train": cfg.epochs * train_images * tail_train,
        "tail_validation": (cfg.epochs + 1) * valid_images * tail_forward,
        "checks": checks,
    }
    total = sum(parts.values())
    return {
        "per_image_gflop": {
            "prefix_forward": prefix / 1e9,
            "tail_forward": tail_forward / 1e9,
            "tail_forward_backward": tail_train / 1e9,
            "full_forward": full / 1e9,
        },
        "per_image_macs_by_kind": {
            "prefix": macs_by_kind(cut.prefix, one),
            "tail": macs_by_kind(cut.tail, features[:1]),
        },
        "per_image_tail_macs_by_module": tail_macs_by_module(model, cut, features[:1]),
        "run": {
            "train_images": train_images,
            "valid_images": valid_images,
            "cached_views": views,
            "epochs": cfg.epochs,
            "validation_passes": cfg.epochs + 1,
            "tflop": {name: flops / 1e12 for name, flops in parts.items()} | {"total": total / 1e12},
            "tera_macs_total": total / 2e12,
        },
        "_flops": {"prefix": prefix, "tail_forward": tail_forward, "tail_train": tail_train, "parts": parts},
    }


def measure(cfg, cut, batch, optimizer, flops: dict, repeats: int, threads: int) -> dict:
    """Achieved GFLOP/s of each part as training runs it, and of a large matmul, on `threads` threads."""
    torch.set_num_threads(threads)
    ort_prefix = onnx_prefix(cut.prefix, batch[:2].contiguous(), threads)
    nchw = batch.contiguous()
    with torch.inference_mode():
        features = cut.prefix(batch).contiguous(memory_format=torch.channels_last)
    train_batch = features[: cfg.batch_size].clone()
    targets = torch.arange(cfg.batch_size) % cfg_classes(cut)
    prefix_flops, tail_forward, tail_train = flops["prefix"], flops["tail_forward"], flops["tail_train"]
    results = {}
    if ort_prefix is not None:
        results["prefix_onnxruntime"] = rate(timed(lambda: ort_prefix(nchw), repeats), len(batch) * prefix_flops)

    def torch_prefix() -> None:
        with torch.inference_mode():
            cut.prefix(batch)

    results["prefix_torch"] = rate(timed(torch_prefix, max(2, repeats // 3)), len(batch) * prefix_flops)
    set_train_mode(cut.tail)

    def step() -> None:
        train_step(cut.tail, train_batch, targets, cfg, optimizer, 1)

    def train_forward() -> None:
        cut.tail(train_batch)

    results["tail_train_step"] = rate(timed(step, 3 * repeats, warmup=3), cfg.batch_size * tail_train)
    results["tail_train_forward"] = rate(timed(train_forward, 3 * repeats, warmup=2), cfg.batch_size * tail_forward)
    cut.tail.eval()

    def validation_forward() -> None:
        with torch.inference_mode():
            cut.tail(features)

    results["tail_validation_forward"] = rate(timed(validation_forward, 2 * repeats), len(features) * tail_forward)
    left, right = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    results["matmul_peak"] = rate(timed(lambda: torch.mm(left, right), repeats, warmup=2), 2 * MATMUL_SIZE**3)
    return results


PROFILE_GROUPS = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "batch_norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
    "relu6": ("aten::clamp", "aten::hardtanh_backward"),
}
"""Where a tail training step's CPU time goes, by the aten ops that do the work (self time)."""


def profile_group(event) -> str:
    if event.name in ("aten::mkldnn_convolution", "aten::convolution_backward"):
        weight = event.input_shapes[1 if event.name == "aten::mkldnn_convolution" else 2]
        return "convolution_depthwise" if len(weight) == 4 and weight[1] == 1 and weight[2] > 1 else "convolution_other"
    parents = []
    parent = event.cpu_parent
    while parent is not None:
        parents.append(parent.name)
        parent = parent.cpu_parent
    if "aten::hardtanh_" in parents:
        return "relu6_inplace_clone"  # autograd copies an in-place ReLU6's input before clamping it
    if any(name.startswith("Optimizer.") for name in parents):
        return "optimizer"
    return next((name for name, ops in PROFILE_GROUPS.items() if event.name in ops), "other")


def profile_step(cfg, cut, features: torch.Tensor, optimizer, steps: int) -> dict:
    """Shares of a training step's self CPU time (1 thread, `steps` steps under torch.profiler) by
    kind of work, convolutions split into depthwise and the rest (by their weights' shapes)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    set_train_mode(cut.tail)
    targets = torch.arange(len(features)) % cfg_classes(cut)
    train_step(cut.tail, features, targets, cfg, optimizer, 1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(steps):
            train_step(cut.tail, features, targets, cfg, optimizer, 1)
    events = list(profiler.events())
    total = sum(event.self_cpu_time_total for event in events)
    shares: dict[str, float] = {}
    for event in events:
        group = profile_group(event)
        shares[group] = shares.get(group, 0.0) + event.self_cpu_time_total / total
    return {"steps": steps, "self_cpu_s_per_step": total / 1e6 / steps} | {
        name: round(share, 3) for name, share in sorted(shares.items())
    }


def compare(reference: Path, counts: dict, rates: dict, one_thread: dict, threads: int, cfg) -> dict:
    """What share of a measured run's train step the FLOPs explain. Two sets of rates: those timed
    here on `threads` threads (wall time, slowed by whatever else runs), and the 1-thread rates per
    CPU second times `threads` (what the cores do while they run this work, assuming perfect scaling)."""
    runs = json.loads(reference.read_text())["runs"]
    train_s = statistics.median(run["step_seconds"]["train"] for run in runs.values())
    images_per_s = statistics.median(run["train_images_per_second"] for run in runs.values())
    parts, train_images = counts["_flops"]["parts"], counts["run"]["train_images"]
    epoch_s = cfg.epochs * train_images / images_per_s
    prefix_key = "prefix_onnxruntime" if "prefix_onnxruntime" in rates else "prefix_torch"
    keys = {"prefix_cache": prefix_key, "tail_train": "tail_train_step", "tail_validation": "tail_validation_forward"}
    estimates = {
        "timed_here": {part: parts[part] / (rates[key]["gflops_median"] * 1e9) for part, key in keys.items()},
        "one_thread_cpu_x_threads": {
            part: parts[part] / (one_thread[key]["gflops_per_thread_cpu_s"] * threads * 1e9)
            for part, key in keys.items()
        },
    }
    total_flops = sum(parts.values())
    peak = one_thread["matmul_peak"]["gflops_per_thread_cpu_s"] * threads
    return {
        "reference": str(reference),
        "train_step_s": train_s,
        "epoch_s": round(epoch_s, 1),
        "epoch_gflops": round(parts["tail_train"] / epoch_s / 1e9, 2),
        "train_step_gflops": round(total_flops / train_s / 1e9, 2),
        "matmul_peak_gflops": round(peak, 1),
        "floor_s_at_matmul_peak": round(total_flops / peak / 1e9, 1),
        "kernel_seconds": {
            name: {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)}
            for name, seconds in estimates.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--weights", help="local timm weights file (default: random weights, same FLOPs)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=1443, help="train images (reference split)")
    parser.add_argument("--valid", type=int, default=309, help="valid images (reference split)")
    parser.add_argument("--split", help="a data/split folder to read the image counts from instead")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile-steps", type=int, default=3, help="training steps under torch.profiler")
    parser.add_argument("--reference", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--out")
    args = parser.parse_args()
    train_images, valid_images = split_counts(Path(args.split)) if args.split else (args.train, args.valid)
    cfg, model, cut, batch, optimizer = build(args)
    counts = count(cfg, model, cut, batch, train_images, valid_images)
    threads = torch.get_num_threads()
    rates = measure(cfg, cut, batch, optimizer, counts["_flops"], args.repeats, threads)
    one_thread = measure(cfg, cut, batch, optimizer, counts["_flops"], args.repeats, 1) if threads > 1 else rates
    with torch.no_grad():
        features = cut.prefix(batch[: cfg.batch_size]).contiguous(memory_format=torch.channels_last)
    step_profile = profile_step(cfg, cut, features, optimizer, args.profile_steps)
    torch.set_num_threads(threads)
    result = {
        "model": cfg.model,
        "image_size": cfg.image_size,
        "trainable_blocks": cfg.trainable_blocks,
        "cut": cut.cut_name,
        "feature_shape": list(cut.feature_shape),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "counter": "torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; FLOPs = 2 x multiply-adds)",
        **{k: v for k, v in counts.items() if not k.startswith("_")},
        "rates": without_thread_cpu(rates) if threads > 1 else rates,
        "rates_one_thread": one_thread,
        "tail_step_profile_one_thread": step_profile,
    }
    if args.reference and Path(args.reference).is_file():
        result["reference_run"] = compare(Path(args.reference), counts, rates, one_thread, threads, cfg)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
