"""ViLBERT forward speed against the machine's own matmul speed, measured in one process.

Full official config (bert_base_6layer_6conect + task tokens), random weights, inference mode:
  * B=1: 37 text tokens (the demo's length), 101 regions;  B=8: 23 tokens (VQA's length), 101 regions.
For each it prints the FLOPs of one forward (counted by torch.utils.flop_counter, without the pre-training
heads, which no task reads), the median time, the achieved GFLOP/s, and the ratio to the FLOP floor = FLOPs /
(GFLOP/s of a large fp32 matmul, measured interleaved with the forwards in the same process). It also reports
the speed-up of bf16 autocast and the largest probability difference against fp32 on the same inputs, and, on
CPUs with native bf16 instructions, the same for what PRECISION=bf16 serves there (weights packed in bf16).

    python bench/bench_vilbert.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelkit.precision import precision_autocast  # noqa: E402
from modelkit.regions import VISUAL_ROWS_PER_IMAGE  # noqa: E402
from vilbert.configuration import ViLBertConfig  # noqa: E402
from vilbert.cpu_inference import (  # noqa: E402
    native_bf16_linear_available,
    onednn_linear_available,
    pack_linear_weights,
)
from vilbert.modeling import ViLBertForVLTasks  # noqa: E402
from vilbert.tiny import tiny_config  # noqa: E402
from timing import timed  # noqa: E402  (bench/, this script's folder)

CONFIG = Path(__file__).resolve().parent.parent / "config" / "bert_base_6layer_6conect.json"
MATMUL_SIZE = 2048


def make_inputs(batch: int, length: int, regions: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.randint(1000, 30000, (batch, length), generator=g).to(device),
        features=torch.rand(batch, regions, 2048, generator=g).to(device) * 2,
        spatials=torch.rand(batch, regions, 5, generator=g).to(device),
        token_type_ids=torch.zeros(batch, length, dtype=torch.long, device=device),
        attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
        image_attention_mask=torch.ones(batch, regions, dtype=torch.long, device=device),
        task_ids=torch.full((batch, 1), 1, dtype=torch.long, device=device),
    )


def count_flops(model, inputs, pretraining_heads: bool = False) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**inputs, output_pretraining_heads=pretraining_heads)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny test model's config (vilbert/tiny.py) instead of the full one: a quick check of "
                             "this script (bf16 on a CPU without native bf16 takes minutes at full size)")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)

    if args.tiny:
        config = tiny_config(feature_dim=2048)
    else:
        config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(CONFIG).to_dict(), "task_specific_tokens": True})
    model = ViLBertForVLTasks(config).eval().to(device)
    # What the predictor serves on CPU: the same weights, reordered for oneDNN (vilbert/cpu_inference.py).
    served = model
    if device == "cpu" and onednn_linear_available():
        served = copy.deepcopy(model)
        pack_linear_weights(served)
    # What the predictor serves with PRECISION=bf16 on a CPU with native bf16: weights packed in bf16.
    served_bf16 = None
    if device == "cpu" and native_bf16_linear_available():
        served_bf16 = copy.deepcopy(model)
        pack_linear_weights(served_bf16, dtype=torch.bfloat16)
    device_info = {}
    if device.startswith("cuda"):
        device_info = {"gpu": torch.cuda.get_device_name(), "cuda_weights_gb": torch.cuda.memory_allocated() / 1e9}
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    matmul_flops = 2 * MATMUL_SIZE**3
    # A stricter reference beside torch.mm: the same product through oneDNN's packed kernel, the one the served
    # model uses. Where it beats torch.mm's BLAS, the floor by torch.mm flatters the served model; both are shown.
    packed_b = torch.ops.mkldnn._reorder_linear_weight(b, MATMUL_SIZE) if served is not model else None

    def matmul_onednn():
        return torch.ops.mkldnn._linear_pointwise(a, packed_b, None, "none", [], "")

    print(f"# ViLBERT forward benchmark — {time.strftime('%Y-%m-%d')} — {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "packed_weights": served is not model, **device_info, "cases": []}
    for batch, length in ((1, 37), (8, 23)):
        inputs = make_inputs(batch, length, VISUAL_ROWS_PER_IMAGE, device)
        flops = count_flops(model, inputs)
        flops_with_heads = count_flops(model, inputs, pretraining_heads=True)

        def forward(net, precision="fp32"):
            with torch.inference_mode(), precision_autocast(torch.device(device).type, precision):
                return net(**inputs)

        variants = {"plain": (model, "fp32"), "served": (served, "fp32"), "bf16": (model, "bf16")}
        if served_bf16 is not None:
            variants["served_bf16"] = (served_bf16, "bf16")
        for _ in range(2):  # warm-up
            for net, precision in variants.values():
                forward(net, precision)
            torch.mm(a, b)
            if packed_b is not None:
                matmul_onednn()
        times: dict[str, list[float]] = {"matmul": [], "matmul_onednn": [], **{name: [] for name in variants}}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            times["matmul"].append(timed(lambda: torch.mm(a, b), device)[0])
            if packed_b is not None:
                times["matmul_onednn"].append(timed(matmul_onednn, device)[0])
            for name, (net, precision) in variants.items():
                times[name].append(timed(lambda: forward(net, precision), device)[0])
        median = {k: statistics.median(v) for k, v in times.items() if v}
        matmul_gflops = matmul_flops / median["matmul"] / 1e9
        floor_s = flops / (matmul_gflops * 1e9)
        fp32, served_out, bf16 = forward(model), forward(served), forward(model, "bf16")

        def max_prob_diff(x, y):
            return max(
                (torch.softmax(getattr(x, h).float(), -1) - torch.softmax(getattr(y, h).float(), -1)).abs().max().item()
                for h in ("vil_prediction", "vil_prediction_gqa", "vil_tri_prediction")
            )

        case = {
            "batch": batch, "tokens": length, "regions": 101,
            "gflop_per_forward": flops / 1e9,
            "gflop_pretraining_heads": (flops_with_heads - flops) / 1e9,
            "matmul_gflops": matmul_gflops,
            "plain_median_ms": median["plain"] * 1e3,
            "plain_ratio_to_floor": median["plain"] / floor_s,
            "served_median_ms": median["served"] * 1e3,
            "served_achieved_gflops": flops / median["served"] / 1e9,
            "served_ratio_to_floor": median["served"] / floor_s,
            "served_max_prob_diff": max_prob_diff(fp32, served_out),
            "bf16_speedup": median["plain"] / median["bf16"],
            "bf16_speedup_over_served": median["served"] / median["bf16"],
            "bf16_max_prob_diff": max_prob_diff(fp32, bf16),
        }
        if packed_b is not None:
            case["matmul_onednn_gflops"] = matmul_flops / median["matmul_onednn"] / 1e9
            case["served_ratio_to_onednn_floor"] = median["served"] / (flops / (case["matmul_onednn_gflops"] * 1e9))
        if served_bf16 is not None:
            case["served_bf16_median_ms"] = median["served_bf16"] * 1e3
            case["served_bf16_speedup_over_served"] = median["served"] / median["served_bf16"]
            case["served_bf16_max_prob_diff"] = max_prob_diff(fp32, forward(served_bf16, "bf16"))
        if device.startswith("cuda"):
            # the plain, served and bf16 models all live on the device: peak of the busiest forward on top of them
            case["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        results["cases"].append(case)
        lines = [
            f"B={batch:<2d} L={length} R=101: {case['gflop_per_forward']:.2f} GFLOP/forward "
            f"(+{case['gflop_pretraining_heads']:.2f} if the pre-training heads ran); matmul {matmul_gflops:.1f} GFLOP/s",
            f"   served (packed): {case['served_median_ms']:.1f} ms, {case['served_achieved_gflops']:.1f} GFLOP/s, "
            f"{case['served_ratio_to_floor']:.3f}x the floor (max prob diff vs plain {case['served_max_prob_diff']:.1e})",
            f"   plain nn.Linear: {case['plain_median_ms']:.1f} ms, {case['plain_ratio_to_floor']:.3f}x the floor",
        ]
        if packed_b is not None:
            lines.append(f"   stricter floor, the same matmul through oneDNN's packed kernel: "
                         f"{case['matmul_onednn_gflops']:.1f} GFLOP/s; served {case['served_ratio_to_onednn_floor']:.3f}x that floor")
        lines.append(f"   bf16 autocast: {case['bf16_speedup']:.2f}x the speed of plain fp32 "
                     f"({case['bf16_speedup_over_served']:.2f}x the served fp32), max prob diff {case['bf16_max_prob_diff']:.2e}")
        print("\n".join(lines))
        if served_bf16 is not None:
            print(
                f"   served bf16 (weights packed in bf16, native bf16 CPU): {case['served_bf16_median_ms']:.1f} ms, "
                f"{case['served_bf16_speedup_over_served']:.2f}x the served fp32, "
                f"max prob diff {case['served_bf16_max_prob_diff']:.2e}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
