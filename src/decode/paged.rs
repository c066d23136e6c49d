//! Paged KV cache: fixed-size blocks from one pool, a block table per sequence.
//!
//! Data layout: per layer, K and V are each one growable pool of blocks, V
//! `[block][kv_head][slot][head_dim]` and K transposed within each page, `[block][kv_head]
//! [head_dim][slot]` (f32, or f16 with [`KvType::F16`]: values rounded when written, widened as
//! they are loaded); a block id means the same block in every layer. A
//! sequence is a block table (`Vec<block id>`) and a length; position p lives in block
//! `table[p / B]`, slot `p % B`. Blocks carry a reference count: `fork` copies only the table
//! (prefix sharing, e.g. for beams), and the first write into a shared block copies it
//! (copy-on-write). `truncate` (rollback) drops whole blocks past the new length; freed blocks go
//! to a free list and are reused. Fresh blocks are filled with NaN on purpose: attention reads
//! only slots below each sequence's length, and the tests prove unused slots never leak in.
//!
//! Attention reads the table about 64 keys (whole pages) at a time with the online softmax
//! (running max and sum, as in `kernels::flash_attention`), so no contiguous copy of a
//! sequence's K/V is ever made; GQA maps query head h to KV head h / (H / KV). With K transposed,
//! one vector of a page's dimension `d` holds 16 keys: a query scores 16 keys per FMA with no
//! horizontal sums, and every row of a prompt chunk reuses each page from cache (before, each
//! key was one dot product and its reduction: a 1536-token prompt ran at llama.cpp's speed on
//! one thread, NOTES.md). The price: writing one token's K touches every 32-byte row of its
//! page's tile (64 cache lines per KV head where a row took 4).
//!
//! Complexity: appending a token writes O(layers * kv_heads * head_dim), independent of the
//! sequence length (the contiguous cache's `cat` copies the whole past every step); attention
//! for one query is O(len * head_dim). Memory: 2 * kv_heads * head_dim * 4 (f16: 2) bytes per
//! token per layer, plus at most one partly used block per sequence. On a GPU this is vLLM's
//! PagedAttention: one thread block per (sequence, head), the block table in shared memory.

use crate::error::{Error, Result};
use crate::kernels::flash_attention::exp_in_place;
use crate::kernels::Kernels;
use crate::model::cache::{Cache, Positions, StepInfo};
use crate::model::HostAttention;
use candle_core::{DType, Tensor};

/// Query-key products (positions x heads x head_dim) in one step's attention above which its
/// (token, head) pairs are shared out over the threads: below it, a fork costs more than it
/// saves (a short decode step).
const PAR_ATTENTION_WORK: usize = 1 << 15;

/// The queries of [`PagedKvCache::attend_rows`]: row `i`'s `g` heads (`[g, head_dim]`) start
/// at `q[i * stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Queries<'a> {
    pub q: &'a [f32],
    pub stride: usize,
    pub g: usize,
}

/// Handle of a sequence in a [`PagedKvCache`].
pub type SeqId = usize;

#[derive(Debug, Clone)]
struct Seq {
    blocks: Vec<usize>,
    len: usize,
}

/// How the cache stores K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// Exact: what the model computed.
    #[default]
    F32,
    /// Half the memory and half the reads per token (llama.cpp's default cache type); values
    /// rounded to f16 when written.
    F16,
}

/// One layer's K or V pool, in the cache's storage type.
#[derive(Debug, Clone)]
enum Pool {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Pool {
    fn new(t: KvType) -> Self {
        match t {
            KvType::F32 => Pool::F32(Vec::new()),
            KvType::F16 => Pool::F16(Vec::new()),
        }
    }

    /// Capacity for `n` more values if the allocator grants it (a hint: when it does not, the
    /// pool grows as it would have).
    fn reserve(&mut self, n: usize) {
        let _ = match self {
            Pool::F32(p) => p.try_reserve(n),
            Pool::F16(p) => p.try_reserve(n),
        };
    }

    /// Asks the CPU to bring values `r` into the cache (a hint; nothing off x86-64).
    fn prefetch(&self, r: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            let (at, len) = match self {
                Pool::F32(p) => (p[r.clone()].as_ptr() as *const u8, r.len() * 4),
                Pool::F16(p) => (p[r.clone()].as_ptr() as *const u8, r.len() * 2),
            };
            for l in (0..len).step_by(64) {
                // SAFETY: a prefetch of an address inside the slice (it never faults).
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        at.add(l) as *const i8
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = r;
    }

    fn bytes(&self) -> usize {
        match self {
            Pool::F32(p) => p.len() * 4,
            Pool::F16(p) => p.len() * 2,
        }
    }

    /// `n` more values, NaN.
    fn grow(&mut self, n: usize) {
        match self {
            Pool::F32(p) => p.resize(p.len() + n, f32::NAN),
            Pool::F16(p) => p.resize(p.len() + n, half::f16::NAN),
        }
    }

    fn fill_nan(&mut self, r: std::ops::Range<usize>) {
        match self {
            Pool::F32(p) => p[r].fill(f32::NAN),
            Pool::F16(p) => p[r].fill(half::f16::NAN),
        }
    }

    fn copy_within(&mut self, r: std::ops::Range<usize>, to: usize) {
        match self {
            Pool::F32(p) => p.copy_within(r, to),
            Pool::F16(p) => p.copy_within(r, to),
        }
    }

    /// `src[d]` into value `at + d * stride` (a K row into its block's transposed tile).
    fn put_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            Pool::F32(p) => src
                .iter()
                .enumerate()
                .for_each(|(d, &x)| p[at + d * stride] = x),
            Pool::F16(p) => {
                // Rounded by the slice conversion (F16C where the CPU has it: one scalar
                // conversion per value was 0.5% of decode), then scattered.
                use half::slice::HalfFloatSliceExt;
                let mut h = [half::f16::ZERO; 64];
                for (c, xs) in src.chunks(64).enumerate() {
                    h[..xs.len()].convert_from_f32_slice(xs);
                    for (i, &v) in h[..xs.len()].iter().enumerate() {
                        p[at + (64 * c + i) * stride] = v;
                    }
                }
            }
        }
    }

    /// Value `i` as f32.
    fn value(&self, i: usize) -> f32 {
        match self {
            Pool::F32(p) => p[i],
            Pool::F16(p) => p[i].to_f32(),
        }
    }

    fn put(&mut self, at: usize, src: &[f32]) {
        let r = at..at + src.len();
        match self {
            Pool::F32(p) => p[r].copy_from_slice(src),
            Pool::F16(p) => {
                use half::slice::HalfFloatSliceExt;
                p[r].convert_from_f32_slice(src)
            }
        }
    }

    /// Values `r` as f32: borrowed from an f32 pool, converted into `buf` from an f16 one.
    fn get<'a>(&'a self, r: std::ops::Range<usize>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Pool::F32(p) => &p[r],
            Pool::F16(p) => {
                buf.resize(r.len(), 0.0);
                f16_to_f32(&p[r], buf);
                buf
            }
        }
    }
}

/// Keys scored per vector of lanes (one 512-bit register of f32): a K tile's rows are padded
/// to a multiple of it.
const LB: usize = 16;
/// Keys per online-softmax update in [`PagedKvCache::attend_rows`] (whole pages of at least
/// this many keys where a page is smaller).
const SPAN: usize = 64;
/// Head dimensions one pass of [`add_pv`] keeps in registers per query.
const DB: usize = 64;

/// 16 f32 lanes, the unit [`scores`] and [`add_pv`] compute in: one 512-bit register, two
/// 256-bit ones, or a plain array (the compiler does not vectorize those loops by itself: its
/// accumulators went to the stack, one scalar FMA each).
trait V16: Copy {
    /// Two registers per value (AVX2's 16 registers): the loops keep half as many
    /// accumulators, so they do not spill.
    const NARROW: bool = false;
    /// # Safety
    /// `p` points to 16 readable f32.
    unsafe fn load(p: *const f32) -> Self;
    /// 16 f16 widened (exactly).
    ///
    /// # Safety
    /// `p` points to 16 readable f16.
    unsafe fn load_f16(p: *const half::f16) -> Self;
    /// # Safety
    /// `p` points to 16 writable f32.
    unsafe fn store(self, p: *mut f32);
    fn splat(x: f32) -> Self;
    /// `a * b + self` per lane, fused where the type's instructions have FMA.
    fn fma(self, a: Self, b: Self) -> Self;
    fn add(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    /// Per lane, the larger (the other where one is NaN, as `f32::max`).
    fn max(self, b: Self) -> Self;
    /// The largest lane.
    fn reduce_max(self) -> f32;
}

/// The baseline's lanes: a multiply and an add (baseline x86-64 would call libm's `fma`),
/// fused on AArch64 where it is one instruction.
#[derive(Clone, Copy)]
struct Plain([f32; LB]);

impl V16 for Plain {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Plain(std::ptr::read_unaligned(p as *const [f32; LB]))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> Self {
        Plain(std::array::from_fn(|i| (*p.add(i)).to_f32()))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; LB], self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Plain([x; LB])
    }
    #[inline(always)]
    fn fma(mut self, a: Self, b: Self) -> Self {
        for ((c, a), b) in self.0.iter_mut().zip(a.0).zip(b.0) {
            *c = if cfg!(target_arch = "aarch64") {
                a.mul_add(b, *c)
            } else {
                a * b + *c
            };
        }
        self
    }
    #[inline(always)]
    fn add(mut self, b: Self) -> Self {
        self.0.iter_mut().zip(b.0).for_each(|(a, b)| *a += b);
        self
    }
    #[inline(always)]
    fn mul(mut self, b: Self) -> Self {
        self.0.iter_mut().zip(b.0).for_each(|(a, b)| *a *= b);
        self
    }
    #[inline(always)]
    fn max(mut self, b: Self) -> Self {
        self.0.iter_mut().zip(b.0).for_each(|(a, b)| *a = a.max(b));
        self
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.0.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// AVX-512F: one register. Only inside functions compiled with it ([`PagedKvCache::rows_zmm`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Zmm(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl V16 for Zmm {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Zmm(std::arch::x86_64::_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> Self {
        use std::arch::x86_64::*;
        Zmm(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::arch::x86_64::_mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: only reached from code compiled with AVX-512F (the type's contract).
        Zmm(unsafe { std::arch::x86_64::_mm512_set1_ps(x) })
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: as above.
        Zmm(unsafe { std::arch::x86_64::_mm512_fmadd_ps(a.0, b.0, self.0) })
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        // SAFETY: as above.
        Zmm(unsafe { std::arch::x86_64::_mm512_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        // SAFETY: as above.
        Zmm(unsafe { std::arch::x86_64::_mm512_mul_ps(self.0, b.0) })
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        // `vmaxps` returns its second operand where either is NaN: NaN lanes of `b` lose.
        // SAFETY: as above.
        Zmm(unsafe { std::arch::x86_64::_mm512_max_ps(b.0, self.0) })
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        // SAFETY: as above.
        unsafe { std::arch::x86_64::_mm512_reduce_max_ps(self.0) }
    }
}

/// AVX2 + FMA: two registers. Only inside functions compiled with them
/// ([`PagedKvCache::rows_ymm`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Ymm2(std::arch::x86_64::__m256, std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl V16 for Ymm2 {
    const NARROW: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        use std::arch::x86_64::_mm256_loadu_ps as ld;
        Ymm2(ld(p), ld(p.add(8)))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> Self {
        use std::arch::x86_64::*;
        let h = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(at) as *const __m128i));
        Ymm2(h(0), h(8))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        use std::arch::x86_64::_mm256_storeu_ps as st;
        st(p, self.0);
        st(p.add(8), self.1);
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: only reached from code compiled with AVX2 and FMA (the type's contract).
        let v = unsafe { std::arch::x86_64::_mm256_set1_ps(x) };
        Ymm2(v, v)
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        use std::arch::x86_64::_mm256_fmadd_ps as f;
        // SAFETY: as above.
        unsafe { Ymm2(f(a.0, b.0, self.0), f(a.1, b.1, self.1)) }
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        use std::arch::x86_64::_mm256_add_ps as f;
        // SAFETY: as above.
        unsafe { Ymm2(f(self.0, b.0), f(self.1, b.1)) }
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        use std::arch::x86_64::_mm256_mul_ps as f;
        // SAFETY: as above.
        unsafe { Ymm2(f(self.0, b.0), f(self.1, b.1)) }
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        use std::arch::x86_64::_mm256_max_ps as f;
        // `vmaxps` returns its second operand where either is NaN: NaN lanes of `b` lose.
        // SAFETY: as above.
        unsafe { Ymm2(f(b.0, self.0), f(b.1, self.1)) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        let mut out = [0f32; LB];
        // SAFETY: `out` holds 16 f32.
        unsafe { self.store(out.as_mut_ptr()) };
        out.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// [`PagedKvCache::attend_rows`]'s buffers, kept per thread: a widened K tile of small pages,
/// a pair's scores, a span's K and V offsets.
type SpanBufs = (Vec<f32>, Vec<f32>, Vec<usize>, Vec<usize>);

/// What the cache stores K and V as, read in place by [`scores`] and [`add_pv`].
trait KvElem: Copy {
    /// 16 values as f32 lanes.
    ///
    /// # Safety
    /// `p` points to 16 readable values; `V`'s contract (the features its type needs).
    unsafe fn load<V: V16>(p: *const Self) -> V;
    fn f32(self) -> f32;
}

impl KvElem for f32 {
    #[inline(always)]
    unsafe fn load<V: V16>(p: *const f32) -> V {
        V::load(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    unsafe fn load<V: V16>(p: *const half::f16) -> V {
        V::load_f16(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// The largest of the first `n` of `ps` (`-inf` for none; NaN ignored), 16 lanes at a time: the
/// lanes of the last vector past `n` are set to `-inf` first.
#[inline(always)]
fn max_of<V: V16>(ps: &mut [f32], n: usize) -> f32 {
    let end = n.next_multiple_of(LB);
    assert!(ps.len() >= end, "scores buffer");
    ps[n..end].fill(f32::NEG_INFINITY);
    let mut m = V::splat(f32::NEG_INFINITY);
    for c in (0..end).step_by(LB) {
        // SAFETY: `c + LB <= end <= ps.len()`.
        m = m.max(unsafe { V::load(ps.as_ptr().add(c)) });
    }
    m.reduce_max()
}

/// The scores of `R` queries (`qs`: `[R][head_dim]`) against the first `n` keys of a span,
/// times `scale`, into `ps` (`[R][bp]`; lanes from `n` up to the next multiple of [`LB`] hold
/// scores of padding). Keys `16c .. 16c + 16` lie side by side at `k + koffs[c]`, dimension
/// `d` of them `d * pitch` further (a transposed K tile). Per 16 keys, each query broadcasts
/// its value of dimension `d` against the 16 keys' values of `d` (an FMA over 16 keys, no
/// horizontal sum), into four partial sums by `d % 4` (two on AVX2; independent chains) added in a fixed
/// order: a query's scores are the same bits whatever `R` is.
///
/// # Safety
/// Every `k + koffs[c] + d * pitch` for `c < n.div_ceil(16)`, `d < head_dim` starts 16 readable
/// values; `ps` holds `R * bp` values, `n <= bp`, `bp` a multiple of 16; `V`'s contract.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores<V: V16, E: KvElem, const R: usize>(
    qs: &[f32],
    k: *const E,
    koffs: &[usize],
    pitch: usize,
    bp: usize,
    n: usize,
    scale: f32,
    ps: &mut [f32],
) {
    let hd = qs.len() / R;
    assert!(
        ps.len() >= R * bp && n <= bp && bp.is_multiple_of(LB) && koffs.len() >= n.div_ceil(LB),
        "attention tile shapes"
    );
    let (q, p) = (qs.as_ptr(), ps.as_mut_ptr());
    // Partial sums per query: 4, or 2 where a value takes two registers.
    let parts = if V::NARROW { 2 } else { 4 };
    let whole = hd / parts * parts;
    for c0 in (0..n).step_by(LB) {
        let k = k.add(koffs[c0 / LB]);
        let mut acc = [[V::splat(0.0); 4]; R];
        for d0 in (0..whole).step_by(parts) {
            for u in 0..parts {
                let kd = E::load::<V>(k.add((d0 + u) * pitch));
                for (r, a) in acc.iter_mut().enumerate() {
                    a[u] = a[u].fma(V::splat(*q.add(r * hd + d0 + u)), kd);
                }
            }
        }
        for d in whole..hd {
            let kd = E::load::<V>(k.add(d * pitch));
            for (r, a) in acc.iter_mut().enumerate() {
                a[d - whole] = a[d - whole].fma(V::splat(*q.add(r * hd + d)), kd);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let s = match parts {
                4 => a[0].add(a[1]).add(a[2].add(a[3])),
                _ => a[0].add(a[1]),
            };
            s.mul(V::splat(scale)).store(p.add(r * bp + c0));
        }
    }
}

/// `os[r] += sum_k ps[r][k] * v_k` over the first `n` keys of a span for `R` queries (`os`:
/// `[R][head_dim]`, `ps`: `[R][bp]`; key `k`'s V row at `v + voffs[k]`), each output value
/// summed over the keys in order with one FMA per key: the same bits whatever `R` is. [`DB`]
/// dimensions at a time (a pass's accumulators stay in registers); a head dimension that is
/// not a multiple of 16 takes one lane at a time for its last values.
///
/// # Safety
/// Every `v + voffs[k]`, `k < n`, starts `head_dim` readable values; `V`'s contract.
#[inline(always)]
unsafe fn add_pv<V: V16, E: KvElem, const R: usize>(
    ps: &[f32],
    bp: usize,
    v: *const E,
    voffs: &[usize],
    n: usize,
    os: &mut [f32],
) {
    let hd = os.len() / R;
    assert!(
        ps.len() >= R * bp && n <= bp && voffs.len() >= n,
        "attention tile shapes"
    );
    let whole = hd / LB * LB;
    let mut d0 = 0;
    while d0 + DB <= whole {
        if V::NARROW {
            pv_pass::<V, E, R, { DB / LB / 2 }>(ps, bp, v, voffs, n, os, d0);
            pv_pass::<V, E, R, { DB / LB / 2 }>(ps, bp, v, voffs, n, os, d0 + DB / 2);
        } else {
            pv_pass::<V, E, R, { DB / LB }>(ps, bp, v, voffs, n, os, d0);
        }
        d0 += DB;
    }
    while d0 < whole {
        pv_pass::<V, E, R, 1>(ps, bp, v, voffs, n, os, d0);
        d0 += LB;
    }
    for r in 0..R {
        for (k, &at) in voffs.iter().enumerate().take(n) {
            let pk = ps[r * bp + k];
            for d in whole..hd {
                // One lane of V16::fma (fused where the vector loops are).
                os[r * hd + d] = fma_lane::<V>(pk, (*v.add(at + d)).f32(), os[r * hd + d]);
            }
        }
    }
}

/// [`add_pv`] for dimensions `d0 .. d0 + 16 * C`, their `R x C` accumulators in registers.
///
/// # Safety
/// `d0 + 16 * C <= head_dim`, and [`add_pv`]'s contract.
#[inline(always)]
unsafe fn pv_pass<V: V16, E: KvElem, const R: usize, const C: usize>(
    ps: &[f32],
    bp: usize,
    v: *const E,
    voffs: &[usize],
    n: usize,
    os: &mut [f32],
    d0: usize,
) {
    let hd = os.len() / R;
    let (o, p) = (os.as_mut_ptr(), ps.as_ptr());
    let mut acc = [[V::splat(0.0); C]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        for (c, a) in a.iter_mut().enumerate() {
            *a = V::load(o.add(r * hd + d0 + LB * c));
        }
    }
    for (k, &at) in voffs.iter().enumerate().take(n) {
        let vk: [V; C] = std::array::from_fn(|c| E::load::<V>(v.add(at + d0 + LB * c)));
        for (r, a) in acc.iter_mut().enumerate() {
            let pk = V::splat(*p.add(r * bp + k));
            for (a, &vk) in a.iter_mut().zip(&vk) {
                *a = a.fma(pk, vk);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (c, a) in a.iter().enumerate() {
            a.store(o.add(r * hd + d0 + LB * c));
        }
    }
}

/// `a * b + c` exactly as one lane of `V`'s [`V16::fma`].
#[inline(always)]
fn fma_lane<V: V16>(a: f32, b: f32, c: f32) -> f32 {
    let mut out = [0f32; LB];
    let v = V::splat(c).fma(V::splat(a), V::splat(b));
    // SAFETY: `out` holds 16 f32.
    unsafe { v.store(out.as_mut_ptr()) };
    out[0]
}

/// `src` widened into `dst` (same length). `half`'s slice conversion calls an out-of-line
/// 8-value routine per 8 values (11% of a batched decode step at 8 clients, perf); AVX-512
/// widens 16 per instruction inline.
fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx512f() {
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { f16_to_f32_avx512(src, dst) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_to_f32_avx512(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(src.len(), dst.len());
    let whole = src.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
        _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
    }
    for (d, h) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = h.to_f32();
    }
}

#[derive(Debug, Clone)]
pub struct PagedKvCache {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    k: Vec<Pool>,
    v: Vec<Pool>,
    refcount: Vec<u32>,
    free: Vec<usize>,
    seqs: Vec<Option<Seq>>,
}

impl PagedKvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, block_size: usize) -> Self {
        Self::with_type(layers, kv_heads, head_dim, block_size, KvType::F32)
    }

    /// [`Self::new`] storing K and V as `t`.
    pub fn with_type(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        t: KvType,
    ) -> Self {
        Self {
            block_size: block_size.max(1),
            kv_heads,
            head_dim,
            k: vec![Pool::new(t); layers],
            v: vec![Pool::new(t); layers],
            refcount: Vec::new(),
            free: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// Room for `blocks` more blocks in every layer's pools, set aside now (address space only:
    /// the memory is touched when blocks are used) so that growing into them never moves the
    /// pools. A request the allocator refuses is dropped.
    pub fn reserve_blocks(&mut self, blocks: usize) {
        let n = blocks.saturating_mul(self.block_elems());
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.reserve(n);
        }
    }

    fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    fn seq(&self, s: SeqId) -> Result<&Seq> {
        self.seqs
            .get(s)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| Error::Msg(format!("paged cache: no sequence {s}")))
    }

    fn seq_mut(&mut self, s: SeqId) -> Result<&mut Seq> {
        self.seqs
            .get_mut(s)
            .and_then(|x| x.as_mut())
            .ok_or_else(|| Error::Msg(format!("paged cache: no sequence {s}")))
    }

    /// A new empty sequence.
    pub fn add_seq(&mut self) -> SeqId {
        self.seqs.push(Some(Seq {
            blocks: Vec::new(),
            len: 0,
        }));
        self.seqs.len() - 1
    }

    pub fn len(&self, s: SeqId) -> Result<usize> {
        Ok(self.seq(s)?.len)
    }

    /// Blocks in use (referenced by at least one sequence).
    pub fn blocks_in_use(&self) -> usize {
        self.refcount.iter().filter(|&&r| r > 0).count()
    }

    /// Bytes of K/V storage the pool holds (all layers, used or free).
    pub fn pool_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Pool::bytes).sum()
    }

    fn alloc_block(&mut self) -> usize {
        let n = self.block_elems();
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                for l in self.k.iter_mut().chain(self.v.iter_mut()) {
                    l.grow(n);
                }
                self.refcount.push(0);
                self.refcount.len() - 1
            }
        };
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.fill_nan(id * n..(id + 1) * n);
        }
        self.refcount[id] = 1;
        id
    }

    fn release(&mut self, id: usize) {
        self.refcount[id] -= 1;
        if self.refcount[id] == 0 {
            self.free.push(id);
        }
    }

    /// A new sequence sharing every block of `s` (copy-on-write).
    pub fn fork(&mut self, s: SeqId) -> Result<SeqId> {
        let seq = self.seq(s)?.clone();
        for &b in &seq.blocks {
            self.refcount[b] += 1;
        }
        self.seqs.push(Some(seq));
        Ok(self.seqs.len() - 1)
    }

    /// Forgets a sequence, releasing its blocks.
    pub fn free_seq(&mut self, s: SeqId) -> Result<()> {
        let seq = self.seq(s)?.clone();
        for b in seq.blocks {
            self.release(b);
        }
        self.seqs[s] = None;
        Ok(())
    }

    /// Rolls `s` back to its first `len` positions.
    pub fn truncate(&mut self, s: SeqId, len: usize) -> Result<()> {
        let bs = self.block_size;
        let seq = self.seq_mut(s)?;
        if len >= seq.len {
            return Ok(());
        }
        seq.len = len;
        let keep = len.div_ceil(bs);
        let dropped: Vec<usize> = seq.blocks.drain(keep..).collect();
        for b in dropped {
            self.release(b);
        }
        Ok(())
    }

    /// Makes room for `n` more positions of `s` (allocating blocks, copying a shared last block)
    /// and returns the first new position. Write them with [`Self::write`].
    pub fn reserve(&mut self, s: SeqId, n: usize) -> Result<usize> {
        let bs = self.block_size;
        let (start, last_shared) = {
            let seq = self.seq(s)?;
            let partial = seq.len % bs != 0;
            (
                seq.len,
                if partial {
                    seq.blocks.last().copied().filter(|&b| self.refcount[b] > 1)
                } else {
                    None
                },
            )
        };
        if let Some(old) = last_shared {
            // Copy-on-write: this sequence gets its own copy of the shared partial block.
            let new = self.alloc_block();
            let e = self.block_elems();
            for l in self.k.iter_mut().chain(self.v.iter_mut()) {
                l.copy_within(old * e..(old + 1) * e, new * e);
            }
            self.release(old);
            let seq = self.seq_mut(s)?;
            *seq.blocks.last_mut().expect("partial block") = new;
        }
        let need = (start + n).div_ceil(bs);
        while self.seq(s)?.blocks.len() < need {
            let b = self.alloc_block();
            self.seq_mut(s)?.blocks.push(b);
        }
        self.seq_mut(s)?.len = start + n;
        Ok(start)
    }

    fn slot(&self, s: &Seq, pos: usize, head: usize) -> usize {
        self.slot_in(s.blocks[pos / self.block_size], pos, head)
    }

    /// The offset of `head`'s V row for position `pos` in block `b`.
    fn slot_in(&self, b: usize, pos: usize, head: usize) -> usize {
        self.tile(b, head) + pos % self.block_size * self.head_dim
    }

    /// The offset of `head`'s tile in block `b`: its V rows `[slot][head_dim]`, or its K
    /// values transposed, `[head_dim][slot]` (a K tile's `block_size` values of one dimension
    /// lie side by side, so attention multiplies a query by 16 keys per vector instruction
    /// with no horizontal sums).
    fn tile(&self, b: usize, head: usize) -> usize {
        (b * self.kv_heads + head) * self.block_size * self.head_dim
    }

    /// Writes K and V (`[kv_heads, head_dim]` each) of position `pos` of `s` in `layer`.
    pub fn write(
        &mut self,
        layer: usize,
        s: SeqId,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let seq = self.seq(s)?;
        if pos >= seq.len {
            return Err(Error::Msg(format!(
                "paged cache: position {pos} not reserved (length {})",
                seq.len
            )));
        }
        let b = seq.blocks[pos / self.block_size];
        if self.refcount[b] > 1 {
            return Err(Error::Msg(
                "paged cache: write into a shared block (reserve first)".into(),
            ));
        }
        let (hd, bs) = (self.head_dim, self.block_size);
        for h in 0..self.kv_heads {
            let o = self.slot_in(b, pos, h);
            let kt = self.tile(b, h) + pos % bs;
            self.k[layer].put_strided(kt, bs, &k[h * hd..(h + 1) * hd]);
            self.v[layer].put(o, &v[h * hd..(h + 1) * hd]);
        }
        Ok(())
    }

    /// Attention of one query `q: [heads, head_dim]` of sequence `s` at position `pos` over keys
    /// `0..=pos` (causal): returns `[heads, head_dim]`. Reads only slots below the length.
    pub fn attend(
        &self,
        layer: usize,
        s: SeqId,
        pos: usize,
        q: &[f32],
        heads: usize,
    ) -> Result<Vec<f32>> {
        let (hd, g) = (self.head_dim, heads / self.kv_heads.max(1));
        let mut out = vec![0f32; heads * hd];
        for (kvh, o) in out.chunks_mut(g * hd).enumerate() {
            self.attend_group(layer, s, pos, &q[kvh * g * hd..(kvh + 1) * g * hd], kvh, o)?;
        }
        Ok(out)
    }

    /// The query heads of KV head `kvh` (`qs`: `[g, head_dim]`, the `g` heads that share it) of
    /// `s` at `pos`, attending over the K/V of `s` up to `pos` in `layer`: their outputs written
    /// to `out` (`[g, head_dim]`). [`Self::attend_rows`] with one row.
    pub fn attend_group(
        &self,
        layer: usize,
        s: SeqId,
        pos: usize,
        qs: &[f32],
        kvh: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let q = Queries {
            q: qs,
            stride: qs.len(),
            g: qs.len() / self.head_dim.max(1),
        };
        self.attend_rows(layer, s, pos, q, kvh, out)
    }

    /// Consecutive positions `pos0 ..` of `s` (a prompt chunk, or one decoding token), the query
    /// heads of KV head `kvh` each: every row attends causally over the K/V of `s` up to its own
    /// position in `layer`, and row `i`'s outputs go to `out[i * g * head_dim ..]` (`[rows][g,
    /// head_dim]`, `rows = out.len() / (g * head_dim)`). One pass over the pages with an online
    /// softmax per row and head: each span of pages is fetched once for all the run's rows and
    /// the group's heads, not once per query (grouped-query attention, and a prompt chunk's
    /// rows, share it; f16 values are widened as they are loaded). A row's result does not
    /// depend on which rows share its run.
    pub fn attend_rows(
        &self,
        layer: usize,
        s: SeqId,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let seq = self.seq(s)?;
        let width = q.g * self.head_dim;
        let rows = out.len().checked_div(width).unwrap_or(0);
        if rows == 0 || out.len() != rows * width || q.q.len() < (rows - 1) * q.stride + width {
            return Err(Error::Msg(format!(
                "paged cache: {} outputs and {} queries (stride {}) for rows of {width}",
                out.len(),
                q.q.len(),
                q.stride
            )));
        }
        if pos0 + rows > seq.len {
            return Err(Error::Msg(format!(
                "paged cache: queries at {pos0}..{} past length {}",
                pos0 + rows,
                seq.len
            )));
        }
        // The loops in 512-bit (AVX-512F) or 256-bit (AVX2 + FMA) registers, else plain
        // ([`V16`]).
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // SAFETY (both): the CPU has the features each function is compiled for.
            if crate::kernels::avx512f() {
                unsafe { self.rows_zmm(layer, seq, pos0, q, kvh, out) };
                return Ok(());
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                unsafe { self.rows_ymm(layer, seq, pos0, q, kvh, out) };
                return Ok(());
            }
        }
        self.rows::<Plain>(layer, seq, pos0, q, kvh, out);
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_ymm(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        self.rows::<Ymm2>(layer, seq, pos0, q, kvh, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_zmm(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        self.rows::<Zmm>(layer, seq, pos0, q, kvh, out)
    }

    /// [`Self::attend_rows`]'s work, its shapes already checked, on the pools' element type.
    #[inline(always)]
    fn rows<V: V16>(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        match (&self.k[layer], &self.v[layer]) {
            (Pool::F16(k), Pool::F16(v)) => {
                self.rows_in::<V, _>(layer, k, v, seq, pos0, q, kvh, out)
            }
            (Pool::F32(k), Pool::F32(v)) => {
                self.rows_in::<V, _>(layer, k, v, seq, pos0, q, kvh, out)
            }
            _ => unreachable!("a layer's K and V pools have one type"),
        }
    }

    /// [`Self::rows`] over the K and V pools `kp`, `vp`. Per span of about [`SPAN`] keys (whole
    /// pages), for every row that sees it, its query heads two at a time: [`scores`], the online
    /// softmax, [`add_pv`]. K and V are read in place (f16 widened as loaded), except that K
    /// pages smaller than 16 keys are first widened side by side into one tile per span. Each
    /// query's arithmetic is the same whichever rows and heads share its span, so a row's
    /// result does not depend on its run.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows_in<V: V16, E: KvElem>(
        &self,
        layer: usize,
        kp: &[E],
        vp: &[E],
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        let (hd, bs, g) = (self.head_dim, self.block_size, q.g);
        // Keys per softmax update: whole pages, about SPAN keys (the update's max, rescale and
        // bookkeeping cost about as much as scoring 16 keys).
        let span = bs * (SPAN / bs).max(1);
        let bp = span.next_multiple_of(LB);
        let direct = bs.is_multiple_of(LB);
        let rows = out.len() / (g * hd);
        let last = pos0 + rows - 1;
        let scale = 1.0 / (hd as f32).sqrt();
        // Per row and head: running max and sum.
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows * g], vec![0f32; rows * g]);
        // Per thread, kept between calls (a decode step makes one per KV head and layer):
        // the widened K tile of small pages, a pair's scores, the span's key offsets.
        thread_local! {
            static BUFS: std::cell::Cell<SpanBufs> = const {
                std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new()))
            };
        }
        let (mut kt, mut p, mut koffs, mut voffs) = BUFS.take();
        let kt_len = if direct { 0 } else { hd * bp };
        for (buf, len) in [(&mut kt, kt_len), (&mut p, 2 * bp)] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        out.fill(0.0);
        for p0 in (0..=last).step_by(span) {
            let ns = (last + 1 - p0).min(span);
            koffs.clear();
            voffs.clear();
            for (j, b0) in (p0..p0 + ns).step_by(bs).enumerate() {
                let base = self.tile(seq.blocks[b0 / bs], kvh);
                let nb = (p0 + ns - b0).min(bs);
                if direct {
                    koffs.extend((0..nb).step_by(LB).map(|c| base + c));
                } else {
                    for d in 0..hd {
                        let (src, dst) = (base + d * bs, d * bp + j * bs);
                        for (o, x) in kt[dst..dst + bs].iter_mut().zip(&kp[src..src + bs]) {
                            *o = x.f32();
                        }
                    }
                }
                voffs.extend((0..nb).map(|r| base + r * hd));
                // Each page is apart from the last one: the hardware prefetchers start cold
                // on every one, so the next span's pages are fetched while this one is used.
                if b0 + span <= last {
                    let next = self.tile(seq.blocks[(b0 + span) / bs], kvh);
                    self.k[layer].prefetch(next..next + bs * hd);
                    self.v[layer].prefetch(next..next + bs * hd);
                }
            }
            if !direct {
                koffs.extend((0..ns).step_by(LB));
            }
            // Rows before this span's first position see none of it.
            for i in p0.saturating_sub(pos0)..rows {
                let n = (pos0 + i + 1 - p0).min(ns);
                let qi = &q.q[i * q.stride..i * q.stride + g * hd];
                let oi = &mut out[i * g * hd..(i + 1) * g * hd];
                for j0 in (0..g).step_by(2) {
                    let pair = j0 + 1 < g;
                    let (ps, _) = p.split_at_mut(if pair { 2 * bp } else { bp });
                    let qs = &qi[j0 * hd..(j0 + 1 + pair as usize) * hd];
                    let os = &mut oi[j0 * hd..(j0 + 1 + pair as usize) * hd];
                    // SAFETY: every offset starts a page's keys (or the widened tile's) with
                    // `head_dim` rows of at least 16 keys behind it (`pitch` apart), and every
                    // V offset a row of `head_dim`: all inside the pools and `kt`; `V` is the
                    // type the caller's features allow.
                    unsafe {
                        let (kb, pitch) = (kp.as_ptr(), bs);
                        match (pair, direct) {
                            (true, true) => {
                                scores::<V, E, 2>(qs, kb, &koffs, pitch, bp, n, scale, ps)
                            }
                            (false, true) => {
                                scores::<V, E, 1>(qs, kb, &koffs, pitch, bp, n, scale, ps)
                            }
                            (true, false) => {
                                scores::<V, f32, 2>(qs, kt.as_ptr(), &koffs, bp, bp, n, scale, ps)
                            }
                            (false, false) => {
                                scores::<V, f32, 1>(qs, kt.as_ptr(), &koffs, bp, bp, n, scale, ps)
                            }
                        }
                    }
                    let at = i * g + j0;
                    let heads = os.chunks_exact_mut(hd).zip(ps.chunks_exact_mut(bp));
                    for (r, (o, ps)) in heads.enumerate() {
                        let (mi, li) = (&mut m[at + r], &mut l[at + r]);
                        let m_new = max_of::<V>(ps, n).max(*mi);
                        let ps = &mut ps[..n];
                        let f = if *mi == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (*mi - m_new).exp()
                        };
                        *li *= f;
                        o.iter_mut().for_each(|x| *x *= f);
                        *li += exp_in_place(ps, m_new);
                        *mi = m_new;
                    }
                    // SAFETY: as above.
                    unsafe {
                        match pair {
                            true => add_pv::<V, E, 2>(ps, bp, vp.as_ptr(), &voffs, n, os),
                            false => add_pv::<V, E, 1>(ps, bp, vp.as_ptr(), &voffs, n, os),
                        }
                    }
                }
            }
        }
        for (o, l) in out.chunks_exact_mut(hd).zip(&l) {
            o.iter_mut().for_each(|x| *x /= l);
        }
        BUFS.set((kt, p, koffs, voffs));
    }

    /// K and V of `s` in `layer` gathered contiguously `[kv_heads, len, head_dim]` (for tests
    /// and for handing a sequence to the contiguous path).
    pub fn gather(&self, layer: usize, s: SeqId) -> Result<(Vec<f32>, Vec<f32>)> {
        let seq = self.seq(s)?;
        let hd = self.head_dim;
        let (mut k, mut v) = (
            Vec::with_capacity(self.kv_heads * seq.len * hd),
            Vec::with_capacity(self.kv_heads * seq.len * hd),
        );
        let bs = self.block_size;
        for h in 0..self.kv_heads {
            for p in 0..seq.len {
                let kt = self.tile(seq.blocks[p / bs], h) + p % bs;
                k.extend((0..hd).map(|d| self.k[layer].value(kt + d * bs)));
                let o = self.slot(seq, p, h);
                v.extend_from_slice(self.v[layer].get(o..o + hd, &mut Vec::new()));
            }
        }
        Ok((k, v))
    }
}

/// One forward over a [`PagedKvCache`]: each `(seq, tokens)` appends its tokens to its sequence
/// (sequences of any lengths, no padding). The model runs the tokens of all sequences as one row
/// `[1, n]`; each token attends over its own sequence's pages up to itself.
pub struct PagedStep<'a> {
    cache: &'a mut PagedKvCache,
    /// Token t of the flattened batch: its sequence and absolute position.
    rows: Vec<(SeqId, usize)>,
}

impl<'a> PagedStep<'a> {
    /// Reserves the slots of every new token; returns the step and the flattened ids `[n]`.
    pub fn new(
        cache: &'a mut PagedKvCache,
        batch: &[(SeqId, Vec<u32>)],
    ) -> Result<(Self, Vec<u32>)> {
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for (s, toks) in batch {
            if toks.is_empty() {
                return Err(Error::Msg(format!(
                    "paged forward: sequence {s} has no new tokens"
                )));
            }
            let start = cache.reserve(*s, toks.len())?;
            rows.extend((0..toks.len()).map(|i| (*s, start + i)));
            ids.extend_from_slice(toks);
        }
        Ok((Self { cache, rows }, ids))
    }
}

impl Cache for PagedStep<'_> {
    fn begin(&mut self, step: &StepInfo) -> Result<Positions> {
        if step.batch != 1 || step.new_tokens != self.rows.len() {
            return Err(Error::Msg(format!(
                "paged forward: expected ids [1, {}], found [{}, {}]",
                self.rows.len(),
                step.batch,
                step.new_tokens
            )));
        }
        Ok(Positions::Shared(HostAttention::positions(self)))
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        _kernels: Kernels,
    ) -> Result<Tensor> {
        let (_, nh, n, hd) = q.dims4()?;
        // Token-major host copies `[n, heads, hd]` (one transposing copy each), so a token's
        // K/V and a KV head's group of queries are contiguous slices.
        let to_host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.squeeze(0)?
                .transpose(0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let o = HostAttention::attend(self, layer, &to_host(q)?, &to_host(&k)?, &to_host(&v)?, nh)?;
        // Token-major [1, n, H, hd] -> [1, H, n, hd], as the model expects.
        Ok(Tensor::from_vec(o, (1, n, nh, hd), q.device())?
            .to_dtype(q.dtype())?
            .transpose(1, 2)?)
    }
}

impl HostAttention for PagedStep<'_> {
    fn positions(&self) -> Vec<u32> {
        self.rows.iter().map(|r| r.1 as u32).collect()
    }

    fn attend(
        &mut self,
        layer: usize,
        qh: &[f32],
        kh: &[f32],
        vh: &[f32],
        nh: usize,
    ) -> Result<Vec<f32>> {
        let (n, nkv, hd) = (self.rows.len(), self.cache.kv_heads, self.cache.head_dim);
        let kv_row = nkv * hd;
        if qh.len() != n * nh * hd || kh.len() != n * kv_row || vh.len() != n * kv_row {
            return Err(Error::Msg(format!(
                "paged attention: q/k/v of {}/{}/{} values for {n} tokens of {nh}/{nkv} heads of {hd}",
                qh.len(),
                kh.len(),
                vh.len()
            )));
        }
        // Write every new K/V first, then attend (causal).
        for (t, &(s, pos)) in self.rows.iter().enumerate() {
            let at = t * kv_row..(t + 1) * kv_row;
            self.cache.write(layer, s, pos, &kh[at.clone()], &vh[at])?;
        }
        // Runs of consecutive positions of one sequence (a prompt chunk, or one decoding
        // token), each attending with every KV head on its own (the cache is only read now): in
        // parallel, as with continuous batching the row holds many sequences' tokens, and one
        // decoding token still has every KV head to share out. Small contexts stay on this
        // thread.
        let cache = &*self.cache;
        let g = nh / nkv.max(1);
        let runs = runs_of(&self.rows);
        let work = |i: usize| -> Result<Vec<f32>> {
            let ((t0, len), kvh) = (runs[i / nkv], i % nkv);
            let (s, pos0) = self.rows[t0];
            let mut out = vec![0f32; len * g * hd];
            // The run's queries of this KV head: row t's `[g, hd]` at (t * heads + kvh * g) * hd
            // (qh is `[n, heads, hd]`).
            let q0 = (t0 * nh + kvh * g) * hd;
            let q = Queries {
                q: &qh[q0..],
                stride: nh * hd,
                g,
            };
            cache.attend_rows(layer, s, pos0, q, kvh, &mut out)?;
            Ok(out)
        };
        let items = runs.len() * nkv;
        let positions: usize = self.rows.iter().map(|&(_, pos)| pos + 1).sum();
        let outs: Vec<Vec<f32>> = if positions * nh * hd >= PAR_ATTENTION_WORK {
            use rayon::prelude::*;
            (0..items)
                .into_par_iter()
                .map(work)
                .collect::<Result<_>>()?
        } else {
            (0..items).map(work).collect::<Result<_>>()?
        };
        let mut o = vec![0f32; n * nh * hd];
        for (i, out) in outs.iter().enumerate() {
            let ((t0, _), kvh) = (runs[i / nkv], i % nkv);
            for (r, src) in out.chunks_exact(g * hd).enumerate() {
                let at = ((t0 + r) * nh + kvh * g) * hd;
                o[at..at + g * hd].copy_from_slice(src);
            }
        }
        Ok(o)
    }
}

/// The step's tokens as runs `(first token, length)` of consecutive positions of one sequence.
fn runs_of(rows: &[(SeqId, usize)]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (t, &(s, pos)) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some((t0, len)) if rows[*t0].0 == s && rows[*t0].1 + *len == pos => *len += 1,
            _ => runs.push((t, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rnd(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// Query, key and value heads and the head size.
    #[derive(Clone, Copy)]
    struct Heads {
        heads: usize,
        kv: usize,
        hd: usize,
    }

    /// Plain attention over contiguous `[kv, len, hd]` K/V for a query at `pos`.
    fn contiguous_attention(
        k: &[f32],
        v: &[f32],
        len: usize,
        q: &[f32],
        shape: Heads,
        pos: usize,
    ) -> Vec<f32> {
        let Heads { heads, kv, hd } = shape;
        let g = heads / kv;
        let mut out = vec![0f32; heads * hd];
        for h in 0..heads {
            let kvh = h / g;
            let s: Vec<f64> = (0..=pos)
                .map(|p| {
                    (0..hd)
                        .map(|d| (q[h * hd + d] * k[(kvh * len + p) * hd + d]) as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                out[h * hd + d] = (0..=pos)
                    .map(|p| (s[p] - m).exp() / z * v[(kvh * len + p) * hd + d] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn a_steps_rows_split_into_runs_of_consecutive_positions() {
        let rows = [(0, 5), (0, 6), (1, 0), (0, 7), (2, 3), (2, 4), (2, 6)];
        assert_eq!(runs_of(&rows), vec![(0, 2), (2, 1), (3, 1), (4, 2), (6, 1)]);
        assert!(runs_of(&[]).is_empty());
    }

    /// The vector widening equals `half`'s on every f16 bit pattern (subnormals, infinities;
    /// NaN stays NaN), at a length that leaves a scalar tail.
    #[test]
    fn f16_widening_equals_the_half_crate() {
        let src: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let src = &src[..src.len() - 3];
        let mut fast = vec![0f32; src.len()];
        f16_to_f32(src, &mut fast);
        for (h, f) in src.iter().zip(&fast) {
            let want = h.to_f32();
            assert!(
                want.to_bits() == f.to_bits() || (want.is_nan() && f.is_nan()),
                "{:#06x}: {f} vs {want}",
                h.to_bits()
            );
        }
    }

    #[test]
    fn attention_over_pages_equals_contiguous_with_nan_in_unused_slots() {
        // f16 storage: the same, against the contiguous attention of the f16-rounded values.
        // Shapes (layers, kv heads, head_dim, heads, page size) for every path of the loops:
        // pages of 4 (K interleaved into one tile per span) and of 16 (whole pages); three
        // query heads per KV head (a pair and one alone); head_dim 80 (a 64-wide pass and a
        // 16-wide one) and 38 (a 16-wide pass, a tail, and dimensions past the last four);
        // sequences over several 64-key spans.
        for t in [KvType::F32, KvType::F16] {
            attention_over_pages(t, (2, 2, 8, 4, 4), &[1, 5, 8, 13]);
            attention_over_pages(t, (1, 2, 80, 6, 16), &[1, 17, 64, 150]);
            attention_over_pages(t, (1, 1, 38, 2, 16), &[3, 70]);
            attention_over_pages(t, (1, 1, 16, 3, 5), &[131]);
        }
    }

    fn attention_over_pages(
        t: KvType,
        (layers, kv, hd, heads, bs): (usize, usize, usize, usize, usize),
        lens: &[usize],
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut cache = PagedKvCache::with_type(layers, kv, hd, bs, t);
        let stored = |x: Vec<f32>| -> Vec<f32> {
            match t {
                KvType::F32 => x,
                KvType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            }
        };
        let seqs: Vec<SeqId> = lens.iter().map(|_| cache.add_seq()).collect();
        let mut truth = vec![];
        // Interleave appends (one or several tokens at a time) across sequences.
        for (&s, &len) in seqs.iter().zip(lens) {
            // Per layer, the K (and V) rows appended so far.
            let mut ks: Vec<Vec<Vec<f32>>> = vec![vec![]; layers];
            let mut vs: Vec<Vec<Vec<f32>>> = vec![vec![]; layers];
            let mut done = 0;
            while done < len {
                let n = (1 + done % 3).min(len - done);
                let start = cache.reserve(s, n).unwrap();
                for p in start..start + n {
                    for l in 0..layers {
                        let (k, v) = (rnd(kv * hd, &mut rng), rnd(kv * hd, &mut rng));
                        cache.write(l, s, p, &k, &v).unwrap();
                        ks[l].push(stored(k));
                        vs[l].push(stored(v));
                    }
                }
                done += n;
            }
            truth.push((ks, vs));
        }
        for (i, &s) in seqs.iter().enumerate() {
            let len = lens[i];
            for l in 0..layers {
                // Contiguous [kv, len, hd] from the per-position [kv, hd] writes.
                let relay = |src: &Vec<Vec<f32>>| -> Vec<f32> {
                    (0..kv)
                        .flat_map(|h| {
                            (0..len).flat_map(move |p| src[p][h * hd..(h + 1) * hd].to_vec())
                        })
                        .collect()
                };
                let (k, v) = (relay(&truth[i].0[l]), relay(&truth[i].1[l]));
                assert_eq!(cache.gather(l, s).unwrap(), (k.clone(), v.clone()));
                for pos in [0, len / 2, len - 1] {
                    let q = rnd(heads * hd, &mut rng);
                    let got = cache.attend(l, s, pos, &q, heads).unwrap();
                    let want = contiguous_attention(&k, &v, len, &q, Heads { heads, kv, hd }, pos);
                    assert!(
                        got.iter().all(|x| x.is_finite()),
                        "NaN leaked from an unused slot"
                    );
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-5, "{t:?} seq {i} layer {l} pos {pos}: {err}");
                }
                // A run of rows (a prompt chunk) gives each row what it gives alone, bit for
                // bit, with its queries strided as the step's `[n, heads, hd]` holds them.
                let (g, pos0) = (heads / kv, len / 3);
                let rows = len - pos0;
                let qs = rnd(rows * heads * hd, &mut rng);
                for kvh in 0..kv {
                    let mut run = vec![0f32; rows * g * hd];
                    let q = Queries {
                        q: &qs[kvh * g * hd..],
                        stride: heads * hd,
                        g,
                    };
                    cache.attend_rows(l, s, pos0, q, kvh, &mut run).unwrap();
                    // The plain loops: the same up to rounding (fused or not).
                    let mut plain = vec![0f32; rows * g * hd];
                    cache.rows::<Plain>(l, cache.seq(s).unwrap(), pos0, q, kvh, &mut plain);
                    let err = run
                        .iter()
                        .zip(&plain)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-5, "{t:?} plain loops, seq {i} layer {l}: {err}");
                    for r in 0..rows {
                        let at = (r * heads + kvh * g) * hd;
                        let mut alone = vec![0f32; g * hd];
                        let q = &qs[at..at + g * hd];
                        cache
                            .attend_group(l, s, pos0 + r, q, kvh, &mut alone)
                            .unwrap();
                        assert_eq!(
                            run[r * g * hd..(r + 1) * g * hd],
                            alone[..],
                            "{t:?} seq {i} layer {l} kv head {kvh} row {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fork_shares_blocks_and_copies_on_write_truncate_frees() {
        for t in [KvType::F32, KvType::F16] {
            fork_and_copy_on_write(t);
        }
    }

    fn fork_and_copy_on_write(t: KvType) {
        let (kv, hd, bs) = (1, 2, 4);
        let mut c = PagedKvCache::with_type(1, kv, hd, bs, t);
        let a = c.add_seq();
        let start = c.reserve(a, 6).unwrap();
        for p in start..6 {
            c.write(0, a, p, &[p as f32, 0.0], &[0.0, p as f32])
                .unwrap();
        }
        assert_eq!(c.blocks_in_use(), 2);
        let b = c.fork(a).unwrap();
        assert_eq!(c.blocks_in_use(), 2, "the fork shares the prefix");
        // b appends: its shared partial block is copied, a is untouched.
        let p = c.reserve(b, 1).unwrap();
        assert_eq!(p, 6);
        c.write(0, b, 6, &[60.0, 0.0], &[0.0, 60.0]).unwrap();
        assert_eq!(c.blocks_in_use(), 3);
        assert_eq!(c.len(a).unwrap(), 6);
        let (ka, _) = c.gather(0, a).unwrap();
        let (kb, _) = c.gather(0, b).unwrap();
        assert_eq!(&kb[..12], &ka[..12]);
        assert_eq!(kb[12], 60.0);
        // A write into a shared block without reserve is refused.
        let a2 = c.fork(a).unwrap();
        assert!(c.write(0, a2, 0, &[9.0, 9.0], &[9.0, 9.0]).is_err());
        // Rollback frees whole blocks; the freed block is reused.
        c.free_seq(a2).unwrap();
        c.truncate(b, 3).unwrap();
        assert_eq!(c.len(b).unwrap(), 3);
        assert_eq!(c.blocks_in_use(), 2);
        let before = c.pool_bytes();
        let s = c.add_seq();
        c.reserve(s, 4).unwrap();
        assert_eq!(
            c.pool_bytes(),
            before,
            "a freed block is reused, the pool does not grow"
        );
    }
}
