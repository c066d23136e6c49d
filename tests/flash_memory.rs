//! Flash attention never allocates an N x N matrix: at N = 4096 the peak extra heap memory of a
//! forward + backward (through candle's autograd) stays below 20% of one 4096 x 4096 f32 matrix.
//! Its own test binary, so the counting allocator sees no other test's allocations.

use candle_core::{DType, Device, Tensor, Var};
use tern::kernels::flash_attention::{backward, flash_attention, forward, Dims, FlashConfig};
use tern::mem::{heap_now, heap_peak, reset_heap_peak, Counting};

#[global_allocator]
static ALLOC: Counting<std::alloc::System> = Counting(std::alloc::System);

#[test]
fn flash_attention_at_4096_never_allocates_an_n_by_n_matrix() {
    let (n, d) = (4096usize, 64usize);
    let rnd = |seed: u64| -> Tensor {
        let v: Vec<f32> = (0..n * d)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, (1, 1, n, d), &Device::Cpu).unwrap()
    };
    let (q, k, v) = (
        Var::from_tensor(&rnd(1)).unwrap(),
        Var::from_tensor(&rnd(2)).unwrap(),
        Var::from_tensor(&rnd(3)).unwrap(),
    );
    let w = rnd(4);
    warm_per_thread_matmul_scratch(d);
    for causal in [true, false] {
        let base = heap_now();
        reset_heap_peak();
        let cfg = FlashConfig {
            causal,
            ..FlashConfig::default()
        };
        let o = flash_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &cfg).unwrap();
        let loss = (o * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(grads.get(q.as_tensor()).unwrap().dtype(), DType::F32);
        let extra = heap_peak() - base;
        let nn = n * n * 4;
        eprintln!(
            "causal {causal}: peak extra {:.2} MiB = {:.1}% of one NxN f32 matrix",
            extra as f64 / 1048576.0,
            100.0 * extra as f64 / nn as f64
        );
        assert!(extra * 5 < nn, "peak extra {extra} bytes >= 20% of {nn}");
    }
    // The kernel alone (no autograd bookkeeping): O, L, D and the three gradients.
    let vals = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let (qs, ks, vs, ws) = (
        vals(q.as_tensor()),
        vals(k.as_tensor()),
        vals(v.as_tensor()),
        vals(&w),
    );
    let dims = one_head(n, d);
    let base = heap_now();
    reset_heap_peak();
    let cfg = FlashConfig::default();
    let (o, lse) = forward(&qs, &ks, &vs, dims, &cfg);
    let grads = backward(&qs, &ks, &vs, &o, &lse, &ws, dims, &cfg);
    let extra = heap_peak() - base;
    eprintln!(
        "kernel alone: peak extra {:.2} MiB = {:.1}% of one NxN f32 matrix",
        extra as f64 / 1048576.0,
        100.0 * extra as f64 / (n * n * 4) as f64
    );
    assert!(extra * 10 < n * n * 4);
    drop(grads);
}

/// gemm (under candle's matmuls and this backward's tile products) keeps one scratch buffer per
/// thread, the size of the L2 cache (1-2 MiB), made by the thread's first matmul and kept for the
/// process. It does not grow with N and every model step has made it long before attention
/// runs, so make it on this thread and every pool thread before counting: the count is then what
/// attention itself allocates. (A lone (batch, head) task runs on the thread that calls it.)
fn warm_per_thread_matmul_scratch(d: usize) {
    let n = 256;
    let dims = one_head(n, d);
    let x: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 / 7.0).collect();
    let once = || {
        let cfg = FlashConfig::default();
        let (o, lse) = forward(&x, &x, &x, dims, &cfg);
        drop(backward(&x, &x, &x, &o, &lse, &x, dims, &cfg));
    };
    once();
    rayon::broadcast(|_| once());
}

/// One batch, one head, `n` queries over `n` keys of width `d`.
fn one_head(n: usize, d: usize) -> Dims {
    Dims {
        b: 1,
        h: 1,
        kv: 1,
        t: n,
        tk: n,
        d,
    }
}
