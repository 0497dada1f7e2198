// Helpers shared by every kernel module (prepended to each .cu file before NVRTC compiles it).
// No CUDA headers are included, so the build needs nothing but libnvrtc: bf16 and f16 are
// plain 16-bit structs converted by hand (bf16) or by the PTX cvt instruction (f16), with the
// same round-to-nearest-even the `half` crate uses on the CPU.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

#define NEG_INF (__uint_as_float(0xff800000u))

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    // The `half` crate's f32 -> bf16: NaN stays a (quiet) NaN, otherwise round to nearest even.
    u32 u = __float_as_uint(x);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x0040u);
        return r;
    }
    const u32 round_bit = 0x00008000u;
    u32 hi = u >> 16;
    if ((u & round_bit) != 0u && (u & (3u * round_bit - 1u)) != 0u) hi += 1u;
    r.bits = (u16)hi;
    return r;
}
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// Index of this thread in a 1-d grid and the grid's stride, for grid-stride loops.
__device__ __forceinline__ u64 global_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_stride() { return (u64)gridDim.x * blockDim.x; }

#define BLOCK 256

// Sum over the block of one value per thread. `sh` holds blockDim.x floats; blockDim.x must be
// a power of two. Every thread of the block must call it; every thread gets the sum.
__device__ float block_sum(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();  // so `sh` can be reused right away
    return r;
}

// Max over the block; same rules as block_sum.
__device__ float block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Sum over one warp; every lane of the warp must call it and gets the sum.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
