//! bf16 GEMM on the CPU with f32 accumulation, for mixed-precision training (`train.dtype =
//! "bf16"` on a CPU): `C[m, n] = A[m, k] @ B[n, k]^T` with A and B given in f32, rounded to bf16
//! (nearest even) as they are packed, products summed in f32. Beside the plain reference
//! [`matmul_nt_reference`] (the same rounding, then an f32 product) and a test comparing them.
//!
//! Two kernels, picked at run time ([`Bf16Kernel::detect`]; `TERN_ISA=amx|avx512bf16` forces
//! one), on the same packed operands: A row-major in bf16, B in pair panels (per 16 columns:
//! for each pair of k values, the 16 columns' (even, odd) bf16 pairs, 64 bytes). Each task
//! computes a 32 x 32 block of C over the whole of k. Either operand may come k-major
//! ([`Order`]), as a training backward holds `dy`, `x` and the weight: the packing transposes
//! (A) or interleaves (B) as it rounds, with no f32 transpose.
//! - Intel AMX-BF16 (`tdpbf16ps`: a 16 x 16 f32 tile += 16 x 32 bf16 by 32 x 16 bf16 in one
//!   instruction): four accumulator tiles per block.
//! - AVX512-BF16 (`vdpbf16ps`: 16 f32 lanes += the dot products of 16 bf16 pairs; Intel Xeon
//!   3rd generation (Cooper Lake) and later, AMD Zen 4 and later): per 8 rows of A, 8 x 2
//!   accumulator registers, each A pair broadcast against one 64-byte row of a B panel, which
//!   is why B's layout suits both kernels. The instruction flushes denormals (inputs and
//!   results) to zero, which stays within the reference comparison's bound.
//!
//! Other CPUs have no kernel here: [`available`] says so and the caller refuses bf16 with the
//! missing feature named.

use crate::kernels::amx::{release, Amx, TileConfig};
use rayon::prelude::*;

/// Rows and columns of C per task (2 x 2 tiles of 16).
const BLOCK: usize = 32;
/// k per tile multiply (bf16 values in a 64-byte tile row).
const KT: usize = 32;

/// Which instruction computes the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 registers (`vdpbf16ps`).
    Avx512Bf16,
}

impl Bf16Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Every kernel this CPU runs, fastest first (empty: no bf16 GEMM here).
    pub fn available() -> Vec<Bf16Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut v = Vec::new();
            // The packing is AVX-512 (F, BW) in both cases; every AMX CPU has it.
            let avx512 = crate::kernels::avx512f() && is_x86_feature_detected!("avx512bw");
            if avx512 && Amx::get().bf16 {
                v.push(Bf16Kernel::Amx);
            }
            if avx512 && is_x86_feature_detected!("avx512bf16") {
                v.push(Bf16Kernel::Avx512Bf16);
            }
            v
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }

    /// The fastest kernel this CPU runs; `TERN_ISA=amx|avx512bf16` picks one it has (another
    /// value, or one the CPU lacks, leaves the choice to detection). `None`: no bf16 GEMM here.
    pub fn detect() -> Option<Bf16Kernel> {
        static CHOSEN: std::sync::OnceLock<Option<Bf16Kernel>> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let all = Bf16Kernel::available();
            let forced = std::env::var("TERN_ISA")
                .ok()
                .and_then(|v| all.iter().copied().find(|k| k.name() == v));
            forced.or(all.first().copied())
        })
    }
}

/// Whether this CPU runs [`matmul_nt`] (AMX-BF16 with Linux's permission, or AVX512-BF16).
pub fn available() -> bool {
    Bf16Kernel::detect().is_some()
}

/// `f32` -> `bf16` bits, rounding to nearest even (NaN stays a quiet NaN).
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The plain reference: both inputs rounded to bf16, then an f32 product (sums in order).
pub fn matmul_nt_reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let r = |v: &[f32]| {
        v.iter()
            .map(|&x| from_bf16(to_bf16(x)))
            .collect::<Vec<f32>>()
    };
    let (a, b) = (r(a), r(b));
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
        }
    }
    c
}

/// `A[m, k] @ B[n, k]^T` (both row-major) in bf16 with f32 accumulation, on the kernel
/// [`Bf16Kernel::detect`] picks. Panics unless [`available`] (callers check it once and refuse
/// bf16 otherwise).
pub fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    matmul((a, Order::Rows), (b, Order::Rows), m, n, k)
}

/// [`matmul_nt`] on a given kernel, which must be one of [`Bf16Kernel::available`] (panics
/// otherwise: tests and benchmarks compare the kernels this way).
pub fn matmul_nt_with(
    kernel: Bf16Kernel,
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    matmul_with(kernel, (a, Order::Rows), (b, Order::Rows), m, n, k)
}

/// How an operand of `C[m, n] = A B^T` is stored. `Rows`: row-major over k (A as `[m][k]`, B as
/// `[n][k]`); `KMajor`: its transpose (A as `[k][m]`, B as `[k][n]`), which is how a training
/// backward finds `dy` and `x` for `dw = dy^T x` and the weight for `dx = dy W`. The packing
/// reads either order, so no f32 transpose is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Rows,
    KMajor,
}

/// `C[m, n] = A B^T` in bf16 with f32 accumulation, each operand given with its [`Order`], on
/// the kernel [`Bf16Kernel::detect`] picks (panics unless [`available`]).
pub fn matmul(a: (&[f32], Order), b: (&[f32], Order), m: usize, n: usize, k: usize) -> Vec<f32> {
    let kernel = Bf16Kernel::detect().expect("bf16 GEMM: this CPU has no AMX-BF16 or AVX512-BF16");
    matmul_with(kernel, a, b, m, n, k)
}

/// [`matmul`] on a given kernel, one of [`Bf16Kernel::available`].
pub fn matmul_with(
    kernel: Bf16Kernel,
    (a, a_order): (&[f32], Order),
    (b, b_order): (&[f32], Order),
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    assert!(
        Bf16Kernel::available().contains(&kernel),
        "bf16 GEMM: this CPU does not run the {} kernel",
        kernel.name()
    );
    assert_eq!(
        (a.len(), b.len()),
        (m * k, n * k),
        "bf16 GEMM operand sizes"
    );
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    let kp = k.next_multiple_of(KT);
    let (mp, np) = (m.next_multiple_of(BLOCK), n.next_multiple_of(BLOCK));
    let ap = match a_order {
        Order::Rows => pack_a(a, m, k, mp, kp),
        Order::KMajor => pack_a_kmajor(a, m, k, mp, kp),
    };
    let bp = match b_order {
        Order::Rows => pack_b(b, n, k, np, kp),
        Order::KMajor => pack_b_kmajor(b, n, k, np, kp),
    };
    let job = Packed {
        ap: &ap,
        bp: &bp,
        kp,
        m,
        n,
        out: OutPtr(c.as_mut_ptr()),
    };
    let (mb, nb) = (mp / BLOCK, np / BLOCK);
    if kernel == Bf16Kernel::Avx512Bf16 {
        #[cfg(target_arch = "x86_64")]
        (0..mb * nb).into_par_iter().for_each(|t| {
            let (i, j) = (t % mb, t / mb);
            // SAFETY: AVX512-BF16 and AVX-512 F/BW are available (checked above); tasks write
            // disjoint blocks of C.
            unsafe { x86::dp_block(&job, i * BLOCK, j * BLOCK) };
        });
        return c;
    }
    // The tile configuration is loaded once per worker and call (`for_each_init`); workers keep
    // it until their next AMX call loads its own.
    (0..mb * nb).into_par_iter().for_each_init(
        // SAFETY: AMX-BF16 is available (checked above).
        || unsafe { tile_config().load() },
        |_, t| {
            let (i, j) = (t % mb, t / mb);
            // SAFETY: AMX-BF16 is available (checked above) and this thread loaded the
            // configuration; tasks write disjoint blocks of C.
            unsafe { block(&job, i * BLOCK, j * BLOCK) };
        },
    );
    c
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes (one 32 x 32 block of C per task).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One GEMM's packed operands and its output, shared by its tasks (each writes its own block
/// of C).
struct Packed<'a> {
    /// A as bf16, `[mp][kp]` row-major ([`pack_a`]).
    ap: &'a [u16],
    /// B's 16-column pair panels ([`pack_b`]).
    bp: &'a [u32],
    kp: usize,
    /// C's true size (the packed operands are padded to whole blocks).
    m: usize,
    n: usize,
    out: OutPtr,
}

/// tmm0-3: C tiles (16 x 16 f32); tmm4, 5: A tiles (16 rows x 32 bf16); tmm6, 7: B tiles (16
/// pair rows x 16 columns).
fn tile_config() -> TileConfig {
    let mut c = TileConfig::new();
    for t in 0..8 {
        c = c.set(t, 16, 64);
    }
    c
}

/// A as bf16, row-major `[mp, kp]`, zero-padded.
fn pack_a(a: &[f32], m: usize, k: usize, mp: usize, kp: usize) -> Vec<u16> {
    let mut p = vec![0u16; mp * kp];
    p.par_chunks_mut(kp)
        .take(m)
        .enumerate()
        .for_each(|(i, row)| {
            let src = &a[i * k..(i + 1) * k];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a bf16 kernel runs only where AVX-512 F and BW are (`Bf16Kernel::available`);
            // `row` holds k values or more.
            unsafe {
                x86::round_row(src, row)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for (d, &x) in row.iter_mut().zip(src) {
                *d = to_bf16(x);
            }
        });
    p
}

/// A given k-major (`[k][m]`) packed as [`pack_a`] packs it row-major: per 16 rows of the
/// packed A, 16 x 16 blocks of the source transposed in registers.
fn pack_a_kmajor(a: &[f32], m: usize, k: usize, mp: usize, kp: usize) -> Vec<u16> {
    let mut p = vec![0u16; mp * kp];
    p.par_chunks_mut(16 * kp)
        .enumerate()
        .take(m.div_ceil(16))
        .for_each(|(blk, rows)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `pack_a`; `rows` holds 16 packed rows of kp values.
            unsafe {
                x86::transpose_rows(a, m, k, blk * 16, kp, rows)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for t in 0..k {
                for c in 0..16.min(m - blk * 16) {
                    rows[c * kp + t] = to_bf16(a[t * m + blk * 16 + c]);
                }
            }
        });
    p
}

/// B given k-major (`[k][n]`) packed as [`pack_b`] packs it: each pair row of a 16-column
/// panel is two consecutive source rows' 16 values, interleaved (no transpose needed).
fn pack_b_kmajor(b: &[f32], n: usize, k: usize, np: usize, kp: usize) -> Vec<u32> {
    let per_nb = kp / 2 * 16;
    let mut p = vec![0u32; np * kp / 2];
    p.par_chunks_mut(per_nb)
        .enumerate()
        .take(n.div_ceil(16))
        .for_each(|(nb, panel)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `pack_a`; `panel` holds kp / 2 rows of 16 pairs.
            unsafe {
                x86::interleave_panel(b, n, k, nb * 16, panel)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for q in 0..k.div_ceil(2) {
                for c in 0..16.min(n - nb * 16) {
                    let at = |t: usize| b[t * n + nb * 16 + c];
                    let hi = if 2 * q + 1 < k {
                        to_bf16(at(2 * q + 1))
                    } else {
                        0
                    };
                    panel[q * 16 + c] = to_bf16(at(2 * q)) as u32 | (hi as u32) << 16;
                }
            }
        });
    p
}

/// B in AMX's pair layout: per 16 columns (rows of B) and per 32 values of k, 16 rows of 64
/// bytes where row `p` holds, for each of the 16 columns, its values `2p` and `2p + 1`. Seen as
/// u32 pairs, a 16-column panel is `[k / 2][16]`: the pairs of those 16 rows of B, transposed.
fn pack_b(b: &[f32], n: usize, k: usize, np: usize, kp: usize) -> Vec<u32> {
    let per_nb = kp / 2 * 16; // pairs per 16-column panel
    let mut p = vec![0u32; np * kp / 2];
    p.par_chunks_mut(per_nb)
        .enumerate()
        .for_each(|(nb, panel)| {
            let cols = 16.min(n.saturating_sub(nb * 16));
            let rows: Vec<&[f32]> = (0..cols)
                .map(|c| &b[(nb * 16 + c) * k..(nb * 16 + c + 1) * k])
                .collect();
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `pack_a`; `panel` holds kp / 2 rows of 16 pairs.
            unsafe {
                x86::pair_panel(&rows, k, panel)
            };
            #[cfg(not(target_arch = "x86_64"))]
            for (q, out) in panel.chunks_exact_mut(16).take(k.div_ceil(2)).enumerate() {
                for (o, row) in out.iter_mut().zip(&rows) {
                    let hi = row.get(2 * q + 1).map_or(0, |&x| to_bf16(x)) as u32;
                    *o = to_bf16(row[2 * q]) as u32 | hi << 16;
                }
            }
        });
    p
}

/// The packing with AVX-512: 16 values rounded per instruction sequence (the same nearest-even
/// rounding and quiet NaN as `half::bf16::from_f32`), B's pairs transposed 16 x 16 in registers;
/// and the AVX512-BF16 block kernel.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 f32 -> 16 bf16 (as the low halves of 32-bit lanes).
    #[inline(always)]
    unsafe fn round16(v: __m512) -> __m512i {
        let x = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x40_0000)));
        _mm512_srli_epi32::<16>(r)
    }

    /// 16 values from `src` (fewer at its end: the rest read as 0).
    #[inline(always)]
    unsafe fn load16(src: &[f32], at: usize) -> __m512 {
        let left = src.len().saturating_sub(at).min(16);
        _mm512_maskz_loadu_ps(
            ((1u32 << left) - 1) as u16,
            src.as_ptr().add(at.min(src.len())),
        )
    }

    /// `src` rounded into the start of `dst`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
        for at in (0..src.len()).step_by(16) {
            let h = _mm512_cvtepi32_epi16(round16(load16(src, at)));
            let left = (src.len() - at).min(16);
            _mm256_mask_storeu_epi16(
                dst.as_mut_ptr().add(at) as *mut i16,
                ((1u32 << left) - 1) as u16,
                h,
            );
        }
    }

    /// Rows of A per register block: 8 x 2 accumulators, two B rows and a broadcast A pair
    /// fit AVX-512's 32 registers with room to spare.
    const DP_ROWS: usize = 8;

    /// One 32 x 32 block of C at (`i0`, `j0`) with `vdpbf16ps`, written where it falls inside
    /// `[m, n]`: for each pair of k values, one 64-byte row of each of the block's two B panels
    /// (16 columns' pairs) meets each A row's pair, broadcast.
    ///
    /// # Safety
    /// AVX512-BF16 and AVX-512 F available; `job`'s operands cover the block and no other task
    /// writes this block of its output.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dp_block(job: &super::Packed, i0: usize, j0: usize) {
        let (ap, bp, m, n, out) = (job.ap, job.bp, job.m, job.n, job.out.0);
        let pairs = job.kp / 2;
        // A's rows as pairs (u32), B's two panels of this block.
        let a32 = ap.as_ptr() as *const u32;
        let b0 = bp.as_ptr().add(j0 * pairs);
        let b1 = b0.add(16 * pairs);
        let cols = (n - j0).min(super::BLOCK);
        let (mask0, mask1) = (
            ((1u32 << cols.min(16)) - 1) as u16,
            ((1u32 << cols.saturating_sub(16)) - 1) as u16,
        );
        for r0 in (i0..(i0 + super::BLOCK).min(m)).step_by(DP_ROWS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; DP_ROWS];
            let arow = a32.add(r0 * pairs);
            for q in 0..pairs {
                let bq0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b0.add(q * 16) as *const _));
                let bq1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b1.add(q * 16) as *const _));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*arow.add(r * pairs + q) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], a, bq0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], a, bq1);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(m - r0) {
                let dst = out.add((r0 + r) * n + j0);
                _mm512_mask_storeu_ps(dst, mask0, acc[0]);
                // (wrapping: past the last row's end when the block has 16 columns or fewer, not written)
                _mm512_mask_storeu_ps(dst.wrapping_add(16), mask1, acc[1]);
            }
        }
    }

    /// Packed rows `i0..i0 + 16` of A from its k-major source `a` (`[k][m]`) into `rows` (16
    /// rows of `kp` bf16): per 16 values of k, 16 source runs of 16 rounded, then transposed.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn transpose_rows(
        a: &[f32],
        m: usize,
        k: usize,
        i0: usize,
        kp: usize,
        rows: &mut [u16],
    ) {
        let cols = (m - i0).min(16);
        for t0 in (0..k).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (dt, reg) in r.iter_mut().enumerate().take(k - t0) {
                let at = (t0 + dt) * m + i0;
                *reg = _mm512_castsi512_ps(round16(load16(&a[at..at + cols], 0)));
            }
            let t = crate::kernels::amx::transpose16(r);
            for (c, v) in t.iter().enumerate().take(cols) {
                let h = _mm512_cvtepi32_epi16(_mm512_castps_si512(*v));
                // t0 + 16 <= kp (kp is a multiple of 32 and t0 < k).
                _mm256_storeu_si256(rows.as_mut_ptr().add(c * kp + t0) as *mut __m256i, h);
            }
        }
    }

    /// The 16-column panel of B at column `j0` from its k-major source `b` (`[k][n]`): pair row
    /// `q` is source rows 2q (low halves) and 2q + 1 (high halves), 16 columns each, rounded.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn interleave_panel(b: &[f32], n: usize, k: usize, j0: usize, panel: &mut [u32]) {
        let cols = (n - j0).min(16);
        let row = |t: usize| &b[t * n + j0..t * n + j0 + cols];
        for q in 0..k.div_ceil(2) {
            let lo = round16(load16(row(2 * q), 0));
            let hi = if 2 * q + 1 < k {
                _mm512_slli_epi32::<16>(round16(load16(row(2 * q + 1), 0)))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_storeu_si512(
                panel.as_mut_ptr().add(q * 16) as *mut _,
                _mm512_or_si512(lo, hi),
            );
        }
    }

    /// Up to 16 rows of B (`rows`, k values each) as a `[kp / 2][16]` panel of bf16 pairs.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pair_panel(rows: &[&[f32]], k: usize, panel: &mut [u32]) {
        for q0 in (0..k).step_by(32) {
            // Row c's 32 values from q0 as 16 pairs, one register per row.
            let mut r = [_mm512_setzero_ps(); 16];
            for (c, row) in rows.iter().enumerate() {
                let lo = _mm512_cvtepi32_epi16(round16(load16(row, q0)));
                let hi = _mm512_cvtepi32_epi16(round16(load16(row, q0 + 16)));
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                r[c] = _mm512_castsi512_ps(both);
            }
            let t = crate::kernels::amx::transpose16(r);
            let out = panel.as_mut_ptr().add(q0 / 2 * 16) as *mut f32;
            for (p, v) in t.iter().enumerate().take((k - q0).div_ceil(2).min(16)) {
                _mm512_storeu_ps(out.add(p * 16), *v);
            }
        }
    }
}

/// One 32 x 32 block of C at (`i0`, `j0`), written where it falls inside `[m, n]`.
///
/// # Safety
/// AMX-BF16 available and [`tile_config`] loaded on this thread; `job`'s operands cover the
/// block and no other task writes this block of its output.
unsafe fn block(job: &Packed, i0: usize, j0: usize) {
    let (ap, bp, kp, m, n, out) = (job.ap, job.bp, job.kp, job.m, job.n, job.out);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::asm;
        let mut c = [0f32; BLOCK * BLOCK];
        let a0 = ap.as_ptr().add(i0 * kp);
        let a1 = a0.add(16 * kp);
        let b0 = bp.as_ptr().add(j0 * kp / 2);
        let b1 = b0.add(16 * kp / 2);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for kb in 0..kp / KT {
            asm!(
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(kb * KT),
                a1 = in(reg) a1.add(kb * KT),
                sa = in(reg) kp * 2,
                b0 = in(reg) b0.add(kb * KT / 2 * 16),
                b1 = in(reg) b1.add(kb * KT / 2 * 16),
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        let cp = c.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s} * 1], tmm0",
            "tilestored [{c1} + {s} * 1], tmm1",
            "tilestored [{c2} + {s} * 1], tmm2",
            "tilestored [{c3} + {s} * 1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(16),
            c2 = in(reg) cp.add(16 * BLOCK),
            c3 = in(reg) cp.add(16 * BLOCK + 16),
            s = in(reg) BLOCK * 4,
            options(nostack),
        );
        for r in 0..BLOCK.min(m - i0) {
            let cols = BLOCK.min(n - j0);
            let dst = out.0.add((i0 + r) * n + j0);
            std::ptr::copy_nonoverlapping(c.as_ptr().add(r * BLOCK), dst, cols);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ap, bp, kp, i0, j0, m, n, out.0);
        unreachable!("bf16 GEMM without AMX");
    }
}

/// Releases this thread's tile state (tests and callers that want it back early).
pub fn release_tiles() {
    if Amx::get().bf16 {
        // SAFETY: AMX available.
        unsafe { release() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 1.7)
            .collect()
    }

    /// (m, n, k): every remainder of the 32 x 32 blocks, the 16-wide panels and rows, the
    /// 32-value k steps and the pairs (odd k).
    const ODD_SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (37, 45, 70),
        (16, 32, 32),
        (16, 32, 33),
        (64, 33, 100),
        (5, 200, 257),
        (41, 17, 64),
        (33, 48, 15),
    ];

    /// Odd shapes (every tile remainder: m, n not multiples of 16 or 32, k not of 32) within
    /// f32 summation-order error of the reference on the same bf16-rounded inputs.
    #[test]
    fn bf16_gemm_kernels_match_the_reference_on_odd_shapes() {
        let kernels = Bf16Kernel::available();
        if kernels.is_empty() {
            eprintln!("SKIP: no AMX-BF16 or AVX512-BF16 on this CPU");
            return;
        }
        for kernel in kernels {
            eprintln!("kernel {}", kernel.name());
            for (m, n, k) in ODD_SHAPES {
                let (a, b) = (input(m * k, 1), input(n * k, 2));
                let want = matmul_nt_reference(&a, &b, m, n, k);
                let got = matmul_nt_with(kernel, &a, &b, m, n, k);
                for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                    // |sum| <= sum |a||b|; f32 reassociation error <= k * eps * sum |a||b|.
                    let (i, j) = (idx / n, idx % n);
                    let mag: f32 = (0..k).map(|t| (a[i * k + t] * b[j * k + t]).abs()).sum();
                    let tol = 1e-6 * k as f32 * mag + 1e-6;
                    assert!(
                        (g - w).abs() <= tol,
                        "{} [{m},{n},{k}] ({i},{j}): {g} vs {w}",
                        kernel.name()
                    );
                }
            }
        }
        release_tiles();
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| v[(i % rows) * cols + i / rows])
            .collect()
    }

    /// Operands given k-major (as a training backward holds them) pack to the same bf16
    /// values as their row-major transposes: every order gives the same bits, tails included.
    #[test]
    fn k_major_operands_give_the_row_major_product_exactly() {
        for kernel in Bf16Kernel::available() {
            for (m, n, k) in ODD_SHAPES {
                let (a, b) = (input(m * k, 3), input(n * k, 4));
                let (at, bt) = (transpose(&a, m, k), transpose(&b, n, k));
                let want = matmul_nt_with(kernel, &a, &b, m, n, k);
                for (ao, bo) in [
                    (Order::KMajor, Order::Rows),
                    (Order::Rows, Order::KMajor),
                    (Order::KMajor, Order::KMajor),
                ] {
                    let a_in = if ao == Order::KMajor { &at } else { &a };
                    let b_in = if bo == Order::KMajor { &bt } else { &b };
                    let got = matmul_with(kernel, (a_in, ao), (b_in, bo), m, n, k);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{} {ao:?} x {bo:?} [{m},{n},{k}]",
                        kernel.name()
                    );
                }
            }
        }
        release_tiles();
    }

    /// The vector packing rounds exactly as `half` (ties to even, NaN quiet, infinities, the
    /// largest finite values rounding up to infinity, subnormals), tail included.
    #[test]
    fn packed_values_round_as_half_does() {
        // The x86 packing is AVX-512 (every AMX CPU has it); an AVX2-only CPU (AMD Zen 2)
        // never packs, and would stop on an illegal instruction here.
        #[cfg(target_arch = "x86_64")]
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            eprintln!("SKIP: the bf16 packing needs AVX-512 F and BW");
            return;
        }
        let specials = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -1.0 - 1.0 / 256.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            -0.0,
            65504.5,
        ];
        let mut a: Vec<f32> = (0..4000)
            .map(|i| f32::from_bits(0x3f80_0000 + i * 977))
            .collect();
        a.extend(specials);
        let p = pack_a(&a, 1, a.len(), 1, a.len().next_multiple_of(KT));
        for (x, got) in a.iter().zip(&p) {
            let want = to_bf16(*x);
            let nan = from_bf16(want).is_nan() && from_bf16(*got).is_nan();
            assert!(*got == want || nan, "{x}: {got:#06x} vs {want:#06x}");
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), to_bf16(1.0));
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }
}
