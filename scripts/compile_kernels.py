"""Compile every Triton kernel of kernels.py for an NVIDIA GPU on a machine without one, and
report what ptxas says: registers and spills per thread, the SASS instruction count per weight
each thread handles (for the GEMMs, the instructions of the loop over K per weight of one
iteration), the barriers while the weights stream in, before the last plain global
load (BAR: the CTA waits, usually for a layout change through shared memory; MEMBAR: a memory
fence), int-to-float conversions (I2F: quarter rate on Hopper), arithmetic that flushes
denormals to zero (FTZ; the GEMV's decode needs denormals) and 2-byte shared-memory stores
(STS.U16: one per weight when a dequantized tile goes to shared memory one element at a
time). A static view, not a timing: an instruction count does not predict a speedup, and the
kernels are compiled with the launcher's run-time specialization so that the barriers counted
are the ones that run. The interpreter that
runs the tests never compiles; this catches what only the compiler rejects, before a GPU is
at hand.

    python scripts/compile_kernels.py [--arch 90]

Uses Triton's own compiler, ptxas and cuobjdump (shipped in the triton wheel). The kernels'
configurations are the ones config_for picks for Llama-3-8B shapes (groups of 128), and one
candidate of `scripts/bench_kernels.py --tune` (the swapped GEMM).
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

import kernels  # noqa: E402

PACKED = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qhi_ptr": "*i32", "s_ptr": "*fp16",
          "z_ptr": "*fp16"}


def jobs(kernels):
    """The kernels of a kernels.py module to compile: (name, kernel, signature, constexprs, num_warps,
    weights), weights per program, or ("K loop", weights per iteration) to count the
    instructions of the loop over K, or None."""
    csr = {"rowptr_ptr": "*i32", "cols_ptr": "*i16", "vals_ptr": "*fp16"}
    for bits, x, outliers, N in [(4, "fp16", False, 14336), (3, "fp16", False, 14336),
                                 (2, "fp16", False, 14336), (4, "bf16", False, 14336),
                                 (4, "fp16", True, 14336), (4, "fp16", "run sums", 14336),
                                 (4, "fp16", False, 4096)]:
        c = kernels.config_for(1, N, 4096, 128)  # the MLP matrices' tile, then q/o's
        gemv = dict(G=128, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], ITERS=c["ITERS"],
                    ROW_STATS=True, EVEN=True, OUT_BLOCK=128, SUM_ROWS=outliers == "run sums")
        sig = PACKED | {"x_ptr": f"*{x}", "rowptr_ptr": "*i32", "rows_ptr": "*i32",
                        "cols_ptr": "*i16", "vals_ptr": "*fp16", "ws_ptr": "*fp32",
                        "count_ptr": "*i32", "y_ptr": f"*{x}", "N": "i32", "K": "i32"}
        name = f"gemv {bits}-bit" + (", bf16 x" if x == "bf16" else "") + \
            (", outliers" if outliers else "") + \
            (" in run sums" if outliers == "run sums" else "") + f" (M=1, {N}x4096)"
        yield (name, kernels._gemv_kernel, sig, gemv | dict(BITS=bits, OUTLIERS=bool(outliers)),
               c["num_warps"], c["BLOCK_N"] * c["BLOCK_K"] * c["ITERS"])
    # the small-batch GEMM: config_for's tile, bf16 and fp16 activations, and the `--tune`
    # candidate with the weight tile as tl.dot's first operand (swap, a 64 x 16 wgmma)
    c = kernels.config_for(16, 4096, 4096, 128)
    has_swap = "SWAP" in kernels._gemm_kernel.arg_names  # (not in kernels.py before 1dd1165)
    swapped = dict(c, BLOCK_N=64, BLOCK_K=128, swap=has_swap)
    for bits, x, cfg in [(4, "bf16", c), (4, "fp16", c), (3, "fp16", c), (4, "fp16", swapped)]:
        const = dict(G=128, BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                     BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"], ROW_STATS=True,
                     DOT=getattr(triton.language, {"bf16": "bfloat16"}.get(x, "float16")))
        if has_swap:
            const["SWAP"] = cfg.get("swap", False)
        sig = PACKED | {"x_ptr": f"*{x}", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
        name = f"gemm {bits}-bit" + (", bf16 x" if x == "bf16" else "") + (
            ", swap" if cfg.get("swap") else "") + (
            f", {cfg['BLOCK_N']}x{cfg['BLOCK_K']} tile" if cfg is swapped else "")
        yield (f"{name} (M=16)", kernels._gemm_kernel, sig, const, cfg["num_warps"],
               ("K loop", cfg["BLOCK_N"] * cfg["BLOCK_K"]))  # weights per loop iteration
    c = kernels.config_for(256, 4096, 4096, 128)
    sig = {k: v for k, v in PACKED.items() if k != "x_ptr"} | {
        "wt_ptr": "*fp16", "N": "i32", "K": "i32"}
    yield ("dequant 4-bit (M=256)", kernels._dequant_kernel, sig,
           dict(G=128, BITS=4, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], ROW_STATS=True),
           c["num_warps"], c["BLOCK_N"] * c["BLOCK_K"])
    for M, block in [(1, 128), (16, 64)]:  # after the unfused GEMV; after the GEMM
        yield (f"outliers (M={M})", kernels._outliers_kernel,
               {"xt_ptr": "*fp16"} | csr | {"y_ptr": "*fp32", "M": "i32", "N": "i32"},
               dict(BLOCK_M=M, ROWS=16, BLOCK=block), 4, None)
    yield ("add outliers (prefill)", kernels._add_outliers_kernel,
           csr | {"wt_ptr": "*fp16", "N": "i32"}, dict(ROWS=16, BLOCK=128), 4, None)
    f32 = "*fp32"
    yield ("QuantEase block (calibration)", kernels._cd_block_kernel,
           {n: f32 for n in ("What", "R", "S", "Sc", "Z", "D")} | {
               "m": "i32", "n": "i32", "b1": "i32", "width": "i32", "maxq": "fp32"},
           dict(ROUNDED=True, B=128, BLOCK_R=8), 4, None)
    yield ("GPTQ block (calibration)", kernels._gptq_block_kernel,
           {"W1": f32, "U1": f32, "Sc": f32, "Z": f32, "Maxq": f32, "Keep": "*u8",
            "Codes": f32, "Qv": f32, "Err": f32, "m": "i32", "width": "i32", "tau": "fp32"},
           dict(SPQR=True, B=128, BLOCK_R=8), 4, None)


def find_cuobjdump(ptxas: str) -> str:
    """Triton's own cuobjdump (its knobs honour TRITON_CUOBJDUMP_PATH), else the one beside
    ptxas, else one on the PATH: TRITON_PTXAS_PATH may point into another CUDA install (torch's,
    say), which need not ship cuobjdump."""
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)  # Triton >= 3.4
    for path in [getattr(getattr(knobs, "cuobjdump", None), "path", None),
                 str(Path(ptxas).with_name("cuobjdump")), shutil.which("cuobjdump")]:
        if path and Path(path).is_file():
            return path
    raise SystemExit("error: no cuobjdump (Triton's, beside ptxas or on the PATH); "
                     "set TRITON_CUOBJDUMP_PATH")


def report(kernel, sig, const, warps, arch, tmp: Path) -> dict:
    # what Triton's launcher specializes at run time for Llama shapes: every pointer 16-byte
    # aligned, every integer argument a multiple of 16 (tt.divisibility = 16)
    names = kernel.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or v == "i32"}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig | {k: "constexpr" for k in const},
                                    constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    ptx, cubin = tmp / "k.ptx", tmp / "k.cubin"
    ptx.write_text(compiled.asm["ptx"])
    ptxas = get_ptxas(arch).path
    info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(cubin)],
                          capture_output=True, text=True, check=True).stderr
    cuobjdump = find_cuobjdump(ptxas)
    sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    # the part that streams the weights: up to the last plain global load (the split-K
    # epilogue reads the partial sums back with .STRONG loads, after it)
    plain_loads = [m.end() for m in re.finditer(r"\bLDG\.E(?![^;]*STRONG)[^;]*;", sass)]
    loop = sass[:plain_loads[-1]] if plain_loads else sass
    # the longest loop: from the target of a backward branch to the branch
    offsets = [(int(a, 16), b) for a, b in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), off) for off, ins in offsets
             for m in [re.search(r"\bBRA (0x[0-9a-f]+)", ins)] if m and int(m.group(1), 16) < off]
    start, end = max(loops, key=lambda se: se[1] - se[0], default=(0, -1))
    return {"regs": int(re.search(r"Used (\d+) registers", info).group(1)),
            "loop": sum(start <= off <= end for off, _ in offsets),
            "spill": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
            "sass": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)),
            # CTA barriers (shared-memory shuffles) and memory fences while the weights stream
            # in; the split-K GEMV's epilogue (after them) needs a fence and a barrier once per
            # program, and wide tiles one more barrier to give the accumulator the layout of
            # the 4-wide atomic adds
            "bar": len(re.findall(r"\bBAR\b", loop)),
            "membar": len(re.findall(r"\bMEMBAR\b", loop)),
            # int-to-float conversions (quarter rate on Hopper), not counting I2F.RP: the first
            # step of an integer division
            "i2f": len(re.findall(r"\bI2FP?\.(?!RP )", sass)),
            # arithmetic that flushes denormals to zero (the GEMV's decode relies on denormals)
            "ftz": len(re.findall(r"\bF(?:FMA|MUL|ADD)\S*\.FTZ", sass)),
            # 2-byte shared-memory stores: one per weight where a dequantized tile reaches
            # shared memory (for tl.dot) one element per thread and row (see kernels._fields)
            "sts16": len(re.findall(r"\bSTS\.U16\b", sass))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 = H100")
    p.add_argument("--kernels", default=None,
                   help="another kernels.py to compile (e.g. an older commit's, from git show)")
    a = p.parse_args()
    mod = kernels
    if a.kernels:  # loaded under its own name, beside this checkout's
        spec = importlib.util.spec_from_file_location("kernels_other", a.kernels)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    print(f"Triton {triton.__version__}, sm_{a.arch}a\n")
    print("| kernel | registers | spill bytes | SASS instructions | per weight and thread | "
          "BAR / MEMBAR | I2F | FTZ | STS.U16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernel, sig, const, warps, weights in jobs(mod):
            r = report(kernel, sig, const, warps, a.arch, Path(tmp))
            if weights is None:
                per = "-"
            elif isinstance(weights, tuple):  # the K loop's instructions, per iteration
                per = f"{r['loop'] / (weights[1] / (32 * warps)):.2f} (K loop)"
            else:
                per = f"{r['sass'] / (weights / (32 * warps)):.2f}"
            print(f"| {name} | {r['regs']} | {r['spill']} | {r['sass']:,} | {per} | "
                  f"{r['bar']} / {r['membar']} | {r['i2f']} | {r['ftz']} | {r['sts16']} |")


if __name__ == "__main__":
    main()
