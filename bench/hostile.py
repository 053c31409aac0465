"""Hostile inputs and faults against `dflashtrain`, `dflashtrain-eval` and `dflashtrain-export`, counted by outcome.

    python bench/hostile.py            # every case (in-process where the CLI path allows it, else a subprocess)
    python bench/hostile.py -k resume  # only cases whose name contains "resume"

Outcomes: **clean** (the expected exit status; on failure exactly one `dflashtrain:` line, last, no traceback),
**traceback**, **wrong** (another exit status, several or no error lines, an expected effect missing) and
**damaged** (a file that existed before the case changed or disappeared, or a pickle bomb went off). Each case runs
in a directory of its own; the files every case must leave alone (a finished run, an export, a models folder) are
fingerprinted around it. Single-threaded (OMP_NUM_THREADS=1, torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_lib import (  # noqa: E402
    QUIET,
    ROOT,
    Case,
    World,
    after_a_kill,
    after_divergence,
    beside_a_live_run,
    build_world,
    in_a_subprocess,
    live_staging,
    loads,
    on_a_small_disk,
    run_case,
    signalled,
    slug,
    step,
)

# ---------------------------------------------------------------------------------------------- the cases
def train_cases(world: World) -> List[Case]:
    base = [f"data.path={world.data}", *QUIET, "trainer.max_steps=2"]

    def bad(name: str, *args: str, key: str = "", expect: int = 2) -> Case:
        return Case(name, "train", [*base, *args], expect=expect, key=key)

    values = {
        "model.drafter.block_size": ["0", "1", "-3", "eight", "1.5"],
        "model.drafter.num_layers": ["0", "-1"],
        "model.drafter.num_taps": ["0", "99"],
        "model.drafter.target_layer_ids": ["[]", "[99,1,2]", "[-1,1,2]", "[1,1,1]", "[1,3,7]"],
        "model.drafter.mask_token_id": ["-1", "999999", "345"],
        "model.drafter.intermediate_size": ["0", "-5"],
        "model.drafter.logits_chunk_blocks": ["0"],
        "model.drafter.markov_rank": ["-1", "8"],
        "model.drafter.attention": ["fast", "flex"],
        "model.target.dtype": ["float64", "fp8", "bfloat16"],
        "data.max_length": ["0", "8", "1000000"],
        "data.num_anchors": ["0", "-1"],
        "data.batch_size": ["0", "-2", "1.5"],
        "data.num_workers": ["-1"],
        "data.pad_to_multiple_of": ["0", "-8"],
        "data.on_bad_row": ["ignore"],
        "data.shuffle": ["maybe"],
        "optim.lr": ["0", "-1", "nan", "inf", "fast"],
        "optim.weight_decay": ["-1", "nan"],
        "optim.betas": ["[0.9]", "[1.0,0.9]", "[0.9,nan]", "[-0.1,0.9]"],
        "optim.eps": ["0", "nan"],
        "optim.warmup_ratio": ["1.0", "-0.1", "nan"],
        "optim.min_lr_ratio": ["2", "nan"],
        "trainer.max_steps": ["0", "-5", "1.5"],
        "trainer.max_epochs": ["0", "-2"],
        "trainer.accelerator": ["tpu", "gpu", "mps"],
        "trainer.precision": ["bf16", "64-true", "bf16-true", "16-true", "64"],
        "trainer.gradient_clip_val": ["0", "-1", "nan", "inf"],
        "trainer.accumulate_grad_batches": ["0"],
        "trainer.log_every_n_steps": ["0"],
        "checkpoint.every_n_train_steps": ["0"],
        "checkpoint.save_top_k": ["-2"],
        "parallelism.devices": ["0", "[0]", "-1", "two"],
        "parallelism.num_nodes": ["0", "2"],
        "parallelism.sharding_strategy": ["FULL"],
        "seed": ["-1", "1099511627776"],
        "eval.every_n_steps": ["-1"],
        "eval.num_prompts": ["0"],
        "eval.max_new_tokens": ["0"],
        "loss.gamma": ["-1", "nan", "inf"],
        "loss.mask_mode": ["sometimes"],
        "loss.target": ["soft"],
    }
    cases = [bad(f"{key}={value}", *(["loss=decay"] if key.startswith("loss.") else []), f"{key}={value}",
                 key=key.split("[")[0] if key != "model.target.dtype" else "")
             for key, options in values.items() for value in options]  # loss.* keys: decay's (dpace is the default)
    cases += [bad(f"loss=dpace {a}", "loss=dpace", a, key=a.split("=")[0])
              for a in ("loss.alpha=0", "loss.alpha=1.5", "loss.alpha=nan", "loss.mode=sometimes",
                        "loss.reduction=mean")]
    cases += [bad(f"loss=vp_drafter {a}", "loss=vp_drafter", a, key=a.split("=")[0])
              for a in ("loss.prefix_weight_base=0", "loss.prefix_weight_base=inf", "loss.prefix_weight_base=-1")]
    cases += [bad(f"loss=dspark {a}", "loss=dspark", *a.split(), key=a.split("=")[0])
              for a in ("loss.ce_alpha=-1", "loss.l1_alpha=nan", "loss.conf_alpha=inf",
                        "loss.ce_alpha=0 loss.l1_alpha=0", "model.drafter.markov_rank=0")]
    cases += [bad(name, *args, key=key) for name, args, key in [
        ("two taps listed, three asked for", ["model.drafter.target_layer_ids=[1,3]"], "model.drafter.num_taps"),
        ("unknown top-level key", ["+foo=1"], "foo"),
        ("unknown data key", ["data.bogus=1"], "data.bogus"),
        ("+ typo in data", ["+data.typo=1"], "data.typo"),
        ("+ typo in drafter", ["+model.drafter.typo=1"], "model.drafter.typo"),
        ("+ typo in loss", ["+loss.typo=1"], "loss.typo"),
        ("+ typo in optim", ["+optim.typo=1"], "optim.typo"),
        ("+ typo in trainer", ["+trainer.typo=1"], "trainer.typo"),
        ("nested _target_ in loss", ["+loss.foo._target_=builtins.print", "+loss.foo._args_=[X]"], "loss.foo"),
        ("a _target_ at the top", ["+_target_=os.system"], "_target_"),
        ("loss=plain", ["loss=plain"], "loss"),
        ("loss=null", ["loss=null"], "loss"),
        ("model=null", ["model=null"], "model"),
        ("data=nope", ["data=nope"], "data"),
        ("parallelism=nope", ["parallelism=nope"], "parallelism"),
        ("logger=wandb", ["logger=wandb"], "logger"),
        ("logger.name=wandb", ["logger.name=wandb"], "logger.name"),
        ("delete the target path", ["~model.target.path"], "model.target.path"),
        ("a malformed override", ["optim.lr=="], ""),
        ("fsdp on CPU", ["parallelism=fsdp", "trainer.accelerator=cpu"], "parallelism.strategy"),
        ("data.path missing", ["data.path=/nonexistent/train.jsonl"], "data.path"),
        ("data.path is a directory without data files", [f"data.path={ROOT / 'empty-dir'}"], "data.path"),
        ("data.path null", ["data.path=null"], "data.path"),
        ("data.eval_path missing", ["data.eval_path=/nonexistent.jsonl", "eval.every_n_steps=1"], "data.eval_path"),
        ("target path missing", ["model.target.path=/nonexistent"], "model.target.path"),
        ("target path is a file", [f"model.target.path={world.data}"], "model.target.path"),
    ]]
    cases += [bad(f"target dir: {name}", f"model.target.path={path}", key="model.target.path")
              for name, path in world.targets.items()]
    blocker = ROOT / "a_file"
    blocker.write_text("not a directory")
    cases += [bad("output dir under a file", f"paths.output_dir={blocker / 'out'}", key="paths.output_dir"),
              bad("hydra run dir under a file", f"hydra.run.dir={blocker / 'h'}", key="hydra.run.dir"),
              bad("output dir of a finished run", f"paths.output_dir={world.run}", key="paths.output_dir"),
              bad("hydra run dir of a finished run", f"hydra.run.dir={world.run}",
                  f"paths.output_dir={ROOT / 'elsewhere'}", key="hydra.run.dir")]
    return cases


def resume_cases(world: World) -> List[Case]:
    base = [f"data.path={world.data}", *QUIET]
    empty, jsonl, foreign, no_state = (ROOT / n for n in ("empty.ckpt", "rows.ckpt", "foreign.ckpt", "no_state.ckpt"))
    empty.write_bytes(b"")
    jsonl.write_bytes(world.data.read_bytes())
    import torch

    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    state = torch.load(world.last, map_location="cpu", weights_only=True)
    state.pop("optimizer_states")
    torch.save(state, no_state)

    def resume(name: str, path: Path, *args: str, key: str = "resume_from", expect: int = 2, out: str = "") -> Case:
        return Case(name, "train", [*base, "trainer.max_steps=6", f"resume_from={path}",
                                    f"paths.output_dir={out or ROOT / ('out-' + slug(name))}", *args],
                    expect=expect, key=key)

    return [
        resume("resume from a missing file", ROOT / "nope.ckpt"),
        resume("resume from a directory", ROOT),
        resume("resume from an empty file", empty),
        resume("resume from a JSONL file", jsonl),
        resume("resume from a pickle bomb", world.bomb),
        resume("resume from a bare pickle bomb", world.bare_bomb),
        resume("resume from a foreign checkpoint", foreign),
        resume("resume from weights without training state", no_state),
        resume("resume dspark as decay", world.dspark_run / "checkpoints" / "last.ckpt", key="loss"),
        resume("resume decay as dspark", world.last, "loss=dspark", key="loss"),
        resume("resume with another gamma", world.last, "loss.gamma=2", key="loss.gamma"),
        resume("resume with another batch size (continues, warned)", world.last, "data.batch_size=2", expect=0),
        resume("resume with another data format", world.last, "data.format=messages", key="data.format"),
        resume("resume with another seed", world.last, "seed=3", key="seed"),
        resume("resume with another block size", world.last, "model.drafter.block_size=6",
               key="model.drafter.block_size"),
        resume("resume with other anchors", world.last, "data.num_anchors=4", key="data.num_anchors"),
        resume("resume with accumulation", world.last, "trainer.accumulate_grad_batches=2",
               key="trainer.accumulate_grad_batches"),
        resume("resume on other data", world.last, f"data.path={ROOT / 'other.jsonl'}", key="data.path"),
        resume("resume in place from an older step", world.run / "checkpoints" / "step0000002.ckpt",
               out=str(world.run)),
        Case("resume with a new lr (applied)", "train", [*base, "trainer.max_steps=5", f"resume_from={world.last}",
                                                         f"paths.output_dir={ROOT / 'out-new-lr'}", "optim.lr=1e-3"],
             expect=0),
        Case("resume_from=auto in a new directory", "train", [*base, "trainer.max_steps=2", "resume_from=auto",
                                                              f"paths.output_dir={ROOT / 'out-auto'}"], expect=0),
    ]


def eval_export_cases(world: World) -> List[Case]:
    garbage = ROOT / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    planted = ROOT / "planted"
    (planted / "outputs/train/x/checkpoints").mkdir(parents=True)
    shutil.copy(world.bomb, planted / "outputs/train/x/checkpoints/last.ckpt")
    nothing = ROOT / "nothing_here"
    nothing.mkdir()
    incomplete = ROOT / "drafter.incomplete"
    incomplete.mkdir()
    (incomplete / "keep.txt").write_text("not ours")
    dspark = world.dspark_run / "checkpoints" / "last.ckpt"
    short = ["num_prompts=2", "max_new_tokens=4", "baseline=false"]

    def ev(name: str, *args: str, key: str = "", expect: int = 2, cwd: Optional[Path] = None) -> Case:
        return Case(name, "evaluate", [*args, f"output_dir={ROOT / ('eval-' + slug(name))}"],
                    expect=expect, key=key, cwd=cwd)

    def ex(name: str, *args: str, key: str = "", expect: int = 2, cwd: Optional[Path] = None,
           check: Optional[Callable[[], str]] = None, setup: Optional[Callable[[], None]] = None) -> Case:
        if setup:
            setup()
        return Case(name, "export", list(args), expect=expect, key=key, cwd=cwd, check=check)

    def kept(path: Path, name: str) -> Callable[[], str]:
        return lambda: "" if (path / name).is_file() else f"{path / name} is gone"

    return [
        ev("eval ckpt missing", "ckpt_path=/nope.ckpt", key="ckpt_path"),
        ev("eval ckpt is a directory", f"ckpt_path={ROOT}", key="ckpt_path"),
        ev("eval ckpt is random bytes", f"ckpt_path={garbage}", key="ckpt_path"),
        ev("eval ckpt is a pickle bomb", f"ckpt_path={world.bomb}", key="ckpt_path"),
        ev("eval ckpt is a bare pickle bomb", f"ckpt_path={world.bare_bomb}", key="ckpt_path"),
        ev("eval latest, none there", key="ckpt_path", cwd=nothing),
        ev("eval latest finds a planted bomb", key="ckpt_path", cwd=planted),
        ev("eval vp_drafter bomb", f"ckpt_path={world.last}", f"vp_drafter={world.bomb}", key="vp_drafter"),
        ev("eval vp_drafter missing", f"ckpt_path={world.last}", "vp_drafter=/nope", key="vp_drafter"),
        ev("eval vp_drafter is a dspark drafter", f"ckpt_path={world.last}", f"vp_drafter={dspark}", *short,
           key="vp_drafter"),
        ev("eval vp_drafter with sampling", f"ckpt_path={world.last}", f"vp_drafter={world.last}",
           "temperature=0.5", key="temperature"),
        ev("eval d2sd_branches=0", f"ckpt_path={world.last}", f"vp_drafter={world.last}", "d2sd_branches=0",
           key="d2sd_branches"),
        ev("eval drafter_dir missing", "drafter_dir=/nope", "model.target.path=/nope", key="drafter_dir"),
        ev("eval drafter_dir without target", f"drafter_dir={world.export}", key="model.target.path"),
        ev("eval num_prompts=0", f"ckpt_path={world.last}", "num_prompts=0", key="num_prompts"),
        ev("eval num_prompts=-1", f"ckpt_path={world.last}", "num_prompts=-1", key="num_prompts"),
        ev("eval temperature=-1", f"ckpt_path={world.last}", "temperature=-1", key="temperature"),
        ev("eval max_new_tokens=0", f"ckpt_path={world.last}", "max_new_tokens=0", key="max_new_tokens"),
        ev("eval prompts missing", f"ckpt_path={world.last}", "data.eval_path=/nope.jsonl", key="data.eval_path"),
        ev("eval target missing", f"ckpt_path={world.last}", "model.target.path=/nope", key="model.target.path"),
        ev("eval unknown key", f"ckpt_path={world.last}", "bogus=1", key="bogus"),
        Case("eval output dir under a file", "evaluate", [f"ckpt_path={world.last}", *short,
                                                          f"output_dir={ROOT / 'a_file' / 'eval'}"], key="output_dir"),
        ev("eval device=tpu", f"ckpt_path={world.last}", "device=tpu", key="device"),
        ev("eval device=cuda:7", f"ckpt_path={world.last}", "device=cuda:7", key="device"),
        ev("eval prompts is a directory", f"ckpt_path={world.last}", f"data.eval_path={ROOT}", key="data.eval_path"),
        ev("eval a real checkpoint", f"ckpt_path={world.last}", *short, expect=0),
        ex("export ckpt missing", "ckpt_path=/nope.ckpt", f"output_dir={ROOT / 'x1'}", key="ckpt_path"),
        ex("export ckpt random bytes", f"ckpt_path={garbage}", f"output_dir={ROOT / 'x2'}", key="ckpt_path"),
        ex("export bare pickle bomb", f"ckpt_path={world.bare_bomb}", f"output_dir={ROOT / 'x3'}", key="ckpt_path"),
        ex("export pickle bomb", f"ckpt_path={world.bomb}", f"output_dir={ROOT / 'x4'}", key="ckpt_path"),
        ex("export latest, none there", key="ckpt_path", cwd=nothing),
        ex("export latest finds a planted bomb", key="ckpt_path", cwd=planted),
        ex("export over a models folder", f"ckpt_path={world.last}", f"output_dir={world.models}", "overwrite=true",
           key="output_dir", check=kept(world.models / "Qwen3-8B", "model.safetensors")),
        ex("export over its own checkpoints", f"ckpt_path={world.last}", f"output_dir={world.last.parent}",
           "overwrite=true", key="output_dir", check=kept(world.last.parent, "last.ckpt")),
        ex("export over a run directory", f"ckpt_path={world.last}", f"output_dir={world.run}", "overwrite=true",
           key="output_dir", check=kept(world.last.parent, "last.ckpt")),
        ex("export into a non-empty dir", f"ckpt_path={world.last}", f"output_dir={world.export}", key="output_dir"),
        ex("export onto a file", f"ckpt_path={world.last}", f"output_dir={ROOT / 'a_file'}", "overwrite=true",
           key="output_dir"),
        ex("export beside a foreign .incomplete", f"ckpt_path={world.last}", f"output_dir={ROOT / 'drafter'}",
           key="output_dir", check=kept(incomplete, "keep.txt")),
        ex("export beside a live export", f"ckpt_path={world.last}", f"output_dir={ROOT / 'busy'}", key="output_dir",
           setup=live_staging(ROOT / "busy.incomplete")),
        ex("export dtype=fp8", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x5'}", "dtype=fp8", key="dtype"),
        ex("export target missing", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x6'}", "target_path=/nope",
           key="target_path"),
        ex("export unknown key", f"ckpt_path={world.last}", "bogus=1", key="bogus"),
        ex("export a dspark checkpoint", f"ckpt_path={dspark}", f"output_dir={ROOT / 'x7'}", expect=0),
        ex("export twice into one new dir (2nd refused)", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x7'}",
           key="output_dir"),
        ex("re-export over its own export", f"ckpt_path={dspark}", f"output_dir={ROOT / 'x7'}", "overwrite=true",
           "dtype=bfloat16", expect=0),
    ]


def fault_cases(world: World) -> List[Case]:
    """Real processes: signals from outside, a full disk, a second live run, an export beside a live one."""
    base = [f"data.path={world.data}", *QUIET]
    cases = []
    for signame, code in (("SIGTERM", 143), ("SIGUSR1", 138), ("SIGINT", 130)):
        out = ROOT / f"signal-{signame}"
        cases.append(Case(f"{signame} from outside mid-run", "train",
                          [*base, f"paths.output_dir={out}", "trainer.max_steps=100000",
                           "checkpoint.every_n_train_steps=1"], expect=code, runner=signalled(signame, out),
                          check=lambda out=out: "" if loads(out / "checkpoints" / "last.ckpt") else "no last.ckpt"))
    out = ROOT / "sigterm-early"
    cases.append(Case("SIGTERM while the data is read", "train", [*base, f"paths.output_dir={out}"], expect=-15,
                      runner=signalled("SIGTERM", out, wait_for=None)))
    full = ROOT / "full-disk"
    cases.append(Case("full disk at the next checkpoint", "train",
                      [*base, f"paths.output_dir={full}", f"hydra.run.dir={full}", "trainer.max_steps=6",
                       "checkpoint.every_n_train_steps=1", f"resume_from={full / 'checkpoints' / 'last.ckpt'}"],
                      expect=6, key="checkpoint", runner=on_a_small_disk(world.run, full),
                      check=lambda: "" if all(loads(p) for p in (full / "checkpoints").glob("*.ckpt")) and not
                      list(full.rglob("*.partial-*")) else "a checkpoint does not load, or a partial file is left"))
    export_full = ROOT / "export-full"
    cases.append(Case("full disk during an export over a previous one", "export",
                      [f"ckpt_path={world.last}", f"output_dir={export_full / 'drafter'}", "overwrite=true"],
                      expect=6, key="output_dir", runner=on_a_small_disk(world.export, export_full / "drafter"),
                      check=lambda: "" if (export_full / "drafter" / "model.safetensors").is_file() else "export gone"))
    killed = ROOT / "killed"
    cases.append(Case("kill -9 mid-run, then resume_from=auto", "train",
                      [*base, f"paths.output_dir={killed}", "trainer.max_steps=6", "resume_from=auto"], expect=0,
                      runner=after_a_kill(base, killed),
                      check=lambda: "" if step(killed / "checkpoints" / "last.ckpt") == 6 else "not at step 6"))
    twice = ROOT / "twice"
    cases.append(Case("Ctrl-C twice", "train", [*base, f"paths.output_dir={twice}", "trainer.max_steps=100000",
                                                "checkpoint.every_n_train_steps=1"], expect=130, key="SIGINT",
                      runner=signalled("SIGINT", twice, repeat=True)))
    diverged = ROOT / "diverged"
    cases.append(Case("diverged at lr 1e30, then resume from last-good with a lower lr", "train",
                      [*base, f"paths.output_dir={diverged / 'again'}", "trainer.max_steps=30", "optim.lr=1e-3"],
                      expect=3, key="non-finite", runner=after_divergence(base, diverged)))  # its weights are huge
    no_last = ROOT / "no-last"
    cases.append(Case("save_last=false still saves the final step", "train",
                      [*base, f"paths.output_dir={no_last}", "trainer.max_steps=3", "checkpoint.save_last=false",
                       "checkpoint.every_n_train_steps=2"], expect=0, runner=in_a_subprocess,
                      check=lambda: "" if step(no_last / "checkpoints" / "step0000003.ckpt") == 3 else "no step 3"))
    epochs = ROOT / "one-epoch"
    cases.append(Case("max_epochs=1 ends with last.ckpt at the epoch's end", "train",
                      [*base, f"paths.output_dir={epochs}", "trainer.max_steps=100000", "trainer.max_epochs=1"],
                      expect=0, runner=in_a_subprocess,
                      check=lambda: "" if step(epochs / "checkpoints" / "last.ckpt") == 8 else "last.ckpt not step 8"))
    live = ROOT / "live"
    cases.append(Case("a second run on a live run's directory", "train",
                      [*base, f"paths.output_dir={live}", "trainer.max_steps=2"], key="paths.output_dir",
                      runner=beside_a_live_run(base, live)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"building the world under {ROOT} ...", flush=True)
    world = build_world()
    cases = [c for c in train_cases(world) + resume_cases(world) + eval_export_cases(world) + fault_cases(world)
             if args.k in c.name]
    counts: Counter = Counter()
    for case in cases:
        outcome = run_case(case, world)
        counts[outcome.kind] += 1
        print(f"{outcome.kind:9s} {case.entry:8s} {case.name}: {outcome.detail}", flush=True)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{counts[k]} {k}" for k in ("clean", "traceback", "wrong",
                                                                          "damaged")))
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
