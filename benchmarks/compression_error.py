"""Relative error and stored bits per element of kivi, gear-l and gear on SmolLM2's real K/V.

Each prompt is prefilled once; every layer's keys and values, (1, 3 kv heads, tokens, 64), are
compressed as one chunk each (the way the cache compresses the prompt after prefill) and read
back. Over all layers and prompts, per K and V:
    error = sqrt(sum ||X - X^||^2 / sum ||X||^2)      bits = 8 * sum stored bytes / sum elements
and, for comparison with figures that average per-layer errors, mean ||X - X^|| / ||X|| over
layers and prompts. Bytes come from CompressedChunk.nbytes(), never from a formula.

Run from the repository root:  python -m benchmarks.compression_error [--data DIR] [--prompts N]
"""

from __future__ import annotations

import argparse
import platform
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from benchmarks.smollm2 import DEFAULT_DATA_DIR, capture_kv, gsm8k_prompts, load_smollm2
from gear_kernels import GearConfig, compress, decompress

SETTINGS = [("kivi", 2), ("gear-l", 2), ("gear", 2), ("kivi", 3), ("kivi", 4), ("gear-l", 4), ("gear", 4)]
COMPONENTS = ("codes", "scales", "outliers", "lowrank")


@dataclass
class Tally:
    """Running sums over layers and prompts for one (setting, kind)."""

    squared_error: float = 0.0
    squared_norm: float = 0.0
    elements: int = 0
    chunk_errors: list[float] = field(default_factory=list)
    bytes_by_component: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, x: torch.Tensor, chunk) -> None:
        x = x.double()  # sums of ~1e6 squares: accumulate in fp64
        squared_error = (decompress(chunk).double() - x).square().sum().item()
        squared_norm = x.square().sum().item()
        self.squared_error += squared_error
        self.squared_norm += squared_norm
        self.chunk_errors.append((squared_error / squared_norm) ** 0.5)
        self.elements += x.numel()
        for name, count in chunk.nbytes(by_component=True).items():
            self.bytes_by_component[name] += count

    @property
    def error(self) -> float:
        return (self.squared_error / self.squared_norm) ** 0.5

    @property
    def mean_chunk_error(self) -> float:
        return sum(self.chunk_errors) / len(self.chunk_errors)

    def bits(self, component: str | None = None) -> float:
        stored = self.bytes_by_component[component] if component else sum(self.bytes_by_component.values())
        return 8 * stored / self.elements


def measure(layers_per_prompt, dtype: torch.dtype | None) -> dict[tuple[str, str], Tally]:
    """layers_per_prompt: per prompt, per layer (keys, values) -> Tally per (label, kind)."""
    tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)
    for layers in layers_per_prompt:
        for keys, values in layers:
            for kind, x in (("key", keys), ("value", values)):
                x = x if dtype is None else x.to(dtype)
                for method, bits in SETTINGS:
                    chunk = compress(x, GearConfig(method=method, bits=bits), kind)
                    tallies[f"{method}-{bits}", kind].add(x, chunk)
    return tallies


def markdown(tallies: dict[tuple[str, str], Tally]) -> str:
    """One row per setting: errors (aggregate, then mean over layers), bits per element (K, V,
    both), ratio against fp16, and the bits of each stored component (K and V together)."""
    head = ["method", "K error", "V error", "K layer mean", "V layer mean", "K bits", "V bits", "bits", "vs fp16"]
    head += [f"{c} bits" for c in COMPONENTS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, bits in SETTINGS:
        k, v = tallies[f"{method}-{bits}", "key"], tallies[f"{method}-{bits}", "value"]
        both = Tally(elements=k.elements + v.elements)
        for name in set(k.bytes_by_component) | set(v.bytes_by_component):
            both.bytes_by_component[name] = k.bytes_by_component[name] + v.bytes_by_component[name]
        cells = [f"{method}-{bits}", f"{k.error:.4f}", f"{v.error:.4f}", f"{k.mean_chunk_error:.4f}",
                 f"{v.mean_chunk_error:.4f}", f"{k.bits():.2f}", f"{v.bits():.2f}", f"{both.bits():.2f}",
                 f"{16 / both.bits():.2f}x"]
        cells += [f"{both.bits(c):.2f}" for c in COMPONENTS]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="benchmark data dir (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=2, help="GSM8K test questions used (default: %(default)s)")
    parser.add_argument("--dtype", choices=("model", "float16", "bfloat16"), default="model",
                        help="compress K/V in the model's dtype (fp32 from GGUF) or cast them first")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    prompts = gsm8k_prompts(args.data, args.prompts)
    captured = [capture_kv(model, tokenizer, prompt) for prompt in prompts]
    dtype = None if args.dtype == "model" else getattr(torch, args.dtype)
    keys = captured[0][0][0]
    tokens = [layers[0][0].shape[-2] for layers in captured]
    print(f"SmolLM2-135M-Instruct, {len(captured[0])} layers, K/V {tuple(keys.shape[:2])} x tokens x "
          f"{keys.shape[-1]}, {len(prompts)} GSM8K 8-shot prompts of {tokens} tokens, K/V compressed in "
          f"{dtype or keys.dtype}; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print(markdown(measure(captured, dtype)))


if __name__ == "__main__":
    main()
