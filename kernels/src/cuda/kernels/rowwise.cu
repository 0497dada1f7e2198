// Row kernels: one block of BLOCK threads per row of a [rows, d] tensor (grid.x = rows),
// reductions through shared memory.

// y[row] = <a[row], b[row]>.
extern "C" __global__ void row_dot_f32(const float* a, const float* b, float* y, u64 d) {
    __shared__ float sh[BLOCK];
    u64 base = (u64)blockIdx.x * d;
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += a[base + i] * b[base + i];
    float s = block_sum(acc, sh);
    if (threadIdx.x == 0) y[blockIdx.x] = s;
}

extern "C" __global__ void softmax_f32(const float* x, float* y, u64 d) {
    __shared__ float sh[BLOCK];
    u64 base = (u64)blockIdx.x * d;
    float mx = NEG_INF;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) mx = fmaxf(mx, x[base + i]);
    mx = block_max(mx, sh);
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += expf(x[base + i] - mx);
    float sum = block_sum(acc, sh);
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) y[base + i] = expf(x[base + i] - mx) / sum;
}

// dx = y * (dy - <dy, y>) per row.
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* dy, float* dx, u64 d) {
    __shared__ float sh[BLOCK];
    u64 base = (u64)blockIdx.x * d;
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += y[base + i] * dy[base + i];
    float dot = block_sum(acc, sh);
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) dx[base + i] = y[base + i] * (dy[base + i] - dot);
}

// y = x / sqrt(mean(x^2) + eps) * w.
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, u64 d, float eps) {
    __shared__ float sh[BLOCK];
    u64 base = (u64)blockIdx.x * d;
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += x[base + i] * x[base + i];
    float r = 1.0f / sqrtf(block_sum(acc, sh) / (float)d + eps);
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) y[base + i] = x[base + i] * r * w[i];
}

// xhat = x*r, g = dy*w: dx = r*(g - xhat*mean(g*xhat)); dw += dy*xhat (dw zeroed by the caller,
// summed over rows with atomics).
extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* w, const float* dy, float* dx, float* dw,
                                            u64 d, float eps) {
    __shared__ float sh[BLOCK];
    u64 base = (u64)blockIdx.x * d;
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += x[base + i] * x[base + i];
    float r = 1.0f / sqrtf(block_sum(acc, sh) / (float)d + eps);
    acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += dy[base + i] * w[i] * x[base + i] * r;
    float mean_gx = block_sum(acc, sh) / (float)d;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) {
        float xhat = x[base + i] * r;
        dx[base + i] = r * (dy[base + i] * w[i] - xhat * mean_gx);
        atomicAdd(&dw[i], dy[base + i] * xhat);
    }
}

// log-sum-exp of one row, computed by the whole block.
__device__ float row_lse(const float* row, u64 d, float* sh) {
    float mx = NEG_INF;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float acc = 0.0f;
    for (u64 i = threadIdx.x; i < d; i += blockDim.x) acc += expf(row[i] - mx);
    return mx + logf(block_sum(acc, sh));
}

// loss[row] = lse(logits[row]) - logits[row, target]; 0 where the target is negative.
extern "C" __global__ void cross_entropy_f32(const float* logits, const int* targets, float* loss, u64 vocab) {
    __shared__ float sh[BLOCK];
    int t = targets[blockIdx.x];
    if (t < 0) {  // uniform over the block, so no thread is left waiting at a barrier
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.0f;
        return;
    }
    const float* row = logits + (u64)blockIdx.x * vocab;
    float lse = row_lse(row, vocab, sh);
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - row[t];
}

// dlogits[row] = dloss[row] * (softmax(row) - onehot(target)); zeros where the target is negative.
extern "C" __global__ void cross_entropy_bwd_f32(const float* logits, const int* targets, const float* dloss,
                                                 float* dlogits, u64 vocab) {
    __shared__ float sh[BLOCK];
    int t = targets[blockIdx.x];
    u64 base = (u64)blockIdx.x * vocab;
    if (t < 0) {
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) dlogits[base + i] = 0.0f;
        return;
    }
    float lse = row_lse(logits + base, vocab, sh);
    float dl = dloss[blockIdx.x];
    for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
        float g = dl * expf(logits[base + i] - lse);
        if (i == (u64)t) g -= dl;
        dlogits[base + i] = g;
    }
}
