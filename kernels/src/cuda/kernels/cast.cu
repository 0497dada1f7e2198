// Element type conversions, always through f32 (as the CPU's to_dtype does).

template <typename S, typename D>
__device__ void cast_impl(const S* x, D* y, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) y[i] = from_f32<D>(to_f32(x[i]));
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, u64 n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_f32_f16(const float* x, f16_t* y, u64 n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, u64 n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_f16_f32(const f16_t* x, float* y, u64 n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_bf16_f16(const bf16_t* x, f16_t* y, u64 n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_f16_bf16(const f16_t* x, bf16_t* y, u64 n) { cast_impl(x, y, n); }
