"""One drafter training step, dflashtrain against SpecForge's own DFlash step, side by side in one process.

    bash bench/env.sh                          # once: bench/.venv with dflashtrain and specforge==0.2.0 (no deps)
    bench/.venv/bin/python bench/step.py       # every point this machine runs; writes bench/RESULTS.md
    bench/.venv/bin/python bench/step.py --points peer-v8192 objectives --repeats 10 --threads 2

Both trainers get the same drafter weights (dflashtrain's, loaded into SpecForge's DFlashDraftModel: the parameter
names are the same), the same token ids, loss mask, precomputed target states, embedding and lm_head; the target
forward is outside the step. A step = forward + backward + optimizer step (each trainer's own: dflashtrain's fused
AdamW with one grad norm, SpecForge's BF16Optimizer). Repetitions are interleaved (the order rotating), and every
ratio is the median of the per-repetition ratios, with its quartiles as the spread (and the ratio of the fastest
repetitions). Before timing, each peer point
checks that both trainers give the same loss for the same anchors. The GPU points (the Qwen3-8B drafter, flex
attention, host synchronisations per step) run only where CUDA is available and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geometry import CPU, QWEN3_8B, TINY, Geometry, make_inputs, step_flops  # noqa: E402
import measure  # noqa: E402
from measure import cuda_syncs, interleaved, peak_bytes, ratio  # noqa: E402
import peer  # noqa: E402
from ours import OBJECTIVES, OurStep  # noqa: E402
from points import extra_points  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = "## Notes"  # a results file's section from this heading on is written by hand and kept across runs
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}  # dense bf16, by device name


class Report:
    """Lines printed as they come and written to bench/RESULTS.md at the end."""

    def __init__(self):
        self.lines: List[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def machine(threads: int, device: torch.device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {threads} threads, "
            f"python {platform.python_version()}{gpu}; load average at start {load}")


def peer_point(report: Report, name: str, g: Geometry, device, repeats: int, warmup: int, goal: Optional[float]
               ) -> None:
    """dflashtrain (decay) vs SpecForge (dflash loss) at g: loss agreement, then interleaved step times."""
    inputs = make_inputs(g, device)
    ours = OurStep(g, inputs, "decay")
    state = {k: v.detach().clone() for k, v in ours.module.drafter.state_dict().items()}
    theirs = peer.PeerStep(g, inputs, state)
    blocks = ours.module.blocks_for(inputs.batch())
    ours_loss = float(ours.loss_only())
    theirs_loss = float(theirs.loss_with_anchors(blocks.anchor_positions, blocks.block_keep))
    times = interleaved({"ours": ours, "theirs": theirs}, repeats, warmup, device)
    r = ratio(times["ours"], times["theirs"])
    verdict = "" if goal is None else f" — goal ≤ {goal}: {'met' if r.median <= goal else 'MISSED'}"
    report(f"| {name} | {g.describe()} | {r}{verdict} | loss {ours_loss:.5f} vs {theirs_loss:.5f} |")


def objectives_point(report: Report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """Each objective's step against decay's, pair by pair (each pair interleaved), on the same weights and inputs."""
    inputs = make_inputs(g, device)
    steps = {name: OurStep(g, inputs, name) for name in OBJECTIVES}
    state = steps["decay"].module.drafter.state_dict()
    for step in steps.values():
        step.module.drafter.load_state_dict(state)
    goals = {"dpace": 1.03, "vp_drafter": 1.03, "dspark": 1.15}
    for name in OBJECTIVES[1:]:
        times = interleaved({name: steps[name], "decay": steps["decay"]}, repeats, warmup, device)
        r = ratio(times[name], times["decay"])
        report(f"| {name} / decay | {g.describe()} | {r} — goal ≤ {goals[name]}: "
               f"{'met' if r.median <= goals[name] else 'MISSED'} | |")


def chunked_point(report: Report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """Chunked (gradient taken per chunk in the forward) vs unchunked (all logits, one ordinary backward): the LM
    head + loss alone, on the drafter's hidden states, at 512 anchors (16 chunks, as at the Qwen3-8B point)."""
    from dflashtrain.objectives.chunked import chunked_objective

    inputs = make_inputs(g, device)
    step = OurStep(g, inputs, "decay")
    module = step.module
    batch = inputs.batch()
    blocks = module.blocks_for(batch)
    with torch.no_grad():
        hidden = module.draft_hidden(blocks, module.target.states(None, None))

    def head_and_loss(chunk: int, bounded: bool) -> Callable[[], None]:
        def run() -> None:
            h = hidden.detach().requires_grad_(True)
            total, _ = chunked_objective(h, blocks, module.objective, module.chunk_logits, chunk,
                                         use_checkpoint=bounded)
            (total.terms["ce"] / total.weight_sum.clamp(min=1e-8)).backward()
        return run

    chunked, whole = head_and_loss(g.chunk, True), head_and_loss(g.anchors, False)
    times = interleaved({"chunked": chunked, "unchunked": whole}, repeats, warmup, device)
    memory = peak_bytes(chunked, device) / max(1, peak_bytes(whole, device))
    report(f"| head + loss, chunk {g.chunk} / unchunked | {g.describe()} | {ratio(times['chunked'], times['unchunked'])}"
           f" | memory {memory:.3f} of unchunked (goal ≤ 0.25: {'met' if memory <= 0.25 else 'MISSED'}) |")


def compile_point(report: Report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """model.drafter.compile=true (torch.compile of each drafter layer) against eager, same weights and inputs."""
    import time

    inputs = make_inputs(g, device)
    eager = OurStep(g, inputs, "decay")
    compiled = OurStep(g, inputs, "decay", drafter_state=eager.module.drafter.state_dict(), compile_layers=True)
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    times = interleaved({"compiled": compiled, "eager": eager}, repeats, warmup, device)
    report(f"| compiled layers / eager | {g.describe()} | {ratio(times['compiled'], times['eager'])} | first "
           f"compiled step {first:.1f} s |")


def gpu_point(report: Report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """The Qwen3-8B drafter: step time vs SpecForge, share of the bf16 peak, peak memory of each."""
    inputs = make_inputs(g, device)
    ours = OurStep(g, inputs, "decay")
    theirs = peer.PeerStep(g, inputs, {k: v.detach().clone() for k, v in ours.module.drafter.state_dict().items()})
    times = interleaved({"ours": ours, "theirs": theirs}, repeats, warmup, device)
    r = ratio(times["ours"], times["theirs"])
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    achieved = step_flops(g) / (r.ours_ms / 1e3) / 1e12
    share = f"{achieved:.0f} TFLOP/s = {achieved / peak:.2f} of the bf16 peak (goal ≥ 0.50)" if peak else \
        f"{achieved:.0f} TFLOP/s (peak unknown for {name})"
    mem_ours, mem_theirs = peak_bytes(ours, device), peak_bytes(theirs, device)
    syncs = f"host synchronisations per step {cuda_syncs(ours)} vs {cuda_syncs(theirs)}"
    report(f"| qwen3-8b, ours / SpecForge | {g.describe()} | {r} — goal ≤ 0.75: "
           f"{'met' if r.median <= 0.75 else 'MISSED'} | {share}; peak memory {mem_ours / 2**30:.1f} GiB vs "
           f"{mem_theirs / 2**30:.1f} GiB (goal ≤ SpecForge's); {syncs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", help="names to run (default: every point this machine runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions of the peer points (≥ 10)")
    parser.add_argument("--quick-repeats", type=int, default=5, help="repetitions of the secondary points")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--clock", choices=sorted(measure.CLOCKS), default="cpu",
                        help="CPU steps: process CPU time (default; robust to other load) or wall time")
    parser.add_argument("--out", default=str(RESULTS), help="the results file (default bench/RESULTS.md)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    measure.CLOCK = args.clock
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing_peer = peer.available()
    r, q, w = args.repeats, args.quick_repeats, args.warmup
    points: Dict[str, Callable[[Report], None]] = {}
    if missing_peer is None:
        points["peer-v8192"] = lambda rep: peer_point(rep, "ours / SpecForge", CPU, device, r, w, 0.9)
        points["peer-v32768"] = lambda rep: peer_point(rep, "ours / SpecForge", CPU.with_(vocab=32768), device, r, w,
                                                       0.9)
        points["peer-32anchors"] = lambda rep: peer_point(rep, "ours / SpecForge, one chunk",
                                                          CPU.with_(anchors=32), device, q, w, None)
        points["peer-tiny"] = lambda rep: peer_point(rep, "ours / SpecForge, tiny default", TINY, device, r, w, None)
    points["objectives"] = lambda rep: objectives_point(rep, CPU, device, r, w)
    points["chunked"] = lambda rep: chunked_point(rep, CPU.with_(anchors=512), device, q, w)
    points["compile"] = lambda rep: compile_point(rep, CPU, device, q, w)
    points.update(extra_points(device, q, w))
    if device.type == "cuda" and missing_peer is None:
        points["gpu-qwen3-8b"] = lambda rep: gpu_point(rep, QWEN3_8B, device, r, w)
    chosen = args.points or list(points)
    unknown = [p for p in chosen if p not in points]
    if unknown:
        parser.error(f"unknown or unavailable points {unknown}; here: {', '.join(points)}")

    report = Report()
    report("# bench/step.py results")
    report()
    report(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, `{' '.join(['python', 'bench/step.py', *sys.argv[1:]])}`")
    report()
    report(f"Machine: {machine(args.threads, device)}. Clock: "
           f"{'wall time' if device.type == 'cuda' or args.clock == 'wall' else 'process CPU time'}.")
    if missing_peer is not None:
        report(f"SpecForge not importable here ({missing_peer}): the peer points are skipped; run bench/env.sh.")
    if device.type != "cuda":
        report("No CUDA device: the GPU points (Qwen3-8B drafter, flex vs dense attention, host synchronisations "
               "counted by CUDA) are skipped.")
    report()
    report("| point | geometry | ratio: median (quartiles; median step times) | notes |")
    report("|---|---|---|---|")
    for name in chosen:
        points[name](report)
    out = Path(args.out)
    notes = out.read_text().partition(NOTES)[2] if out.exists() and NOTES in out.read_text() else ""
    out.write_text("\n".join(report.lines) + "\n" + (f"\n{NOTES}{notes}" if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
