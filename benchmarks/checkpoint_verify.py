"""What verified checkpoints cost: save and load of a ~1.5 GB training state, with and without
the manifest's digests.

    python benchmarks/checkpoint_verify.py                 # 6 interleaved rounds
    python benchmarks/checkpoint_verify.py --rounds 5 --dim 512
    python benchmarks/checkpoint_verify.py --tiny            # a small model: does it still run?

The TransformerLM of `pipeline_memory.py` (95M parameters; parameters, gradients and AdamW
moments 1.5 GB, of which a checkpoint holds parameters and moments) is saved and loaded in one
process through `shardwise.checkpoint`. "Verified" is the real code path: every file hashed as
it is sealed, every file checked against the manifest before a load. "Plain" saves through the
same code with the digests switched off (the hashing replaced by a stub for this comparison
only); a plain load is `verify=False`, the path of a rank whose files another rank just
verified (a load needs the manifest, and still checks each file it reads against it: the load
ratio is the up-front pass over every file). So the ratios isolate what verification adds.
Each round runs verified, plain, verified again (the A/A
pair that shows the noise floor) for save, then the same for load, in an order rotated every
round (support/rounds.py); the files are still in the page cache when they are read back, as
they are when a run resumes right after a crash. The last line is JSON: per-round ratios
(verified / plain), their median and min-max, the A/A ratios, and the median seconds of each
side for context.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import shardwise.checkpoint.save as save_module
from shardwise.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from shardwise.checkpoint.manifest import FileDigest
from shardwise.distributed import DistEnv
from support.rounds import (
    Comparison,
    add_rounds_flag,
    again,
    parse_with_tiny,
    round_line,
    round_orders,
)
from support.transformer_job import build_transformer, fixed_batch, model_flags

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
_FAKE = FileDigest(bytes=0, sha256="0" * 64)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    model, optimizer = trained_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"TransformerLM {params / 1e6:.1f}M parameters; checkpoint ~{12 * params / 1e9:.2f} GB")
    times: dict[str, dict[str, list[float]]] = {"save": {}, "load": {}}
    orders = round_orders(["verified", "plain"], args.rounds, aa="verified")
    with tempfile.TemporaryDirectory(prefix="checkpoint-verify-", dir=args.dir) as root:
        for index, order in enumerate(orders):
            for op, samples in times.items():
                seconds = {
                    side: measure(op, side, Path(root) / op, model, optimizer) for side in order
                }
                for side, value in seconds.items():
                    samples.setdefault(side, []).append(value)
                shown = {"verified/plain": seconds["verified"] / seconds["plain"]}
                shown["A/A"] = seconds[again("verified")] / seconds["verified"]
                print(f"{op}: {round_line(index, args.rounds, seconds, 's', shown)}", flush=True)
    print(json.dumps(report(times)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=992, layers=8, heads=8, batch=4, length=64)
    add_rounds_flag(parser, default=6)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    tiny = {"dim": 64, "layers": 2, "heads": 2, "batch": 2, "length": 16}
    return parse_with_tiny(parser, tiny | {"rounds": 1})


def trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model after one AdamW step, so the optimizer's moments exist."""
    model = build_transformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = fixed_batch(args)
    logits = model(batch.tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).backward()
    optimizer.step()
    return model, optimizer


def measure(op: str, side: str, directory: Path, model, optimizer) -> float:
    """Seconds for one save (or one load of a fresh save) on `side`."""
    verified = side != "plain"
    path = directory / "step_00000001"
    if op == "load":  # every load reads a manifest: the save before it is a verified one
        save_checkpoint(directory, model, optimizer, TrainerState(step=1), ENV)
    started = time.perf_counter()
    with digests(verified):
        if op == "save":
            save_checkpoint(directory, model, optimizer, TrainerState(step=1), ENV)
        else:
            load_checkpoint(path, model, optimizer, ENV, verify=verified)
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return seconds


@contextmanager
def digests(enabled: bool) -> Iterator[None]:
    """Switch the manifest's hashing off for the plain side."""
    if enabled:
        yield
        return
    saved = (save_module.digest_files, save_module.write_manifest)
    save_module.digest_files = _no_digests  # type: ignore[assignment]
    save_module.write_manifest = _no_manifest  # type: ignore[assignment]
    try:
        yield
    finally:
        save_module.digest_files, save_module.write_manifest = saved


def _no_digests(root: Path, names: list[str]) -> dict[str, FileDigest]:
    return dict.fromkeys(names, _FAKE)


def _no_manifest(root: Path, digests: dict[str, FileDigest]) -> None:
    return None


def report(times: dict[str, dict[str, list[float]]]) -> dict[str, object]:
    result: dict[str, object] = {"rounds": len(times["save"]["plain"])}
    for op, samples in times.items():
        comparison = Comparison.between(samples, "verified", "plain", aa="verified")
        print(comparison.line(f"{op} verified/plain"))
        figures = comparison.figures(op)  # renamed below: this script's keys came first
        result[f"{op}_ratio_verified_vs_plain"] = figures[op]
        result[f"{op}_ratio_range"] = figures[f"{op}_range"]
        result[f"{op}_aa_ratio_range"] = figures[f"{op}_aa_range"]
        result[f"{op}_resolved"] = figures[f"{op}_resolved"]
        for side in ("verified", "plain"):
            result[f"{op}_{side}_median_s"] = round(statistics.median(samples[side]), 2)
    return result


if __name__ == "__main__":
    main()
