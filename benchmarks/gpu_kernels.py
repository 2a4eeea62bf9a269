"""GEAR's Triton kernels on a GPU: check each against its torch reference, then time it.

    python benchmarks/gpu_kernels.py            # CUDA machine: checks, then one markdown table
    python benchmarks/gpu_kernels.py --smoke    # CPU: the same steps, TRITON_INTERPRET=1, tiny sizes
    python benchmarks/gpu_kernels.py --compile  # CPU, no GPU: compile every kernel variant the run
                                                # launches, for sm_90 (--arch), and report registers

The run (about 2 minutes on an H200, most of it Triton compiling):
1. measures the device's memory bandwidth with a large device-to-device copy;
2. checks on CUDA: compress(kernel="triton") against compress (every stored tensor bitwise:
   codes, scales, zero points, outliers and the low-rank factors, which the same torch power
   iteration computes from the same codes) and decode_attention_triton against
   decode_attention_torch, over backbones, bit widths, fp16/bf16, GQA ratios, q_len, prompt
   rows of different lengths and streamed chunks; any failure is reported (exit status 1);
3. picks the fastest of a few tile and split configurations (TUNING in triton_attention) for
   gear and kivi at 32k tokens, batch 1 and 32, and repeats the attention checks with it;
4. times (median of triton.testing.do_bench) at 1k, 8k and 32k cached tokens and batch 1, 8 and
   32 (kv_heads 8, q_heads 32, head_dim 128, fp16, gear 2-bit kivi, a layer store holding every
   row's compressed prompt, plus a 16-token buffer): decode attention with gear, with kivi
   (no outliers, no low rank) and with turboquant alone (`kivi/turboquant`: method kivi over
   the turboquant quantizer), one launch and a merge whatever the batch,
   gear's packed torch path (attention_reference, what kernel=torch runs), torch SDPA over an fp16
   cache of the same length, and the quantize+pack kernels (triton_quantize.quantize_pack) on the
   prompt's keys. Each time is
   set against the bytes the kernel must move at the measured bandwidth (the "% of copy BW"
   column) and, for attention, against SDPA.

Needs torch and triton only (no transformers, no lm_eval).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ARGS.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
ARGS.add_argument("--compile", action="store_true", help="compile the kernels for a GPU target without one")
ARGS.add_argument("--arch", type=int, default=90, help="--compile: CUDA compute capability (90: H100/H200)")
ARGS.add_argument("--quick", action="store_true", help="--compile: only the main variants (tests/test_kernels_compile.py)")
ARGS.add_argument("--no-tune", action="store_true", help="skip the tile-configuration sweep")
ARGS.add_argument("--tokens", type=str, default=None, help="comma-separated cached token counts")
ARGS.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes")
ARGS.add_argument("--methods", type=str, default="gear,kivi,kivi/turboquant",
                  help="comma-separated methods timed (gear, gear-l, kivi; method/backbone for another quantizer)")
OPTS = ARGS.parse_args()
if OPTS.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
elif OPTS.compile:
    os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from gear_kernels import GearConfig  # noqa: E402
from gear_kernels.chunk import compress  # noqa: E402  (the torch reference, whatever config.kernel says)
from gear_kernels import triton_attention as ta  # noqa: E402
from gear_kernels import triton_device as td  # noqa: E402
from gear_kernels import triton_quantize as tq  # noqa: E402
from gear_kernels.attention_reference import decode_attention_torch  # noqa: E402
from gear_kernels.corrections.outliers import select_outliers  # noqa: E402
from gear_kernels.store import KVStore  # noqa: E402

TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


# ------------------------------------------------------------------ compile-only mode

def install_compile_only(arch: int) -> list[str]:
    """Make every kernel launch compile its variant for CUDA `arch` instead of running."""
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
             torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
             torch.uint16: "u16", torch.uint32: "u32"}
    launch_opts = ("num_warps", "num_stages", "enable_fp_fusion")
    seen: dict = {}
    report: list[str] = []
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k not in launch_opts})
        options = {k: v for k, v in kwargs.items() if k in launch_opts}
        signature, constants, attrs = {}, {}, {}
        for i, name in enumerate(self.arg_names):
            value = bound[name]
            # specialize as the JIT does: ints equal to 1 become constants, ints and pointers
            # divisible by 16 are marked so
            if self.params[i].is_constexpr or (type(value) is int and value == 1):
                signature[name], constants[(i,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + types[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={value!r}")
        key = (self.fn.__name__, tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in constants.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            return None
        start = time.time()
        kernel = triton.compile(ASTSource(self, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options)
        usage = ""
        if cuobjdump.exists():
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gear_{os.getpid()}.cubin"
            path.write_bytes(kernel.asm["cubin"])
            out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
            path.unlink()
            usage = " ".join(w for line in out.splitlines() if "REG:" in line for w in line.split()
                             if w.startswith(("REG:", "STACK:", "SHARED:")))
        flags = ",".join(f"{self.arg_names[i[0]]}={v}" for i, v in constants.items()
                         if self.arg_names[i[0]].isupper())
        seen[key] = kernel
        report.append(f"{self.fn.__name__} [{flags}] {usage} ({time.time() - start:.1f}s)")
        print("compiled", report[-1], flush=True)
        return None

    JITFunction.run = run
    # nothing runs, so outputs are never written: zeros keep the wrappers' own checks quiet
    tq._new = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    td.check_device = lambda device: None
    td.interpreter_sizes = lambda device: False
    td.num_sms = lambda device: 132
    return report


# ------------------------------------------------------------------ timing helpers

def bench(fn) -> float:
    """Median seconds of fn()."""
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write)."""
    n = (2 << 30) if DEVICE == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / seconds


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def store_bytes(store: KVStore) -> int:
    return sum(store.nbytes().values())


def randn_kv(batch, heads, tokens, dim, dtype, seed, kind):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(batch, heads, tokens, dim, generator=g, device=DEVICE)
    if kind == "key":
        loud = torch.rand(dim, generator=g, device=DEVICE) < 0.08
        x = x * (1 + 6 * loud.float()) + 0.5
    else:
        x = x + 12 * (torch.rand(x.shape, generator=g, device=DEVICE) < 0.003).float()
    return x.to(dtype)


# ------------------------------------------------------------------ checks

def same_chunk(a, b) -> str:
    """'' when a and b store the same tensors (codes, scales, zeros, outliers, factors), bitwise."""
    if a.parts.keys() != b.parts.keys():
        return f"stored tensors differ: {sorted(a.parts)} vs {sorted(b.parts)}"
    if (a.quantizer, a.token_group) != (b.quantizer, b.token_group):
        return f"layout differs: {a.quantizer} / {a.token_group} vs {b.quantizer} / {b.token_group}"
    for name, t in a.parts.items():
        u = b.parts[name]
        if u.shape != t.shape or u.dtype != t.dtype:
            return f"{name}: layout differs"
        if not torch.equal(t, u):
            detail = f", max diff {(t.float() - u.float()).abs().max().item():.3g}" if name.startswith("lowrank") else ""
            return f"{name}: {(t != u).sum().item()} entries differ{detail}"
    return ""


def check_compress(small: bool) -> list[tuple[str, bool, str]]:
    tokens, heads = (37, 2) if small else (1000, 8)
    cases = [("kivi", 2, "key", torch.float16, 128), ("kivi", 2, "value", torch.float16, 128),
             ("kcvt", 3, "key", torch.bfloat16, 64), ("flexgen", 4, "value", torch.bfloat16, 128),
             ("kivi", 8, "key", torch.float16, 64), ("kcvt", 2, "value", torch.float16, 128)]
    if small:
        cases = cases[:2] + cases[2:3]
    results = []
    for backbone, bits, kind, dtype, dim in cases:
        config = GearConfig(method="gear", bits=bits, backbone=backbone, rank_prompt=4)
        x = randn_kv(2, heads, tokens, dim, dtype, bits, kind)
        problem = same_chunk(compress(x, config, kind, kernel="triton"), compress(x, config, kind))
        results.append((f"compress {backbone} {bits}-bit {kind} {str(dtype)[6:]} d{dim}", not problem,
                        problem or "bitwise"))
    return results


def prompt_store(keys, values, lengths, chunks=()) -> KVStore:
    """A store of row b's last lengths[b] tokens of the compressed prompt rows (keys, values: one
    CompressedChunk per row), then the streamed (key, value) chunks."""
    store = KVStore(batch=len(keys), prompt_end=max(lengths)).with_prompt(keys, values)
    for k, v in chunks:
        store = store.appended(k, v)
    return store


def make_store(config, batch, heads, dim, dtype, prompt, n_chunks, seed):
    rows = [(compress(randn_kv(1, heads, n, dim, dtype, seed + b, "key"), config, "key"),
             compress(randn_kv(1, heads, n, dim, dtype, seed + 50 + b, "value"), config, "value")) for b, n in enumerate(prompt)]
    size = config.buffer_size
    chunks = [(compress(randn_kv(batch, heads, size, dim, dtype, seed + 100 + i, "key"), config, "key", config.rank(prompt=False)),
               compress(randn_kv(batch, heads, size, dim, dtype, seed + 200 + i, "value"), config, "value", config.rank(prompt=False)))
              for i in range(n_chunks)]
    return prompt_store([k for k, _ in rows], [v for _, v in rows], prompt, chunks)


def check_attention(small: bool) -> list[tuple[str, bool, str]]:
    # method, backbone, bits, dim, ratio, q_len, dtype, prompt rows, streamed chunks, n_buf
    cases = [
        ("gear", "kivi", 2, 128, 4, 1, torch.float16, (1000, 1000, 700), 2, 10),
        ("gear", "flexgen", 3, 128, 8, 2, torch.bfloat16, (700, 333), 1, 5),
        ("gear-l", "kcvt", 4, 64, 1, 1, torch.float16, (333, 64), 3, 3),
        ("kivi", "kivi", 8, 64, 3, 1, torch.bfloat16, (300, 129, 64), 1, 7),
        ("gear", "kivi", 2, 128, 4, 1, torch.float16, (2048,), 16, 1),
        ("gear", "turboquant", 3, 128, 4, 1, torch.float16, (700, 333), 1, 5),
        ("kivi", "turboquant", 2, 128, 2, 2, torch.bfloat16, (300, 129), 2, 3),
    ]
    if small:
        cases = [(m, bb, b, 64, r, ql, dt, tuple(min(n, 70) for n in pr), min(c, 2), nb)
                 for m, bb, b, _, r, ql, dt, pr, c, nb in cases]
    results = []
    for i, (method, backbone, bits, dim, ratio, q_len, dtype, prompt, n_chunks, n_buf) in enumerate(cases):
        heads, batch = 2, len(prompt)
        config = GearConfig(method=method, backbone=backbone, bits=bits)
        store = make_store(config, batch, heads, dim, dtype, prompt, n_chunks, 10 * i)
        k_buf = randn_kv(batch, heads, n_buf, dim, dtype, i + 1, "key")
        v_buf = randn_kv(batch, heads, n_buf, dim, dtype, i + 2, "value")
        q = randn_kv(batch, heads * ratio, q_len, dim, dtype, i + 3, "value")
        ref = decode_attention_torch(q, store, k_buf, v_buf, dim ** -0.5)
        out = torch.full_like(q, float("nan"))
        ta.decode_attention_triton(q, store, k_buf, v_buf, dim ** -0.5, out=out)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        ok = err < TOL[dtype] and not torch.isnan(out).any().item()
        name = (f"attention {method} {backbone} {bits}-bit d{dim} gqa{ratio} b{batch} q{q_len} {str(dtype)[6:]} "
                f"rows {'/'.join(map(str, prompt))} + {n_chunks} chunks")
        results.append((name, ok, f"rel err {err:.1e} (tol {TOL[dtype]:.0e})"))
    return results


# ------------------------------------------------------------------ timing

class Cache:
    """Every row's compressed prompt (a layer store) plus a buffer, for up to `batch` rows."""

    def __init__(self, config, batch, heads, tokens, dim, dtype, n_buf, seed):
        self.k = randn_kv(batch, heads, tokens, dim, dtype, seed, "key")
        self.v = randn_kv(batch, heads, tokens, dim, dtype, seed + 1, "value")
        self.k_buf = randn_kv(batch, heads, n_buf, dim, dtype, seed + 2, "key")
        self.v_buf = randn_kv(batch, heads, n_buf, dim, dtype, seed + 3, "value")
        self.chunks = {}
        self.config = config

    def compressed(self, method: str):
        """method: a GEAR method, over the 2-bit kivi backbone unless named after a slash
        ("kivi/turboquant": turboquant alone)."""
        if method not in self.chunks:
            name, _, backbone = method.partition("/")
            config = GearConfig(method=name, bits=self.config.codec.bits,
                                backbone=backbone or self.config.codec.backbone)
            self.chunks[method] = (compress(self.k, config, "key", kernel="triton"),
                                   compress(self.v, config, "value", kernel="triton"))
        return self.chunks[method]

    def rows(self, method: str, batch: int):
        """(store, k_buf, v_buf) of the first `batch` rows."""
        k, v = self.compressed(method)
        one = [torch.tensor([b], device=DEVICE) for b in range(batch)]
        store = prompt_store([k.select_rows(i) for i in one], [v.select_rows(i) for i in one], [k.shape[2]] * batch)
        return store, self.k_buf[:batch], self.v_buf[:batch]


def time_rows(tokens_list, batches, methods, heads, ratio, dim, dtype, n_buf):
    """Yield (tokens, batch, kernel, seconds, bytes moved, SDPA seconds or None) as each is timed."""
    config = GearConfig(method="gear", bits=2, backbone="kivi")
    for tokens in tokens_list:
        cache = Cache(config, max(batches), heads, tokens, dim, dtype, n_buf, seed=tokens)
        for batch in batches:
            q = randn_kv(batch, heads * ratio, 1, dim, dtype, 7, "value")
            scale = dim ** -0.5
            k_full = torch.cat([cache.k[:batch], cache.k_buf[:batch]], dim=2).contiguous()
            v_full = torch.cat([cache.v[:batch], cache.v_buf[:batch]], dim=2).contiguous()
            sdpa_bytes = tensor_bytes(q, q, k_full, v_full)

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True)

            sdpa_s = bench(sdpa)
            yield tokens, batch, "SDPA fp16 cache", sdpa_s, sdpa_bytes, sdpa_s
            for method in methods:
                store, k_buf, v_buf = cache.rows(method, batch)
                out = torch.empty_like(q)
                moved = store_bytes(store) + tensor_bytes(q, out, k_buf, v_buf)

                def attend():
                    return ta.decode_attention_triton(q, store, k_buf, v_buf, scale, out=out)

                yield tokens, batch, f"decode attention {method} 2-bit", bench(attend), moved, sdpa_s
                if method == "gear":  # the packed torch path (dispatch's kernel=torch) on the same cache
                    torch_s = bench(lambda: decode_attention_torch(q, store, k_buf, v_buf, scale))
                    yield tokens, batch, "decode attention gear 2-bit, packed torch", torch_s, moved, sdpa_s
                del store
            x = cache.k[:batch].reshape(batch * heads, tokens, dim)
            index = select_outliers(x.reshape(batch * heads, -1).float(), config.codec.outlier_ratio)
            exclude = torch.zeros((batch * heads, tokens * dim), dtype=torch.bool, device=DEVICE)
            exclude = exclude.scatter_(-1, index, True).reshape(x.shape)  # (rows, T, D), as the quantizer passes it
            codes, scale_t, zero = tq.quantize_pack(x, exclude, 2, 64, True)
            # stats kernel reads x and the mask and writes the scales; pack kernel reads x again
            # with the scales and writes the codes
            moved = tensor_bytes(x, exclude) + tensor_bytes(x) + 3 * tensor_bytes(scale_t, zero) + tensor_bytes(codes)
            quant_s = bench(lambda: tq.quantize_pack(x, exclude, 2, 64, True))
            yield tokens, batch, "quantize+pack keys (2-bit)", quant_s, moved, None
            del x, exclude, codes, k_full, v_full
        del cache
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def tune(heads, ratio, dim, dtype, n_buf, tokens, batches, methods=("gear", "kivi")):
    """Time a few tile configurations on one cache per method; keep the fastest in ta.TUNING.

    Ranked by the sum over (method, batch) of each time relative to the best for that pair, so
    gear and kivi, and the large batch (throughput) and batch 1 (latency), weigh alike. A
    configuration that fails to compile is reported and skipped.
    """
    shapes = [(32, 32, 4, 1, 4), (32, 32, 4, 1, 16), (32, 32, 4, 1, 64), (64, 32, 4, 1, 4), (64, 32, 4, 1, 16),
              (64, 32, 8, 1, 4), (64, 32, 8, 1, 16), (128, 32, 8, 1, 4), (32, 64, 4, 1, 16), (32, 32, 4, 2, 16),
              (16, 32, 4, 1, 16), (16, 32, 4, 1, 64)]
    configs = [dict(block_n=n, block_o=o, num_warps=w, num_stages=st, programs_per_sm=ps) for n, o, w, st, ps in shapes]
    cache = Cache(GearConfig(method="gear"), max(batches), heads, tokens, dim, dtype, n_buf, seed=1)
    inputs = {(method, batch): (cache.rows(method, batch), randn_kv(batch, heads * ratio, 1, dim, dtype, 7, "value"))
              for method in methods for batch in batches}
    default = dict(ta.TUNING)
    times = []
    for cfg in configs:
        ta.TUNING.update(cfg)
        try:
            per_pair = [bench(lambda: ta.decode_attention_triton(q, store, kb, vb, 0.1))
                        for (store, kb, vb), q in inputs.values()]
        except Exception as error:  # noqa: BLE001 - a sweep entry that does not compile is skipped
            print(f"  tile config {cfg}: failed ({type(error).__name__}: {str(error)[:120]})")
            continue
        times.append((cfg, per_pair))
    best_at = [min(t[i] for _, t in times) for i in range(len(inputs))]
    lines = []
    for cfg, per_pair in times:
        detail = ", ".join(f"{m} b{b} {t * 1e6:.0f} us" for (m, b), t in zip(inputs, per_pair))
        lines.append(f"  tile config {cfg}: {detail} at {tokens} tokens")
    best = min(times, key=lambda item: sum(t / b for t, b in zip(item[1], best_at)))[0]
    ta.TUNING.update(default)
    ta.TUNING.update(best)
    lines.append(f"  -> using {best}")
    return lines


def main() -> int:
    global DEVICE
    small = OPTS.smoke or OPTS.compile
    if OPTS.compile:
        report = install_compile_only(OPTS.arch)
        DEVICE = "cpu"
    else:
        DEVICE = "cuda" if not OPTS.smoke else "cpu"
        if DEVICE == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: run with --smoke (CPU interpreter) or --compile", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    started = time.time()
    if OPTS.compile:
        # launch what the checks and the timed runs launch, at GPU sizes; nothing executes
        if OPTS.quick:  # the default config, keys and values; the 3-bit gather path; q_len 2; chunks
            config = GearConfig(method="gear", bits=3, backbone="flexgen")
            store = make_store(config, 2, 2, 128, torch.bfloat16, (100, 70), 2, 0)
            buf = randn_kv(2, 2, 4, 128, torch.bfloat16, 1, "key")
            ta.decode_attention_triton(randn_kv(2, 8, 2, 128, torch.bfloat16, 2, "key"), store, buf, buf, 0.1)
        else:
            check_compress(small=False)
            check_attention(small=True)
        cache = Cache(GearConfig(), 2, 2, 300, 128, torch.float16, 16, 0)
        for method in ("gear",) if OPTS.quick else ("gear", "kivi"):
            store, kb, vb = cache.rows(method, 2)
            q = randn_kv(2, 8, 1, 128, torch.float16, 1, "value")
            for cfg in ({},) if OPTS.quick else ({}, dict(block_n=64), dict(block_n=64, num_warps=8)):
                saved = dict(ta.TUNING)
                ta.TUNING.update(cfg)
                ta.decode_attention_triton(q, store, kb, vb, 0.1)
                ta.TUNING.update(saved)
        print(f"\n{len(report)} kernel variants compiled for sm_{OPTS.arch} in {time.time() - started:.0f}s")
        return 0

    if DEVICE == "cuda":
        name = torch.cuda.get_device_name()
        print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    else:
        print(f"device: CPU (TRITON_INTERPRET=1 smoke run), torch {torch.__version__}, triton {triton.__version__}")
    bandwidth = copy_bandwidth()
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")

    checks = check_compress(small) + check_attention(small)
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |")
    failed = [c for c in checks if not c[1]]
    print(f"checks done at {time.time() - started:.0f}s", flush=True)

    heads, ratio, dim, dtype, n_buf = (8, 4, 128, torch.float16, 16) if not small else (2, 2, 64, torch.float16, 16)
    tokens_list = [1024, 8192, 32768] if not small else [64, 160]
    batches = [1, 8, 32] if not small else [1, 2]
    if OPTS.tokens:
        tokens_list = [int(t) for t in OPTS.tokens.split(",")]
    if OPTS.batches:
        batches = [int(b) for b in OPTS.batches.split(",")]
    if not OPTS.no_tune and not small:
        print("\ntile sweep:", flush=True)
        print("\n".join(tune(heads, ratio, dim, dtype, n_buf, 32768, [1, 32])), flush=True)
        retest = check_attention(small)
        print("attention checks with these tiles: " + ", ".join("ok" if ok else f"FAIL {name} {detail}"
                                                                  for name, ok, detail in retest), flush=True)
        failed += [c for c in retest if not c[1]]
    print(f"\nkv_heads {heads}, q_heads {heads * ratio}, head_dim {dim}, {str(dtype)[6:]}, gear = 2-bit kivi "
          f"backbone, group 64, 2% outliers, rank 4; cache = every row's compressed prompt + {n_buf} exact tokens; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; tiles {ta.TUNING}\n")
    print("| cached tokens | batch | kernel | time (us) | bytes moved (MB) | GB/s | % of copy BW | vs SDPA fp16 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    # rows print as they are timed, so a run cut short still reports what it measured
    for tokens, batch, kernel, seconds, moved, sdpa_s in time_rows(tokens_list, batches, OPTS.methods.split(","),
                                                                     heads, ratio, dim, dtype, n_buf):
        speed = moved / seconds
        versus = f"{sdpa_s / seconds:.2f}x" if sdpa_s is not None else ""
        print(f"| {tokens} | {batch} | {kernel} | {seconds * 1e6:.1f} | {moved / 1e6:.2f} | {speed / 1e9:.0f} | "
              f"{100 * speed / bandwidth:.0f}% | {versus} |", flush=True)
    print(f"\ntotal {time.time() - started:.0f}s; {len(failed)} failed checks")
    return 1 if failed else 0


DEVICE = "cpu"
if __name__ == "__main__":
    sys.exit(main())
