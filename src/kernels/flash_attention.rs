//! Flash attention on the CPU, forward and backward, beside the plain reference (softmax of the
//! full score matrix, composed of differentiable candle ops).
//!
//! Shapes: q `[B, H, T, d]`, k and v `[B, KV, Tk, d]` with `H % KV == 0`; query head `h` reads KV
//! head `h / (H / KV)` straight from k/v (GQA without copying K/V). Query row `i` sits at absolute
//! position `Tk - T + i` (a cache of `Tk - T` positions before it). Key `j` is visible to row `i`
//! iff `j >= kv_start[b]` (left padding, optional) and, when causal, `j <= Tk - T + i`.
//!
//! Forward, per (batch, head, tile of query rows), in parallel: walk the key/value tiles, skipping
//! the ones entirely above the causal diagonal or entirely inside the padding, and keep per row a
//! running max `m`, a running sum `l` and an unnormalized output `acc`:
//!   m_new = max(m, max_j s_j);  acc = acc * exp(m - m_new) + sum_j exp(s_j - m_new) v_j;
//!   l = l * exp(m - m_new) + sum_j exp(s_j - m_new);  m = m_new.
//! Why exp(m_old - m_new): every term already in `acc` and `l` was computed as exp(s - m_old);
//! multiplying by exp(m_old - m_new) turns it into exp(s - m_new), so at the end
//! acc / l = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m) is the exact softmax-weighted sum,
//! and no exponent is ever positive (no overflow).
//! The fully-masked hazard: a row can meet a tile (even its first one) in which it sees no key.
//! Then max_j s_j = -inf and m_new = -inf, and exp(m - m_new) = exp(-inf + inf) = NaN would
//! poison the row. Such a row/tile pair is skipped; a row that sees no key at all keeps
//! m = -inf, l = 0, gets output 0 and L = -inf, and contributes nothing to the backward.
//! Only O and L = m + ln(l) per row are stored.
//!
//! Backward recomputes P = exp(S - L) block by block, with D = rowsum(dO * O), per (query tile,
//! key chunk) of `tile` x `tile`:
//!   S = scale Q K^T,  dP = dO V^T,  P = exp(S - L),  dS = P * (dP - D),
//!   dQ += scale dS K,  dK += scale dS^T Q,  dV += P^T dO:
//! five small GEMMs (the `gemm` crate candle's matmuls use, one thread each) and one pass of
//! exponentials, masked entries set to 0. One rayon task per (batch, query head) owns its dQ
//! rows and its own dK/dV partials `[Tk, d]`; the query heads sharing a KV head are summed at
//! the end, so no two threads add into one row and nothing is recomputed. (The first version
//! ran two passes of row-by-row dot products, dQ per query tile and dK/dV per key tile: S and
//! dP computed twice, 7 products per pair instead of 5, and 12% of a 0.6B training step.)
//!
//! Memory: O(B*H*T*d) for the inputs/outputs, O(B*H*Tk*d) for the backward's dK/dV partials
//! and O(B*H*T) for L and D, never O(T*Tk); each task holds two `tile` x `tile` blocks. Time:
//! the same O(B*H*T*Tk*d) as naive attention, about halved by causal tile skipping. On a GPU
//! this is one thread block per (batch, head, query tile) with the K/V tiles staged in shared
//! memory (FlashAttention-2); there the backward runs a block per key tile and accumulates dQ
//! with atomics or in a separate pass.

use super::{contiguous_slice, with_cpu_slices};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Mutex;

/// Default tile edge (rows of Q and of K/V per tile).
pub const DEFAULT_TILE: usize = 64;

/// What a call attends to.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashConfig {
    pub causal: bool,
    /// Tile edge for query rows and key rows.
    pub tile: usize,
    /// Per batch row: keys before this index are padding (never visible). Empty = none.
    pub kv_start: Vec<usize>,
}

impl Default for FlashConfig {
    fn default() -> Self {
        Self {
            causal: true,
            tile: DEFAULT_TILE,
            kv_start: Vec::new(),
        }
    }
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub tk: usize,
    pub d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.h / self.kv
    }
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
    fn check(&self, cfg: &FlashConfig) -> candle_core::Result<()> {
        if self.kv == 0 || !self.h.is_multiple_of(self.kv) {
            candle_core::bail!(
                "flash attention: {} query heads do not split over {} KV heads",
                self.h,
                self.kv
            );
        }
        if self.tk < self.t {
            candle_core::bail!(
                "flash attention: {} queries but only {} keys",
                self.t,
                self.tk
            );
        }
        if cfg.tile == 0 {
            candle_core::bail!("flash attention: tile must be > 0");
        }
        if !cfg.kv_start.is_empty() && cfg.kv_start.len() != self.b {
            candle_core::bail!(
                "flash attention: {} kv_start entries for batch {}",
                cfg.kv_start.len(),
                self.b
            );
        }
        Ok(())
    }
}

/// Which keys a row sees: `j` in `lo..hi`.
#[derive(Clone, Copy)]
struct Visible {
    start: usize,
    causal: bool,
    off: usize,
    tk: usize,
}

impl Visible {
    fn new(dims: &Dims, cfg: &FlashConfig, b: usize) -> Self {
        let start = cfg.kv_start.get(b).copied().unwrap_or(0);
        Self {
            start,
            causal: cfg.causal,
            off: dims.tk - dims.t,
            tk: dims.tk,
        }
    }
    /// Keys visible to query row i: `lo..hi` (possibly empty).
    fn range(&self, i: usize) -> (usize, usize) {
        let hi = if self.causal {
            (i + self.off + 1).min(self.tk)
        } else {
            self.tk
        };
        (self.start.min(hi), hi)
    }
}

/// The element types attention runs in (f32 and f64): e^x, and the two inner loops of a tile
/// (a row's scores, the weighted sum of the value rows), which f32 runs through explicit
/// AVX-512 code where the CPU has it (the compiler's vectorization of the plain loops keeps a
/// chain of dependent adds per key: decode attention took a fifth of a 0.6B token at 200
/// positions).
pub trait AttnFloat: Float {
    /// e^x: for f32 the polynomial [`super::cross_entropy::exp_f32`] (relative error < 5e-7,
    /// no libm call, so the loop over a tile's scores vectorizes), for f64 libm's.
    fn exp_fast(self) -> Self;

    /// [`dot`], in a function compiled with AVX-512F.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[inline(always)]
    unsafe fn dot_avx512(a: &[Self], b: &[Self]) -> Self {
        dot(a, b)
    }

    /// [`add_weighted_rows`], in a function compiled with AVX-512F.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[inline(always)]
    unsafe fn add_weighted_rows_avx512(acc: &mut [Self], p: &[Self], v: &[Self]) {
        add_weighted_rows(acc, p, v)
    }
}

impl AttnFloat for f32 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        super::cross_entropy::exp_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        zmm::dot(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn add_weighted_rows_avx512(acc: &mut [f32], p: &[f32], v: &[f32]) {
        zmm::add_weighted_rows(acc, p, v)
    }
}

impl AttnFloat for f64 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// Lanes of the running sums below: one 512-bit register of f32 where the caller is compiled
/// for AVX-512 (two of AVX2's).
pub(crate) const LANES: usize = 16;

/// `a . b`, the plain loop (the reference for [`zmm::dot`]).
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    // Sixteen independent accumulators so the compiler vectorizes the loop (one 512-bit
    // register where the caller is compiled for AVX-512).
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] = acc[k] + x[k] * y[k];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |s, &v| s + v);
    for (&x, &y) in ra.iter().zip(rb) {
        s = s + x * y;
    }
    s
}

/// `acc += sum_j p[j] * v[j]` over the rows `v[j]` (each `acc.len()` long), the plain loop
/// (the reference for [`zmm::add_weighted_rows`]).
#[inline(always)]
pub(crate) fn add_weighted_rows<T: Float>(acc: &mut [T], p: &[T], v: &[T]) {
    for (&pj, row) in p.iter().zip(v.chunks_exact(acc.len())) {
        for (o, &x) in acc.iter_mut().zip(row) {
            *o = *o + pj * x;
        }
    }
}

/// `sum_j e^(x_j - m)`, each `x_j` replaced by its term: sixteen running sums so the loop
/// vectorizes.
#[inline(always)]
pub(crate) fn exp_in_place<T: AttnFloat>(x: &mut [T], m: T) -> T {
    let mut sums = [T::zero(); LANES];
    for c in x.chunks_mut(LANES) {
        for (v, sum) in c.iter_mut().zip(sums.iter_mut()) {
            *v = (*v - m).exp_fast();
            *sum = *sum + *v;
        }
    }
    sums.iter().fold(T::zero(), |s, &v| s + v)
}

/// The f32 inner loops in AVX-512F, beside their plain versions above (tests compare them).
/// `#[inline(always)]` without a target feature of their own: they are inlined into callers
/// compiled with AVX-512F (as `ternary_matmul`'s kernels are).
#[cfg(target_arch = "x86_64")]
mod zmm {
    use std::arch::x86_64::*;

    /// Mask of the first `n` (at most 16) lanes.
    #[inline(always)]
    fn head(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// `a . b`: two chains of FMAs, one tree reduction.
    ///
    /// # Safety
    /// AVX-512F; `a` and `b` of one length.
    #[inline(always)]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            let (x, y) = (pa.add(i + 16), pb.add(i + 16));
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(y), s1);
            i += 32;
        }
        while i < n {
            let m = if n - i >= 16 { 0xffff } else { head(n - i) };
            let (x, y) = (
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
            );
            s0 = _mm512_fmadd_ps(x, y, s0);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// `acc += sum_j p[j] * v[j]`: the output in chunks of 128 (then 64) columns held in
    /// registers across all the rows (eight or four chains of FMAs), so `acc` is not loaded and
    /// stored per key and each value row of a 128-wide head is read once.
    ///
    /// # Safety
    /// AVX-512F; `v` holds `p.len()` rows of `acc.len()`.
    #[inline(always)]
    pub unsafe fn add_weighted_rows(acc: &mut [f32], p: &[f32], v: &[f32]) {
        let d = acc.len();
        assert!(v.len() >= p.len() * d, "add_weighted_rows: v too short");
        let mut c = 0;
        while c + 128 <= d {
            chunk::<8>(acc, p, v, c);
            c += 128;
        }
        while c + 64 <= d {
            chunk::<4>(acc, p, v, c);
            c += 64;
        }
        let (o, pv) = (acc.as_mut_ptr(), v.as_ptr());
        while c < d {
            let m = if d - c >= 16 { 0xffff } else { head(d - c) };
            let mut a = _mm512_maskz_loadu_ps(m, o.add(c));
            for (j, &pj) in p.iter().enumerate() {
                let x = _mm512_maskz_loadu_ps(m, pv.add(j * d + c));
                a = _mm512_fmadd_ps(_mm512_set1_ps(pj), x, a);
            }
            _mm512_mask_storeu_ps(o.add(c), m, a);
            c += 16;
        }
    }

    /// Columns `c .. c + 16 R` of [`add_weighted_rows`] in `R` registers.
    #[inline(always)]
    unsafe fn chunk<const R: usize>(acc: &mut [f32], p: &[f32], v: &[f32], c: usize) {
        let (d, o, pv) = (acc.len(), acc.as_mut_ptr(), v.as_ptr());
        let mut a: [__m512; R] = std::array::from_fn(|k| _mm512_loadu_ps(o.add(c + 16 * k)));
        for (j, &pj) in p.iter().enumerate() {
            let (w, row) = (_mm512_set1_ps(pj), pv.add(j * d + c));
            for (k, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(row.add(16 * k)), *a);
            }
        }
        for (k, a) in a.iter().enumerate() {
            _mm512_storeu_ps(o.add(c + 16 * k), *a);
        }
    }
}

/// Forward on contiguous slices: returns O `[B, H, T, d]` and L `[B, H, T]`.
pub fn forward<T: AttnFloat + Send + Sync>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    cfg: &FlashConfig,
) -> (Vec<T>, Vec<T>) {
    forward_strided(q, k, v, dims, dims.tk * dims.d, cfg)
}

/// [`forward`] with K/V heads `kv_stride` elements apart (each head's `Tk` rows of `d`
/// contiguous): a KV cache's buffer `[B, KV, capacity, d]` is read in place, not copied.
pub fn forward_strided<T: AttnFloat + Send + Sync>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    kv_stride: usize,
    cfg: &FlashConfig,
) -> (Vec<T>, Vec<T>) {
    let Dims {
        t, tk, d, h, kv, ..
    } = dims;
    let (tile, g) = (cfg.tile, dims.group());
    let mut o = vec![T::zero(); q.len()];
    let mut lse = vec![T::zero(); dims.b * h * t];
    let wide = SimdLevel::detect();
    o.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each(|(bh, (o_head, l_head))| {
            let (b, hh) = (bh / h, bh % h);
            let vis = Visible::new(&dims, cfg, b);
            let kv_base = (b * kv + hh / g) * kv_stride;
            let head = Head {
                q: &q[bh * t * d..(bh + 1) * t * d],
                k: &k[kv_base..kv_base + tk * d],
                v: &v[kv_base..kv_base + tk * d],
                vis,
                dims,
                tile,
            };
            o_head
                .par_chunks_mut(tile * d)
                .zip(l_head.par_chunks_mut(tile))
                .enumerate()
                .for_each(|(qt, (o_tile, l_tile))| wide.run(&head, qt * tile, o_tile, l_tile));
        });
    (o, lse)
}

/// One (batch, head): its queries, its KV head's keys and values, and what each row sees.
struct Head<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    vis: Visible,
    dims: Dims,
    tile: usize,
}

/// The vector width the forward tiles are compiled for, detected at run time (the crate is
/// built for baseline x86-64, whose 128-bit SSE2 would run `dot`/`axpy` at a quarter of
/// AVX-512's width).
#[derive(Clone, Copy)]
enum SimdLevel {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl SimdLevel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::avx512f() {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Baseline
    }

    fn run<T: AttnFloat>(self, head: &Head<T>, i0: usize, o: &mut [T], l: &mut [T]) {
        match self {
            SimdLevel::Baseline => fwd_tile::<T, false>(head, i0, o, l),
            // SAFETY: `detect` chose these only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => unsafe { fwd_tile_avx2(head, i0, o, l) },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => unsafe { fwd_tile_avx512(head, i0, o, l) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile_avx2<T: AttnFloat>(head: &Head<T>, i0: usize, o: &mut [T], l: &mut [T]) {
    fwd_tile::<T, false>(head, i0, o, l)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn fwd_tile_avx512<T: AttnFloat>(head: &Head<T>, i0: usize, o: &mut [T], l: &mut [T]) {
    fwd_tile::<T, true>(head, i0, o, l)
}

/// The forward of one tile of query rows `i0..i0 + l.len()`: output rows `o` and their L.
#[inline(always)]
fn fwd_tile<T: AttnFloat, const WIDE: bool>(
    head: &Head<T>,
    i0: usize,
    o_tile: &mut [T],
    l_tile: &mut [T],
) {
    let Head {
        q: q_head,
        k: kh,
        v: vh,
        vis,
        dims,
        tile,
    } = *head;
    let (tk, d) = (dims.tk, dims.d);
    let scale = T::from(dims.scale()).unwrap_or_else(T::one);
    let rows = l_tile.len();
    let mut m = vec![T::neg_infinity(); rows];
    let mut l = vec![T::zero(); rows];
    let mut s = vec![T::zero(); tile];
    // Keys any row of this tile can see: tiles outside lo..hi are skipped whole.
    let lo = vis.range(i0).0;
    let hi = vis.range(i0 + rows - 1).1;
    let mut j0 = lo - lo % tile;
    while j0 < hi {
        let j1 = (j0 + tile).min(tk);
        for r in 0..rows {
            let (rlo, rhi) = vis.range(i0 + r);
            let (a, z) = (rlo.max(j0), rhi.min(j1));
            if a >= z {
                continue; // this row sees nothing here: the fully-masked hazard
            }
            let qi = &q_head[(i0 + r) * d..(i0 + r + 1) * d];
            // The visible keys' scores, then their exponentials, then the weighted sum of
            // their values: three passes over the tile that each vectorize.
            let sr = &mut s[a - j0..z - j0];
            for (sj, kj) in sr.iter_mut().zip(kh[a * d..z * d].chunks_exact(d)) {
                // SAFETY (both): WIDE only in `fwd_tile_avx512`, compiled for and run on
                // AVX-512F.
                *sj = if WIDE {
                    unsafe { T::dot_avx512(qi, kj) }
                } else {
                    dot(qi, kj)
                } * scale;
            }
            let mt = sr.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
            let m_new = m[r].max(mt);
            let acc = &mut o_tile[r * d..(r + 1) * d];
            if m[r] != m_new {
                let f = (m[r] - m_new).exp(); // 0 when m was -inf
                l[r] = l[r] * f;
                acc.iter_mut().for_each(|x| *x = *x * f);
                m[r] = m_new;
            }
            l[r] = l[r] + exp_in_place(sr, m_new);
            let vr = &vh[a * d..z * d];
            if WIDE {
                unsafe { T::add_weighted_rows_avx512(acc, sr, vr) }
            } else {
                add_weighted_rows(acc, sr, vr)
            }
        }
        j0 = j1;
    }
    for r in 0..rows {
        let acc = &mut o_tile[r * d..(r + 1) * d];
        if l[r] > T::zero() {
            let inv = l[r].recip();
            acc.iter_mut().for_each(|x| *x = *x * inv);
            l_tile[r] = m[r] + l[r].ln();
        } else {
            l_tile[r] = T::neg_infinity();
        }
    }
}

/// `dst[m, n] (+)= alpha * a[m, k] b[k, n]` with `gemm` on one thread (the callers are already
/// one rayon task each). `dst` is row-major with rows `ldd` apart; `a` and `b` are read through
/// (row, column) strides, so a transpose is a swap of strides, never a copy. With `acc` false
/// `dst` is overwritten. Bounds are checked here, so the unsafe call below only ever reads and
/// writes inside the slices.
#[allow(clippy::too_many_arguments)]
fn matmul_into<T: Float + 'static>(
    dst: &mut [T],
    ldd: usize,
    (m, n, k): (usize, usize, usize),
    a: (&[T], usize, usize),
    b: (&[T], usize, usize),
    alpha: T,
    acc: bool,
) {
    let ((a, a_rs, a_cs), (b, b_rs, b_cs)) = (a, b);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        n <= ldd && last(m, n, ldd, 1) < dst.len(),
        "matmul_into: dst"
    );
    assert!(last(m, k, a_rs, a_cs) < a.len(), "matmul_into: lhs");
    assert!(last(k, n, b_rs, b_cs) < b.len(), "matmul_into: rhs");
    // SAFETY: every index the product touches is in bounds (checked above); `dst` is a unique
    // borrow that overlaps neither input; T is f32 or f64 (the only types `backward` serves;
    // `gemm` panics on others rather than misreading them).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One query head's share of the backward: its rows of Q, dO, L and D, its KV head's K and V.
struct BwdHead<'a, T> {
    q: &'a [T],
    dout: &'a [T],
    lse: &'a [T],
    dd: &'a [T],
    k: &'a [T],
    v: &'a [T],
    vis: Visible,
    d: usize,
    tile: usize,
    scale: T,
}

impl<T: Float + 'static> BwdHead<'_, T> {
    /// Keys any row of query tile `i0..i0 + rows` sees, over the rows that see something
    /// (`None` when none does).
    fn key_span(&self, i0: usize, rows: usize) -> Option<(usize, usize)> {
        (i0..i0 + rows)
            .filter(|&i| self.lse[i] != T::neg_infinity())
            .map(|i| self.vis.range(i))
            .filter(|(lo, hi)| lo < hi)
            .reduce(|(a, b), (lo, hi)| (a.min(lo), b.max(hi)))
    }

    /// dQ of this head's rows into `dq` `[T, d]`; its dK and dV contributions into `dk`, `dv`
    /// `[Tk, d]` (this head's alone: the caller sums a KV group's heads).
    fn run(&self, dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
        let (d, tile, scale) = (self.d, self.tile, self.scale);
        let t = self.lse.len();
        // S, then P, for one (query tile, key chunk) pair; dP, then dS.
        let mut p = vec![T::zero(); tile * tile];
        let mut ds = vec![T::zero(); tile * tile];
        for i0 in (0..t).step_by(tile) {
            let rows = tile.min(t - i0);
            let Some((lo, hi)) = self.key_span(i0, rows) else {
                continue;
            };
            let q = &self.q[i0 * d..(i0 + rows) * d];
            let dout = &self.dout[i0 * d..(i0 + rows) * d];
            let dq = &mut dq[i0 * d..(i0 + rows) * d];
            for j0 in (lo..hi).step_by(tile) {
                let cols = tile.min(hi - j0);
                let k = &self.k[j0 * d..(j0 + cols) * d];
                let v = &self.v[j0 * d..(j0 + cols) * d];
                // S = scale Q K^T and dP = dO V^T, [rows, cols] (K^T, V^T: swapped strides).
                matmul_into(
                    &mut p,
                    cols,
                    (rows, cols, d),
                    (q, d, 1),
                    (k, 1, d),
                    scale,
                    false,
                );
                matmul_into(
                    &mut ds,
                    cols,
                    (rows, cols, d),
                    (dout, d, 1),
                    (v, 1, d),
                    T::one(),
                    false,
                );
                self.p_and_ds(i0, rows, j0, cols, &mut p, &mut ds);
                // dQ += scale dS K;  dK += scale dS^T Q;  dV += P^T dO.
                matmul_into(
                    dq,
                    d,
                    (rows, d, cols),
                    (&ds, cols, 1),
                    (k, d, 1),
                    scale,
                    true,
                );
                let (dk, dv) = (
                    &mut dk[j0 * d..(j0 + cols) * d],
                    &mut dv[j0 * d..(j0 + cols) * d],
                );
                matmul_into(
                    dk,
                    d,
                    (cols, d, rows),
                    (&ds, 1, cols),
                    (q, d, 1),
                    scale,
                    true,
                );
                matmul_into(
                    dv,
                    d,
                    (cols, d, rows),
                    (&p, 1, cols),
                    (dout, d, 1),
                    T::one(),
                    true,
                );
            }
        }
    }

    /// In place over one `[rows, cols]` block: S -> P = exp(S - L) and dP -> dS = P (dP - D),
    /// both 0 where a row does not see the key (masked, padding, or a row that sees nothing).
    fn p_and_ds(&self, i0: usize, rows: usize, j0: usize, cols: usize, p: &mut [T], ds: &mut [T]) {
        for r in 0..rows {
            let i = i0 + r;
            let (l, dd) = (self.lse[i], self.dd[i]);
            let (lo, hi) = self.vis.range(i);
            let (lo, hi) = if l == T::neg_infinity() {
                (0, 0)
            } else {
                (lo, hi)
            };
            let (p, ds) = (
                &mut p[r * cols..(r + 1) * cols],
                &mut ds[r * cols..(r + 1) * cols],
            );
            for (c, (pv, dv)) in p.iter_mut().zip(ds.iter_mut()).enumerate() {
                let j = j0 + c;
                if j >= lo && j < hi {
                    let e = (*pv - l).exp();
                    *pv = e;
                    *dv = e * (*dv - dd);
                } else {
                    *pv = T::zero();
                    *dv = T::zero();
                }
            }
        }
    }
}

/// Backward on contiguous slices: returns (dQ, dK, dV). `T` is f32 or f64.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float + Send + Sync + 'static>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    dout: &[T],
    dims: Dims,
    cfg: &FlashConfig,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        t, tk, d, h, kv, ..
    } = dims;
    let (tile, g) = (cfg.tile, dims.group());
    let scale = T::from(dims.scale()).unwrap_or_else(T::one);
    // D_i = rowsum(dO_i * O_i), one value per query row.
    let dd: Vec<T> = dout
        .par_chunks(d)
        .zip(o.par_chunks(d))
        .map(|(a, b)| dot(a, b))
        .collect();
    // One task per (batch, query head): its dQ rows, and dK/dV partials of its own, `[B, H,
    // Tk, d]`, summed over each KV group below (no two tasks write one row).
    let mut dq = vec![T::zero(); q.len()];
    let mut dk_h = vec![T::zero(); dims.b * h * tk * d];
    let mut dv_h = vec![T::zero(); dims.b * h * tk * d];
    dq.par_chunks_mut(t * d)
        .zip(dk_h.par_chunks_mut(tk * d))
        .zip(dv_h.par_chunks_mut(tk * d))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let (b, hh) = (bh / h, bh % h);
            let kv_base = (b * kv + hh / g) * tk * d;
            let rows = bh * t * d..(bh + 1) * t * d;
            BwdHead {
                q: &q[rows.clone()],
                dout: &dout[rows],
                lse: &lse[bh * t..(bh + 1) * t],
                dd: &dd[bh * t..(bh + 1) * t],
                k: &k[kv_base..kv_base + tk * d],
                v: &v[kv_base..kv_base + tk * d],
                vis: Visible::new(&dims, cfg, b),
                d,
                tile,
                scale,
            }
            .run(dq, dk, dv);
        });
    if g == 1 {
        return (dq, dk_h, dv_h);
    }
    let sum_groups = |parts: &[T]| -> Vec<T> {
        let mut out = vec![T::zero(); k.len()];
        out.par_chunks_mut(tk * d)
            .enumerate()
            .for_each(|(bk, acc)| {
                for part in parts[bk * g * tk * d..(bk + 1) * g * tk * d].chunks(tk * d) {
                    acc.iter_mut().zip(part).for_each(|(a, &x)| *a = *a + x);
                }
            });
        out
    };
    (dq, sum_groups(&dk_h), sum_groups(&dv_h))
}

struct FlashOp {
    cfg: FlashConfig,
    /// L per query row from the forward (f64 whatever the dtype), for the backward.
    lse: Mutex<Vec<f64>>,
}

fn dims_of(ql: &Layout, kl: &Layout) -> candle_core::Result<Dims> {
    let (qd, kd) = (ql.dims(), kl.dims());
    if qd.len() != 4 || kd.len() != 4 || qd[0] != kd[0] || qd[3] != kd[3] {
        candle_core::bail!(
            "flash attention: q {qd:?} and k {kd:?} must be [B, H, T, d] and [B, KV, Tk, d]"
        );
    }
    Ok(Dims {
        b: qd[0],
        h: qd[1],
        kv: kd[1],
        t: qd[2],
        tk: kd[2],
        d: qd[3],
    })
}

impl FlashOp {
    fn fwd<T: AttnFloat + Send + Sync + candle_core::WithDType>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dims: Dims,
        kv_stride: usize,
        shape: Shape,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o, lse) = forward_strided(q, k, v, dims, kv_stride, &self.cfg);
        *self.lse.lock().expect("lse lock") =
            lse.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect();
        Ok((T::to_cpu_storage_owned(o), shape))
    }

    fn bwd_typed<T: Float + Send + Sync + candle_core::WithDType + 'static>(
        &self,
        ts: [&Tensor; 5],
        dims: Dims,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Read the inputs in place (no copies: the backward's memory stays O(B*H*T*d)).
        let lse: Vec<T> = self
            .lse
            .lock()
            .expect("lse lock")
            .iter()
            .map(|&x| T::from(x).unwrap_or_else(T::nan))
            .collect();
        let (dq, dk, dv) = with_cpu_slices(&ts, "flash attention backward", |v: &[&[T]]| {
            backward(v[0], v[1], v[2], v[3], &lse, v[4], dims, &self.cfg)
        })?;
        let dev = ts[0].device();
        Ok((
            Some(Tensor::from_vec(dq, ts[0].shape(), dev)?),
            Some(Tensor::from_vec(dk, ts[1].shape(), dev)?),
            Some(Tensor::from_vec(dv, ts[2].shape(), dev)?),
        ))
    }
}

impl CustomOp3 for FlashOp {
    fn name(&self) -> &'static str {
        "tern-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(ql, kl)?;
        dims.check(&self.cfg)?;
        if vl.dims() != kl.dims() {
            candle_core::bail!(
                "flash attention: v {:?} differs from k {:?}",
                vl.dims(),
                kl.dims()
            );
        }
        let shape = ql.shape().clone();
        let stride = match (kv_head_stride(kl), kv_head_stride(vl)) {
            (Some(a), Some(b)) if a == b => a,
            _ => candle_core::bail!("flash attention: k and v need one layout of whole rows"),
        };
        match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => self.fwd(
                contiguous_slice(q, ql, "flash attention: q")?,
                kv_slice(k, kl, stride)?,
                kv_slice(v, vl, stride)?,
                dims,
                stride,
                shape,
            ),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => self.fwd(
                contiguous_slice(q, ql, "flash attention: q")?,
                kv_slice(k, kl, stride)?,
                kv_slice(v, vl, stride)?,
                dims,
                stride,
                shape,
            ),
            _ => candle_core::bail!("flash attention: q, k, v must share one dtype, f32 or f64"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = dims_of(q.layout(), k.layout())?;
        match q.dtype() {
            DType::F32 => self.bwd_typed::<f32>([q, k, v, o, dout], dims),
            DType::F64 => self.bwd_typed::<f64>([q, k, v, o, dout], dims),
            dt => candle_core::bail!("flash attention backward: unsupported dtype {dt:?}"),
        }
    }
}

/// Whether [`flash_attention`] runs the fused kernel for these inputs (CPU, f32/f64).
pub fn supported(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// Fused attention (see the module doc). q `[B, H, T, d]`, k/v `[B, KV, Tk, d]` -> `[B, H, T, d]`.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &FlashConfig) -> Result<Tensor> {
    if !supported(q) {
        return attention_reference(q, k, v, cfg);
    }
    let op = FlashOp {
        cfg: cfg.clone(),
        lse: Mutex::new(Vec::new()),
    };
    // K/V are read in place when each head's rows are contiguous (a KV cache's buffer viewed
    // up to its length); anything else is copied once.
    let in_place = |t: &Tensor| match kv_head_stride(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
    };
    let (mut k, mut v) = (in_place(k)?, in_place(v)?);
    if kv_head_stride(k.layout()) != kv_head_stride(v.layout()) {
        (k, v) = (k.contiguous()?, v.contiguous()?);
    }
    Ok(q.contiguous()?.apply_op3(&k, &v, op)?)
}

/// Elements between consecutive heads of K or V `[B, KV, Tk, d]` when each head's `Tk * d`
/// values are contiguous and the heads evenly spaced (contiguous, or a cache buffer
/// `[B, KV, capacity, d]` narrowed to `Tk`); `None` for any other layout.
fn kv_head_stride(l: &Layout) -> Option<usize> {
    let (dims, st) = (l.dims(), l.stride());
    let [b, kv, tk, d] = *dims else { return None };
    let rows_ok = (d <= 1 || st[3] == 1) && (tk <= 1 || st[2] == d);
    // Head (b, h) sits at (b * kv + h) * stride: one stride for both indices.
    let heads_ok = b <= 1 || kv <= 1 || st[0] == st[1] * kv;
    let stride = match (b, kv) {
        (_, 2..) => st[1],
        (2.., _) => st[0],
        _ => tk * d,
    };
    (rows_ok && heads_ok && stride >= tk * d).then_some(stride)
}

/// The values of K or V from its first element, checked to hold every head at `stride`.
fn kv_slice<'a, T>(data: &'a [T], l: &Layout, stride: usize) -> candle_core::Result<&'a [T]> {
    let (dims, start) = (l.dims(), l.start_offset());
    let heads = dims[0] * dims[1];
    let need = heads.saturating_sub(1) * stride + dims[2] * dims[3];
    match data.get(start..start + need) {
        Some(s) => Ok(s),
        None => candle_core::bail!("flash attention: k/v layout {l:?} outside its storage"),
    }
}

/// Additive mask `[B, 1, 1, T, Tk]` (0 or -inf) for `cfg`, shaped for [`super::attention::attention`].
pub fn additive_mask(
    b: usize,
    t: usize,
    tk: usize,
    cfg: &FlashConfig,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let dims = Dims {
        b,
        h: 1,
        kv: 1,
        t,
        tk,
        d: 1,
    };
    let mut data = Vec::with_capacity(b * t * tk);
    for bi in 0..b {
        let vis = Visible::new(&dims, cfg, bi);
        for i in 0..t {
            let (lo, hi) = vis.range(i);
            data.extend((0..tk).map(|j| {
                if j >= lo && j < hi {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, 1, t, tk), device)?.to_dtype(dtype)?)
}

/// The plain reference: full scores, additive mask, softmax, all differentiable candle ops.
/// Rows that see no key come out NaN here (softmax of all -inf); the fused kernel gives 0.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &FlashConfig,
) -> Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let (kv, tk) = (k.dim(1)?, k.dim(2)?);
    let needs_mask = cfg.causal && t > 1 || cfg.kv_start.iter().any(|&s| s > 0);
    let mask = if needs_mask {
        Some(additive_mask(b, t, tk, cfg, q.dtype(), q.device())?)
    } else {
        None
    };
    super::attention::attention(q, k, v, mask.as_ref(), kv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The AVX-512 loops ([`zmm`]) equal the plain ones on lengths around every chunk edge
    /// (tails, 64- and 128-column register chunks), to f32 rounding.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn zmm_loops_match_the_plain_loops() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        };
        for d in [
            1, 7, 16, 17, 33, 63, 64, 65, 100, 127, 128, 129, 192, 200, 256,
        ] {
            let (a, b) = (vals(d, 1), vals(d, 2));
            // SAFETY: the CPU has AVX-512F (checked above).
            let (fast, plain) = (unsafe { zmm::dot(&a, &b) }, dot(&a, &b));
            assert!(
                (fast - plain).abs() <= 1e-5 * (1.0 + plain.abs()),
                "dot d={d}"
            );
            for keys in [0, 1, 5, 16, 64] {
                let (p, v) = (vals(keys, 3), vals(keys * d, 4));
                let (mut fast, mut plain) = (vals(d, 5), vals(d, 5));
                // SAFETY: as above.
                unsafe { zmm::add_weighted_rows(&mut fast, &p, &v) };
                add_weighted_rows(&mut plain, &p, &v);
                for (x, y) in fast.iter().zip(&plain) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "rows d={d} keys={keys}"
                    );
                }
            }
        }
    }

    fn randn(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0) * 1.7).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a: Vec<f64> = a
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = b
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / scale
    }

    fn qkv(
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        tk: usize,
        d: usize,
        dt: DType,
    ) -> (Tensor, Tensor, Tensor) {
        (
            randn(&[b, h, t, d], 1, dt),
            randn(&[b, kv, tk, d], 2, dt),
            randn(&[b, kv, tk, d], 3, dt),
        )
    }

    #[test]
    fn forward_matches_reference_small_and_odd_sizes() {
        for &(b, h, kv, t, tk, d, tile, causal) in &[
            (1, 1, 1, 256, 256, 64, 64, true),
            (1, 1, 1, 256, 256, 64, 64, false),
            (2, 4, 2, 113, 113, 40, 32, true),
            (2, 6, 3, 113, 113, 40, 64, false),
            (1, 4, 1, 7, 50, 16, 8, true), // a cache of 43 positions before the queries
            // Decode-sized blocks (t <= tile, grouped query heads): several key tiles.
            (2, 4, 2, 1, 77, 16, 8, true),
            (3, 8, 2, 5, 130, 24, 16, false),
        ] {
            let (q, k, v) = qkv(b, h, kv, t, tk, d, DType::F32);
            let cfg = FlashConfig {
                causal,
                tile,
                kv_start: vec![],
            };
            let got = flash_attention(&q, &k, &v, &cfg).unwrap();
            let want = attention_reference(&q, &k, &v, &cfg).unwrap();
            let err = max_rel(&got, &want);
            assert!(
                err < 1e-4,
                "b{b} h{h} kv{kv} t{t} tk{tk} d{d} tile{tile} causal{causal}: rel err {err}"
            );
        }
    }

    /// K/V read in place from a wider buffer (a KV cache's `[B, KV, capacity, d]` narrowed to
    /// its length) give the same output as contiguous K/V, and no copy is needed to run.
    #[test]
    fn strided_kv_heads_match_contiguous_kv() {
        let (b, h, kv, t, tk, d, cap) = (2, 4, 2, 3, 37, 16, 64);
        let (q, k, v) = qkv(b, h, kv, t, tk, d, DType::F32);
        let buf = |x: &Tensor| {
            let z = Tensor::zeros((b, kv, cap, d), DType::F32, &Device::Cpu).unwrap();
            z.slice_set(x, 2, 0).unwrap();
            z.narrow(2, 0, tk).unwrap()
        };
        let (ks, vs) = (buf(&k), buf(&v));
        assert!(!ks.is_contiguous());
        assert_eq!(kv_head_stride(ks.layout()), Some(cap * d));
        assert_eq!(kv_head_stride(k.layout()), Some(tk * d));
        // A layout whose rows are not contiguous is copied, not misread.
        assert_eq!(kv_head_stride(k.transpose(2, 3).unwrap().layout()), None);
        let cfg = FlashConfig {
            tile: 8,
            ..FlashConfig::default()
        };
        let want = flash_attention(&q, &k, &v, &cfg).unwrap();
        let got = flash_attention(&q, &ks, &vs, &cfg).unwrap();
        assert_eq!(max_rel(&got, &want), 0.0);
        let reference = attention_reference(&q, &k, &v, &cfg).unwrap();
        assert!(max_rel(&got, &reference) < 1e-5);
    }

    #[test]
    fn forward_matches_reference_at_4096_tokens_tile_128() {
        let (q, k, v) = qkv(2, 8, 8, 4096, 4096, 64, DType::F32);
        for causal in [true, false] {
            let cfg = FlashConfig {
                causal,
                tile: 128,
                kv_start: vec![],
            };
            let got = flash_attention(&q, &k, &v, &cfg).unwrap();
            let want = attention_reference(&q, &k, &v, &cfg).unwrap();
            let err = max_rel(&got, &want);
            assert!(err < 1e-4, "causal {causal}: rel err {err}");
        }
    }

    /// Left-padded decode (grouped query heads, one query row per head after a cache): each
    /// batch row sees only its keys from its padding on.
    #[test]
    fn padded_decode_blocks_match_the_reference() {
        let (b, h, kv, t, tk, d) = (3, 4, 2, 1, 70, 16);
        let (q, k, v) = qkv(b, h, kv, t, tk, d, DType::F32);
        let cfg = FlashConfig {
            causal: true,
            tile: 16,
            kv_start: vec![0, 35, 69],
        };
        let got = flash_attention(&q, &k, &v, &cfg).unwrap();
        let want = attention_reference(&q, &k, &v, &cfg).unwrap();
        assert!(max_rel(&got, &want) < 1e-5);
    }

    #[test]
    fn padding_rows_with_fully_masked_first_tiles_stay_finite() {
        // Row 1 starts at key 70 with tile 32: its first two tiles are fully masked, and its
        // queries before position 70 see no key at all.
        let (q, k, v) = qkv(2, 2, 1, 100, 100, 16, DType::F32);
        let cfg = FlashConfig {
            causal: true,
            tile: 32,
            kv_start: vec![0, 70],
        };
        let got = flash_attention(&q, &k, &v, &cfg).unwrap();
        let vals: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert!(vals.iter().all(|x| x.is_finite()));
        let want = attention_reference(&q, &k, &v, &cfg).unwrap();
        // Compare the rows that see something: batch 1 from position 70.
        let g1 = got.narrow(0, 1, 1).unwrap().narrow(2, 70, 30).unwrap();
        let w1 = want.narrow(0, 1, 1).unwrap().narrow(2, 70, 30).unwrap();
        assert!(max_rel(&g1, &w1) < 1e-4);
        let blind = got.narrow(0, 1, 1).unwrap().narrow(2, 0, 70).unwrap();
        assert_eq!(
            blind
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(
            max_rel(
                &got.narrow(0, 0, 1).unwrap(),
                &want.narrow(0, 0, 1).unwrap()
            ) < 1e-4
        );
        // The backward of the blind rows is zero, not NaN.
        let qv = Var::from_tensor(&q).unwrap();
        let o = flash_attention(qv.as_tensor(), &k, &v, &cfg).unwrap();
        let grads = o.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let dq: Vec<f32> = grads
            .get(qv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(dq.iter().all(|x| x.is_finite()));
    }

    fn grads_of(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        w: &Tensor,
        cfg: &FlashConfig,
        fused: bool,
    ) -> Vec<Tensor> {
        let (qv, kv, vv) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let o = if fused {
            flash_attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), cfg).unwrap()
        } else {
            attention_reference(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), cfg).unwrap()
        };
        // A loss with a random weight per output so every dO differs.
        let loss = (o * w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [qv, kv, vv]
            .iter()
            .map(|x| g.get(x.as_tensor()).unwrap().clone())
            .collect()
    }

    #[test]
    fn backward_matches_reference_backward() {
        // (b, h, kv, t, tk, d, tile, causal, kv_start): odd tiles of rows and keys, grouped
        // heads, a cache before the queries (tk > t), left padding.
        for (b, h, kv, t, tk, d, tile, causal, kv_start) in [
            (2, 4, 4, 256, 256, 64, 64, true, vec![]),
            (2, 4, 2, 256, 256, 64, 64, false, vec![]),
            (1, 6, 2, 113, 113, 40, 32, true, vec![]),
            (1, 4, 1, 37, 90, 24, 16, true, vec![]),
            (2, 4, 2, 50, 50, 16, 16, false, vec![0, 21]),
        ] {
            let (q, k, v) = qkv(b, h, kv, t, tk, d, DType::F32);
            let w = randn(&[b, h, t, d], 9, DType::F32);
            let cfg = FlashConfig {
                causal,
                tile,
                kv_start,
            };
            let got = grads_of(&q, &k, &v, &w, &cfg, true);
            let want = grads_of(&q, &k, &v, &w, &cfg, false);
            for (name, (g, r)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let err = max_rel(g, r);
                assert!(
                    err < 1e-4,
                    "{name} b{b} h{h} kv{kv} t{t} tk{tk} d{d} causal{causal}: rel err {err}"
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_in_f64() {
        let (b, h, kv, t, d) = (1, 2, 1, 9, 5);
        let (q, k, v) = qkv(b, h, kv, t, t, d, DType::F64);
        let w = randn(&[b, h, t, d], 9, DType::F64);
        let cfg = FlashConfig {
            causal: true,
            tile: 4,
            kv_start: vec![],
        };
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            (flash_attention(q, k, v, &cfg).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let grads = grads_of(&q, &k, &v, &w, &cfg, true);
        let eps = 1e-6;
        for (which, g) in grads.iter().enumerate() {
            let base = [&q, &k, &v][which];
            let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            for idx in 0..flat.len() {
                let mut plus = flat.clone();
                let mut minus = flat.clone();
                plus[idx] += eps;
                minus[idx] -= eps;
                let p = Tensor::from_vec(plus, base.shape(), &Device::Cpu).unwrap();
                let m = Tensor::from_vec(minus, base.shape(), &Device::Cpu).unwrap();
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which] = p;
                let lp = loss(&args[0], &args[1], &args[2]);
                args[which] = m;
                let lm = loss(&args[0], &args[1], &args[2]);
                let fd = (lp - lm) / (2.0 * eps);
                assert!(
                    (fd - gv[idx]).abs() <= 1e-5 + 1e-3 * fd.abs(),
                    "input {which} idx {idx}: fd {fd} vs {}",
                    gv[idx]
                );
            }
        }
    }
}
