"""prunekit on a CUDA GPU: masks, optimizers, structured compaction and 2:4 sparse kernels.

CI has no GPU, so this script is the check that what the CPU tests assert also holds on CUDA, with
the timings a GPU user would ask for. Each part prints one line and the whole run writes
``benchmarks/results/gpu_check.md``:

1. **Global magnitude pruning on the GPU**: torchvision ResNet-50 to 90%, exact count pruned, the
   masks on the model's device, time against one |w| pass over the weights (issue #2's measure).
2. **Masks survive training**: AdamW steps with the optimizer attached keep every pruned weight at
   exactly zero; the masked step's time against the dense step's (ResNet-50, batch 64, bf16 autocast).
3. **Structured compaction**: ResNet-50 at 50% of channels, compacted on the GPU; outputs equal to the
   masked model's; latency of dense vs compacted (batch 64, fp16, channels_last), against the MACs.
4. **2:4 semi-structured sparsity** (``pk.NM(2, 4)``): the masks have exactly the pattern that
   ``torch.sparse.to_sparse_semi_structured`` accepts (cuSPARSELt / CUTLASS kernels on sm80+), the
   sparse product equals the masked dense one, and its speed against dense fp16 ``F.linear``.

Run:  python benchmarks/gpu_check.py            (a CUDA GPU; about 2 minutes on an H200)
      python benchmarks/gpu_check.py --smoke    (tiny sizes, any device: checks the script itself)
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import today, write_result  # noqa: E402

import prunekit as pk  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, repeats: int = 20, warmup: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return times[len(times) // 2]


def _resnet(device, smoke: bool):
    import torchvision

    torch.manual_seed(0)
    build = torchvision.models.resnet18 if smoke else torchvision.models.resnet50
    return build(weights=None).to(device)


def global_magnitude(device, smoke) -> str:
    model = _resnet(device, smoke).eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(w.numel() for w in weights)

    def abs_pass():
        for w in weights:
            w.detach().abs()

    pass_ms = _median_ms(abs_pass, device, repeats=10)
    # The first call pays for loading the GPU kernels it uses; a second call on a fresh copy does not.
    spare = copy.deepcopy(model)
    _sync(device)
    start = time.perf_counter()
    pruner = pk.prune(model, 0.9, criterion="magnitude", granularity="weight", scope="global")
    _sync(device)
    prune_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    pk.prune(spare, 0.9, criterion="magnitude", granularity="weight", scope="global")
    _sync(device)
    again_ms = 1e3 * (time.perf_counter() - start)
    masks = pruner.masks
    pruned = sum(int((~keep).sum()) for keep in masks.values())
    on_device = all(keep.device.type == device.type for keep in masks.values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert pruned == round(0.9 * total), (pruned, total)
    assert on_device and zeros >= pruned
    return (
        f"| global magnitude 90% ({total:,} weights) | exactly {pruned:,} pruned, masks on {device.type} | "
        f"first call {prune_ms:.1f} ms, second {again_ms:.1f} ms = {again_ms / pass_ms:.0f}× one |w| pass "
        f"({pass_ms:.2f} ms) |"
    )


def training(device, smoke) -> str:
    batch = 4 if smoke else 64
    size = 32 if smoke else 224
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def make(masked: bool):
        model = _resnet(device, smoke).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pruner = None
        if masked:
            pruner = pk.prune(model, 0.9, scope="global", optimizer=optimizer)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, pruner, step

    dense_model, _, dense_step = make(False)
    masked_model, pruner, masked_step = make(True)
    steps = 3 if smoke else 30
    dense_ms = masked_ms = 0.0
    # Interleaved rounds, so that clock changes hit both alike.
    for _ in range(3):
        dense_ms += _median_ms(dense_step, device, repeats=steps, warmup=2)
        masked_ms += _median_ms(masked_step, device, repeats=steps, warmup=2)
    leaked = 0
    for name, keep in pruner.masks.items():
        module_name, _, param_name = name.rpartition(".")
        param = masked_model.get_submodule(module_name).get_parameter(param_name)
        leaked += int((param.detach()[~keep] != 0).sum())
    assert leaked == 0, f"{leaked} pruned weights came back"
    del dense_model

    def enforcement():  # what the masked step adds: the masks re-applied, and pruner.step()
        pruner.apply_masks()
        pruner.step()

    enforcement_ms = _median_ms(enforcement, device, repeats=50)
    return (
        f"| AdamW steps with masks enforced (batch {batch}, bf16 autocast) | 0 pruned weights non-zero after "
        f"{3 * (steps + 2)} steps | masked step {masked_ms / 3:.2f} ms vs dense {dense_ms / 3:.2f} ms: "
        f"{masked_ms / dense_ms - 1:+.1%}; the enforcement alone {enforcement_ms:.2f} ms = "
        f"{enforcement_ms / (dense_ms / 3):+.1%} of a dense step |"
    )


def structured(device, smoke, round_to: int = 1) -> str:
    batch = 2 if smoke else 128
    size = 64 if smoke else 224
    model = _resnet(device, smoke).eval()
    example = torch.randn(1, 3, size, size, device=device)
    x = torch.randn(batch, 3, size, size, device=device)
    dense_macs = pk.summary(model, example).macs
    start = time.perf_counter()
    pk.prune(model, 0.5, criterion="l2", granularity="out_channel", example_inputs=example, round_to=round_to)
    small = pk.compact(model, example)
    _sync(device)
    prune_s = time.perf_counter() - start
    # Exactness is checked in true float32: cuDNN's default TF32 convolutions differ by ~1e-4 by themselves.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        masked_out, small_out = model(x), small(x)
    torch.backends.cudnn.allow_tf32 = tf32
    difference = float((masked_out - small_out).abs().max() / masked_out.abs().max())
    assert difference <= 1e-4, difference
    small_macs = pk.summary(small, example).macs
    dense = _resnet(device, smoke).eval()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    forwards = {}
    for name, net in (("dense", dense), ("compacted", small)):
        net = net.to(dtype=dtype, memory_format=torch.channels_last)
        inputs = x.to(dtype=dtype, memory_format=torch.channels_last)

        def forward(net=net, inputs=inputs):
            with torch.no_grad():
                net(inputs)

        forwards[name] = forward
    # Interleaved rounds, medians of their medians: GPU clocks ramp and drift between calls.
    rounds = {name: [] for name in forwards}
    for _ in range(2 if smoke else 7):
        for name, forward in forwards.items():
            rounds[name].append(_median_ms(forward, device, repeats=5 if smoke else 40, warmup=10))
    timed = {name: sorted(values)[len(values) // 2] for name, values in rounds.items()}
    speedup = timed["dense"] / timed["compacted"]
    mac_ratio = dense_macs / small_macs
    return (
        f"| ResNet-50 at 50% channels, round_to={round_to}, prune + compact on {device.type} ({prune_s:.2f} s) "
        "| outputs equal "
        f"(max diff {difference:.1e} of scale); MACs ÷{mac_ratio:.2f} | batch {batch} {str(dtype)[6:]}: "
        f"{timed['dense']:.2f} → {timed['compacted']:.2f} ms, ×{speedup:.2f} ({speedup / mac_ratio:.2f} of the MAC "
        "ratio) |"
    )


def two_four(device, smoke) -> str:
    if device.type != "cuda":
        return "| 2:4 semi-structured kernels | skipped: needs a CUDA GPU | |"
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    features = 1024 if smoke else 8192
    tokens = 1024 if smoke else 8192
    layer = torch.nn.Linear(features, features, bias=False).to(device=device, dtype=torch.float16)
    pk.prune(layer, granularity=pk.NM(2, 4)).remove()
    weight = layer.weight.detach()
    groups = (weight.reshape(features, -1, 4) != 0).sum(dim=-1)
    assert int(groups.max()) <= 2
    sparse = to_sparse_semi_structured(weight)  # raises if the pattern is not 2:4 along the rows
    x = torch.randn(tokens, features, device=device, dtype=torch.float16)
    dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
    difference = float((dense_out - sparse_out).abs().max() / dense_out.abs().max())
    assert difference < 1e-2, difference
    dense_ms = _median_ms(lambda: F.linear(x, weight), device, repeats=50)
    timings = []
    for backend in ("cuSPARSELt", "CUTLASS"):
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "CUTLASS"
        try:
            sparse = to_sparse_semi_structured(weight)
            # W·xᵀ puts the sparse operand first, as the kernels want; F.linear(x, W) transposes around it.
            x_t = x.t().contiguous()
            sparse_ms = _median_ms(lambda sparse=sparse: F.linear(x, sparse), device, repeats=50)
            first_ms = _median_ms(lambda sparse=sparse, x_t=x_t: torch.mm(sparse, x_t), device, repeats=50)
            timings.append(f"{backend}: F.linear ×{dense_ms / sparse_ms:.2f}, W·xᵀ ×{dense_ms / first_ms:.2f}")
        except (RuntimeError, NotImplementedError) as error:
            timings.append(f"{backend}: unavailable ({str(error).splitlines()[0][:60]})")
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    tflops = 2 * tokens * features * features / dense_ms / 1e9
    return (
        f"| 2:4 (pk.NM(2, 4)) on Linear({features}, {features}) fp16, {tokens} tokens | pattern accepted by "
        f"to_sparse_semi_structured; max diff {difference:.1e} of scale | dense {dense_ms:.3f} ms "
        f"({tflops:.0f} TFLOP/s); speed-up of 2:4 sparse: {'; '.join(timings)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    parser.add_argument("--out", type=Path, help="also copy the Markdown here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest conv kernels for each (new) shape
    parts = (global_magnitude, training, structured, functools.partial(structured, round_to=8), two_four)
    for part in parts:
        line = part(device, args.smoke)
        print(line, flush=True)
        rows.append(line)
    text = "\n".join(
        [
            "# prunekit on a CUDA GPU",
            "",
            f"{today()}, {name}, torch {torch.__version__}, `python benchmarks/gpu_check.py`"
            + (" --smoke (tiny sizes: not a measurement)" if args.smoke else ""),
            "",
            "| check | result | time |",
            "| --- | --- | --- |",
            *rows,
            "",
        ]
    )
    if not args.smoke:
        write_result("gpu_check", text)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
