// Paged-KV-cache kernels. The caches are [num_blocks, block_size, kv_heads, head_dim] in their
// own element type T (read and written through to_f32 / from_f32, so a bf16 cache is never
// copied whole); everything else is f32.
//
// Attention metadata, built on the host per call:
//   tok_seq[t]  sequence of query token t;   tok_pos[t]  its position among that sequence's keys;
//   slots[seq_off[s] + j]  cache slot (block * block_size + offset) of key j of sequence s.
// Query token t attends to keys 0..=tok_pos[t] of its sequence (causal).
//
// One block of ATT_WARPS warps per (query token, query head): grid = (tokens, q_heads). Each warp
// takes every ATT_WARPS-th key; a lane holds head dims lane, lane + 32, ... (head_dim <= 256).

#define ATT_WARPS 4
#define ATT_PER_LANE 8
#define ATT_MAX_DIM (32 * ATT_PER_LANE)

// cache[slots[t]] = x[t] for token rows x [tokens, row] (row = kv_heads * head_dim).
template <typename T>
__device__ void write_kv_impl(T* cache, const float* x, const u32* slots, u64 tokens, u64 row) {
    u64 n = tokens * row;
    for (u64 o = global_index(); o < n; o += grid_stride()) cache[(u64)slots[o / row] * row + o % row] = from_f32<T>(x[o]);
}
extern "C" __global__ void write_kv_f32(float* c, const float* x, const u32* s, u64 t, u64 r) { write_kv_impl(c, x, s, t, r); }
extern "C" __global__ void write_kv_bf16(bf16_t* c, const float* x, const u32* s, u64 t, u64 r) { write_kv_impl(c, x, s, t, r); }
extern "C" __global__ void write_kv_f16(f16_t* c, const float* x, const u32* s, u64 t, u64 r) { write_kv_impl(c, x, s, t, r); }

// Where one (token, head) block reads: its sequence's slots, its key count, its cache offset.
struct AttnRow {
    const u32* slots;
    int n_keys;
    u64 kv_off;  // offset of this head's kv head inside a cache row
    u64 row;     // elements per cache slot
    u64 q_off;   // offset of this (token, head) in q / out / dq
};

__device__ __forceinline__ AttnRow attn_row(const int* tok_seq, const int* tok_pos, const u32* slots,
                                            const u64* seq_off, int q_heads, int kv_heads, int head_dim) {
    AttnRow a;
    u64 t = blockIdx.x, h = blockIdx.y;
    int group = q_heads / kv_heads;
    a.slots = slots + seq_off[tok_seq[t]];
    a.n_keys = tok_pos[t] + 1;
    a.kv_off = (u64)((int)h / group) * head_dim;
    a.row = (u64)kv_heads * head_dim;
    a.q_off = (t * q_heads + h) * head_dim;
    return a;
}

// <reg, cache vector> over one warp (every lane gets the result).
template <typename T>
__device__ __forceinline__ float warp_dot(const float* reg, const T* vec, int head_dim, int lane) {
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        int dd = lane + 32 * i;
        if (dd < head_dim) part += reg[i] * to_f32(vec[dd]);
    }
    return warp_sum(part);
}

// Running softmax statistics of each warp (max m, sum l), merged into the block's (M, L).
__device__ void merge_stats(float m, float l, float* sh_m, float* sh_l, int warp, int lane, float* M, float* L) {
    if (lane == 0) {
        sh_m[warp] = m;
        sh_l[warp] = l;
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sh_m[w]);
    float sum = 0.0f;
    // A warp that saw no key has m = -inf and l = 0; key 0 always exists, so mx is finite.
    for (int w = 0; w < ATT_WARPS; ++w) sum += sh_l[w] * expf(sh_m[w] - mx);
    *M = mx;
    *L = sum;
}

template <typename T>
__device__ void attn_fwd(const float* q, const T* k, const T* v, float* out, const int* tok_seq, const int* tok_pos,
                         const u32* slots, const u64* seq_off, int q_heads, int kv_heads, int head_dim, float scale) {
    __shared__ float sh_m[ATT_WARPS], sh_l[ATT_WARPS];
    __shared__ float sh_acc[ATT_WARPS][ATT_MAX_DIM];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    AttnRow a = attn_row(tok_seq, tok_pos, slots, seq_off, q_heads, kv_heads, head_dim);
    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        int dd = lane + 32 * i;
        qr[i] = dd < head_dim ? q[a.q_off + dd] : 0.0f;
        acc[i] = 0.0f;
    }
    // Online softmax over this warp's keys.
    float m = NEG_INF, l = 0.0f;
    for (int j = warp; j < a.n_keys; j += ATT_WARPS) {
        u64 base = (u64)a.slots[j] * a.row + a.kv_off;
        float s = scale * warp_dot(qr, k + base, head_dim, lane);
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new);
        float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            int dd = lane + 32 * i;
            if (dd < head_dim) acc[i] = acc[i] * corr + p * to_f32(v[base + dd]);
        }
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        int dd = lane + 32 * i;
        if (dd < head_dim) sh_acc[warp][dd] = acc[i];
    }
    float M, L;
    merge_stats(m, l, sh_m, sh_l, warp, lane, &M, &L);  // its barrier also publishes sh_acc
    for (int dd = threadIdx.x; dd < head_dim; dd += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) o += sh_acc[w][dd] * expf(sh_m[w] - M);
        out[a.q_off + dd] = o / L;
    }
}

// Backward: pass 1 recomputes the softmax statistics; pass 2 per key: p = softmax, ds =
// p * (<dout, v> - <dout, out>) * scale; dq += ds * k; dk += ds * q; dv += p * dout. dk and dv
// are f32 cache-shaped buffers zeroed by the caller; several queries add into one key, hence
// the atomics.
template <typename T>
__device__ void attn_bwd(const float* q, const T* k, const T* v, const float* out, const float* dout, float* dq,
                         float* dk, float* dv, const int* tok_seq, const int* tok_pos, const u32* slots,
                         const u64* seq_off, int q_heads, int kv_heads, int head_dim, float scale) {
    __shared__ float sh_m[ATT_WARPS], sh_l[ATT_WARPS];
    __shared__ float sh_acc[ATT_WARPS][ATT_MAX_DIM];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    AttnRow a = attn_row(tok_seq, tok_pos, slots, seq_off, q_heads, kv_heads, head_dim);
    float qr[ATT_PER_LANE], dor[ATT_PER_LANE], dqr[ATT_PER_LANE];
    float delta_part = 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        int dd = lane + 32 * i;
        qr[i] = dd < head_dim ? q[a.q_off + dd] : 0.0f;
        dor[i] = dd < head_dim ? dout[a.q_off + dd] : 0.0f;
        dqr[i] = 0.0f;
        if (dd < head_dim) delta_part += dor[i] * out[a.q_off + dd];
    }
    float delta = warp_sum(delta_part);
    float m = NEG_INF, l = 0.0f;
    for (int j = warp; j < a.n_keys; j += ATT_WARPS) {
        u64 base = (u64)a.slots[j] * a.row + a.kv_off;
        float s = scale * warp_dot(qr, k + base, head_dim, lane);
        float m_new = fmaxf(m, s);
        l = l * expf(m - m_new) + expf(s - m_new);
        m = m_new;
    }
    float M, L;
    merge_stats(m, l, sh_m, sh_l, warp, lane, &M, &L);
    for (int j = warp; j < a.n_keys; j += ATT_WARPS) {
        u64 base = (u64)a.slots[j] * a.row + a.kv_off;
        float s = scale * warp_dot(qr, k + base, head_dim, lane);
        float p = expf(s - M) / L;
        float ds = p * (warp_dot(dor, v + base, head_dim, lane) - delta) * scale;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            int dd = lane + 32 * i;
            if (dd < head_dim) {
                dqr[i] += ds * to_f32(k[base + dd]);
                atomicAdd(&dk[base + dd], ds * qr[i]);
                atomicAdd(&dv[base + dd], p * dor[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        int dd = lane + 32 * i;
        if (dd < head_dim) sh_acc[warp][dd] = dqr[i];
    }
    __syncthreads();
    for (int dd = threadIdx.x; dd < head_dim; dd += blockDim.x) {
        float g = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) g += sh_acc[w][dd];
        dq[a.q_off + dd] = g;
    }
}

#define ATTN_FWD(NAME, T)                                                                                        \
    extern "C" __global__ void NAME(const float* q, const T* k, const T* v, float* out, const int* tok_seq,     \
                                    const int* tok_pos, const u32* slots, const u64* seq_off, int q_heads,      \
                                    int kv_heads, int head_dim, float scale) {                                  \
        attn_fwd<T>(q, k, v, out, tok_seq, tok_pos, slots, seq_off, q_heads, kv_heads, head_dim, scale);       \
    }
ATTN_FWD(paged_attention_f32, float)
ATTN_FWD(paged_attention_bf16, bf16_t)
ATTN_FWD(paged_attention_f16, f16_t)

#define ATTN_BWD(NAME, T)                                                                                        \
    extern "C" __global__ void NAME(const float* q, const T* k, const T* v, const float* out, const float* dout, \
                                    float* dq, float* dk, float* dv, const int* tok_seq, const int* tok_pos,    \
                                    const u32* slots, const u64* seq_off, int q_heads, int kv_heads,            \
                                    int head_dim, float scale) {                                                \
        attn_bwd<T>(q, k, v, out, dout, dq, dk, dv, tok_seq, tok_pos, slots, seq_off, q_heads, kv_heads,        \
                    head_dim, scale);                                                                           \
    }
ATTN_BWD(paged_attention_bwd_f32, float)
ATTN_BWD(paged_attention_bwd_bf16, bf16_t)
ATTN_BWD(paged_attention_bwd_f16, f16_t)
