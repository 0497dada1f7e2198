// Elementwise and index kernels on f32 buffers; one thread per element, grid-stride loops.

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) y[i] = a[i] + b[i];
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* y, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = gate[i];
        y[i] = g * sigmoid(g) * up[i];
    }
}

extern "C" __global__ void swiglu_bwd_f32(const float* gate, const float* up, const float* dy, float* dgate,
                                          float* dup, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = gate[i], u = up[i], d = dy[i];
        float s = sigmoid(g);
        // d silu(g)/dg = s * (1 + g * (1 - s)).
        dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
        dup[i] = d * g * s;
    }
}

// x *= s, in place.
extern "C" __global__ void scale_f32(float* x, float s, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) x[i] *= s;
}

// y[i, j] = x[i, j] * s[i] for x of shape [rows, d].
extern "C" __global__ void scale_rows_f32(const float* x, const float* s, float* y, u64 rows, u64 d) {
    u64 n = rows * d;
    for (u64 i = global_index(); i < n; i += grid_stride()) y[i] = x[i] * s[i / d];
}

// Column sums of x [b, n] into y [n], rows added in order like the CPU.
extern "C" __global__ void sum_batch_f32(const float* x, float* y, u64 b, u64 n) {
    for (u64 j = global_index(); j < n; j += grid_stride()) {
        float acc = 0.0f;
        for (u64 r = 0; r < b; ++r) acc += x[r * n + j];
        y[j] = acc;
    }
}

// y [batch, c, r] = transpose of each x [batch, r, c]; one thread per output element.
extern "C" __global__ void transpose_f32(const float* x, float* y, u64 batch, u64 r, u64 c) {
    u64 mat = r * c, n = batch * mat;
    for (u64 o = global_index(); o < n; o += grid_stride()) {
        u64 b = o / mat, rem = o % mat;
        u64 j = rem / r, i = rem % r;  // output row j (a column of x), column i (a row of x)
        y[o] = x[b * mat + i * c + j];
    }
}

// y [m, d] = rows idx[0..m] of x.
extern "C" __global__ void gather_rows_f32(const float* x, const u32* idx, float* y, u64 m, u64 d) {
    u64 n = m * d;
    for (u64 o = global_index(); o < n; o += grid_stride()) y[o] = x[(u64)idx[o / d] * d + o % d];
}

// y[idx[i]] += x[i] for x [m, d]; indices may repeat, hence the atomics.
extern "C" __global__ void scatter_add_rows_f32(const float* x, const u32* idx, float* y, u64 m, u64 d) {
    u64 n = m * d;
    for (u64 o = global_index(); o < n; o += grid_stride()) atomicAdd(&y[(u64)idx[o / d] * d + o % d], x[o]);
}

// One AdamW step, PyTorch's order: decay, moments, then the bias-corrected update.
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, u64 n, float lr, float beta1,
                                     float beta2, float eps, float weight_decay, float step_size, float bc2_sqrt) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float gi = g[i];
        float pi = p[i] * (1.0f - lr * weight_decay);
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        pi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// Sum of squares in f64: per-thread partial sums, a block reduction, one atomic per block.
extern "C" __global__ void sum_squares_f32(const float* x, double* out, u64 n) {
    __shared__ double sh[BLOCK];
    double acc = 0.0;
    for (u64 i = global_index(); i < n; i += grid_stride()) acc += (double)x[i] * (double)x[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out, sh[0]);
}

// Rotary embedding, "rotate half" layout: in each head, element i pairs with i + d/2. x and y
// are [t, h, d]; token k is rotated by direction * pos[k] * inv_freq[i]. One thread per pair.
extern "C" __global__ void rope_f32(const float* x, const u32* pos, const float* inv_freq, float* y, u64 t, u64 h,
                                    u64 d, float direction) {
    u64 half = d / 2, n = t * h * half;
    for (u64 o = global_index(); o < n; o += grid_stride()) {
        u64 tok = o / (h * half), rem = o % (h * half);
        u64 head = rem / half, i = rem % half;
        float s, c;
        sincosf((float)pos[tok] * inv_freq[i], &s, &c);
        s *= direction;
        u64 base = (tok * h + head) * d;
        float a = x[base + i], b = x[base + i + half];
        y[base + i] = a * c - b * s;
        y[base + i + half] = b * c + a * s;
    }
}
