"""Forward cost of a Panacea adapter against a plain LoRA of the same total rank, and the cost of changing λ.

A Llama-like model of moderate size on the CPU, adapters on all seven projections:

- forward of Panacea (rank r, m objectives) vs a PEFT LoRA of rank r + m, on the same model and batch;
- Panacea with one λ for the batch vs one λ per row;
- `set_preference` vs re-mixing two LoRA adapters (one per objective, as Rewarded Soups) for a new λ: the minimal
  in-place remix (the mixed adapter concatenates both, so only its B blocks change, scaled by λ) and PEFT's
  `add_weighted_adapter(combination_type="cat")`.

Forward variants run interleaved (one call of each per round) and every figure is a median. The last line printed is
a JSON object of the ratios. Run: `python benchmarks/forward.py` (about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

import peft_panacea  # noqa: F401  (registers the PANACEA tuner type)
from peft_panacea import PanaceaConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="Panacea's r; the LoRA gets r + m.")
    parser.add_argument("--objectives", type=int, default=2, help="m, the number of objectives.")
    parser.add_argument("--rounds", type=int, default=15, help="Interleaved forward calls per variant.")
    parser.add_argument("--switches", type=int, default=200, help="Preference changes timed per method.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="'wall' (time.perf_counter) or 'cpu' (time.process_time; steadier on a busy machine, with --threads 1).",
    )
    return parser.parse_args()


def build_base(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def randomize(model: torch.nn.Module) -> None:
    """Non-zero adapter weights everywhere (the cost does not depend on them, but no path may be skipped)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "panacea_" in name or "lora_" in name:
                param.normal_(std=0.02)


def interleaved_medians(
    calls: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per call of each function, timed one call of each per round after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            start = clock()
            call()
            elapsed = clock() - start
            if round_index > 0:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(call: Callable[[int], object], repeats: int, clock: Callable[[], float]) -> float:
    call(0)  # warm-up
    times = []
    for i in range(repeats):
        start = clock()
        call(i)
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    r, m = args.rank, args.objectives
    base = build_base(args.hidden, args.layers)
    input_ids = torch.randint(
        0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    panacea = get_peft_model(
        copy.deepcopy(base), PanaceaConfig(r=r, preference_dim=m, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    ).eval()
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r + m, lora_alpha=2 * (r + m), target_modules=PROJECTIONS, task_type="CAUSAL_LM"),
    ).eval()
    randomize(panacea)
    randomize(lora)
    single = torch.full((m,), 1.0 / m)
    rows = torch.distributions.Dirichlet(torch.ones(m)).sample((args.batch,))

    def forward_panacea(preference: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            panacea.set_preference(preference)
            return panacea(input_ids=input_ids)

        return call

    with torch.inference_mode():
        forward = interleaved_medians(
            {
                "base": lambda: base(input_ids=input_ids),
                "lora": lambda: lora(input_ids=input_ids),
                "panacea_single": forward_panacea(single),
                "panacea_per_row": forward_panacea(rows),
            },
            rounds=args.rounds,
            clock=clock,
        )

    # --- changing λ ---
    preferences = [torch.tensor([p, 1.0 - p]) for p in torch.linspace(0, 1, 11).tolist()] if m == 2 else [single]
    set_preference = median_seconds(
        lambda i: panacea.set_preference(preferences[i % len(preferences)]), args.switches, clock
    )

    soups = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    )
    soups.add_adapter("harmless", LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS))
    randomize(soups)
    soups.add_weighted_adapter(["default", "harmless"], [0.5, 0.5], "mix", combination_type="cat")
    soup_layers = [module for module in soups.modules() if isinstance(module, LoraLayer)]

    @torch.no_grad()
    def remix_in_place(i: int) -> None:
        weights = preferences[i % len(preferences)].tolist()
        for layer in soup_layers:
            mixed = layer.lora_B["mix"].weight  # (out, 2 r)
            for k, (name, weight) in enumerate(zip(["default", "harmless"], weights)):
                factor = weight * layer.scaling[name] / layer.scaling["mix"]
                torch.mul(layer.lora_B[name].weight, factor, out=mixed[:, k * r : (k + 1) * r])

    def remix_with_peft(i: int) -> None:
        soups.delete_adapter("mix")
        weights = preferences[i % len(preferences)].tolist()
        soups.add_weighted_adapter(["default", "harmless"], weights, "mix", combination_type="cat")

    remix = median_seconds(remix_in_place, args.switches, clock)
    remix_peft = median_seconds(remix_with_peft, max(args.switches // 10, 5), clock)

    # --- report ---
    threads = torch.get_num_threads()
    print(f"model: Llama-like, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens,")
    print(
        f"       adapters on {len(PROJECTIONS)} projections per layer, {threads} threads, {args.clock} clock, "
        f"torch {torch.__version__}"
    )
    print(f"forward, median of {args.rounds} interleaved calls:")
    print(f"  base model (no adapter)        {forward['base'] * 1e3:9.1f} ms")
    print(f"  LoRA r={r + m:<3}                     {forward['lora'] * 1e3:9.1f} ms")
    print(f"  Panacea r={r} m={m}, single λ     {forward['panacea_single'] * 1e3:9.1f} ms")
    print(f"  Panacea r={r} m={m}, λ per row    {forward['panacea_per_row'] * 1e3:9.1f} ms")
    print(f"changing λ, median of {args.switches} changes:")
    print(f"  Panacea set_preference         {set_preference * 1e6:9.1f} µs")
    print(f"  LoRA soup remix, in place      {remix * 1e6:9.1f} µs")
    print(f"  LoRA soup add_weighted_adapter {remix_peft * 1e6:9.1f} µs")
    ratios = {
        "panacea_vs_lora_forward": round(forward["panacea_single"] / forward["lora"], 4),
        "per_row_vs_single": round(forward["panacea_per_row"] / forward["panacea_single"], 4),
        "set_preference_vs_lora_remix": round(set_preference / remix, 4),
        "set_preference_vs_add_weighted_adapter": round(set_preference / remix_peft, 4),
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
