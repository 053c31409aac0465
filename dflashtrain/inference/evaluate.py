"""The eval recipe (`dflashtrain-eval`), top to bottom: check the config, load drafter and target, decode held-out
prompts speculatively and with block size 1, report τ, acceptance and speedup (docs/decoding.md).

    τ          mean over all rounds of (accepted + 1)  (tokens committed per target verification, bonus included)
    histogram  rounds per accepted length 0..B-1
    accept_rate[k-1] = P(accepted >= k) per drafted position k = 1..B-1 (and the conditional rate)
    speedup    Σ baseline time / Σ speculative time over the same prompts; tokens/s of both

Written to <output_dir>/eval.json and as TensorBoard scalars under <output_dir>/tensorboard.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dflashtrain.config.errors import ConfigError
from dflashtrain.data.prompts import read_prompts, stop_token_ids
from dflashtrain.export.atomic import atomic_write_text
from dflashtrain.export.checkpoint import load_checkpoint, resolve_checkpoint
from dflashtrain.export.hf import load_exported
from dflashtrain.inference.decode import (
    D2SDProposer,
    DFlashProposer,
    Generation,
    PlainDecoding,
    Sampler,
    acceptance_stats,
    generate,
    single_thread_on_cpu,
)
from dflashtrain.models.target import DTYPES, FrozenTarget, load_target_config, load_tokenizer

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_drafter(cfg: DictConfig) -> Tuple[Any, Optional[str], Dict[str, Any]]:
    """-> (the loaded drafter with its heads and family, the target path it was trained with or None, what was
    loaded). drafter_dir wins over ckpt_path."""
    if cfg.drafter_dir is not None:
        return load_exported(Path(cfg.drafter_dir)), None, {"drafter_dir": os.path.abspath(cfg.drafter_dir)}
    path = resolve_checkpoint(cfg.ckpt_path)
    loaded = load_checkpoint(path)
    return loaded, loaded.meta["target_path"], {"ckpt_path": str(path.resolve()),
                                                "global_step": loaded.meta.get("global_step")}


def load_second_drafter(path: str):
    """The D²SD variable-prefix drafter: a training .ckpt or an exported directory."""
    loaded = load_exported(Path(path)) if Path(path).is_dir() else load_checkpoint(Path(path), "vp_drafter")
    if loaded.family.name != "dflash":
        raise ConfigError("vp_drafter", f"{path} holds a {loaded.family.name} drafter; D²SD re-drafts with a "
                                        "dflash-family drafter trained with loss=vp_drafter")
    return loaded.drafter


def validate_eval(cfg: DictConfig) -> None:
    """Values and files, before any weight is loaded. Raises ConfigError naming the key."""
    if cfg.num_prompts is not None and cfg.num_prompts <= 0:
        raise ConfigError("num_prompts", f"must be > 0 or null (all), got {cfg.num_prompts}")
    if cfg.max_new_tokens <= 0:
        raise ConfigError("max_new_tokens", f"must be > 0, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not os.path.isfile(cfg.data.eval_path):
        raise ConfigError("data.eval_path", f"no prompt file (chat JSONL) at {cfg.data.eval_path!r}")
    if cfg.drafter_dir is not None and not Path(cfg.drafter_dir, "config.json").is_file():
        raise ConfigError("drafter_dir", f"no exported drafter (config.json) in {cfg.drafter_dir!r}")
    if cfg.vp_drafter is not None:
        if not (Path(cfg.vp_drafter).is_file() or Path(cfg.vp_drafter, "config.json").is_file()):
            raise ConfigError("vp_drafter", f"no checkpoint file or exported drafter at {cfg.vp_drafter!r}")
        if cfg.temperature != 0:
            raise ConfigError("temperature", "must be 0 with vp_drafter (D²SD candidate rows are verified greedily)")
        if cfg.d2sd_branches < 1:
            raise ConfigError("d2sd_branches", f"must be >= 1, got {cfg.d2sd_branches}")
    if cfg.drafter_dir is not None and cfg.model.target.path is None:
        raise ConfigError("model.target.path", "is required with drafter_dir (an exported drafter records no target)")
    check_device(cfg.device)


def check_device(name: str) -> None:
    """auto, cpu, or a CUDA device that exists (cuda, cuda:<n>)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:<n>; got {name!r}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= visible:
        raise ConfigError("device", f"{name} asked for, but {visible} CUDA devices are visible")


def check_pairing(drafter: Any, config: Any) -> None:
    """The drafter fits the target (its config.json, read before any weight): hidden size, taps, mask row."""
    g = drafter.geometry
    if g.hidden_size != config.hidden_size:
        raise ConfigError("model.target.path", f"hidden size {config.hidden_size} != the drafter's {g.hidden_size}")
    if max(g.target_layer_ids) >= config.num_hidden_layers - 1 or g.mask_token_id >= config.vocab_size:
        raise ConfigError("model.target.path", f"taps {g.target_layer_ids} / mask token {g.mask_token_id} do not fit "
                                               f"a target of {config.num_hidden_layers} layers, vocab {config.vocab_size}")


# ---------------------------------------------------------------------------------------------- report
def summarize(speculative: List[Generation], baseline: List[Generation], block_size: int) -> Dict[str, Any]:
    stats = acceptance_stats(speculative, block_size)
    tokens = sum(len(g.tokens) for g in speculative)
    seconds = sum(g.seconds for g in speculative)
    stats.update(prompts=len(speculative), generated_tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)
    if baseline:
        base_tokens, base_seconds = sum(len(g.tokens) for g in baseline), sum(g.seconds for g in baseline)
        stats.update(baseline_tokens_per_s=base_tokens / base_seconds, baseline_seconds=base_seconds,
                     speedup=base_seconds / seconds,
                     greedy_mismatches=sum(s.tokens != b.tokens for s, b in zip(speculative, baseline)))
    return stats


def histogram_text(histogram: Sequence[int], width: int = 40) -> str:
    top = max(max(histogram), 1)
    return "\n".join(f"  accepted {n:2d}: {count:6d} {'#' * round(width * count / top)}"
                     for n, count in enumerate(histogram))


def write_report(report: Dict[str, Any], output_dir: Path, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    atomic_write_text(output_dir / "eval.json", json.dumps(report, indent=2) + "\n", key="output_dir")
    writer = SummaryWriter(str(output_dir / "tensorboard"))
    for name in ("tau", "tokens_per_s", "baseline_tokens_per_s", "speedup"):
        if name in report:
            writer.add_scalar(f"eval/{name}", report[name], step)
    for k, rate in enumerate(report["accept_rate"], start=1):
        writer.add_scalar(f"eval/accept_rate_k/{k}", rate, step)
    for n, count in enumerate(report["histogram"]):
        writer.add_scalar(f"eval/accepted_hist/{n}", count, step)
    writer.close()


# ---------------------------------------------------------------------------------------------- the recipe
def run(cfg: DictConfig) -> Dict[str, Any]:
    validate_eval(cfg)
    loaded, trained_target, source = load_drafter(cfg)
    drafter = loaded.drafter
    second = load_second_drafter(cfg.vp_drafter) if cfg.vp_drafter is not None else None
    target_path = trained_target if cfg.model.target.path is None else cfg.model.target.path
    if not Path(target_path, "config.json").is_file():
        raise ConfigError("model.target.path", f"no Hugging Face model directory (config.json) at {target_path!r}")
    for model in filter(None, (drafter, second)):
        check_pairing(model, load_target_config(target_path))
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("output_dir", f"cannot create {output_dir}: {error.strerror or error}") from None
    tokenizer = load_tokenizer(target_path)
    prompts = read_prompts(cfg.data.eval_path, tokenizer, cfg.num_prompts, cfg.data.on_bad_row)
    if not prompts:
        raise ConfigError("data.eval_path", f"{cfg.data.eval_path} holds no usable chat row")
    stop = stop_token_ids(tokenizer, target_path)

    device = pick_device(cfg.device)
    dtype = DTYPES[cfg.model.target.dtype]
    target = FrozenTarget.load(target_path, cfg.model.target.dtype, drafter.geometry.target_layer_ids).to(device)
    heads = loaded.heads.to(device) if loaded.heads is not None else None  # heads stay in their stored dtype
    proposer = loaded.family.proposer(drafter.to(device=device, dtype=dtype), heads, target)
    if second is not None:
        if not isinstance(proposer, DFlashProposer):
            raise ConfigError("vp_drafter", f"D²SD pairs two dflash-family drafters; the main drafter is "
                                            f"{loaded.family.name}")
        proposer = D2SDProposer(proposer, DFlashProposer(second.to(device=device, dtype=dtype), target),
                                cfg.d2sd_branches)
    block_size = proposer.block_size  # tokens per target verification, the anchor included
    log.info("eval: %d prompts from %s, B = %d, T = %g, stop tokens %s, %s", len(prompts), cfg.data.eval_path,
             block_size, cfg.temperature, stop, source)

    def sampler() -> Sampler:
        return Sampler(cfg.temperature, torch.Generator(device=device).manual_seed(cfg.seed))

    spec_sampler, base_sampler = sampler(), sampler()
    speculative, baseline = [], []
    with single_thread_on_cpu(device):
        for mode in (proposer, PlainDecoding()):  # warm-up (allocator, kernels) outside the timings
            generate(target, mode, prompts[0], min(8, cfg.max_new_tokens), stop, sampler())
        progress = tqdm(prompts, desc="eval", unit="prompt", dynamic_ncols=True)
        for prompt in progress:
            speculative.append(generate(target, proposer, prompt, cfg.max_new_tokens, stop, spec_sampler))
            if cfg.baseline:
                baseline.append(generate(target, PlainDecoding(), prompt, cfg.max_new_tokens, stop, base_sampler))
            progress.set_postfix(tau=f"{acceptance_stats(speculative, block_size)['tau']:.3f}")

    report = summarize(speculative, baseline, block_size)
    if cfg.vp_drafter is not None:  # D²SD: how often a re-drafted row was the one committed
        report["branch_win_rate"] = sum(r > 0 for g in speculative for r in g.winning_rows) / max(report["rounds"], 1)
    report.update(decoding="d2sd" if cfg.vp_drafter is not None else loaded.family.name, block_size=block_size,
                  temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                  device=str(device), target_path=str(target_path), eval_path=str(cfg.data.eval_path), **source)
    write_report(report, output_dir, step=source.get("global_step") or 0)
    if report.get("greedy_mismatches") and cfg.temperature == 0:
        log.warning("%d prompts decoded differently with and without the drafter (numerics of batched vs single-"
                    "token target forwards in %s)", report["greedy_mismatches"], cfg.model.target.dtype)
    lines = [f"tau = {report['tau']:.3f} over {report['rounds']} rounds, {len(prompts)} prompts (B = {block_size})",
             histogram_text(report["histogram"])]
    if cfg.baseline:
        lines.append(f"speedup {report['speedup']:.2f}x: {report['tokens_per_s']:.1f} tokens/s vs "
                     f"{report['baseline_tokens_per_s']:.1f} with block size 1 ({device})")
    lines.append(f"report: {output_dir / 'eval.json'}")
    log.info("\n".join(lines))  # the console and <run dir>/eval.log
    return report
