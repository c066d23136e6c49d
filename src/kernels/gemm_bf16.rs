//! bf16 GEMM on the CPU with f32 accumulation, for mixed-precision training (`train.dtype =
//! "bf16"` on a CPU): `C[m, n] = A[m, k] @ B[n, k]^T` with A and B given in f32, rounded to bf16
//! (nearest even) as they are packed, products summed in f32. Beside the plain reference
//! [`matmul_nt_reference`] (the same rounding, then an f32 product) and a test comparing them.
//!
//! Kernel: Intel AMX-BF16 (`tdpbf16ps`: a 16 x 16 f32 tile += 16 x 32 bf16 by 32 x 16 bf16 in
//! one instruction). Each task computes a 32 x 32 block of C in four accumulator tiles over the
//! whole of k, from A packed row-major in bf16 and B packed in AMX's pair layout (per 16
//! columns and 32 values of k: 16 rows of 16 (even, odd) bf16 pairs). Other CPUs have no kernel
//! here: [`available`] says so and the caller refuses bf16 with the missing feature named.

use crate::kernels::amx::{release, Amx, TileConfig};
use rayon::prelude::*;

/// Rows and columns of C per task (2 x 2 tiles of 16).
const BLOCK: usize = 32;
/// k per tile multiply (bf16 values in a 64-byte tile row).
const KT: usize = 32;

/// Whether this CPU runs [`matmul_nt`] (AMX-BF16, with Linux's permission).
pub fn available() -> bool {
    Amx::get().bf16
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

/// `A[m, k] @ B[n, k]^T` (both row-major) in bf16 with f32 accumulation. Panics unless
/// [`available`] (callers check it once and refuse bf16 otherwise).
pub fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(available(), "bf16 GEMM: this CPU has no AMX-BF16");
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
    let ap = pack_a(a, m, k, mp, kp);
    let bp = pack_b(b, n, k, np, kp);
    let out = OutPtr(c.as_mut_ptr());
    let (mb, nb) = (mp / BLOCK, np / BLOCK);
    // The tile configuration is loaded once per worker and call (`for_each_init`); workers keep
    // it until their next AMX call loads its own.
    (0..mb * nb).into_par_iter().for_each_init(
        // SAFETY: AMX-BF16 is available (asserted above).
        || unsafe { tile_config().load() },
        |_, t| {
            let (i, j) = (t % mb, t / mb);
            // SAFETY: AMX-BF16 is available (asserted above) and this thread loaded the
            // configuration; tasks write disjoint blocks of C.
            unsafe { block(&ap, &bp, kp, i * BLOCK, j * BLOCK, m, n, out) };
        },
    );
    c
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes (one 32 x 32 block of C per task).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

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
            // SAFETY: AMX-BF16 CPUs have AVX-512 (F, BW); `row` holds k values or more.
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
/// rounding and quiet NaN as `half::bf16::from_f32`), B's pairs transposed 16 x 16 in registers.
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
/// AMX-BF16 available and [`tile_config`] loaded on this thread; `out` points to `m * n` f32
/// of which no other task writes this block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    ap: &[u16],
    bp: &[u32],
    kp: usize,
    i0: usize,
    j0: usize,
    m: usize,
    n: usize,
    out: OutPtr,
) {
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
    if available() {
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

    /// Odd shapes (every tile remainder: m, n not multiples of 16 or 32, k not of 32) within
    /// f32 summation-order error of the reference on the same bf16-rounded inputs.
    #[test]
    fn amx_bf16_gemm_matches_the_reference_on_odd_shapes() {
        if !available() {
            eprintln!("SKIP: no AMX-BF16 on this CPU");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (37, 45, 70),
            (16, 32, 32),
            (64, 33, 100),
            (5, 200, 257),
        ] {
            let (a, b) = (input(m * k, 1), input(n * k, 2));
            let want = matmul_nt_reference(&a, &b, m, n, k);
            let got = matmul_nt(&a, &b, m, n, k);
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                // |sum| <= sum |a||b|; f32 reassociation error <= k * eps * sum |a||b|.
                let (i, j) = (idx / n, idx % n);
                let mag: f32 = (0..k).map(|t| (a[i * k + t] * b[j * k + t]).abs()).sum();
                let tol = 1e-6 * k as f32 * mag + 1e-6;
                assert!((g - w).abs() <= tol, "[{m},{n},{k}] ({i},{j}): {g} vs {w}");
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
