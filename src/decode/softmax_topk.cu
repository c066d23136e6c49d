// Fused softmax + top-k over the vocabulary, one thread block per row (CUDA).
// The CPU version and its reference live in topk.rs; topk_cuda.rs compiles this file with NVRTC
// and compares it against the CPU version (tests run only with --features cuda on a GPU).
//
// Per row of V logits, never writing the probability vector:
//  1. (max, sum) with the online rescale: each thread scans a strided slice keeping its own
//     (m, s); pairs combine as m = max(m1, m2), s = s1*exp(m1 - m) + s2*exp(m2 - m), first by warp
//     shuffles, then across the block's warps in shared memory. lse = m + log(s).
//  2. The k-th largest logit by radix select on order-preserving 32-bit keys: 32 block-wide
//     counting passes build the largest threshold T with count(key >= T) >= k (the row stays in
//     L2 for a 151,936-wide row).
//  3. Candidates: every key > T (atomic slot), then keys == T in id order (a block-wide ordered
//     scan with warp ballots) until k are taken: ties go to the lower id.
//  4. Bitonic sort of the <= 1024 candidates in shared memory by (logit desc, id asc); write ids,
//     logits and the row's lse. The caller turns logits into probabilities exp(x - lse).
// NaN logits get key 0 and are never chosen unless the row has fewer than k other values.

// NVRTC has no C library headers.
typedef unsigned int uint32_t;
#define INFINITY __int_as_float(0x7f800000)

#define MAX_K 1024
#define THREADS 256

__device__ __forceinline__ uint32_t order_key(float x) {
    if (x != x) return 0u;  // NaN: below everything
    uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) { m = mn; s = 0.f; return; }
    float a = (m == -INFINITY) ? 0.f : s * __expf(m - mn);
    float b = (m2 == -INFINITY) ? 0.f : s2 * __expf(m2 - mn);
    m = mn;
    s = a + b;
}

__device__ uint32_t block_count(const float *row, int v, uint32_t threshold, uint32_t *scratch) {
    uint32_t c = 0;
    for (int i = threadIdx.x; i < v; i += blockDim.x) c += order_key(row[i]) >= threshold;
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = c;
    __syncthreads();
    uint32_t total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
    return total;
}

extern "C" __global__ void softmax_topk_f32(const float *__restrict__ logits, int v, int k,
                                            uint32_t *__restrict__ out_ids,
                                            float *__restrict__ out_logits,
                                            float *__restrict__ out_lse) {
    __shared__ float sm[THREADS / 32], ss[THREADS / 32];
    __shared__ uint32_t scratch[THREADS / 32];
    __shared__ uint32_t cand_key[MAX_K];
    __shared__ uint32_t cand_id[MAX_K];
    __shared__ uint32_t n_taken;
    __shared__ uint32_t tie_base;

    const float *row = logits + (size_t)blockIdx.x * v;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

    // 1. online max / sum
    float m = -INFINITY, s = 0.f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = row[i];
        if (x != x || x == -INFINITY) continue;
        if (x > m) { s = (m == -INFINITY) ? 0.f : s * __expf(m - x); m = x; }
        s += __expf(x - m);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_down_sync(0xffffffffu, m, o), s2 = __shfl_down_sync(0xffffffffu, s, o);
        combine(m, s, m2, s2);
    }
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bm = sm[0], bs = ss[0];
        for (int w = 1; w < nwarps; ++w) combine(bm, bs, sm[w], ss[w]);
        out_lse[blockIdx.x] = (bs > 0.f) ? bm + logf(bs) : -INFINITY;
    }

    // 2. radix select of the k-th largest key
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
        uint32_t cand = prefix | (1u << bit);
        if (block_count(row, v, cand, scratch) >= (uint32_t)k) prefix = cand;
    }
    const uint32_t t = prefix;

    // 3a. everything strictly above the threshold
    if (threadIdx.x == 0) n_taken = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        uint32_t key = order_key(row[i]);
        if (key > t) {
            uint32_t slot = atomicAdd(&n_taken, 1u);
            cand_key[slot] = key;
            cand_id[slot] = (uint32_t)i;
        }
    }
    __syncthreads();
    // 3b. ties at the threshold, lowest ids first: ordered block-wide scan in chunks
    if (threadIdx.x == 0) tie_base = n_taken;
    __syncthreads();
    for (int c0 = 0; c0 < v && tie_base < (uint32_t)k; c0 += blockDim.x) {
        int i = c0 + threadIdx.x;
        bool eq = i < v && order_key(row[i]) == t;
        uint32_t ballot = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) scratch[warp] = __popc(ballot);
        __syncthreads();
        uint32_t before = 0;
        for (int w = 0; w < warp; ++w) before += scratch[w];
        uint32_t rank = tie_base + before + __popc(ballot & ((1u << lane) - 1u));
        if (eq && rank < (uint32_t)k) { cand_key[rank] = t; cand_id[rank] = (uint32_t)i; }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t total = 0;
            for (int w = 0; w < nwarps; ++w) total += scratch[w];
            tie_base += total;
        }
        __syncthreads();
    }

    // 4. bitonic sort of k candidates: key desc, id asc (padding sorts last)
    int n = 1;
    while (n < k) n <<= 1;
    for (int i = k + threadIdx.x; i < n; i += blockDim.x) { cand_key[i] = 0; cand_id[i] = 0xffffffffu; }
    __syncthreads();
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                int j = i ^ stride;
                if (j > i) {
                    bool i_first = cand_key[i] > cand_key[j] || (cand_key[i] == cand_key[j] && cand_id[i] < cand_id[j]);
                    bool want_i_first = ((i & size) == 0);
                    if (i_first != want_i_first) {
                        uint32_t tk = cand_key[i]; cand_key[i] = cand_key[j]; cand_key[j] = tk;
                        uint32_t ti = cand_id[i]; cand_id[i] = cand_id[j]; cand_id[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        uint32_t id = cand_id[i];
        out_ids[(size_t)blockIdx.x * k + i] = id;
        out_logits[(size_t)blockIdx.x * k + i] = row[id];
    }
}
