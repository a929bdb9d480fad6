"""The GPU path measured on one card: the cuda tests, then shardwise against a hand-written loop,
the Transformer's model FLOP utilisation, and LSTM/GRU packed against padded.

    python benchmarks/device_check.py            # on a GPU machine (see device_check.sh)
    python benchmarks/device_check.py --dry      # on CPU: inputs and tiny sizes, 1 round

Writes under $OUT (default ./device_out): pytest.log, profile.txt, table.txt, result.json;
prints a short table and ONE JSON line last. See benchmarks/README.md, "The device check".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from support.rounds import Comparison, interleave  # noqa: E402

NEEDED = ("torch", "numpy", "pydantic", "tomli_w", "safetensors", "rich", "pytest", "shardwise")


def check_inputs(dry: bool) -> dict[str, str]:
    """Everything the run needs, checked before any of it starts; exits 2 naming what is missing."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken install is as missing as an absent one
            missing.append(f"{name} ({type(error).__name__}: {error})")
    if missing:
        sys.exit(
            f"device_check: cannot import {', '.join(missing)}; carry the wheels (--fetch-wheels)"
        )
    import torch

    if not dry and not torch.cuda.is_available():
        sys.exit("device_check: torch sees no CUDA device; run it on the GPU machine, or use --dry")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "cpu"
    return {"torch": torch.__version__, "card": card}


def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, object]:
    """`pytest -m cuda tests/cuda`, its log under $OUT; on CPU they all skip, with reasons."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-rs", "-p"]
    command.append("no:cacheprovider")
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        log, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        log, rc = f"{error.stdout or ''}\n... timed out after {timeout_s:.0f}s", -1
    (out / "pytest.log").write_text(log)
    tail = [line for line in log.splitlines() if line.strip()][-1:] or [""]
    return {
        "pytest_rc": rc,
        "pytest_summary": tail[0],
        "pytest_s": round(time.perf_counter() - started, 1),
    }


class Clock:
    """Wall time of `fn`, synchronising the device around it so queued kernels count."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def seconds(self, fn: Callable[[], None]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def ours_vs_hand(session, sizes: dict, rounds: int, clock: Clock) -> Comparison:
    """Tokens/s of the own-loop API's step against a plain loop: same model, batches, precision."""
    import torch
    import torch.nn.functional as F

    from shardwise.models import TransformerLM

    device, dtype = session.device, torch.bfloat16
    torch.manual_seed(0)

    def build() -> TransformerLM:
        return TransformerLM(dim=sizes["dim"], num_layers=sizes["layers"], max_len=sizes["seq"])

    ours_model = session.prepare(build())
    hand_model = build().to(device)
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-4)
    hand_opt = torch.optim.AdamW(hand_model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (sizes["batch"], sizes["seq"] + 1), generator=g).to(device)
        for _ in range(sizes["steps"])
    ]
    tokens = sizes["batch"] * sizes["seq"] * sizes["steps"]

    def ours() -> None:
        for b in batches:
            x, y = b[:, :-1], b[:, 1:]
            ours_opt.zero_grad(set_to_none=True)
            session.forward_backward(ours_model, x, y, step_tokens=y.numel(), reduce=False)
            session.step(ours_opt, ours_model)

    def hand() -> None:
        for b in batches:
            x, y = b[:, :-1], b[:, 1:]
            hand_opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype):
                logits = hand_model(x)
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            hand_opt.step()

    ours(), hand()  # warm-up: kernels chosen, allocator filled
    samples = interleave(
        {
            "ours": lambda: tokens / clock.seconds(ours),
            "hand": lambda: tokens / clock.seconds(hand),
        },
        rounds,
        aa="ours",
    )
    return Comparison.between(samples, "ours", "hand", aa="ours")


def matmul_tflops(device: str, n: int) -> float:
    """The card's bf16 matmul rate: an n×n×n product, 3 warm-ups then 10 timed with events."""
    import torch

    dtype = torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (begin.elapsed_time(end) / 1e3) / 1e12


def transformer_mfu(sizes: dict, peak_tflops: float, out: Path, clock: Clock) -> dict:
    """Model FLOP utilisation of a bf16 Transformer step against the measured matmul rate."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from shardwise.models import TransformerLM

    device = "cuda" if torch.cuda.is_available() and sizes["device"] == "cuda" else "cpu"
    model = TransformerLM(
        dim=sizes["dim"], num_layers=sizes["layers"], num_heads=sizes["heads"], max_len=sizes["seq"]
    ).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = torch.randint(0, 256, (sizes["batch"], sizes["seq"] + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    for _ in range(2):
        step()
    seconds = clock.seconds(lambda: [step() for _ in range(sizes["steps"])]) / sizes["steps"]
    tokens = sizes["batch"] * sizes["seq"]
    # 6 FLOPs a parameter a token (forward 2, backward 4) plus attention's scores and mixing.
    flops = 6 * params * tokens + 12 * sizes["layers"] * sizes["seq"] * sizes["dim"] * tokens
    achieved = flops / seconds / 1e12
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=10)
    (out / "profile.txt").write_text(table)
    return {
        "mfu_params_m": round(params / 1e6, 1),
        "mfu_seq": sizes["seq"],
        "mfu_tokens_per_s": round(tokens / seconds),
        "mfu_model_tflops": round(achieved, 3),
        "matmul_bf16_tflops": round(peak_tflops, 3),
        "mfu": round(achieved / peak_tflops, 3),
        "profile_top10": table,
    }


def packed_vs_padded(cell: str, sizes: dict, rounds: int, device: str, clock: Clock) -> Comparison:
    """Real tokens/s of a RecurrentLM step with lengths (packed) over the same batches padded."""
    import torch
    import torch.nn.functional as F

    from shardwise.models import RecurrentLM

    torch.manual_seed(0)
    model = RecurrentLM(cell=cell).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    # Lengths spread 20x as in a paragraph corpus; a batch is as many as fill the token budget.
    per_batch = max(1, sizes["tokens_per_batch"] // sizes["seq"])
    batches = []
    for _ in range(sizes["steps"]):
        lengths = torch.randint(sizes["seq"] // 20 + 2, sizes["seq"] + 1, (per_batch,), generator=g)
        tokens = torch.randint(0, 256, (per_batch, sizes["seq"] + 1), generator=g)
        targets = tokens[:, 1:].clone()
        targets[torch.arange(sizes["seq"]) >= lengths[:, None]] = -100
        batches.append((tokens[:, :-1].to(device), targets.to(device), lengths))
    real = sum(int(b[2].sum()) for b in batches)

    def run(packed: bool) -> float:
        def steps() -> None:
            for x, y, lengths in batches:
                optimizer.zero_grad(set_to_none=True)
                logits = model(x, lengths if packed else None)
                F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
                optimizer.step()

        return real / clock.seconds(steps)

    run(True), run(False)
    samples = interleave(
        {"packed": lambda: run(True), "padded": lambda: run(False)}, rounds, aa="packed"
    )
    return Comparison.between(samples, "packed", "padded", aa="packed")


def sizes_for(dry: bool) -> dict[str, dict]:
    from shardwise.config import TrainConfig

    budget = TrainConfig.model_fields["tokens_per_batch"].default
    if dry:
        tiny = {"dim": 64, "layers": 2, "heads": 4, "seq": 32, "batch": 2, "steps": 2}
        return {
            "ab": tiny,
            "mfu": {**tiny, "device": "cpu"},
            "recurrent": {"seq": 64, "tokens_per_batch": 256, "steps": 2},
            "matmul_n": 256,
        }
    return {
        "ab": {"dim": 512, "layers": 8, "heads": 8, "seq": 512, "batch": 16, "steps": 10},
        # ~100M parameters: 12 * 14 * 768^2 in the blocks.
        "mfu": {
            "dim": 768,
            "layers": 14,
            "heads": 12,
            "seq": 1024,
            "batch": 8,
            "steps": 10,
            "device": "cuda",
        },
        "recurrent": {"seq": 256, "tokens_per_batch": budget, "steps": 20},
        "matmul_n": 8192,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--pytest-timeout-s", type=float, default=300)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or "device_out")
    out.mkdir(parents=True, exist_ok=True)
    found = check_inputs(args.dry)
    rounds = args.rounds or (1 if args.dry else 5)
    result: dict[str, object] = {"device": found["card"], "torch": found["torch"], "dry": args.dry}
    result["rounds"] = rounds
    if not args.skip_tests:
        result.update(run_cuda_tests(out, args.pytest_timeout_s))

    import shardwise

    device = "cpu" if args.dry else "cuda"
    clock = Clock(device)
    sizes = sizes_for(args.dry)
    lines = [
        f"torch {found['torch']} on {found['card']}"
        + ("  (dry run: CPU, tiny)" if args.dry else "")
    ]
    if "pytest_rc" in result:
        lines.append(f"cuda tests: rc {result['pytest_rc']}: {result['pytest_summary']}")

    session = shardwise.setup(device=device, precision="bf16")
    try:
        ab = ours_vs_hand(session, sizes["ab"], rounds, clock)
    finally:
        session.close()
    result.update(ab.figures("ours_over_hand"))
    result["ours_over_hand_target"] = 0.95
    lines.append(ab.line("shardwise/hand tokens/s (bf16 transformer)"))

    peak = matmul_tflops(device, sizes["matmul_n"])
    mfu = transformer_mfu(sizes["mfu"], peak, out, clock)
    table = mfu.pop("profile_top10")
    result.update(mfu)
    lines.append(
        f"transformer {mfu['mfu_params_m']}M params, seq {mfu['mfu_seq']}, bf16: "
        f"{mfu['mfu_tokens_per_s']:,} tok/s, {mfu['mfu_model_tflops']} TFLOP/s of "
        f"{mfu['matmul_bf16_tflops']} matmul = MFU {mfu['mfu']:.1%}"
    )
    for cell in ("lstm", "gru"):
        c = packed_vs_padded(cell, sizes["recurrent"], rounds, device, clock)
        result.update(c.figures(f"{cell}_packed_over_padded"))
        lines.append(c.line(f"{cell} packed/padded real tok/s"))

    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n\nprofiler top-10:\n" + table + "\n")
    (out / "result.json").write_text(json.dumps(result) + "\n")
    print(text)
    print("profiler top-10 (also in profile.txt):")
    print(table)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
