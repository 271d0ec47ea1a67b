"""The NVIDIA GPU targets (a100, a10g, l4, l40s, rtx4090, h100, h200): datasheet and whitepaper figures.

Read by tune (cost model: SMs, occupancy limits, roofline), emit (arch, TensorRT flags) and plan (memory).
Conventions for every figure below:
- peak_flops are DENSE (the datasheets' "with sparsity" figures, marked *, are halved back) and, for the
  tensor-core dtypes, with FP32 ACCUMULATE, the mode Triton's tl.dot uses. Where a datasheet lists both
  accumulate modes (GeForce/Ada whitepaper), the fp32-accumulate one is taken.
- memory_bytes is the datasheet's capacity in decimal GB (10^9 bytes). HBM/GDDR parts are binary-sized
  and nvidia-smi shows a little more (A100 80GB: 81920 MiB), so this errs on the safe side for planning.
- memory_bandwidth is the datasheet's peak in decimal GB/s.
- clock_hz is the boost clock the peak figures are quoted at; peak_fp16 / (SMs x clock) gives the dense
  tensor FLOP per clock per SM, which must be an architectural rate (tests/targets check it): 2048 on
  sm_80 (A100 whitepaper: 256 FP16 FMA/clock per tensor core, 4 per SM), 4096 on sm_90 (H100 whitepaper:
  2x A100 per SM per clock; the dense figures correspond to 1830 MHz), 1024 on GA102/AD10x with fp32
  accumulate at full rate (L4, L40S: Ada whitepaper) and 512 where fp32 accumulate is half rate (A10G,
  RTX 4090). Clocks: A100 1410 MHz (A100 whitepaper), A10G 1710 MHz, L4 2040 MHz, L40S and RTX 4090
  2520 MHz (Ada whitepaper / datasheets), H100 and H200 SXM 1830 MHz.
- Per-SM limits come from the CUDA C++ Programming Guide, "Technical Specifications per Compute
  Capability" (the same table kernels/config.py ARCH_LIMITS cites; tests/targets check they agree):
    cc 8.0: 164 KB shared/SM, 163 KB/block opt-in, 64 warps (2048 threads), 32 blocks/SM
    cc 8.6: 100 KB shared/SM,  99 KB/block opt-in, 48 warps (1536 threads), 16 blocks/SM
    cc 8.9: 100 KB shared/SM,  99 KB/block opt-in, 48 warps (1536 threads), 24 blocks/SM
    cc 9.0: 228 KB shared/SM, 227 KB/block opt-in, 64 warps (2048 threads), 32 blocks/SM
    all:    65536 32-bit registers/SM, 255 per thread.
"""

from __future__ import annotations

from .spec import ORT_PROVIDERS, Target

KB = 1024
GB = 10**9
T = 10**12  # TFLOP/s

_SM = {  # compute capability -> per-SM limits (Programming Guide table, see the module docstring)
    80: dict(shared_mem_per_sm=164 * KB, shared_mem_per_block=163 * KB, max_warps_per_sm=64, max_blocks_per_sm=32),
    86: dict(shared_mem_per_sm=100 * KB, shared_mem_per_block=99 * KB, max_warps_per_sm=48, max_blocks_per_sm=16),
    89: dict(shared_mem_per_sm=100 * KB, shared_mem_per_block=99 * KB, max_warps_per_sm=48, max_blocks_per_sm=24),
    90: dict(shared_mem_per_sm=228 * KB, shared_mem_per_block=227 * KB, max_warps_per_sm=64, max_blocks_per_sm=32),
}
AMPERE_DTYPES = ("bf16", "fp16", "fp32")  # sm_80/86: bf16 yes, fp8 no
FP8_DTYPES = ("bf16", "fp16", "fp8", "fp32")  # sm_89/90
AMPERE_TRT = ("TF32", "FP16", "BF16")
FP8_TRT = ("TF32", "FP16", "BF16", "FP8")
GPU_BACKENDS = ("onnx", "tensorrt", "kernels", "aoti")  # aoti for cuda builds only where a GPU is present


def _gpu(name: str, description: str, cc: int, sm_count: int, memory_gb: float, bandwidth_gbs: float,
         clock_mhz: float, peak: dict[str, float]) -> Target:
    limits = _SM[cc]
    return Target(
        name=name, description=description, kind="gpu", compute_capability=cc, sm_count=sm_count,
        registers_per_sm=65536, registers_per_thread=255, max_threads_per_sm=32 * limits["max_warps_per_sm"],
        memory_bytes=int(memory_gb * GB), memory_bandwidth=bandwidth_gbs * GB, clock_hz=clock_mhz * 1e6,
        peak_flops=peak,
        dtypes=FP8_DTYPES if cc >= 89 else AMPERE_DTYPES, ort_providers=ORT_PROVIDERS,
        trt_builder_flags=FP8_TRT if cc >= 89 else AMPERE_TRT, backends=GPU_BACKENDS, **limits)


# NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column) and the NVIDIA A100 Tensor Core GPU
# Architecture whitepaper (Table 1: 108 SMs): FP32 19.5 TF, TF32 156 TF (312*), BF16/FP16 312 TF (624*);
# 80 GB HBM2e at 2,039 GB/s.
A100 = _gpu("a100", "NVIDIA A100 SXM4 80GB (Ampere GA100)", 80, sm_count=108, memory_gb=80, bandwidth_gbs=2039,
            clock_mhz=1410,
            peak={"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T})

# AWS G5's A10G (GA102, 80 SMs at 1.71 GHz boost) has no NVIDIA datasheet of its own. AWS and Baseten's
# "NVIDIA A10 vs A10G" give 35 TF FP32 and 70 TF FP16 tensor (fp32 accumulate); 24 GB GDDR6 at 600 GB/s.
# Sources disagree: NVIDIA's A10 datasheet (72 SMs, 31.2 TF FP32, 125 TF FP16) describes the A10, whose
# tensor cores accumulate fp32 at full rate; the A10G accumulates fp32 at half rate like GeForce GA102
# (80 SMs x 4 TCs x 256 FLOP/clk x 1.71 GHz = 140 TF with fp16 accumulate, 70 TF with fp32). We take 70.
# TF32 is half the fp16 rate on GA102 (RTX 3090: 35.6 TF), so 35 TF.
A10G = _gpu("a10g", "NVIDIA A10G 24GB (AWS G5, Ampere GA102)", 86, sm_count=80, memory_gb=24, bandwidth_gbs=600,
            clock_mhz=1710,
            peak={"fp32": 35 * T, "tf32": 35 * T, "fp16": 70 * T, "bf16": 70 * T})

# NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TF, TF32 120* TF, FP16/BF16 242* TF, FP8 485* TF (* with
# sparsity, halved here); 24 GB GDDR6 at 300 GB/s; 7,424 CUDA cores = 58 SMs of 128 (Ada whitepaper).
L4 = _gpu("l4", "NVIDIA L4 24GB (Ada AD104)", 89, sm_count=58, memory_gb=24, bandwidth_gbs=300, clock_mhz=2040,
          peak={"fp32": 30.3 * T, "tf32": 60 * T, "fp16": 121 * T, "bf16": 121 * T, "fp8": 242.5 * T})

# NVIDIA L40S datasheet: FP32 91.6 TF, TF32 183 TF (366*), BF16/FP16 362.05 TF (733*), FP8 733 TF (1,466*);
# 48 GB GDDR6 at 864 GB/s; 18,176 CUDA cores = 142 SMs.
L40S = _gpu("l40s", "NVIDIA L40S 48GB (Ada AD102)", 89, sm_count=142, memory_gb=48, bandwidth_gbs=864,
            clock_mhz=2520,
            peak={"fp32": 91.6 * T, "tf32": 183 * T, "fp16": 362.05 * T, "bf16": 362.05 * T, "fp8": 733 * T})

# NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090): 128 SMs, FP32 82.6 TF, TF32 82.6 TF,
# FP16/BF16 with FP32 accumulate 165.2 TF (330.3 with fp16 accumulate), FP8 with FP32 accumulate 330.3 TF
# (660.6 with fp16 accumulate); 24 GB GDDR6X at 1,008 GB/s.
RTX4090 = _gpu("rtx4090", "NVIDIA GeForce RTX 4090 24GB (Ada AD102)", 89, sm_count=128, memory_gb=24,
               bandwidth_gbs=1008, clock_mhz=2520,
               peak={"fp32": 82.6 * T, "tf32": 82.6 * T, "fp16": 165.2 * T, "bf16": 165.2 * T, "fp8": 330.3 * T})

# NVIDIA H100 Tensor Core GPU Architecture whitepaper (Table 3, H100 SXM5: 132 SMs; dense FP32 66.9 TF,
# TF32 494.7 TF, FP16/BF16 989.4 TF, FP8 1,978.9 TF) and the H100 datasheet (SXM: 67 / 989* / 1,979* /
# 3,958* TF; 80 GB HBM3 at 3.35 TB/s). The whitepaper's unrounded dense figures are used.
H100 = _gpu("h100", "NVIDIA H100 SXM5 80GB (Hopper GH100)", 90, sm_count=132, memory_gb=80, bandwidth_gbs=3350,
            clock_mhz=1830,
            peak={"fp32": 66.9 * T, "tf32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T, "fp8": 1978.9 * T})

# NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100 SXM's compute (FP32 67 TF, TF32 989* TF, BF16/FP16
# 1,979* TF, FP8 3,958* TF: the same GH100 with 132 SMs) with 141 GB HBM3e at 4.8 TB/s.
H200 = _gpu("h200", "NVIDIA H200 SXM 141GB (Hopper GH100, HBM3e)", 90, sm_count=132, memory_gb=141,
            bandwidth_gbs=4800, clock_mhz=1830,
            peak={"fp32": 66.9 * T, "tf32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T, "fp8": 1978.9 * T})

GPUS: tuple[Target, ...] = (A100, A10G, L4, L40S, RTX4090, H100, H200)
