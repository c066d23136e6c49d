//! Matrix multiply straight from packed 2-bit ternary weights with int8 activations, for
//! inference from an exported GGUF (Q2_0 / PQ2_0) without a dense copy of the weights.
//!
//! `y[n, rows] = x[n, cols] @ W^T`, W ternary (codes t in {-1, 0, +1}, one scale per 64
//! weights). Three steps:
//!
//! 1. Load time, [`PackedMatrix::new`]: each row is repacked into super-blocks of 128 weights:
//!    32 bytes of codes `q = t + 1` in {0, 1, 2} where byte `l` holds the codes of elements
//!    `l, l + 32, l + 64, l + 96` at bits 0, 2, 4, 6. Shifting the 32 bytes by 2k and masking
//!    with 3 then yields elements `32k .. 32k + 32` in order: one vector load and four shift/and
//!    pairs unpack 128 weights, with no shuffles. The scales (one per 64 weights, or one per
//!    super-block where a row's two 64-blocks share it: every tern export) are kept once each,
//!    f32 by default (the file's values bit for bit: 2.25 bits per weight for a tern export,
//!    2.5 for a file with a scale per 64). `tern --scales byte`
//!    (`TERN_SCALES=byte`) keeps one byte each instead ([`ByteScales`]: relative to the row's
//!    smallest scale, the f32 bit pattern rounded to 5-10 mantissa bits), so a tern export is
//!    resident in 2 + 8/128 + 32/cols bits per weight (2.09 at 1024 columns, against 2.06 for
//!    llama.cpp's TQ2_0). Each task then expands its rows' bytes into f32 (at most 64 rows,
//!    into L1) before the kernels run, so the kernels read f32 scales either way; the
//!    expansion costs 1-thread decode 5-12% on a Zen 4 whose kernel is bound by its operations,
//!    not its bytes (NOTES.md, session 22), hence opt-in. (Expanding the file's f16 scales
//!    once per row and block cost 18%: session 8.)
//! 2. Per call, [`QuantizedRows::new`]: each activation row is quantized per 32 values (one
//!    code plane), absmax to int8 (`x ~ s * xq`, s >= max|x| / 127), as llama.cpp's Q8_0 does,
//!    with each group's `s * sum(xq)` kept for the correction below. Every step `s` of a row is
//!    an exact integer multiple `m * unit` of one per-row unit (m <= 32767, at most 3e-5 over
//!    max|x| / 127 for the row's largest group: [`group_steps`]), so the 256-bit kernels
//!    (AVX2, AVX-VNNI) can scale a group's integer dot by `m` in integers and convert once per
//!    super-block. For the x86 vector kernels the values are laid out in [`ActOrder`] and
//!    the codes unpacked to match, so that every lane of their integer dots holds one group.
//!    (Per 128 values made prefill 15% faster but put 1.1% of the trained tiny model's top
//!    tokens off the f32 model's; NOTES.md.)
//! 3. The dot products in integers: `sum_j t_j xq_j = sum_j q_j xq_j - sum_j xq_j`, where the
//!    first sum is exactly what `maddubs` (u8 x i8, AVX2) or `dpbusd` (AVX-512 VNNI / AVX-VNNI)
//!    compute; with one step per token (`act_quant = "per_token"`) a weight-scale block's groups
//!    add in integers before one conversion; otherwise each group's integer dot is scaled by its
//!    activation scale (in chunk order a super-block's four groups sit in different lanes of
//!    one dot: one multiply by the step lanes, or on 256-bit one `vpmaddwd` by the multiples,
//!    scales all four), a 64-block's correction is subtracted once, and the block's weight
//!    scale multiplies into an f32 accumulator. Several tokens share one unpacking of the
//!    codes (tiles of up to 4 tokens; on AVX-512 VNNI 2 rows x 4 tokens share the activation
//!    loads too), so prefill is a packed GEMM, not a loop of matrix-vector products. Matrices
//!    that read the same input (q/k/v, gate/up) share one quantization and one parallel region
//!    ([`matmul_many`]).
//!
//! Kernels: AVX-512 VNNI (512-bit, `avx512vnni` + `avx512bw`), AVX-VNNI, AVX2, NEON with
//! `sdot` (AArch64; signed codes `t = q - 1`, so it needs no correction), and a portable one
//! written to auto-vectorize; [`Isa::detect`] picks one at run time, and every one is tested
//! against [`matmul_reference`] (dequantize, then f32) and against the portable kernel on odd
//! shapes. On a GPU the same layout maps to `dp4a` / IMMA with the planes unpacked in registers.

use crate::quant::codec::Packing;
use crate::quant::ActQuant;
use rayon::prelude::*;

/// Weights per super-block (one 32-byte vector of 2-bit codes).
const SB: usize = 128;
/// Weights per scale in the file's Q2_0 blocks (a super-block has two).
const BLK: usize = 64;
/// Activation values per int8 quantization group (one code plane of a super-block).
const GROUP: usize = 32;
/// f32 lanes of a 64-block's activation scales (`QuantizedRows::lanes`).
const LANES: usize = 16;
/// Tokens that share one unpacking of a row's codes.
const TILE: usize = 4;
/// The same for the AVX2 kernel with per-token inputs, whose multiplies compete with the
/// unpacking's shifts for the same two ports: 8 accumulators, 4 code planes and a mask fit its
/// 16 registers (`tern bench gemm` [64 x 1024] @ [3072 x 1024]^T, CPU B: 3.07-3.11 -> 2.84-2.88
/// ms). With per-32 inputs, whose multiples take registers too, and on AVX-VNNI, 8 tokens
/// measured level to 5% slower, so those keep [`TILE`].
const TILE_AVX2: usize = 8;
/// Rows that share one load of a token's activations (decode).
const ROWS: usize = 4;
/// Fewest tokens for which `Isa::Amx` runs its tiles (fewer run the AVX-512 VNNI kernels: a
/// call costs AMX about the same from 2 to 8 tokens, the weights' unpacking; `tern bench gemm`
/// at [3072, 1024] on 1 thread, AMX vs VNNI: 2 tokens 0.155 vs 0.107 ms, 3 0.156 vs 0.148, 4
/// 0.148 vs 0.162-0.176, 5 0.150 vs 0.238, 8 0.16 vs 0.34; at 4 the two are within noise).
pub const AMX_MIN_TOKENS: usize = 5;
/// Rows that share each token's activation loads in a prefill tile (AVX-512 VNNI: 2 rows x 4
/// tokens keep 8 accumulators, 4 code planes and 2 activation vectors in registers).
const PAIR: usize = 2;

/// A byte of four 2-bit codes -> the four codes in the low bits of four bytes (little endian).
const SPREAD: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            t[b] |= (((b >> (2 * k)) & 3) as u32) << (8 * k);
            k += 1;
        }
        b += 1;
    }
    t
};

/// The instruction set a kernel uses, chosen once per call by CPU feature detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Intel AMX-INT8 tiles for several tokens at once ([`AMX_MIN_TOKENS`] or more: prefill,
    /// batched decode), AVX-512 VNNI for one token.
    Amx,
    Avx512Vnni,
    AvxVnni,
    Avx2,
    /// AArch64 NEON with the dot-product extension (`sdot`: Apple M1 and later, Graviton 2+).
    NeonDot,
    Portable,
}

impl Isa {
    /// The fastest kernel this CPU runs (`TERN_ISA=portable|avx2|avxvnni|avx512vnni|amx|neondot`
    /// overrides, for benchmarks and tests; an ISA the CPU lacks falls back to detection).
    pub fn detect() -> Isa {
        // Decided once per process: every matmul asks (several per layer and token), and the
        // environment lookup and feature list need not be repeated.
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let all = Isa::available();
            let forced = std::env::var("TERN_ISA")
                .ok()
                .and_then(|v| all.iter().copied().find(|i| i.name() == v));
            forced.unwrap_or(all[0])
        })
    }

    /// Every ISA this CPU can run, fastest first (always ends with `Portable`).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
            {
                if crate::kernels::amx::Amx::get().int8 {
                    v.push(Isa::Amx);
                }
                v.push(Isa::Avx512Vnni);
            }
            if is_x86_feature_detected!("avxvnni") {
                v.push(Isa::AvxVnni);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(Isa::NeonDot);
        }
        v.push(Isa::Portable);
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx2 => "avx2",
            Isa::NeonDot => "neondot",
            Isa::Portable => "portable",
        }
    }
}

/// How a [`PackedMatrix`] keeps its weight scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleStore {
    /// f32, exactly the file's values: 2.25 bits per weight with a scale per 128 (tern's
    /// exports), 2.5 with one per 64.
    F32,
    /// One byte per scale ([`ByteScales`]), f32 where a row's scales span too many octaves:
    /// 2.09 bits per weight at 1024 columns with one scale per 128. Decode pays for expanding
    /// them each token (5-12% at 1 thread on a Zen 4, NOTES.md), so it is opt-in.
    Byte,
}

impl ScaleStore {
    /// The names `tern --scales` and `TERN_SCALES` take, in [`ScaleStore::from_name`]'s order.
    pub const NAMES: [&'static str; 2] = ["f32", "byte"];

    /// The store a name in [`ScaleStore::NAMES`] stands for.
    pub fn from_name(name: &str) -> Option<ScaleStore> {
        match name {
            "f32" => Some(ScaleStore::F32),
            "byte" => Some(ScaleStore::Byte),
            _ => None,
        }
    }

    /// What `TERN_SCALES` names (`tern --scales` sets it), `F32` where unset. The binary
    /// refuses any other value before anything loads; a library user's typo falls back to
    /// `F32`.
    pub fn chosen() -> ScaleStore {
        static CHOSEN: std::sync::OnceLock<ScaleStore> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            std::env::var("TERN_SCALES")
                .ok()
                .and_then(|v| ScaleStore::from_name(&v))
                .unwrap_or(ScaleStore::F32)
        })
    }
}

/// The stored scales: f32 in the kernels' layout, or bytes expanded per call.
#[derive(Clone, Debug)]
enum Scales {
    /// `rows * per` ([`PackedMatrix::per`]: one per super-block where wide, else one per
    /// 64-block, 0 for the padding block of an odd block count).
    F32(Vec<f32>),
    Byte(ByteScales),
}

/// Mantissa bits a byte scale can keep, as shifts of the f32 bit pattern, most bits first:
/// 10 (f16's: rows whose scales span under a quarter octave, and every row with one scale,
/// stay exact) down to 5 (relative error <= 2^-6 for rows spanning up to 7.9 octaves). A
/// matrix with a row wider than that keeps f32.
const BYTE_SHIFTS: std::ops::RangeInclusive<u32> = 13..=18;
/// The byte code of a zero scale (the padding block of an odd block count, an all-zero group).
const BYTE_ZERO: u8 = 255;

/// One byte per weight scale: each row keeps its smallest nonzero scale as an f32 `factor`,
/// and each scale as `factor * t` with `t` in [1, 2^(255 / 2^(23 - shift))): `t`'s f32 bit
/// pattern, rounded to nearest at bit `shift` (so `23 - shift` mantissa bits stay), less 1.0's,
/// is the code; code 255 is the scale 0. A byte keeps a relative precision of
/// `2^(shift - 24)` over 255 steps (llama.cpp's K-quants make the same trade with 6-bit
/// sub-block scales). Expanding is a widening, an add and a shift of a whole task's codes as
/// one stream (no per-row work, no table, no exp); the kernels run on the `t` values and each
/// output is multiplied by its row's factor. The matrix takes the most mantissa bits that fit
/// every row's span.
#[derive(Clone, Debug)]
pub struct ByteScales {
    /// Per row `per` codes (one per super-block where wide, else per 64-block).
    codes: Vec<u8>,
    /// Per row: its smallest nonzero scale, which the expanded values are multiplied by.
    factor: Vec<f32>,
    shift: u32,
    per: usize,
}

impl ByteScales {
    /// Codes for `vals` (rows of `per` scales), or `None` where a scale is negative or not
    /// finite, or a row spans more than 255 steps even at the coarsest shift.
    pub fn encode(vals: &[f32], per: usize) -> Option<ByteScales> {
        if per == 0 || vals.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return None;
        }
        BYTE_SHIFTS
            .into_iter()
            .find_map(|shift| Self::encode_at(vals, per, shift))
    }

    fn encode_at(vals: &[f32], per: usize, shift: u32) -> Option<ByteScales> {
        let one = 1f32.to_bits() >> shift;
        let code = |t: f32| ((t.to_bits() + (1 << (shift - 1))) >> shift).checked_sub(one);
        let rows = vals.len() / per;
        let (mut codes, mut factor) = (vec![BYTE_ZERO; rows * per], vec![1f32; rows]);
        for ((row, c), f) in vals
            .chunks_exact(per)
            .zip(codes.chunks_exact_mut(per))
            .zip(&mut factor)
        {
            let nonzero = row.iter().copied().filter(|s| *s != 0.0);
            let Some(lo) = nonzero.reduce(f32::min) else {
                continue; // an all-zero row
            };
            *f = lo;
            for (c, s) in c.iter_mut().zip(row).filter(|(_, s)| **s != 0.0) {
                match code(s / lo) {
                    Some(k) if k < BYTE_ZERO as u32 => *c = k as u8,
                    _ => return None,
                }
            }
        }
        Some(ByteScales {
            codes,
            factor,
            shift,
            per,
        })
    }

    /// The offset added to a code before its shift (code 0 is 1.0).
    fn k(&self) -> u32 {
        1f32.to_bits() >> self.shift
    }

    /// Scale `i` of row `r`.
    pub fn get(&self, r: usize, i: usize) -> f32 {
        Self::value(self.codes[r * self.per + i], self.k(), self.shift) * self.factor[r]
    }

    /// A code's value before its row's factor.
    #[inline(always)]
    fn value(code: u8, k: u32, shift: u32) -> f32 {
        if code == BYTE_ZERO {
            0.0
        } else {
            f32::from_bits((code as u32 + k) << shift)
        }
    }

    /// Rows `rows` as f32 (the kernels' layout: `per` each), before their factors. Decode
    /// expands every scale of the model once per token, so 16 at a time on AVX-512 and 8 on
    /// AVX2 (the plain loop cost AVX2 decode a quarter: NOTES.md).
    fn expand(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let codes = &self.codes[rows.start * self.per..rows.end * self.per];
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::avx512f()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were just detected; the function checks `out`'s length.
            return unsafe { x86::expand_scales_avx512(codes, self.k(), self.shift, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { x86::expand_scales_avx2(codes, self.k(), self.shift, out) };
        }
        Self::expand_plain(codes, self.k(), self.shift, out);
    }

    /// The plain loop of [`ByteScales::expand`] (the reference for the AVX-512 and AVX2 ones).
    fn expand_plain(codes: &[u8], k: u32, shift: u32, out: &mut [f32]) {
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = Self::value(c, k, shift);
        }
    }
}

/// A `[rows, cols]` ternary matrix in the kernel layout (module doc, step 1).
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    /// `rows * sbs * 32` bytes of codes.
    codes: Vec<u8>,
    /// The weight scales (one per 64-block, or per super-block where `wide`), as stored.
    scales: Scales,
    pub rows: usize,
    pub cols: usize,
    /// Super-blocks per row.
    sbs: usize,
    /// Every row's two 64-block scales per super-block are equal (tern's group-128 exports):
    /// a super-block's two blocks are then added before one weight-scale multiply, not two.
    wide: bool,
    /// How its input is quantized: what the model was trained with (`tern.act_quant`), or
    /// what `tern --act-quant` asks for.
    pub act_quant: ActQuant,
}

impl PackedMatrix {
    /// Repacks `rows` rows of GGUF blocks (`bytes`, row-major) into the kernel layout, the
    /// scales kept as [`ScaleStore::chosen`] says.
    pub fn new(bytes: &[u8], rows: usize, cols: usize, packing: Packing) -> crate::Result<Self> {
        Self::with_scales(bytes, rows, cols, packing, ScaleStore::chosen())
    }

    /// [`PackedMatrix::new`] with the scales kept as `store` says.
    pub fn with_scales(
        bytes: &[u8],
        rows: usize,
        cols: usize,
        packing: Packing,
        store: ScaleStore,
    ) -> crate::Result<Self> {
        let rb = packing.row_bytes(cols);
        if !cols.is_multiple_of(packing.block()) || bytes.len() < rows * rb {
            return Err(crate::Error::Msg(format!(
                "packed matrix [{rows}, {cols}] ({packing:?}) does not fit its {} bytes",
                bytes.len()
            )));
        }
        let sbs = cols.div_ceil(SB);
        let mut codes = vec![0u8; rows * sbs * 32];
        let mut scales = vec![0f32; rows * sbs * 2];
        let (bb, per) = (packing.block_bytes(), packing.block() / BLK);
        codes
            .par_chunks_mut(sbs * 32)
            .zip(scales.par_chunks_mut(sbs * 2))
            .enumerate()
            .for_each(|(r, (c, s))| {
                for (fb, blk) in bytes[r * rb..(r + 1) * rb].chunks_exact(bb).enumerate() {
                    let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                    for k in 0..per {
                        s[fb * per + k] = d; // Q2_0: one scale per 64, PQ2_0: per 128
                    }
                    // Source byte i of the block holds elements 4i..4i+3 (2 bits each, in order);
                    // in the super-block they sit in plane e / 32 of bytes e % 32 .. e % 32 + 3.
                    for (i, &byte) in blk[2..].iter().enumerate() {
                        let e = fb * packing.block() + 4 * i; // element index in the row
                        let (sb, within) = (e / SB, e % SB);
                        let spread = SPREAD[byte as usize] << (2 * (within / 32));
                        let at = sb * 32 + within % 32;
                        let dst =
                            u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]) | spread;
                        c[at..at + 4].copy_from_slice(&dst.to_le_bytes());
                    }
                }
            });
        let wide = cols.is_multiple_of(SB)
            && scales
                .chunks_exact(2)
                .all(|p| p[0].to_bits() == p[1].to_bits());
        // A wide row keeps its one scale per super-block once: 4 bytes per 128 weights, where
        // keeping it twice (the kernels read two per super-block) cost a tern export 2.5 bits
        // per weight instead of 2.25.
        let kept: Vec<f32> = match wide {
            true => scales.iter().step_by(2).copied().collect(),
            false => scales,
        };
        let scales = match store {
            ScaleStore::F32 => Scales::F32(kept),
            ScaleStore::Byte => match ByteScales::encode(&kept, if wide { sbs } else { 2 * sbs }) {
                Some(b) => Scales::Byte(b),
                None => Scales::F32(kept),
            },
        };
        Ok(Self {
            codes,
            scales,
            rows,
            cols,
            sbs,
            wide,
            act_quant: ActQuant::None,
        })
    }

    /// Resident bytes of the repacked codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len()
            + match &self.scales {
                Scales::F32(s) => 4 * s.len(),
                Scales::Byte(b) => b.codes.len() + 4 * b.factor.len(),
            }
    }

    /// Weight scales per row: one per super-block where wide, else one per 64-block.
    fn per(&self) -> usize {
        if self.wide {
            self.sbs
        } else {
            2 * self.sbs
        }
    }

    /// Which scale of its row weight `j` of a row is multiplied by.
    fn scale_index(&self, j: usize) -> usize {
        if self.wide {
            j / SB
        } else {
            j / BLK
        }
    }

    /// How the scales are kept: `f32`, or `byte/M` (M mantissa bits kept).
    pub fn scale_format(&self) -> String {
        match &self.scales {
            Scales::F32(_) => "f32".into(),
            Scales::Byte(b) => format!("byte/{}", 23 - b.shift),
        }
    }

    /// The weight scales of `rows`, [`PackedMatrix::per`] each (the kernels' layout), and each
    /// row's factor the kernels' outputs are multiplied by (none with f32 scales): the stored
    /// f32 slice itself, or byte scales expanded into `buf`.
    fn scales_of<'a>(
        &'a self,
        rows: std::ops::Range<usize>,
        buf: &'a mut Vec<f32>,
    ) -> (&'a [f32], Option<&'a [f32]>) {
        let per = self.per();
        match &self.scales {
            Scales::F32(s) => (&s[rows.start * per..rows.end * per], None),
            Scales::Byte(b) => {
                // Grown once per thread, never cleared: `expand` writes every value it returns.
                let need = rows.len() * per;
                if buf.len() < need {
                    buf.resize(need, 0.0);
                }
                let buf = &mut buf[..need];
                b.expand(rows.clone(), buf);
                (buf, Some(&b.factor[rows]))
            }
        }
    }

    /// The stored bytes of `rows`: their codes, and their scales as stored (f32 or byte codes),
    /// for prefetching (the AMX kernel's).
    #[cfg(target_arch = "x86_64")]
    fn bytes_of(&self, rows: std::ops::Range<usize>) -> [&[u8]; 2] {
        let cb = self.sbs * 32;
        let codes = &self.codes[rows.start * cb..rows.end * cb];
        let scales: &[u8] = match &self.scales {
            Scales::F32(s) => {
                let per = self.per();
                let s = &s[rows.start * per..rows.end * per];
                // SAFETY: any f32 slice is a valid byte slice of four times its length.
                unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, 4 * s.len()) }
            }
            Scales::Byte(b) => &b.codes[rows.start * b.per..rows.end * b.per],
        };
        [codes, scales]
    }

    /// Row `r` dequantized (embedding lookup; the reference).
    pub fn row(&self, r: usize) -> Vec<f32> {
        let c = &self.codes[r * self.sbs * 32..];
        let mut buf = Vec::new();
        let (s, factor) = self.scales_of(r..r + 1, &mut buf);
        let f = factor.map_or(1.0, |f| f[0]);
        (0..self.cols)
            .map(|j| {
                let (sb, e) = (j / SB, j % SB);
                let q = (c[sb * 32 + e % 32] >> (2 * (e / 32))) & 3;
                (q as f32 - 1.0) * (s[self.scale_index(j)] * f)
            })
            .collect()
    }

    /// `x: [n, cols]` row-major -> `[n, rows]` row-major, with the detected kernel.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_with(Isa::detect(), x, n)
    }

    /// [`PackedMatrix::matmul`] with a given kernel (it must be one of [`Isa::available`]).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = matmul_many_with(isa, &[self], x, n);
        out.pop().expect("one matrix, one output")
    }

    /// This matrix with its input quantized as `a` says.
    pub fn with_act_quant(self, a: ActQuant) -> Self {
        Self {
            act_quant: a,
            ..self
        }
    }

    /// Whether `other` can take the same quantized activations (same width and scheme).
    fn shares_input_with(&self, other: &PackedMatrix) -> bool {
        self.cols == other.cols && self.sbs == other.sbs && self.act_quant == other.act_quant
    }
}

/// `x @ W_m^T` for several matrices that read the same input (q/k/v, gate/up): the
/// activations are quantized once and every matrix's rows run in one parallel region (one
/// fork/join instead of one per matrix: at 2 threads each costs a wake-up of the other thread,
/// ~200 of them per decoded token at 0.6B). Returns one `[n, rows_m]` per matrix.
pub fn matmul_many(mats: &[&PackedMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    matmul_many_with(Isa::detect(), mats, x, n)
}

/// [`matmul_many`] with a given kernel (it must be one of [`Isa::available`]).
pub fn matmul_many_with(isa: Isa, mats: &[&PackedMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let Some(first) = mats.first() else {
        return Vec::new();
    };
    if !mats.iter().all(|m| first.shares_input_with(m)) {
        return mats.iter().map(|m| m.matmul_with(isa, x, n)).collect();
    }
    assert_eq!(x.len(), n * first.cols, "input length");
    // AMX takes several tokens; one token runs the AVX-512 VNNI kernels.
    let amx = isa == Isa::Amx && n >= AMX_MIN_TOKENS;
    let isa = if isa == Isa::Amx {
        Isa::Avx512Vnni
    } else {
        isa
    };
    let per_token = first.act_quant == ActQuant::PerToken;
    // The x86 vector kernels' per-32 paths read the values in chunk order; per token they
    // read them in order, as AMX, NEON and the portable kernel always do.
    let order = match isa {
        _ if per_token || amx => ActOrder::Plain,
        Isa::Avx2 | Isa::AvxVnni => ActOrder::Chunks256,
        Isa::Avx512Vnni => ActOrder::Chunks512,
        _ => ActOrder::Plain,
    };
    let xq = QuantizedRows::new(x, n, first.cols, first.sbs, order, per_token);
    #[cfg(target_arch = "x86_64")]
    let acts = amx.then(|| x86::amx::Acts::new(&xq, n));
    // Outputs are allocated, not zeroed: the tasks write every cell (zeroing 6 MiB per matrix
    // was ~2% of a 512-token step). Their lengths are set once the tasks are done.
    let mut outs: Vec<Vec<f32>> = mats
        .iter()
        .map(|m| Vec::with_capacity(m.rows * n))
        .collect();
    // Tasks of whole row chunks so each amortizes its scheduling over real work (AMX: whole
    // 16-row tiles).
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let chunk = (total / (4 * rayon::current_num_threads()).max(1))
        .clamp(1, 64)
        .next_multiple_of(if amx { 16 } else { ROWS });
    let tasks: Vec<RowTask> = mats
        .iter()
        .zip(outs.iter_mut())
        .flat_map(|(m, y)| {
            let out = OutPtr(y.as_mut_ptr());
            (0..m.rows).step_by(chunk).map(move |r0| RowTask {
                m,
                rows: r0..(r0 + chunk).min(m.rows),
                out,
            })
        })
        .collect();
    // Rayon unless `TERN_POOL=spin` (`spin_pool`: workers awake between decode's ~100-200
    // regions per token; measured slower here, kept opt-in).
    crate::kernels::spin_pool::SpinPool::global().run(tasks.len(), &|i| {
        let task = &tasks[i];
        #[cfg(target_arch = "x86_64")]
        if let Some(acts) = &acts {
            // SAFETY: `Isa::Amx` is offered only with AMX-INT8 and AVX-512; the row ranges
            // are disjoint, as below.
            return unsafe { x86::amx::rows(task.m, task.rows.clone(), acts, task.out.0) };
        }
        // SAFETY: the tasks' row ranges are disjoint within each matrix, so no two tasks
        // write the same output cell, and `outs` outlives the parallel loop.
        unsafe { task.run(isa, &xq, n) }
    });
    for (y, m) in outs.iter_mut().zip(mats) {
        // SAFETY: the tasks' row ranges cover every row of every matrix, and each task wrote
        // its rows for all `n` tokens (every kernel path stores each output it owns).
        unsafe { y.set_len(m.rows * n) };
    }
    outs
}

/// An output buffer `[n, rows]` written by several tasks, each into its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes (see `matmul_many_with`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Rows `rows` of matrix `m` for every token, written into `out` (`[n, m.rows]`).
struct RowTask<'a> {
    m: &'a PackedMatrix,
    rows: std::ops::Range<usize>,
    out: OutPtr,
}

impl RowTask<'_> {
    /// # Safety
    /// `out` must point to `n * m.rows` floats that no other task writes in `rows`.
    unsafe fn run(&self, isa: Isa, xq: &QuantizedRows, n: usize) {
        // The task's scales in the kernels' layout, expanded once (at most 64 rows: L1).
        thread_local! {
            static SCALES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCALES.with_borrow_mut(|buf| {
            let (ws, factor) = self.m.scales_of(self.rows.clone(), buf);
            self.run_with(isa, xq, n, ws);
            if let Some(f) = factor {
                for t in 0..n {
                    let out = self.out.0.add(t * self.m.rows + self.rows.start);
                    let out = std::slice::from_raw_parts_mut(out, f.len());
                    for (o, f) in out.iter_mut().zip(f) {
                        *o *= f; // the row's smallest scale
                    }
                }
            }
        })
    }

    /// [`RowTask::run`] with the task's rows' scales `ws` ([`PackedMatrix::per`] per row),
    /// before the rows' factors.
    unsafe fn run_with(&self, isa: Isa, xq: &QuantizedRows, n: usize, ws: &[f32]) {
        let m = self.m;
        let (cb, per) = (m.sbs * 32, m.per());
        if n == 1 {
            // Decode: the kernel walks the task's rows ROWS at a time (each load of the
            // activations serves ROWS rows) and writes the outputs in place.
            let rr = self.rows.clone();
            let out = std::slice::from_raw_parts_mut(self.out.0.add(rr.start), rr.len());
            let codes = &m.codes[rr.start * cb..rr.end * cb];
            dot_rows(isa, m.wide, codes, ws, &xq.row(0), out);
            return;
        }
        // Token tiles outside, the task's rows inside: the rows' codes (at most 64 rows) stay
        // in L1/L2 while each tile's activations are read once per task, not per row.
        let tile_n = match isa {
            Isa::Avx2 if xq.per_token => TILE_AVX2,
            _ => TILE,
        };
        let mut tile = [0f32; PAIR * TILE_AVX2];
        let mut xs: [XRow; TILE_AVX2] = [XRow::EMPTY; TILE_AVX2];
        for t0 in (0..n).step_by(tile_n) {
            let tn = tile_n.min(n - t0);
            for (k, x) in xs.iter_mut().enumerate().take(tn) {
                *x = xq.row(t0 + k);
            }
            for r in self.rows.clone().step_by(PAIR) {
                let nr = PAIR.min(self.rows.end - r);
                let codes = &m.codes[r * cb..(r + nr) * cb];
                let out = &mut tile[..nr * tn];
                let w = &ws[(r - self.rows.start) * per..(r - self.rows.start + nr) * per];
                dot_tile(isa, m.wide, nr, codes, w, &xs[..tn], out);
                // `out` is `[nr][tn]`; the output `[n, rows]` (the stride read once: through
                // the raw pointer the compiler would reload it after every store).
                let (stride, at) = (m.rows, self.out.0.add(t0 * m.rows + r));
                for k in 0..tn {
                    for j in 0..nr {
                        *at.add(k * stride + j) = out[j * tn + k];
                    }
                }
            }
        }
    }
}

/// Activation rows quantized per 32 values (module doc, step 2), zero-padded to whole
/// super-blocks.
pub struct QuantizedRows {
    /// `n * sbs * 128` int8 values.
    q: Vec<i8>,
    /// Per 64-block, 16 lanes: the step of its first 32 values in lanes 0-7, of its second 32
    /// in lanes 8-15 (the lanes of a 512-bit integer dot that hold those values' products).
    lanes: Vec<f32>,
    /// Per 64-block: `sum over its two 32-groups of step * sum(q)`, the correction of
    /// `sum t*x = sum q*x - sum x` in the block's units.
    corr: Vec<f32>,
    /// Per super-block: its two 64-blocks' corrections added, for rows with one weight scale
    /// per super-block (`PackedMatrix::wide`).
    corr_sb: Vec<f32>,
    /// Per row: the unit every group's step is an integer multiple of ([`group_steps`]).
    units: Vec<f32>,
    /// With [`ActOrder::Chunks256`] (empty otherwise): per super-block the i16 operand of one
    /// `vpmaddwd`, each of its four groups' steps in units four times (lanes `4g .. 4g + 4`:
    /// the i16 lanes that hold group g), `n * sbs * 16`.
    mults: Vec<i16>,
    /// With [`ActOrder::Chunks512`] (empty otherwise): per super-block the 16 step lanes of
    /// the AVX-512 per-32 path, lane `l` the step of group `l / 4` (the i32 lanes of its dots
    /// that hold that group's products), `n * sbs * 16`.
    chunk_lanes: Vec<f32>,
    sbs: usize,
    /// One step per row (`act_quant = "per_token"`): every group of a row has the row's step.
    per_token: bool,
}

impl QuantizedRows {
    /// `order`: how each super-block's values lie, and the per-group data its kernels read
    /// with them. `per_token`: one step per row ([`group_steps`]).
    pub fn new(
        x: &[f32],
        n: usize,
        cols: usize,
        sbs: usize,
        order: ActOrder,
        per_token: bool,
    ) -> Self {
        let (width, groups) = (sbs * SB, sbs * SB / GROUP);
        let mut q = vec![0i8; n * width];
        let mut lanes = vec![0f32; n * sbs * 2 * LANES];
        let mut corr = vec![0f32; n * sbs * 2];
        let mut units = vec![0f32; n];
        let mut gm = vec![0i16; n * groups];
        let one = |(((((q, l), c), m), u), x): RowParts| {
            *u = quantize_row(x, q, l, c, m, per_token);
            order.apply(q);
        };
        // Prefill quantizes hundreds of rows per matmul: in parallel (decode's one row is not
        // worth a fork).
        if n >= 8 {
            q.par_chunks_mut(width)
                .zip(lanes.par_chunks_mut(sbs * 2 * LANES))
                .zip(corr.par_chunks_mut(sbs * 2))
                .zip(gm.par_chunks_mut(groups))
                .zip(units.par_iter_mut())
                .zip(x.par_chunks(cols))
                .for_each(one);
        } else {
            q.chunks_mut(width)
                .zip(lanes.chunks_mut(sbs * 2 * LANES))
                .zip(corr.chunks_mut(sbs * 2))
                .zip(gm.chunks_mut(groups))
                .zip(units.iter_mut())
                .zip(x.chunks(cols))
                .for_each(one);
        }
        let mults = match order {
            ActOrder::Chunks256 => gm.iter().flat_map(|&m| [m; 4]).collect(),
            _ => Vec::new(),
        };
        let corr_sb = corr.chunks_exact(2).map(|c| c[0] + c[1]).collect();
        let chunk_lanes = match order {
            ActOrder::Chunks512 => {
                let of = |i: usize, sb: usize, g: usize| {
                    step_of(&lanes[i * sbs * 2 * LANES..], sb * SB + g * GROUP)
                };
                (0..n * sbs)
                    .flat_map(|r| (0..LANES).map(move |l| (r / sbs, r % sbs, l / 4)))
                    .map(|(i, sb, g)| of(i, sb, g))
                    .collect()
            }
            _ => Vec::new(),
        };
        Self {
            q,
            lanes,
            corr,
            corr_sb,
            units,
            mults,
            chunk_lanes,
            sbs,
            per_token,
        }
    }

    fn row(&self, i: usize) -> XRow<'_> {
        let (w, l, c) = (self.sbs * SB, self.sbs * 2 * LANES, self.sbs * 2);
        let m = if self.mults.is_empty() { 0 } else { w / 8 };
        let cl = if self.chunk_lanes.is_empty() {
            0
        } else {
            w / 8
        };
        XRow {
            q: &self.q[i * w..(i + 1) * w],
            lanes: &self.lanes[i * l..(i + 1) * l],
            corr: &self.corr[i * c..(i + 1) * c],
            corr_sb: &self.corr_sb[i * self.sbs..(i + 1) * self.sbs],
            mults: &self.mults[i * m..(i + 1) * m],
            chunk_lanes: &self.chunk_lanes[i * cl..(i + 1) * cl],
            unit: self.units[i],
            per_token: self.per_token,
        }
    }
}

/// One row's slices of a [`QuantizedRows`] being filled, and its input.
type RowParts<'a> = (
    (
        (
            ((&'a mut [i8], &'a mut [f32]), &'a mut [f32]),
            &'a mut [i16],
        ),
        &'a mut f32,
    ),
    &'a [f32],
);

/// The largest step multiple ([`group_steps`]). The 256-bit kernels' i32 lanes then hold at
/// most 2 x 4 x 508 x 32767 (~1.3e8) per super-block (two i16 lanes of four planes' pair sums,
/// each times its multiple).
const MULT_MAX: f32 = 32767.0;

/// Each 32-group's step from its absmax: the smallest multiple `m * unit` of the row's unit
/// (`max absmax / 127 / MULT_MAX`) that is at least `absmax / 127`, so `|x / step| <= 127` and
/// every step of the row is an exact integer multiple of one unit: the AVX2 kernel then sums a
/// super-block's groups in integers and converts once (`vpmaddwd` by `m`), not once per
/// group. A step grows by at most 1 / m over absmax / 127: 3e-5 for the row's largest group.
/// An all-zero or non-finite group gets step 0 (it reads as zero), as does a whole row whose
/// largest value is so small (below ~5e-31) that the unit would be subnormal. Returns the unit.
///
/// `per_token`: every group gets the row's one step `max absmax / 127` (multiple 1, and the
/// unit is that step), except that all-zero and non-finite groups still read as zero.
fn group_steps(amax: &[f32], steps: &mut [f32], mults: &mut [i16], per_token: bool) -> f32 {
    let top = amax
        .iter()
        .copied()
        .filter(|a| a.is_finite())
        .fold(0f32, f32::max);
    if per_token {
        let step = top / 127.0;
        for ((&a, s), m) in amax.iter().zip(steps.iter_mut()).zip(mults.iter_mut()) {
            let zero = a == 0.0 || !a.is_finite() || !step.is_normal();
            (*s, *m) = if zero { (0.0, 0) } else { (step, 1) };
        }
        return step;
    }
    let unit = top / 127.0 / MULT_MAX;
    for ((&a, s), m) in amax.iter().zip(steps.iter_mut()).zip(mults.iter_mut()) {
        (*s, *m) = if a == 0.0 || !a.is_finite() || !unit.is_normal() {
            (0.0, 0)
        } else {
            let k = (a / 127.0 / unit).ceil().clamp(1.0, MULT_MAX);
            (k * unit, k as i16)
        };
    }
    unit
}

/// The quantization step (scale) of value `j` of a row, from its lanes.
fn step_of(lanes: &[f32], j: usize) -> f32 {
    lanes[(j / BLK) * LANES + (j % BLK) / GROUP * 8]
}

/// One activation row quantized per 32 values (absmax to int8, steps from [`group_steps`]) into
/// `q` (zero-padded), the per-64-block `lanes` of steps, `corr` corrections and `mults`, each
/// group's step in units (`per_token`: one step for the row). Returns the unit.
fn quantize_row(
    x: &[f32],
    q: &mut [i8],
    lanes: &mut [f32],
    corr: &mut [f32],
    mults: &mut [i16],
    per_token: bool,
) -> f32 {
    // Baseline x86-64 (SSE2) has no vector rounding: `round` would be a libm call per value.
    // The same loop compiled for AVX2 rounds 8 values per instruction.
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx512f() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { quantize_row_avx512(x, q, lanes, corr, mults, per_token) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { quantize_row_avx2(x, q, lanes, corr, mults, per_token) };
    }
    quantize_row_body(x, q, lanes, corr, mults, per_token)
}

/// How [`QuantizedRows`] lays out each super-block's 128 values (group g = values `32g ..
/// 32g + 32`, in 8-byte chunks c), as the kernels reading them unpack the codes. In the chunk
/// orders every lane of a kernel's integer dots holds one group, so one multiply applies all
/// four groups' steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActOrder {
    /// In order: AMX, NEON, the portable kernel, and every kernel with per-token steps.
    Plain,
    /// The 256-bit kernels (AVX2, AVX-VNNI) with per-32 steps: value `32g + 8c + r` at `32c +
    /// 8g + r` (a 4 x 4 transpose of 8-byte chunks). Plane c (code chunk c broadcast, lane g
    /// shifted by 2g) then holds group g in its i16 lanes `4g .. 4g + 4`, the four planes'
    /// pair sums add lane by lane, and one `vpmaddwd` by the multiples scales the super-block.
    Chunks256,
    /// AVX-512 VNNI with per-32 steps: value `32g + 8c + r` at `64(c / 2) + 16g + 8(c % 2) +
    /// r`. Code chunks (0, 1) and (2, 3) each broadcast as a 128-bit pair (a plain load) and
    /// 64-bit lane `2g + h` shifted by 2g hold group g in i32 lanes `4g .. 4g + 4` of both
    /// dots, which then add in integers before one multiply by the step lanes.
    Chunks512,
}

impl ActOrder {
    /// Where value `32g + 8c + r` of a super-block lies.
    fn at(self, g: usize, c: usize, r: usize) -> usize {
        match self {
            ActOrder::Plain => 32 * g + 8 * c + r,
            ActOrder::Chunks256 => 32 * c + 8 * g + r,
            ActOrder::Chunks512 => 64 * (c / 2) + 16 * g + 8 * (c % 2) + r,
        }
    }

    /// Moves every super-block of `q` (values in order) into this order.
    fn apply(self, q: &mut [i8]) {
        if self == ActOrder::Plain {
            return;
        }
        for sb in q.chunks_exact_mut(SB) {
            let plain: [i8; SB] = std::array::from_fn(|i| sb[i]);
            for (g, c) in (0..4).flat_map(|g| (0..4).map(move |c| (g, c))) {
                let (from, to) = (32 * g + 8 * c, self.at(g, c, 0));
                sb[to..to + 8].copy_from_slice(&plain[from..from + 8]);
            }
        }
    }
}

/// A group's step into the row's `lanes` and its correction into `corr`.
#[inline(always)]
fn record_group(g: usize, step: f32, sum: i32, lanes: &mut [f32], corr: &mut [f32]) {
    let (b, half) = (g / 2, g % 2);
    lanes[b * LANES + half * 8..b * LANES + half * 8 + 8].fill(step);
    corr[b] += step * sum as f32;
}

/// The vector quantizers' shared loop: each group's absmax (`absmax` of its 32 values), the
/// steps from [`group_steps`], then each nonzero group quantized (`quantize` of its values and
/// `1 / step`: writes the 32 codes, returns their sum), as [`quantize_row_body`] does. The last,
/// partial group is read zero-padded: zeros change neither its max nor its sum. `q` must hold
/// whole groups (it is padded to super-blocks).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn quantize_groups(
    x: &[f32],
    q: &mut [i8],
    lanes: &mut [f32],
    corr: &mut [f32],
    mults: &mut [i16],
    per_token: bool,
    absmax: impl Fn(*const f32) -> f32,
    quantize: impl Fn(*const f32, f32, *mut i8) -> i32,
) -> f32 {
    let groups = x.len().div_ceil(GROUP);
    let mut tail = [0f32; GROUP];
    let mut group = |g: usize| {
        if (g + 1) * GROUP <= x.len() {
            x.as_ptr().add(g * GROUP)
        } else {
            tail[..x.len() - g * GROUP].copy_from_slice(&x[g * GROUP..]);
            tail.as_ptr()
        }
    };
    let amax: Vec<f32> = (0..groups).map(|g| absmax(group(g))).collect();
    let mut steps = vec![0f32; groups];
    let unit = group_steps(&amax, &mut steps, &mut mults[..groups], per_token);
    for (g, &step) in steps.iter().enumerate() {
        if step == 0.0 {
            continue; // as quantize_row_body
        }
        let sum = quantize(group(g), 1.0 / step, q.as_mut_ptr().add(g * GROUP));
        record_group(g, step, sum, lanes, corr);
    }
    unit
}

/// [`quantize_row_body`] with AVX-512: one group of 32 in two registers, rounding half away
/// from zero as `f32::round` does, so it quantizes exactly as the plain loop (a test checks).
/// `q` must hold whole groups (it is padded to super-blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(
    x: &[f32],
    q: &mut [i8],
    lanes: &mut [f32],
    corr: &mut [f32],
    mults: &mut [i16],
    per_token: bool,
) -> f32 {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn round_away(v: __m512) -> __m512i {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
        let half = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
        let one = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_and_ps(v, _mm512_set1_ps(-0.0)));
        _mm512_cvttps_epi32(_mm512_mask_add_ps(t, half, t, one))
    }
    let load = |src: *const f32| (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
    let absmax = |src: *const f32| {
        let (a, b) = load(src);
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)))
    };
    let quantize = |src: *const f32, inv: f32, dst: *mut i8| {
        let (a, b) = load(src);
        let inv = _mm512_set1_ps(inv);
        let (qa, qb) = (
            round_away(_mm512_mul_ps(a, inv)),
            round_away(_mm512_mul_ps(b, inv)),
        );
        let dst = dst as *mut __m128i;
        _mm_storeu_si128(dst, _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(dst.add(1), _mm512_cvtepi32_epi8(qb));
        _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb))
    };
    quantize_groups(x, q, lanes, corr, mults, per_token, absmax, quantize)
}

/// [`quantize_row_body`] with AVX2: a group of 32 in four registers, rounding half away from
/// zero as `f32::round` does, so it quantizes exactly as the plain loop (a test checks). The
/// plain loop compiled for AVX2 ran its absmax one value at a time (`f32::max` does not
/// vectorize) and was ~1.7% of a 2-thread decode on the submitting thread, between the
/// matmuls. `q` must hold whole groups (it is padded to super-blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    x: &[f32],
    q: &mut [i8],
    lanes: &mut [f32],
    corr: &mut [f32],
    mults: &mut [i16],
    per_token: bool,
) -> f32 {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    #[inline(always)]
    unsafe fn round_away(v: __m256, abs_mask: __m256) -> __m256i {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = _mm256_and_ps(_mm256_sub_ps(v, t), abs_mask);
        let half = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
        let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_andnot_ps(abs_mask, v));
        _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(half, one)))
    }
    let load = |src: *const f32| -> [__m256; 4] {
        std::array::from_fn(|k| _mm256_loadu_ps(src.add(8 * k)))
    };
    let absmax = |src: *const f32| {
        let [a, b, c, d] = load(src).map(|v| _mm256_and_ps(v, abs_mask));
        let v = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
        let v = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_max_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_max_ss(v, _mm_shuffle_ps::<1>(v, v)))
    };
    // `packs` works within 128-bit lanes: this puts the four 8-value pieces back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let quantize = |src: *const f32, inv: f32, dst: *mut i8| {
        let inv = _mm256_set1_ps(inv);
        let [a, b, c, d] = load(src).map(|v| round_away(_mm256_mul_ps(v, inv), abs_mask));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        _mm256_storeu_si256(dst as *mut __m256i, bytes);
        let sum = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
        _mm_cvtsi128_si32(sum)
    };
    quantize_groups(x, q, lanes, corr, mults, per_token, absmax, quantize)
}

#[inline(always)]
fn quantize_row_body(
    x: &[f32],
    q: &mut [i8],
    lanes: &mut [f32],
    corr: &mut [f32],
    mults: &mut [i16],
    per_token: bool,
) -> f32 {
    let amax: Vec<f32> = x
        .chunks(GROUP)
        .map(|grp| grp.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let mut steps = vec![0f32; amax.len()];
    let unit = group_steps(&amax, &mut steps, &mut mults[..amax.len()], per_token);
    for (g, (grp, &step)) in x.chunks(GROUP).zip(&steps).enumerate() {
        if step == 0.0 {
            continue; // all zero or not finite (the group reads as zero)
        }
        let inv = 1.0 / step;
        let mut s = 0i32;
        for (d, v) in q[g * GROUP..g * GROUP + grp.len()].iter_mut().zip(grp) {
            *d = (v * inv).round() as i8;
            s += *d as i32;
        }
        record_group(g, step, s, lanes, corr);
    }
    unit
}

/// `out[j * tn + k] = W_{row j} . xs[k]` for one or two consecutive rows (`codes`, `ws` hold
/// them in order) and the `tn` tokens of one tile (at most `TILE`; `TILE_AVX2` for AVX2 with
/// per-token inputs). `nr`: the rows, 1 or [`PAIR`].
fn dot_tile(
    isa: Isa,
    wide: bool,
    nr: usize,
    codes: &[u8],
    ws: &[f32],
    xs: &[XRow],
    out: &mut [f32],
) {
    let tn = xs.len();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && nr == PAIR {
        // SAFETY: `Isa::available` listed this ISA only if the CPU has its features.
        unsafe { x86::dot_tile2_avx512vnni(wide, codes, ws, xs, out) };
        return;
    }
    // Halves, not divisions by a variable: a call per row pair and tile, and its divisions
    // were ~5% of AVX2 prefill.
    let (cb, sb) = match nr {
        PAIR => (codes.len() / PAIR, ws.len() / PAIR),
        _ => (codes.len(), ws.len()),
    };
    for (j, o) in out.chunks_mut(tn).enumerate() {
        let (c, w) = (&codes[j * cb..(j + 1) * cb], &ws[j * sb..(j + 1) * sb]);
        dot_tile_isa(isa, wide, c, w, xs, o);
    }
}

fn dot_tile_isa(isa: Isa, wide: bool, codes: &[u8], ws: &[f32], rows: &[XRow], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::available` listed this ISA only if the CPU has its features.
        Isa::Avx512Vnni => unsafe { x86::dot_tile_avx512vnni(wide, codes, ws, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::AvxVnni => unsafe { x86::dot_tile_avxvnni(wide, codes, ws, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_tile_avx2(wide, codes, ws, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::NeonDot => unsafe { arm::dot_tile_neondot(wide, codes, ws, rows, out) },
        _ => dot_tile_portable(wide, codes, ws, rows, out),
    }
}

/// `out[j] = W_{row j} . x` for consecutive rows (`codes`, `ws` hold them in order): the x86
/// kernels take them `ROWS` at a time in one call (a call per block of rows, with its slicing
/// and a libc copy of the outputs, was 8% of 1-thread decode), the rest one by one.
fn dot_rows(isa: Isa, wide: bool, codes: &[u8], ws: &[f32], x: &XRow, out: &mut [f32]) {
    let (cb, sb) = (codes.len() / out.len(), ws.len() / out.len());
    #[cfg(target_arch = "x86_64")]
    let blocks = match isa {
        Isa::Avx512Vnni | Isa::AvxVnni | Isa::Avx2 if out.len() >= ROWS => {
            let blocks = out.len() / ROWS * ROWS;
            let (c, w, o) = (
                &codes[..blocks * cb],
                &ws[..blocks * sb],
                &mut out[..blocks],
            );
            match isa {
                // SAFETY: `Isa::available` listed this ISA only if the CPU has its features.
                Isa::Avx512Vnni => unsafe { x86::rows_avx512vnni(wide, c, w, x, o) },
                // SAFETY: as above.
                Isa::AvxVnni => unsafe { x86::rows_avxvnni(wide, c, w, x, o) },
                // SAFETY: as above.
                _ => unsafe { x86::rows_avx2(wide, c, w, x, o) },
            }
            blocks
        }
        _ => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let blocks = 0;
    for (j, o) in out.iter_mut().enumerate().skip(blocks) {
        let (c, w) = (&codes[j * cb..(j + 1) * cb], &ws[j * sb..(j + 1) * sb]);
        let (xs, o) = (std::slice::from_ref(x), std::slice::from_mut(o));
        match isa {
            Isa::Portable => dot_tile_portable(wide, c, w, xs, o),
            _ => dot_tile_isa(isa, wide, c, w, xs, o),
        }
    }
}

/// One token's activations ([`QuantizedRows`]): int8 values, per-64-block step lanes and
/// corrections, and for the x86 per-32 paths (else empty) every group's step as a multiple of
/// `unit` ([`ActOrder::Chunks256`]) or the step lanes of [`ActOrder::Chunks512`].
#[derive(Clone, Copy)]
struct XRow<'a> {
    q: &'a [i8],
    lanes: &'a [f32],
    corr: &'a [f32],
    /// Per super-block, its two blocks' `corr` added (wide rows).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    corr_sb: &'a [f32],
    // Read only by the x86 AVX2 kernel; on other targets they stay empty / zero.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    mults: &'a [i16],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    chunk_lanes: &'a [f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unit: f32,
    /// One step for the whole token (`act_quant = "per_token"`): every group's step is `unit`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    per_token: bool,
}

impl XRow<'_> {
    const EMPTY: XRow<'static> = XRow {
        q: &[],
        lanes: &[],
        corr: &[],
        corr_sb: &[],
        mults: &[],
        chunk_lanes: &[],
        unit: 0.0,
        per_token: false,
    };
}

/// The portable kernel: the same integer math in plain loops (they auto-vectorize). `wide`:
/// `ws` holds one scale per super-block, else one per 64-block.
fn dot_tile_portable(wide: bool, codes: &[u8], ws: &[f32], xs: &[XRow], out: &mut [f32]) {
    for (
        o,
        &XRow {
            q: xq, lanes, corr, ..
        },
    ) in out.iter_mut().zip(xs)
    {
        let mut acc = 0f32;
        for (sb, c) in codes.chunks_exact(32).enumerate() {
            let x = &xq[sb * SB..(sb + 1) * SB];
            for h in 0..2 {
                let b = 2 * sb + h;
                let mut f = 0f32;
                for k in 2 * h..2 * h + 2 {
                    // Plane k holds values 32k..32k+32, one quantization group. i16 products
                    // (|q * x| <= 254): the width SSE2 and NEON multiply natively, so this
                    // vectorizes without any target feature.
                    let mut prod = [0i16; 32];
                    let xk = &x[32 * k..32 * k + 32];
                    for ((p, &byte), &v) in prod.iter_mut().zip(c).zip(xk) {
                        *p = ((byte >> (2 * k)) & 3) as i16 * v as i16;
                    }
                    let dot: i32 = prod.iter().map(|&v| v as i32).sum();
                    f += dot as f32 * lanes[b * LANES + (k % 2) * 8];
                }
                acc += (f - corr[b]) * ws[if wide { sb } else { b }];
            }
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{XRow, LANES, SB};
    use std::arch::x86_64::*;

    /// Bytes ahead of the current codes to prefetch (8 KiB: measured best of 1-8 KiB at 0.6B).
    pub(super) const PREFETCH: usize = 8192;

    /// The address to prefetch while reading rows `j` of `rows` at super-block `sb` of a block
    /// of consecutive rows starting at `block`: `PREFETCH` past the block's bytes in the order
    /// they lie, advancing as fast as the rows are read. (Ahead in each row's own stream
    /// instead, a 4-row walk over rows of 3072 columns read 12 GB/s on AMD Zen 4 where the
    /// same bytes read in order give 31: the rows' short streams defeat the hardware
    /// prefetcher; NOTES.md, session 20.) A hint: an address past the matrix is never
    /// dereferenced.
    #[inline(always)]
    pub(super) fn ahead(block: *const u8, sb: usize, j: usize, rows: usize) -> *const i8 {
        block.wrapping_add((sb * rows + j) * 32 + PREFETCH) as *const i8
    }

    /// The weight scales of super-block `sb` of a row whose scales start at `w`: its one scale
    /// twice where `WIDE`, else its two 64-blocks'.
    #[inline(always)]
    pub(super) unsafe fn block_scales<const WIDE: bool>(w: *const f32, sb: usize) -> (f32, f32) {
        if WIDE {
            let s = *w.add(sb);
            (s, s)
        } else {
            (*w.add(2 * sb), *w.add(2 * sb + 1))
        }
    }

    /// `f(T, WIDE)` at a tile's token count (1..=4) and scale layout: the token loop of the
    /// tile kernels unrolls over a constant.
    macro_rules! by_tokens {
        ($($f:ident)::+ $([$k:ty])?, $n:expr, $wide:expr, ($($arg:expr),*)) => {
            match ($n, $wide) {
                (4, true) => $($f)::+::<$($k,)? 4, true>($($arg),*),
                (3, true) => $($f)::+::<$($k,)? 3, true>($($arg),*),
                (2, true) => $($f)::+::<$($k,)? 2, true>($($arg),*),
                (_, true) => $($f)::+::<$($k,)? 1, true>($($arg),*),
                (4, false) => $($f)::+::<$($k,)? 4, false>($($arg),*),
                (3, false) => $($f)::+::<$($k,)? 3, false>($($arg),*),
                (2, false) => $($f)::+::<$($k,)? 2, false>($($arg),*),
                (_, false) => $($f)::+::<$($k,)? 1, false>($($arg),*),
            }
        };
    }

    /// [`by_tokens`] for tiles of up to [`TILE_AVX2`](super::TILE_AVX2) tokens.
    macro_rules! by_tokens_8 {
        ($($f:ident)::+ [$k:ty], $n:expr, $wide:expr, ($($arg:expr),*)) => {
            match ($n, $wide) {
                (8, true) => $($f)::+::<$k, 8, true>($($arg),*),
                (7, true) => $($f)::+::<$k, 7, true>($($arg),*),
                (6, true) => $($f)::+::<$k, 6, true>($($arg),*),
                (5, true) => $($f)::+::<$k, 5, true>($($arg),*),
                (8, false) => $($f)::+::<$k, 8, false>($($arg),*),
                (7, false) => $($f)::+::<$k, 7, false>($($arg),*),
                (6, false) => $($f)::+::<$k, 6, false>($($arg),*),
                (5, false) => $($f)::+::<$k, 5, false>($($arg),*),
                _ => by_tokens!($($f)::+ [$k], $n, $wide, ($($arg),*)),
            }
        };
    }

    /// One token's activations as raw pointers (read at super-block offsets without bounds
    /// checks in the hot loops; the callers' slices cover every super-block of the row).
    #[derive(Clone, Copy)]
    pub struct XPtr {
        q: *const i8,
        corr: *const f32,
        corr_sb: *const f32,
        mults: *const i16,
        chunk_lanes: *const f32,
        unit: f32,
    }

    impl XPtr {
        /// The corrections a row's weight scales pair with: one per super-block where `WIDE`
        /// (one scale each), else one per 64-block.
        #[inline(always)]
        pub fn corr<const WIDE: bool>(&self) -> *const f32 {
            if WIDE {
                self.corr_sb
            } else {
                self.corr
            }
        }

        pub fn of(x: &XRow) -> Self {
            Self {
                q: x.q.as_ptr(),
                corr: x.corr.as_ptr(),
                corr_sb: x.corr_sb.as_ptr(),
                mults: x.mults.as_ptr(),
                chunk_lanes: x.chunk_lanes.as_ptr(),
                unit: x.unit,
            }
        }
    }

    /// Horizontal sum of 8 floats.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The four planes of a super-block's 32 code bytes (values 32k..32k+32 in plane k) as
    /// u8 in {0, 1, 2}.
    #[inline(always)]
    unsafe fn planes256(at: *const u8) -> [__m256i; 4] {
        let c = _mm256_loadu_si256(at as *const __m256i);
        let mask = _mm256_set1_epi8(3);
        [
            _mm256_and_si256(c, mask),
            _mm256_and_si256(_mm256_srli_epi16(c, 2), mask),
            _mm256_and_si256(_mm256_srli_epi16(c, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(c, 6), mask),
        ]
    }

    /// How a 256-bit kernel turns a super-block's code planes and one token's activations into
    /// its f32 accumulator: the only part that differs between AVX2 and AVX-VNNI, per-32 and
    /// per-token inputs. Every one sums in units of the token's step unit (`XPtr::unit`), which
    /// multiplies the accumulator once at the end.
    trait Step256 {
        /// A super-block's four code planes, in the order this step reads the activations.
        #[inline(always)]
        unsafe fn planes(at: *const u8) -> [__m256i; 4] {
            planes256(at)
        }

        /// Adds one token's dot with super-block `sb` (weight scales `w`) into `acc`.
        unsafe fn step<const WIDE: bool>(
            p: &[__m256i; 4],
            x: XPtr,
            sb: usize,
            w: (f32, f32),
            acc: &mut __m256,
        );
    }

    /// A super-block's two 64-blocks' i32 sums `b0`, `b1` into `acc`, scaled by their weight
    /// scales: added first and converted once where they share one (`WIDE`).
    #[inline(always)]
    unsafe fn add_blocks<const WIDE: bool>(
        b0: __m256i,
        b1: __m256i,
        w: (f32, f32),
        acc: &mut __m256,
    ) {
        if WIDE {
            let d = _mm256_cvtepi32_ps(_mm256_add_epi32(b0, b1));
            *acc = _mm256_fmadd_ps(d, _mm256_set1_ps(w.0), *acc);
        } else {
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b0), _mm256_set1_ps(w.0), *acc);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b1), _mm256_set1_ps(w.1), *acc);
        }
    }

    /// AVX-VNNI with one step per token: the four groups' `vpdpbusd` accumulate into one
    /// integer sum per weight-scale block, converted and scaled once (the row's step is the
    /// unit). (With a step per group, AVX-VNNI runs [`IntGroups`]: faster than `vpdpbusd` per
    /// group converted and scaled one by one, 3.72-3.87 vs 4.10-4.17 ms on `tern bench gemm`
    /// [64 x 1024] @ [3072 x 1024]^T, CPU B.)
    struct TokenVnni;

    impl Step256 for TokenVnni {
        #[inline(always)]
        unsafe fn step<const WIDE: bool>(
            p: &[__m256i; 4],
            x: XPtr,
            sb: usize,
            w: (f32, f32),
            acc: &mut __m256,
        ) {
            let xp = x.q.add(sb * SB);
            let dot = |k: usize, d: __m256i| {
                let xk = _mm256_loadu_si256(xp.add(32 * k) as *const __m256i);
                _mm256_dpbusd_avx_epi32(d, p[k], xk)
            };
            let zero = _mm256_setzero_si256();
            let (d0, d1) = (dot(1, dot(0, zero)), dot(3, dot(2, zero)));
            add_blocks::<WIDE>(d0, d1, w, acc);
        }
    }

    /// AVX2 and AVX-VNNI with a step per 32-group: the super-block read in chunk order
    /// ([`ActOrder::Chunks256`](super::ActOrder)), so the i16 lanes `4g .. 4g + 4` of every plane's
    /// `vpmaddubsw` hold group g. The four planes' pair sums add in i16 (at most 4 x 508), one
    /// `vpmaddwd` by the groups' step multiples (in units) widens and scales the whole
    /// super-block, and one convert and one FMA by the weight scales (lanes 0-3 hold the first
    /// 64-block, 4-7 the second) add it: 5 multiplies per super-block and token where a
    /// `vpmaddwd` per group took 8, on the two ports the unpacking's shifts use too. The row's
    /// unit multiplies once at the end. Unpacking in chunk order costs one more shift per
    /// super-block and row (each 8-byte chunk broadcast as it loads, shifted by its plane).
    /// (Before: `tern bench gemm` [64 x 1024] @ [3072 x 1024]^T on CPU B, AVX2 3.74-3.82 ms,
    /// AVX-VNNI 3.86-3.94; `vpdpwssd` in place of `vpmaddwd` and an add was 3-4% slower.)
    struct IntGroups;

    impl Step256 for IntGroups {
        /// Plane `c`: chunk `c` of the 32 code bytes broadcast to four 64-bit lanes, lane g
        /// shifted by 2g: bytes `8g .. 8g + 8` then hold values `32g + 8c ..` of group g.
        #[inline(always)]
        unsafe fn planes(at: *const u8) -> [__m256i; 4] {
            let (mask, shifts) = (_mm256_set1_epi8(3), _mm256_setr_epi64x(0, 2, 4, 6));
            let plane = |c: usize| {
                let chunk = _mm256_set1_epi64x((at.add(8 * c) as *const i64).read_unaligned());
                _mm256_and_si256(_mm256_srlv_epi64(chunk, shifts), mask)
            };
            [plane(0), plane(1), plane(2), plane(3)]
        }

        #[inline(always)]
        unsafe fn step<const WIDE: bool>(
            p: &[__m256i; 4],
            x: XPtr,
            sb: usize,
            w: (f32, f32),
            acc: &mut __m256,
        ) {
            let (xp, mp) = (x.q.add(sb * SB), x.mults.add(sb * 16));
            let pairs = |c: usize| {
                let xc = _mm256_loadu_si256(xp.add(32 * c) as *const __m256i);
                _mm256_maddubs_epi16(p[c], xc)
            };
            let s01 = _mm256_add_epi16(pairs(0), pairs(1));
            let s = _mm256_add_epi16(s01, _mm256_add_epi16(pairs(2), pairs(3)));
            let m = _mm256_loadu_si256(mp as *const __m256i);
            let d = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, m));
            let ws = if WIDE {
                _mm256_set1_ps(w.0)
            } else {
                _mm256_set_m128(_mm_set1_ps(w.1), _mm_set1_ps(w.0))
            };
            *acc = _mm256_fmadd_ps(d, ws, *acc);
        }
    }

    /// AVX2 with one step per token (`act_quant = "per_token"`): every group's multiple is 1
    /// (or 0 for a group of zeros, whose codes are 0), so a weight-scale block's groups add as
    /// the i16 pair sums themselves (at most 4 x 508: llama.cpp's TQ2_0 does the same over 256
    /// values) and one `vpmaddwd` by ones widens the block: per super-block 4 `vpmaddubsw`, 3
    /// i16 adds and 1 `vpmaddwd`, where [`IntGroups`] takes 4 `vpmaddwd` and 3 i32 adds. On
    /// Intel both multiplies issue on the same two ports, the kernel's limit.
    struct IntToken;

    impl Step256 for IntToken {
        #[inline(always)]
        unsafe fn step<const WIDE: bool>(
            p: &[__m256i; 4],
            x: XPtr,
            sb: usize,
            w: (f32, f32),
            acc: &mut __m256,
        ) {
            let xp = x.q.add(sb * SB);
            let group = |k: usize| {
                let xk = _mm256_loadu_si256(xp.add(32 * k) as *const __m256i);
                _mm256_maddubs_epi16(p[k], xk)
            };
            let ones = _mm256_set1_epi16(1);
            let b0 = _mm256_add_epi16(group(0), group(1));
            let b1 = _mm256_add_epi16(group(2), group(3));
            if WIDE {
                // One weight scale: the whole super-block in i16, one widening.
                let d = _mm256_madd_epi16(_mm256_add_epi16(b0, b1), ones);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(w.0), *acc);
            } else {
                let (d0, d1) = (_mm256_madd_epi16(b0, ones), _mm256_madd_epi16(b1, ones));
                add_blocks::<false>(d0, d1, w, acc);
            }
        }
    }

    /// `acc - sum_b ws[b] * corr[b]` over a row's `n` 64-block weight scales and a token's
    /// corrections: the whole `- sum x` correction of the row, once per row and token instead
    /// of once per block.
    #[inline(always)]
    unsafe fn corrected256(acc: __m256, ws: *const f32, corr: *const f32, n: usize) -> f32 {
        let mut v = acc;
        let mut b = 0;
        while b + 8 <= n {
            let (w, c) = (_mm256_loadu_ps(ws.add(b)), _mm256_loadu_ps(corr.add(b)));
            v = _mm256_fnmadd_ps(w, c, v);
            b += 8;
        }
        let mut s = hsum(v);
        while b < n {
            s -= *ws.add(b) * *corr.add(b);
            b += 1;
        }
        s
    }

    /// One row against the `T` tokens of a tile (256-bit).
    #[inline(always)]
    unsafe fn tile256<K: Step256, const T: usize, const WIDE: bool>(
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        let x: [XPtr; T] = std::array::from_fn(|k| XPtr::of(&xs[k]));
        let (c, w) = (codes.as_ptr(), ws.as_ptr());
        let mut acc = [_mm256_setzero_ps(); T];
        for sb in 0..codes.len() / 32 {
            let p = K::planes(c.add(sb * 32));
            let wsb = block_scales::<WIDE>(w, sb);
            for k in 0..T {
                K::step::<WIDE>(&p, x[k], sb, wsb, &mut acc[k]);
            }
        }
        for k in 0..T {
            let a = _mm256_mul_ps(acc[k], _mm256_set1_ps(x[k].unit));
            out[k] = corrected256(a, w, x[k].corr::<WIDE>(), ws.len());
        }
    }

    /// Rows against one token (256-bit), `ROWS` at a time (`out.len()` a multiple of it): each
    /// load of the activations serves every row of a block.
    #[inline(always)]
    unsafe fn rows256<K: Step256, const WIDE: bool>(
        codes: &[u8],
        ws: &[f32],
        x: &XRow,
        out: &mut [f32],
    ) {
        const R: usize = super::ROWS;
        let (cb, sbw) = (codes.len() / out.len(), ws.len() / out.len());
        let x = XPtr::of(x);
        for (b, out) in out.chunks_exact_mut(R).enumerate() {
            let (c, w) = (codes.as_ptr().add(b * R * cb), ws.as_ptr().add(b * R * sbw));
            block256::<K, WIDE>(c, w, cb, sbw, x, out);
        }
    }

    /// One block of `ROWS` rows of [`rows256`] at `c` / `w` (`cb` code bytes and `sbw` scales
    /// per row).
    #[inline(always)]
    unsafe fn block256<K: Step256, const WIDE: bool>(
        c: *const u8,
        w: *const f32,
        cb: usize,
        sbw: usize,
        x: XPtr,
        out: &mut [f32],
    ) {
        const R: usize = super::ROWS;
        let mut acc = [_mm256_setzero_ps(); R];
        for sb in 0..cb / 32 {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = c.add(j * cb + sb * 32);
                // The weights stream through once: ask for the next row groups' codes early.
                _mm_prefetch::<_MM_HINT_T0>(ahead(c, sb, j, R));
                let wsb = block_scales::<WIDE>(w.add(j * sbw), sb);
                K::step::<WIDE>(&K::planes(at), x, sb, wsb, a);
            }
        }
        let unit = _mm256_set1_ps(x.unit);
        for (j, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            *o = corrected256(
                _mm256_mul_ps(a, unit),
                w.add(j * sbw),
                x.corr::<WIDE>(),
                sbw,
            );
        }
    }

    /// Whether a tile's tokens carry one step each (they all come from one
    /// [`QuantizedRows`](super::QuantizedRows), so they agree).
    fn per_token(xs: &[XRow]) -> bool {
        xs.first().is_some_and(|x| x.per_token)
    }

    /// The 256-bit per-32 path ([`IntGroups`]) reads the values in chunk order and the
    /// groups' step multiples: the activations must carry them ([`ActOrder::Chunks256`]).
    fn assert_chunks256(x: &XRow) {
        assert_eq!(
            x.mults.len() * 8,
            x.q.len(),
            "the 256-bit per-32 kernels need QuantizedRows in ActOrder::Chunks256"
        );
    }

    /// The AVX-512 per-32 path reads the values in its chunk order and the step lanes
    /// ([`ActOrder::Chunks512`]).
    fn assert_chunks512(x: &XRow) {
        assert_eq!(
            x.chunk_lanes.len() * 8,
            x.q.len(),
            "the AVX-512 per-32 kernels need QuantizedRows in ActOrder::Chunks512"
        );
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2(wide: bool, codes: &[u8], ws: &[f32], x: &XRow, out: &mut [f32]) {
        match (x.per_token, wide) {
            (true, true) => rows256::<IntToken, true>(codes, ws, x, out),
            (true, false) => rows256::<IntToken, false>(codes, ws, x, out),
            (false, wide) => rows_groups(wide, codes, ws, x, out),
        }
    }

    /// [`IntGroups`] over rows, for both 256-bit ISAs (inlined into each one's features).
    #[inline(always)]
    unsafe fn rows_groups(wide: bool, codes: &[u8], ws: &[f32], x: &XRow, out: &mut [f32]) {
        assert_chunks256(x);
        match wide {
            true => rows256::<IntGroups, true>(codes, ws, x, out),
            false => rows256::<IntGroups, false>(codes, ws, x, out),
        }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn rows_avxvnni(wide: bool, codes: &[u8], ws: &[f32], x: &XRow, out: &mut [f32]) {
        match (x.per_token, wide) {
            (true, true) => rows256::<TokenVnni, true>(codes, ws, x, out),
            (true, false) => rows256::<TokenVnni, false>(codes, ws, x, out),
            (false, wide) => rows_groups(wide, codes, ws, x, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile_avx2(
        wide: bool,
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        if per_token(xs) {
            by_tokens_8!(tile256[IntToken], xs.len(), wide, (codes, ws, xs, out))
        } else {
            xs.iter().for_each(assert_chunks256);
            by_tokens!(tile256[IntGroups], xs.len(), wide, (codes, ws, xs, out))
        }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot_tile_avxvnni(
        wide: bool,
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        if per_token(xs) {
            by_tokens!(tile256[TokenVnni], xs.len(), wide, (codes, ws, xs, out))
        } else {
            xs.iter().for_each(assert_chunks256);
            by_tokens!(tile256[IntGroups], xs.len(), wide, (codes, ws, xs, out))
        }
    }

    /// [`ByteScales::expand`] 16 codes at a time: widen, add `k`, shift into place (the zero
    /// code masked to 0.0).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn expand_scales_avx512(codes: &[u8], k: u32, shift: u32, out: &mut [f32]) {
        let (b, sh) = (_mm512_set1_epi32(k as i32), _mm_cvtsi32_si128(shift as i32));
        let (n, o) = (codes.len(), out.as_mut_ptr());
        assert!(out.len() >= n, "scale buffer too short");
        for i in (0..n).step_by(16) {
            let left = n - i;
            let m: __mmask16 = if left >= 16 { 0xffff } else { (1 << left) - 1 };
            let c8 = _mm_maskz_loadu_epi8(m, codes.as_ptr().add(i) as *const i8);
            let nonzero = _mm_cmpneq_epi8_mask(c8, _mm_set1_epi8(super::BYTE_ZERO as i8));
            let c = _mm512_add_epi32(_mm512_cvtepu8_epi32(c8), b);
            let v = _mm512_castsi512_ps(_mm512_maskz_sll_epi32(nonzero, c, sh));
            _mm512_mask_storeu_ps(o.add(i), m, v);
        }
    }

    /// [`ByteScales::expand`](super::ByteScales) 8 codes at a time in AVX2 (as the AVX-512 one;
    /// a tail of fewer than 8 codes takes the plain loop).
    #[target_feature(enable = "avx2")]
    pub unsafe fn expand_scales_avx2(codes: &[u8], k: u32, shift: u32, out: &mut [f32]) {
        let (b, sh) = (_mm256_set1_epi32(k as i32), _mm_cvtsi32_si128(shift as i32));
        let zero = _mm256_set1_epi32(super::BYTE_ZERO as i32);
        let (n, o) = (codes.len(), out.as_mut_ptr());
        assert!(out.len() >= n, "scale buffer too short");
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
            let v = _mm256_sll_epi32(_mm256_add_epi32(c, b), sh);
            let v = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(c, zero), v));
            _mm256_storeu_ps(o.add(i), v);
        }
        super::ByteScales::expand_plain(&codes[whole..], k, shift, &mut out[whole..]);
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub unsafe fn rows_avx512vnni(wide: bool, codes: &[u8], ws: &[f32], x: &XRow, out: &mut [f32]) {
        if !x.per_token {
            assert_chunks512(x);
        }
        match (x.per_token, wide) {
            (true, true) => z::rows::<z::Token, true>(codes, ws, x, out),
            (true, false) => z::rows::<z::Token, false>(codes, ws, x, out),
            (false, true) => z::rows::<z::Groups, true>(codes, ws, x, out),
            (false, false) => z::rows::<z::Groups, false>(codes, ws, x, out),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub unsafe fn dot_tile_avx512vnni(
        wide: bool,
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        if per_token(xs) {
            by_tokens!(z::tile[z::Token], xs.len(), wide, (codes, ws, xs, out))
        } else {
            xs.iter().for_each(assert_chunks512);
            by_tokens!(z::tile[z::Groups], xs.len(), wide, (codes, ws, xs, out))
        }
    }

    /// [`dot_tile_avx512vnni`] for two rows (`out`: `[2][xs.len()]`).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub unsafe fn dot_tile2_avx512vnni(
        wide: bool,
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        if per_token(xs) {
            by_tokens!(z::tile2[z::Token], xs.len(), wide, (codes, ws, xs, out))
        } else {
            xs.iter().for_each(assert_chunks512);
            by_tokens!(z::tile2[z::Groups], xs.len(), wide, (codes, ws, xs, out))
        }
    }

    /// The AVX-512 VNNI kernels on 512-bit vectors: each `vpdpbusd` does 64 multiply-adds,
    /// two per super-block and token. With one step per token a super-block's 32 code bytes
    /// are broadcast to both halves of a zmm and shifted per half (planes 0|1, then 2|3), the
    /// values in order. With a step per 32-group the values are in chunk order
    /// ([`ActOrder::Chunks512`](super::super::ActOrder)): each 64-bit lane of a plane pair
    /// holds one 8-byte code chunk shifted by its group, so every i32 lane of both dots holds
    /// one group (lane `l`: group `l / 4`), the two dots add in integers, and one multiply by
    /// the step lanes scales all four groups.
    pub(super) mod z {
        use super::{block_scales, XPtr, LANES, SB};
        use crate::kernels::ternary_matmul::XRow;
        use std::arch::x86_64::*;

        /// A super-block's codes in the order `S` reads the activations: [`planes`] per
        /// token, [`chunk_planes`] per group.
        #[inline(always)]
        unsafe fn planes_for<S: Steps>(at: *const u8) -> (__m512i, __m512i) {
            if S::PER_TOKEN {
                planes(at)
            } else {
                chunk_planes(at)
            }
        }

        /// A super-block's codes in [`ActOrder::Chunks512`](super::super::ActOrder) as two zmm
        /// of u8 in {0, 1, 2}: code chunks (0, 1) and (2, 3), each pair broadcast from memory
        /// (a plain load, no shuffle), 64-bit lane `2g + h` shifted by 2g.
        #[inline(always)]
        unsafe fn chunk_planes(at: *const u8) -> (__m512i, __m512i) {
            let (mask, shifts) = (
                _mm512_set1_epi8(3),
                _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6),
            );
            let pair = |p: usize| {
                let v = _mm512_broadcast_i32x4(_mm_loadu_si128(at.add(16 * p) as *const __m128i));
                _mm512_and_si512(_mm512_srlv_epi64(v, shifts), mask)
            };
            (pair(0), pair(1))
        }

        /// Planes (0|1) and (2|3) of 32 code bytes as two zmm of u8 in {0, 1, 2}.
        #[inline(always)]
        pub unsafe fn planes(at: *const u8) -> (__m512i, __m512i) {
            let mask = _mm512_set1_epi8(3);
            let c = _mm512_broadcast_i64x4(_mm256_loadu_si256(at as *const __m256i));
            let shift = |lo: i16, hi: i16| {
                _mm512_inserti64x4(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi), 1)
            };
            (
                _mm512_and_si512(_mm512_srlv_epi16(c, shift(0, 2)), mask),
                _mm512_and_si512(_mm512_srlv_epi16(c, shift(4, 6)), mask),
            )
        }

        /// One token's activations of one super-block, loaded once for every row using them.
        #[derive(Clone, Copy)]
        pub struct Xsb {
            x01: __m512i,
            x23: __m512i,
            /// Per-32 steps: the super-block's step lanes (`XRow::chunk_lanes`).
            l: __m512,
        }

        /// Which activation steps the kernels apply: per 32 values (the step lanes, per
        /// super-block) or one per token (once per row, at the end).
        pub trait Steps {
            const PER_TOKEN: bool;
        }

        /// Per-32 steps (`act_quant = "none"`).
        pub struct Groups;
        impl Steps for Groups {
            const PER_TOKEN: bool = false;
        }

        /// One step per token (`act_quant = "per_token"`).
        pub struct Token;
        impl Steps for Token {
            const PER_TOKEN: bool = true;
        }

        #[inline(always)]
        pub unsafe fn load<S: Steps>(x: XPtr, sb: usize) -> Xsb {
            let xp = x.q.add(sb * SB);
            let l = if S::PER_TOKEN {
                _mm512_setzero_ps() // not read
            } else {
                _mm512_loadu_ps(x.chunk_lanes.add(sb * LANES))
            };
            Xsb {
                x01: _mm512_loadu_si512(xp as *const __m512i),
                x23: _mm512_loadu_si512(xp.add(64) as *const __m512i),
                l,
            }
        }

        /// One row's (planes `p`, weight scales `w`) contribution of one super-block of one
        /// token to `acc`.
        #[inline(always)]
        pub unsafe fn apply<S: Steps, const WIDE: bool>(
            p: (__m512i, __m512i),
            x: &Xsb,
            w: (f32, f32),
            acc: &mut __m512,
        ) {
            let zero = _mm512_setzero_si512();
            if S::PER_TOKEN {
                // One step for the whole token: a super-block's products add up in integers
                // (two chained dots), one conversion and one FMA per weight scale; the step
                // multiplies once per row (`finish`). 4 operations where per-32 steps take 7.
                if WIDE {
                    let d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, p.0, x.x01), p.1, x.x23);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(w.0), *acc);
                } else {
                    let d01 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, p.0, x.x01));
                    let d23 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, p.1, x.x23));
                    *acc = _mm512_fmadd_ps(d01, _mm512_set1_ps(w.0), *acc);
                    *acc = _mm512_fmadd_ps(d23, _mm512_set1_ps(w.1), *acc);
                }
                return;
            }
            // Chunk order: every lane of both dots holds one group, so they add in integers
            // and one multiply applies the four groups' steps; lanes 8-15 hold the second
            // 64-block (groups 2 and 3). 5 operations where the planes in order took 7.
            // The corrections are subtracted once per row and token (`corrected_lanes`).
            let d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, p.0, x.x01), p.1, x.x23);
            let f = _mm512_mul_ps(_mm512_cvtepi32_ps(d), x.l);
            let w = if WIDE {
                _mm512_set1_ps(w.0)
            } else {
                _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(w.0), _mm512_set1_ps(w.1))
            };
            *acc = _mm512_fmadd_ps(f, w, *acc);
        }

        /// Lanes whose sum is `sum(acc) - sum_b ws[b] * corr[b]` over a row's `n` 64-block
        /// weight scales and a token's corrections (the `- sum x` of every block, once per row
        /// and token).
        #[inline(always)]
        unsafe fn corrected_lanes(
            acc: __m512,
            ws: *const f32,
            corr: *const f32,
            n: usize,
        ) -> __m512 {
            let mut v = acc;
            for b in (0..n).step_by(16) {
                let m: __mmask16 = if n - b >= 16 {
                    0xffff
                } else {
                    (1 << (n - b)) - 1
                };
                let w = _mm512_maskz_loadu_ps(m, ws.add(b));
                let c = _mm512_maskz_loadu_ps(m, corr.add(b));
                v = _mm512_fnmadd_ps(w, c, v);
            }
            v
        }

        /// The horizontal sums of eight vectors, each added in the tree `_mm512_reduce_add_ps`
        /// uses (256-bit halves, then 128-bit halves, then 64-bit, then 32-bit), so every sum is
        /// bit for bit that of a reduce call (a test checks): a tile's outputs stay equal to the
        /// one-token kernel's while its eight reductions share their shuffles (eight separate
        /// reductions were a sixth of the tile kernel's time at 1024 columns).
        #[inline(always)]
        pub unsafe fn reduce8(v: [__m512; 8]) -> __m256 {
            // Lanes (0|2, 1|3) of a and of b, added: [a02 a13 b02 b13].
            let halves = |a: __m512, b: __m512| {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                )
            };
            // [a02 a13 b02 b13] and [c.. d..] -> [a b c d], each 128-bit lane one vector's.
            let quarters = |x: __m512, y: __m512| {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(x, y),
                    _mm512_shuffle_f32x4::<0xDD>(x, y),
                )
            };
            let t0 = quarters(halves(v[0], v[1]), halves(v[2], v[3]));
            let t1 = quarters(halves(v[4], v[5]), halves(v[6], v[7]));
            // Within each lane: elements (0+2, 1+3), then their sum: lane i holds v[i] and
            // v[4 + i] in its first two elements.
            let p = _mm512_add_ps(_mm512_unpacklo_ps(t0, t1), _mm512_unpackhi_ps(t0, t1));
            let q = _mm512_add_ps(p, _mm512_shuffle_ps::<0x4E>(p, p));
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_castps512_ps256(_mm512_permutexvar_ps(order, q))
        }

        /// The sums of the first `n` (at most 8) vectors of `v` into `out[..n]`, by
        /// [`reduce8`] (the others are zero and not stored).
        #[inline(always)]
        unsafe fn store_sums(v: &[__m512; 8], n: usize, out: &mut [f32]) {
            assert!(n <= 8 && out.len() >= n, "reduced outputs");
            let keep = ((1u32 << n) - 1) as __mmask8;
            _mm256_mask_storeu_ps(out.as_mut_ptr(), keep, reduce8(*v));
        }

        /// A row's dot from its accumulator: per-token steps multiply it by the token's step
        /// first (its `unit`), then [`corrected_lanes`], then the horizontal sum.
        #[inline(always)]
        pub unsafe fn finish<S: Steps, const WIDE: bool>(
            acc: __m512,
            ws: *const f32,
            x: XPtr,
            n: usize,
        ) -> f32 {
            _mm512_reduce_add_ps(finish_lanes::<S, WIDE>(acc, ws, x, n))
        }

        /// [`finish`] before its horizontal sum.
        #[inline(always)]
        unsafe fn finish_lanes<S: Steps, const WIDE: bool>(
            acc: __m512,
            ws: *const f32,
            x: XPtr,
            n: usize,
        ) -> __m512 {
            let acc = if S::PER_TOKEN {
                _mm512_mul_ps(acc, _mm512_set1_ps(x.unit))
            } else {
                acc
            };
            corrected_lanes(acc, ws, x.corr::<WIDE>(), n)
        }

        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        pub unsafe fn tile<S: Steps, const T: usize, const WIDE: bool>(
            codes: &[u8],
            ws: &[f32],
            xs: &[XRow],
            out: &mut [f32],
        ) {
            let x: [XPtr; T] = std::array::from_fn(|k| XPtr::of(&xs[k]));
            let (c, w) = (codes.as_ptr(), ws.as_ptr());
            let mut acc = [_mm512_setzero_ps(); T];
            for sb in 0..codes.len() / 32 {
                let p = planes_for::<S>(c.add(sb * 32));
                let wsb = block_scales::<WIDE>(w, sb);
                for k in 0..T {
                    apply::<S, WIDE>(p, &load::<S>(x[k], sb), wsb, &mut acc[k]);
                }
            }
            for k in 0..T {
                out[k] = finish::<S, WIDE>(acc[k], w, x[k], ws.len());
            }
        }

        /// [`tile`] for two rows at once (`codes`, `ws` hold both): each token's activation
        /// loads serve both rows. `out` is `[2][T]`.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        pub unsafe fn tile2<S: Steps, const T: usize, const WIDE: bool>(
            codes: &[u8],
            ws: &[f32],
            xs: &[XRow],
            out: &mut [f32],
        ) {
            let x: [XPtr; T] = std::array::from_fn(|k| XPtr::of(&xs[k]));
            let (cb, sbw) = (codes.len() / 2, ws.len() / 2);
            let (ca, cb_) = (codes.as_ptr(), codes.as_ptr().add(cb));
            let (wa, wb) = (ws.as_ptr(), ws.as_ptr().add(sbw));
            let mut acc = [[_mm512_setzero_ps(); T]; 2];
            for sb in 0..cb / 32 {
                // A batch of a few tokens waits on the codes' first read as decode does:
                // fetch ahead (later token tiles find them in cache; the extra hints are cheap).
                _mm_prefetch::<_MM_HINT_T0>(super::ahead(ca, sb, 0, 2));
                _mm_prefetch::<_MM_HINT_T0>(super::ahead(ca, sb, 1, 2));
                let (pa, pb) = (
                    planes_for::<S>(ca.add(sb * 32)),
                    planes_for::<S>(cb_.add(sb * 32)),
                );
                let w_a = block_scales::<WIDE>(wa, sb);
                let w_b = block_scales::<WIDE>(wb, sb);
                for k in 0..T {
                    let xk = load::<S>(x[k], sb);
                    apply::<S, WIDE>(pa, &xk, w_a, &mut acc[0][k]);
                    apply::<S, WIDE>(pb, &xk, w_b, &mut acc[1][k]);
                }
            }
            // The 2 x T outputs `[2][T]`, in `out`'s order, reduced together.
            let mut v = [_mm512_setzero_ps(); 8];
            for (i, v) in v.iter_mut().enumerate().take(2 * T) {
                let (r, k) = (i / T, i % T);
                *v = finish_lanes::<S, WIDE>(acc[r][k], [wa, wb][r], x[k], sbw);
            }
            store_sums(&v, 2 * T, out);
        }

        /// Rows against one token (decode), `ROWS` at a time (`out.len()` a multiple of it):
        /// each load of the activations serves every row of a block; the codes are prefetched
        /// well ahead (they stream through once).
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        pub unsafe fn rows<S: Steps, const WIDE: bool>(
            codes: &[u8],
            ws: &[f32],
            x: &XRow,
            out: &mut [f32],
        ) {
            const R: usize = crate::kernels::ternary_matmul::ROWS;
            let (cb, sbw) = (codes.len() / out.len(), ws.len() / out.len());
            let x = XPtr::of(x);
            for (b, out) in out.chunks_exact_mut(R).enumerate() {
                let (c, w) = (codes.as_ptr().add(b * R * cb), ws.as_ptr().add(b * R * sbw));
                block::<S, WIDE>(c, w, cb, sbw, x, out);
            }
        }

        /// One block of `ROWS` rows of [`rows`] at `c` / `w` (`cb` code bytes and `sbw`
        /// scales per row).
        #[inline(always)]
        unsafe fn block<S: Steps, const WIDE: bool>(
            c: *const u8,
            w: *const f32,
            cb: usize,
            sbw: usize,
            x: XPtr,
            out: &mut [f32],
        ) {
            const R: usize = crate::kernels::ternary_matmul::ROWS;
            let mut acc = [_mm512_setzero_ps(); R];
            for sb in 0..cb / 32 {
                let xsb = load::<S>(x, sb);
                for (j, a) in acc.iter_mut().enumerate() {
                    let at = c.add(j * cb + sb * 32);
                    _mm_prefetch::<_MM_HINT_T0>(super::ahead(c, sb, j, R));
                    let wsb = block_scales::<WIDE>(w.add(j * sbw), sb);
                    apply::<S, WIDE>(planes_for::<S>(at), &xsb, wsb, a);
                }
            }
            // The block's rows' sums together (the rest of the joint reduction adds zeros).
            let mut v = [_mm512_setzero_ps(); 8];
            for (j, v) in v.iter_mut().enumerate().take(R) {
                *v = finish_lanes::<S, WIDE>(acc[j], w.add(j * sbw), x, sbw);
            }
            store_sums(&v, R, out);
        }
    }

    /// The AMX int8 GEMM for several tokens at once (prefill, batched decode): tile `tdpbssd`
    /// multiplies 16 weight rows by 16 tokens over one 32-value activation group (K = 32) in
    /// one instruction. Weights are the A tile (a 16-row block unpacked once per call to
    /// signed int8 `t` in {-1, 0, +1}, natural order, so no `- sum x` correction); activations
    /// are the B tile, in AMX's layout ([`Acts`]). Each group's 16 x 16 int32 result is scaled
    /// by its token's activation step times its row's weight scale into f32 accumulators (the
    /// per-32 activation scales stay exact, as in the vector kernels). With K = 32 each tile
    /// result must be stored and rescaled: perf puts most of the time in those stores and
    /// the tile loads, the rest in the epilogue. At most 8 tokens (batched decode) run paired
    /// tiles instead (`Acts`, `block_paired`): two groups per multiply in the two halves
    /// of the token columns, each unit of the weights unpacked just before its tiles.
    pub mod amx {
        use crate::kernels::amx::{release, TileConfig};
        use crate::kernels::ternary_matmul::{step_of, PackedMatrix, QuantizedRows, SB};
        use rayon::prelude::*;
        use std::arch::asm;
        use std::arch::x86_64::*;

        /// Weight rows per tile (A's and C's rows).
        pub const M: usize = 16;
        /// Tokens per tile (B's and C's columns).
        pub const N: usize = 16;
        /// Values per tile multiply: one activation quantization group.
        const K: usize = 32;
        /// Bytes of one B tile: K / 4 rows of N tokens x 4 values.
        const B_TILE: usize = K * N;

        /// Quantized activations as AMX B tiles.
        ///
        /// More than [`PAIRED`] tokens: per 16-token tile and per 32-value group, 8 rows of 64
        /// bytes where row `i` holds values `4i .. 4i + 3` of token 0, then of token 1, ...
        /// (tokens past `n` are zero), and the 16 tokens' steps of that group.
        ///
        /// At most [`PAIRED`] tokens (batched decode): one tile, and each B tile holds a whole
        /// 64-block (K = 64): its first 8 rows hold the block's first group in columns 0-7
        /// (one per token) and zeros in columns 8-15, its last 8 rows the second group in
        /// columns 8-15. One multiply then gives both groups' sums side by side, so a
        /// half-empty token tile costs half the multiplies, tile stores and epilogue; the
        /// block's 16 steps are laid out the same way (lanes 0-7 the first group's).
        pub struct Acts {
            b: Vec<i8>,
            steps: Vec<f32>,
            groups: usize,
            tiles: usize,
            n: usize,
        }

        /// Most tokens that run as paired tiles (one 64-block per B tile).
        pub const PAIRED: usize = N / 2;

        impl Acts {
            pub fn new(xq: &QuantizedRows, n: usize) -> Acts {
                if n <= PAIRED {
                    return Acts::new_paired(xq, n);
                }
                let groups = xq.sbs * SB / K;
                let tiles = n.div_ceil(N);
                let mut b = vec![0i8; tiles * groups * B_TILE];
                let mut steps = vec![0f32; tiles * groups * N];
                let fill = |tt: usize, (b, s): (&mut [i8], &mut [f32])| {
                    for k in 0..N.min(n - tt * N) {
                        let row = xq.row(tt * N + k);
                        let (q, lanes) = (row.q, row.lanes);
                        for g in 0..groups {
                            let (src, dst) = (&q[g * K..(g + 1) * K], &mut b[g * B_TILE..]);
                            for i in 0..K / 4 {
                                dst[i * 4 * N + 4 * k..i * 4 * N + 4 * k + 4]
                                    .copy_from_slice(&src[4 * i..4 * i + 4]);
                            }
                            s[g * N + k] = step_of(lanes, g * K);
                        }
                    }
                };
                // Token tiles in parallel (one tile, decode-sized batches: not worth a fork).
                let (bw, sw) = (groups * B_TILE, groups * N);
                if tiles > 1 {
                    let chunks = b.par_chunks_mut(bw).zip(steps.par_chunks_mut(sw));
                    chunks.enumerate().for_each(|(tt, c)| fill(tt, c));
                } else {
                    let chunks = b.chunks_mut(bw).zip(steps.chunks_mut(sw));
                    chunks.enumerate().for_each(|(tt, c)| fill(tt, c));
                }
                Acts {
                    b,
                    steps,
                    groups,
                    tiles,
                    n,
                }
            }

            /// The paired layout (struct doc) for `n <= PAIRED` tokens.
            fn new_paired(xq: &QuantizedRows, n: usize) -> Acts {
                let groups = xq.sbs * SB / K;
                let blocks = groups / 2;
                // Per 64-block: 16 rows of 64 bytes (the same bytes as two 32-groups' tiles),
                // zero-padded to whole units of four blocks so every unit runs four multiplies
                // (the padding's products are zero and never read).
                let mut b = vec![0i8; blocks.next_multiple_of(4) * 2 * B_TILE];
                let mut steps = vec![0f32; blocks * N];
                for k in 0..n {
                    let row = xq.row(k);
                    let (q, lanes) = (row.q, row.lanes);
                    for h in 0..blocks {
                        let dst = &mut b[h * 2 * B_TILE..(h + 1) * 2 * B_TILE];
                        for half in 0..2 {
                            let (g, col) = (2 * h + half, half * PAIRED + k);
                            for i in 0..K / 4 {
                                let at = (half * K / 4 + i) * 4 * N + 4 * col;
                                dst[at..at + 4]
                                    .copy_from_slice(&q[g * K + 4 * i..g * K + 4 * i + 4]);
                            }
                            steps[h * N + col] = step_of(lanes, g * K);
                        }
                    }
                }
                Acts {
                    b,
                    steps,
                    groups,
                    tiles: 1,
                    n,
                }
            }

            /// Whether these activations are laid out paired (at most [`PAIRED`] tokens).
            fn paired(&self) -> bool {
                self.n <= PAIRED
            }
        }

        /// A C tile as `tilestored` writes it: 16 rows of 16 int32.
        #[repr(C, align(64))]
        struct CTile([i32; M * N]);

        thread_local! {
            /// Per thread: a 16-row block of unpacked weights (A tiles) and their scales,
            /// reused across calls (fresh pages each call cost more than the unpacking).
            static SCRATCH: std::cell::RefCell<(Vec<i8>, Vec<f32>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }

        /// Rows `rows` of `m` (starting at a multiple of [`M`]) for every token of `acts`,
        /// written into `out` (`[n, m.rows]`).
        ///
        /// # Safety
        /// The CPU has AMX-INT8 and AVX-512 (`Isa::Amx` is offered), and `out` points to
        /// `n * m.rows` floats of which no other thread writes these rows.
        pub unsafe fn rows(
            m: &PackedMatrix,
            rows: std::ops::Range<usize>,
            acts: &Acts,
            out: *mut f32,
        ) {
            SCRATCH.with_borrow_mut(|(a, w)| {
                let (width, blocks) = (m.sbs * SB, 2 * m.sbs);
                a.resize(M * width, 0);
                w.resize(blocks * M, 0.0);
                // Paired calls: two units' A tiles (unit u + 1 is unpacked while unit u's
                // tiles multiply), 8 KiB, zeroed once per call as the C tiles.
                let mut units = [UnitTiles([0; UNIT]), UnitTiles([0; UNIT])];
                // Two sets of 4 tile results (8 KiB), zeroed once per call, not per block.
                let mut c: [[CTile; 4]; 2] =
                    std::array::from_fn(|_| std::array::from_fn(|_| CTile([0; M * N])));
                // Values per multiply: one 32-group, or a 64-block when paired.
                let k = if acts.paired() { 2 * K } else { K };
                let mut cfg = TileConfig::new();
                for t in [0, 3, 4, 5] {
                    cfg = cfg.set(t, M as u8, (4 * N) as u16); // C: 16 rows x 16 int32
                }
                for t in [1, 6] {
                    cfg = cfg.set(t, M as u8, k as u16); // A: 16 weight rows x k int8
                }
                for t in [2, 7] {
                    cfg = cfg.set(t, (k / 4) as u8, (4 * N) as u16); // B: k / 4 x (16 x 4)
                }
                cfg.load();
                for r0 in rows.clone().step_by(M) {
                    let nr = M.min(rows.end - r0);
                    if acts.paired() {
                        unpack_scales(m, r0, nr, w);
                        // The next 16 rows' codes, fetched into L2 while this block multiplies
                        // (decode-sized calls are as much reading as multiplying).
                        let next = (r0 + M).min(m.rows)..(r0 + 2 * M).min(m.rows);
                        let ahead = m.bytes_of(next);
                        let codes = m.codes[r0 * m.sbs * 32..].as_ptr();
                        let tiles = &mut units;
                        block_paired(codes, m.sbs, nr, w, acts, ahead, tiles, &mut c, |k, v| {
                            let at = out.add(k * m.rows + r0);
                            _mm512_mask_storeu_ps(at, ((1u32 << nr) - 1) as u16, v);
                        });
                        continue;
                    }
                    unpack(m, r0, nr, a, w);
                    for tt in 0..acts.tiles {
                        block(a, w, acts, tt, width, &mut c, |k, v| {
                            let at = out.add((tt * N + k) * m.rows + r0);
                            _mm512_mask_storeu_ps(at, ((1u32 << nr) - 1) as u16, v);
                        });
                    }
                }
                release();
            })
        }

        /// Rows `r0 .. r0 + nr` of `m` as signed int8 weights (`a`: 16 rows of `width`) and
        /// their 64-block scales (`w`: per block, the 16 rows'); rows past `nr` are zero.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn unpack(m: &PackedMatrix, r0: usize, nr: usize, a: &mut [i8], w: &mut [f32]) {
            let width = m.sbs * SB;
            if nr < M {
                a.fill(0);
            }
            let one = _mm512_set1_epi8(1);
            for r in 0..nr {
                let codes = m.codes.as_ptr().add((r0 + r) * m.sbs * 32);
                let dst = a.as_mut_ptr().add(r * width);
                for sb in 0..m.sbs {
                    let (p01, p23) = super::z::planes(codes.add(sb * 32));
                    let d = dst.add(sb * SB) as *mut __m512i;
                    _mm512_storeu_si512(d, _mm512_sub_epi8(p01, one));
                    _mm512_storeu_si512(d.add(1), _mm512_sub_epi8(p23, one));
                }
            }
            unpack_scales(m, r0, nr, w);
        }

        /// The 64-block scales of rows `r0 .. r0 + nr`, each times its row's factor (`w`: per
        /// block, the 16 rows'; rows past `nr` are zero): one gather per block.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn unpack_scales(m: &PackedMatrix, r0: usize, nr: usize, w: &mut [f32]) {
            thread_local! {
                static BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            BUF.with_borrow_mut(|buf| {
                // Stored `m.per()` per row (one per super-block where wide); spread to one
                // per 64-block.
                let (per, wide) = (m.per(), m.wide as usize);
                let (s, factor) = m.scales_of(r0..r0 + nr, buf);
                let mask = ((1u32 << nr) - 1) as u16;
                let f = match factor {
                    Some(f) => _mm512_maskz_loadu_ps(mask, f.as_ptr()),
                    None => _mm512_set1_ps(1.0),
                };
                let rows = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(per as i32),
                );
                for b in 0..2 * m.sbs {
                    let at = s.as_ptr().add(b >> wide);
                    let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, rows, at);
                    _mm512_storeu_ps(w.as_mut_ptr().add(b * M), _mm512_mul_ps(v, f));
                }
            })
        }

        /// Bytes of one unit's A tiles in [`block_paired`]: four 64-blocks of 16 rows.
        const UNIT: usize = 4 * M * 2 * K;

        /// A unit's A tiles: 64-block `j` of the unit's 16 rows at `j * 1024`, row by row.
        #[repr(C, align(64))]
        struct UnitTiles([i8; UNIT]);

        /// Unit `u` (super-blocks `2u`, `2u + 1` where they exist) of the 16 rows whose codes
        /// start at `codes` (`sbs` super-blocks a row), as [`UnitTiles`]; rows past `nr` are
        /// left as they are (zero).
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn unpack_unit(
            codes: *const u8,
            sbs: usize,
            nr: usize,
            u: usize,
            dst: &mut UnitTiles,
        ) {
            let one = _mm512_set1_epi8(1);
            let d = dst.0.as_mut_ptr();
            for r in 0..nr {
                for s in 0..2.min(sbs - 2 * u) {
                    let (p01, p23) = super::z::planes(codes.add((r * sbs + 2 * u + s) * 32));
                    let at = |j: usize| d.add(j * M * 2 * K + r * 2 * K) as *mut __m512i;
                    _mm512_store_si512(at(2 * s), _mm512_sub_epi8(p01, one));
                    _mm512_store_si512(at(2 * s + 1), _mm512_sub_epi8(p23, one));
                }
            }
        }

        /// Four independent tile multiplies `c[j] = a[j] x b[j]` (A: 16 weight rows `sa` bytes
        /// apart; B: rows of 64 bytes; C stored as rows of 16 int32), each into its own
        /// accumulator (`tmm0`, 3, 4, 5; A / B alternate between two register pairs): tile
        /// registers are not renamed, so one accumulator would chain every zero, multiply and
        /// store behind the last.
        ///
        /// # Safety
        /// The thread's tile configuration is loaded (A in `tmm1`, `tmm6`; B in `tmm2`, `tmm7`;
        /// C in `tmm0`, 3, 4, 5), and every address holds its tile.
        #[inline(always)]
        unsafe fn tiles4(a: [*const i8; 4], sa: usize, b: [*const i8; 4], c: [*mut i32; 4]) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm3",
                "tilezero tmm4",
                "tilezero tmm5",
                "tileloadd tmm1, [{a0} + {sa} * 1]",
                "tileloadd tmm2, [{b0} + {sb} * 1]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tileloadd tmm6, [{a1} + {sa} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbssd tmm3, tmm6, tmm7",
                "tileloadd tmm1, [{a2} + {sa} * 1]",
                "tileloadd tmm2, [{b2} + {sb} * 1]",
                "tdpbssd tmm4, tmm1, tmm2",
                "tileloadd tmm6, [{a3} + {sa} * 1]",
                "tileloadd tmm7, [{b3} + {sb} * 1]",
                "tdpbssd tmm5, tmm6, tmm7",
                "tilestored [{c0} + {sb} * 1], tmm0",
                "tilestored [{c1} + {sb} * 1], tmm3",
                "tilestored [{c2} + {sb} * 1], tmm4",
                "tilestored [{c3} + {sb} * 1], tmm5",
                a0 = in(reg) a[0],
                a1 = in(reg) a[1],
                a2 = in(reg) a[2],
                a3 = in(reg) a[3],
                sa = in(reg) sa,
                b0 = in(reg) b[0],
                b1 = in(reg) b[1],
                b2 = in(reg) b[2],
                b3 = in(reg) b[3],
                sb = in(reg) 4 * N,
                c0 = in(reg) c[0],
                c1 = in(reg) c[1],
                c2 = in(reg) c[2],
                c3 = in(reg) c[3],
                options(nostack),
            );
        }

        /// The operands of [`tiles4`]: four A tiles `a.1` bytes apart from `a.0`, four B tiles
        /// `b.1` bytes apart, and the four C buffers. (Plain arrays: closures that built them
        /// were left as calls in the kernels, which cost a third of a decode-sized call.)
        #[inline(always)]
        #[allow(clippy::type_complexity)]
        unsafe fn four(
            a: (*const i8, usize),
            b: (*const i8, usize),
            c: &mut [CTile; 4],
        ) -> ([*const i8; 4], [*const i8; 4], [*mut i32; 4]) {
            let [c0, c1, c2, c3] = c;
            (
                [a.0, a.0.add(a.1), a.0.add(2 * a.1), a.0.add(3 * a.1)],
                [b.0, b.0.add(b.1), b.0.add(2 * b.1), b.0.add(3 * b.1)],
                [
                    c0.0.as_mut_ptr(),
                    c1.0.as_mut_ptr(),
                    c2.0.as_mut_ptr(),
                    c3.0.as_mut_ptr(),
                ],
            )
        }

        /// [`block`] for the paired layout ([`Acts`]: at most [`PAIRED`] tokens, one 64-block
        /// per multiply). Units of four 64-blocks (two super-blocks; a row's last unit may have
        /// two, padded by zero activations) run into the four accumulator tiles,
        /// and, as in [`block`], unit `u + 1` is issued before unit `u`'s epilogue. Per row the
        /// f32 accumulator holds the even groups' sums of the tokens in lanes 0-7 and the odd
        /// groups' in lanes 8-15; the two halves are added once, at the end.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn block_paired(
            codes: *const u8,
            sbs: usize,
            nr: usize,
            w: &[f32],
            acts: &Acts,
            ahead: [&[u8]; 2],
            tiles: &mut [UnitTiles; 2],
            c: &mut [[CTile; 4]; 2],
            mut store: impl FnMut(usize, __m512),
        ) {
            const BLOCK: usize = M * 2 * K;
            const B_BLOCK: usize = 2 * B_TILE;
            let blocks = acts.groups / 2;
            let units = blocks.div_ceil(4);
            if nr < M {
                // Rows past `nr` multiply as zeros (no unit writes them).
                tiles.iter_mut().for_each(|t| t.0.fill(0));
            }
            unpack_unit(codes, sbs, nr, 0, &mut tiles[0]);
            // Cache lines of `ahead` each unit prefetches (spread so the fill buffers keep up).
            let lines = ahead.map(|a| a.len().div_ceil(64));
            let per_unit = (lines[0] + lines[1]).div_ceil(units.max(1));
            let line = |l: usize| match l < lines[0] {
                true => ahead[0].as_ptr().add(64 * l),
                false => ahead[1].as_ptr().add(64 * (l - lines[0])),
            };
            let mut acc = [_mm512_setzero_ps(); M];
            for u in 0..=units {
                if u < units {
                    for l in u * per_unit..((u + 1) * per_unit).min(lines[0] + lines[1]) {
                        _mm_prefetch::<_MM_HINT_T1>(line(l) as *const i8);
                    }
                    let a = tiles[u % 2].0.as_ptr();
                    let b = acts.b.as_ptr().add(4 * u * B_BLOCK);
                    let (a, b, c) = four((a, BLOCK), (b, B_BLOCK), &mut c[u % 2]);
                    tiles4(a, 2 * K, b, c);
                    if u + 1 < units {
                        unpack_unit(codes, sbs, nr, u + 1, &mut tiles[(u + 1) % 2]);
                    }
                }
                if u > 0 {
                    let u = u - 1;
                    let nb = 4.min(blocks - 4 * u);
                    for (j, cj) in c[u % 2].iter().enumerate().take(nb) {
                        let h = 4 * u + j;
                        let steps = _mm512_loadu_ps(acts.steps.as_ptr().add(h * N));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let at = cj.0.as_ptr().add(r * N) as *const __m512i;
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(at)), steps);
                            let wr = *w.as_ptr().add(h * M + r);
                            *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(wr), *acc);
                        }
                    }
                }
            }
            // Each row's two halves (even and odd groups) added, then transposed: output `k`
            // of the transpose is token `k`'s 16 rows.
            let acc = acc.map(|v| _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v)));
            let t = crate::kernels::amx::transpose16(acc);
            for (k, v) in t.into_iter().enumerate().take(acts.n) {
                store(k, v);
            }
        }

        /// One 16-row block against token tile `tt`: `store(k, v)` receives token `k`'s 16
        /// outputs (one per row). Tile registers are not renamed, so one accumulator tile
        /// would chain every group's zero, multiply and store behind the last: each super-block
        /// (4 groups) instead runs its 4 multiplies into 4 accumulator tiles (tmm0, 3, 4, 5)
        /// alternating 2 pairs of A / B registers, then stores the 4 results; and super-block
        /// `s + 1` is issued before super-block `s`'s epilogue reads them (two sets of C
        /// buffers), so the vector loads never wait on tile stores just issued.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn block(
            a: &[i8],
            w: &[f32],
            acts: &Acts,
            tt: usize,
            width: usize,
            c: &mut [[CTile; 4]; 2],
            mut store: impl FnMut(usize, __m512),
        ) {
            let groups = acts.groups;
            let sbs = groups / 4;
            let mut acc = [_mm512_setzero_ps(); M];
            let bt = acts.b.as_ptr().add(tt * groups * B_TILE);
            for sb in 0..=sbs {
                if sb < sbs {
                    let (a, b) = (a.as_ptr().add(sb * SB), bt.add(4 * sb * B_TILE));
                    let (a, b, c) = four((a, K), (b, B_TILE), &mut c[sb % 2]);
                    tiles4(a, width, b, c);
                }
                if sb > 0 {
                    let sb = sb - 1;
                    let steps: [__m512; 4] = std::array::from_fn(|j| {
                        _mm512_loadu_ps(acts.steps.as_ptr().add((tt * groups + 4 * sb + j) * N))
                    });
                    let cs = &c[sb % 2];
                    // Per row, each 64-block's two groups are scaled by their steps, then
                    // by the block's weight scale once.
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let d = |j: usize| {
                            let at = cs[j].0.as_ptr().add(r * N) as *const __m512i;
                            _mm512_cvtepi32_ps(_mm512_load_si512(at))
                        };
                        for h in 0..2 {
                            let t = _mm512_mul_ps(d(2 * h), steps[2 * h]);
                            let t = _mm512_fmadd_ps(d(2 * h + 1), steps[2 * h + 1], t);
                            let wr = *w.as_ptr().add((2 * sb + h) * M + r);
                            *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(wr), *acc);
                        }
                    }
                }
            }
            // acc[r] holds row r for the 16 tokens; the caller wants each token's 16 rows.
            let t = crate::kernels::amx::transpose16(acc);
            for (k, v) in t.into_iter().enumerate().take(N.min(acts.n - tt * N)) {
                store(k, v);
            }
        }
    }
}

/// The AArch64 kernel: NEON with the dot-product extension. The codes become signed
/// (`t = q - 1` in {-1, 0, 1}), so `sdot` (i8 x i8, four products summed per i32 lane) gives
/// `sum t * x` directly and the `- sum x` correction of the x86 kernels is not needed. `sdot` is
/// written as inline assembly: its intrinsic (`vdotq_s32`) is not stable Rust yet.
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{XRow, LANES, SB};
    use std::arch::aarch64::*;

    /// `acc + sdot(a, b)`: each i32 lane adds the four products of its four i8 pairs.
    #[inline(always)]
    unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        std::arch::asm!(
            "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc,
            in(vreg) a,
            in(vreg) b,
            options(pure, nomem, nostack)
        );
        acc
    }

    /// Plane `k` (values `32k .. 32k + 32`) of a super-block's 32 code bytes as signed codes.
    #[inline(always)]
    unsafe fn plane(c: (uint8x16_t, uint8x16_t), k: i8) -> (int8x16_t, int8x16_t) {
        let (shift, mask, one) = (vdupq_n_s8(-2 * k), vdupq_n_u8(3), vdupq_n_s8(1));
        let t =
            |v: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshlq_u8(v, shift), mask)), one);
        (t(c.0), t(c.1))
    }

    /// One row against each token of `xs` (`out[k]`), every super-block's planes unpacked once
    /// for all of them (`wide`: one weight scale per super-block, else per 64-block).
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_tile_neondot(
        wide: bool,
        codes: &[u8],
        ws: &[f32],
        xs: &[XRow],
        out: &mut [f32],
    ) {
        out.fill(0.0);
        for (sb, c) in codes.chunks_exact(32).enumerate() {
            let c = (vld1q_u8(c.as_ptr()), vld1q_u8(c.as_ptr().add(16)));
            let planes = [plane(c, 0), plane(c, 1), plane(c, 2), plane(c, 3)];
            for (o, &XRow { q: xq, lanes, .. }) in out.iter_mut().zip(xs) {
                let x = xq.as_ptr().add(sb * SB);
                for h in 0..2 {
                    let b = 2 * sb + h;
                    let mut f = 0f32;
                    for k in 2 * h..2 * h + 2 {
                        let (t0, t1) = planes[k];
                        let acc = sdot(vdupq_n_s32(0), t0, vld1q_s8(x.add(32 * k)));
                        let acc = sdot(acc, t1, vld1q_s8(x.add(32 * k + 16)));
                        f += vaddvq_s32(acc) as f32 * lanes[b * LANES + (k % 2) * 8];
                    }
                    *o += f * ws[if wide { sb } else { b }];
                }
            }
        }
    }
}

/// Plain reference: dequantize every row, then a dense f32 product.
pub fn matmul_reference(m: &PackedMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let w: Vec<Vec<f32>> = (0..m.rows).map(|r| m.row(r)).collect();
    let mut y = vec![0f32; n * m.rows];
    for i in 0..n {
        for (r, wr) in w.iter().enumerate() {
            y[i * m.rows + r] = wr
                .iter()
                .zip(&x[i * m.cols..(i + 1) * m.cols])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::codec::{dequantize_row, pack_row};

    fn packed(rows: usize, cols: usize, p: Packing, group: usize) -> (Vec<u8>, PackedMatrix) {
        packed_times(rows, cols, p, group, 1.0)
    }

    /// [`packed`] with every scale times `mul` (byte scales: other row factors than 1).
    fn packed_times(
        rows: usize,
        cols: usize,
        p: Packing,
        group: usize,
        mul: f32,
    ) -> (Vec<u8>, PackedMatrix) {
        let mut buf = Vec::new();
        for r in 0..rows {
            let codes: Vec<i8> = (0..cols)
                .map(|j| (((r * 31 + j * 17 + j / 7) % 3) as i8) - 1)
                .collect();
            let scales: Vec<f32> = (0..cols.div_ceil(group))
                .map(|g| mul * (0.01 * (r + 1) as f32 + 0.3 * g as f32))
                .collect();
            pack_row(&codes, &scales, group, p, &mut buf);
        }
        let m = PackedMatrix::new(&buf, rows, cols, p).unwrap();
        (buf, m)
    }

    fn input(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0 + if i % 97 == 0 { 3.0 } else { 0.0 })
            .collect()
    }

    /// The repacked rows are the file's: bit for bit with f32 scales, and within the byte
    /// scales' relative precision (`2^(shift - 24)`) with them.
    #[test]
    fn repacked_rows_equal_the_file_rows() {
        for (p, cols, group) in [
            (Packing::Q2_0, 64, 64),
            (Packing::Q2_0, 320, 64),
            (Packing::PQ2_0, 384, 128),
        ] {
            let (buf, _) = packed(5, cols, p, group);
            let rb = p.row_bytes(cols);
            let exact = PackedMatrix::with_scales(&buf, 5, cols, p, ScaleStore::F32).unwrap();
            let bytes = PackedMatrix::with_scales(&buf, 5, cols, p, ScaleStore::Byte).unwrap();
            let Scales::Byte(b) = &bytes.scales else {
                panic!("{p:?} cols {cols}: byte scales expected");
            };
            let tol = (b.shift as f32 - 24.0).exp2();
            for r in 0..5 {
                let file = dequantize_row(&buf[r * rb..(r + 1) * rb], cols, p);
                assert_eq!(exact.row(r), file, "{p:?} cols {cols} row {r}");
                for (j, (a, f)) in bytes.row(r).iter().zip(&file).enumerate() {
                    assert!(
                        (a - f).abs() <= tol * f.abs(),
                        "{p:?} {cols} [{r}, {j}]: {a} vs {f}"
                    );
                }
            }
        }
        assert!(PackedMatrix::new(&[0; 10], 2, 64, Packing::Q2_0).is_err());
    }

    /// Byte scales keep the most mantissa bits every row's span allows, round to nearest, keep
    /// zeros, and refuse what they cannot hold (then the matrix keeps f32).
    #[test]
    fn byte_scales_round_to_the_finest_step_that_fits() {
        // Rows whose scales are within a quarter octave above their smallest, at f16 steps of
        // it: all 10 of f16's mantissa bits, so exact; so is every row of one scale.
        let f16s: Vec<f32> = [1.0f32, 1.125, 1.0009766, 0.0, 0.59375, 0.5]
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        let b = ByteScales::encode(&f16s, 3).unwrap();
        assert_eq!(b.shift, 13);
        for (i, v) in f16s.iter().enumerate() {
            assert_eq!(b.get(i / 3, i % 3), *v, "scale {i}");
        }
        let ones = [0.7001953f32, 0.123, 3e-7];
        let b = ByteScales::encode(&ones, 1).unwrap();
        assert_eq!(b.shift, 13);
        assert_eq!([b.get(0, 0), b.get(1, 0), b.get(2, 0)], ones);
        // Rows from 2^k up to `span` times that: 255 codes hold 0.2 octave at 10 mantissa bits
        // (205 steps), 1 octave at 7 (128; 8 bits would need 256), 3 at 6, 7 at 5, not 9.
        let spans = [
            (1.2f32, Some(13)),
            (2.0, Some(16)),
            (8.0, Some(17)),
            (128.0, Some(18)),
        ];
        for (span, shift) in spans.into_iter().chain([(512.0, None)]) {
            let vals: Vec<f32> = [1.0f32, 0.25]
                .iter()
                .flat_map(|c| (0..16).map(move |i| c * span.powf(i as f32 / 15.0)))
                .collect();
            let b = ByteScales::encode(&vals, 16);
            assert_eq!(b.as_ref().map(|b| b.shift), shift, "span {span}");
            if let Some(b) = b {
                let tol = (b.shift as f32 - 24.0).exp2();
                for (i, v) in vals.iter().enumerate() {
                    let got = b.get(i / 16, i % 16);
                    assert!((got - v).abs() <= tol * v, "span {span}, {i}: {got} vs {v}");
                }
            }
        }
        assert!(ByteScales::encode(&[1.0, -0.5], 2).is_none());
        assert!(ByteScales::encode(&[1.0, f32::NAN], 2).is_none());
        let zeros = ByteScales::encode(&[0.0; 4], 2).unwrap();
        assert_eq!((zeros.get(0, 0), zeros.get(1, 1)), (0.0, 0.0));
        // Tiny scales (base below zero, wrapping) round-trip as well.
        let tiny = ByteScales::encode(&[1e-30, 1.5e-30], 2).unwrap();
        assert!((tiny.get(0, 1) - 1.5e-30).abs() <= 1.5e-30 * (tiny.shift as f32 - 24.0).exp2());
    }

    /// The AVX-512 expansion of byte scales equals the plain loop: every length around the
    /// 16-code steps, wide and not, zeros included.
    #[test]
    fn byte_scale_expansion_matches_the_plain_loop() {
        let vals: Vec<f32> = (0..41)
            .map(|i| {
                if i % 7 == 3 {
                    0.0
                } else {
                    0.02 + 0.013 * i as f32
                }
            })
            .collect();
        let b = ByteScales::encode(&vals, 41).unwrap();
        let tol = (b.shift as f32 - 24.0).exp2();
        for n in [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 41] {
            let mut want = vec![-1f32; n + 3];
            ByteScales::expand_plain(&b.codes[..n], b.k(), b.shift, &mut want);
            assert_eq!(want[n..], [-1.0; 3], "the plain loop stays in bounds");
            for (i, v) in vals[..n].iter().enumerate() {
                let got = want[i] * b.factor[0];
                assert!((got - v).abs() <= tol * v, "n {n} {i}: {got} vs {v}");
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
                let mut got = vec![-1f32; n + 3];
                // SAFETY: the CPU has AVX-512 BW and VL (checked above).
                unsafe { x86::expand_scales_avx512(&b.codes[..n], b.k(), b.shift, &mut got) };
                assert_eq!(got, want, "n {n}");
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let mut got = vec![-1f32; n + 3];
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { x86::expand_scales_avx2(&b.codes[..n], b.k(), b.shift, &mut got) };
                assert_eq!(got, want, "AVX2, n {n}");
            }
        }
    }

    /// The resident layout: 2 bits of code per weight plus one byte per scale and an f32 base
    /// per row (2.09 bits at 1024 columns, groups of 128); with `ScaleStore::F32` one f32 per
    /// scale: 2.25 bits with groups of 128, 2.5 with groups of 64 (odd counts padded).
    #[test]
    fn resident_bytes_are_codes_plus_scales() {
        for (p, rows, cols, group, scales_per_row) in [
            (Packing::PQ2_0, 6, 384, 128, 3),
            (Packing::Q2_0, 6, 384, 128, 3),
            (Packing::Q2_0, 6, 384, 64, 6),
            (Packing::Q2_0, 6, 320, 64, 6),
        ] {
            let (buf, m) = packed(rows, cols, p, group);
            let sbs = cols.div_ceil(SB);
            let codes = rows * sbs * 32;
            let f32s = PackedMatrix::with_scales(&buf, rows, cols, p, ScaleStore::F32).unwrap();
            assert_eq!(
                f32s.bytes(),
                codes + 4 * rows * scales_per_row,
                "{p:?} {cols} {group}"
            );
            assert_eq!(scales_per_row, if group == SB { sbs } else { 2 * sbs });
            let bytes = PackedMatrix::with_scales(&buf, rows, cols, p, ScaleStore::Byte).unwrap();
            assert_eq!(
                bytes.bytes(),
                codes + rows * scales_per_row + 4 * rows,
                "{p:?} {cols} {group}"
            );
            let chosen = if ScaleStore::chosen() == ScaleStore::Byte {
                &bytes
            } else {
                &f32s
            };
            assert_eq!(m.bytes(), chosen.bytes(), "new() keeps the chosen store");
        }
        // A span of scales a trained model's row has (the helper's rows span 8 octaves, which
        // keeps them f32).
        let mut buf = Vec::new();
        for r in 0..64 {
            let codes: Vec<i8> = (0..1024).map(|j| ((r + j) % 3) as i8 - 1).collect();
            let scales: Vec<f32> = (0..8).map(|g| 0.02 + 0.003 * (r + g) as f32).collect();
            pack_row(&codes, &scales, 128, Packing::PQ2_0, &mut buf);
        }
        let m =
            PackedMatrix::with_scales(&buf, 64, 1024, Packing::PQ2_0, ScaleStore::Byte).unwrap();
        let bits = 8.0 * m.bytes() as f64 / (64.0 * 1024.0);
        assert_eq!(bits, 2.0 + 8.0 / 128.0 + 32.0 / 1024.0);
        assert!(bits <= 2.1);
    }

    /// Every kernel this CPU runs, on odd shapes (a lone 64-block, an odd block count, token
    /// counts that leave partial tiles): within the int8 rounding bound of dequantize + f32
    /// (each activation is off by at most half its block's step, so an output is off by at most
    /// sum_j |w_j| * step_j / 2), and equal to the portable kernel up to f32 summation order.
    /// `TERN_REQUIRE_ISA=name` (scripts/test_neon.sh sets it) fails the run when that kernel is
    /// not among the ones this machine offers, so an emulator or CPU without the feature cannot
    /// let the kernel tests pass on the portable kernel alone.
    #[test]
    fn the_required_kernel_is_available() {
        if let Ok(want) = std::env::var("TERN_REQUIRE_ISA") {
            let have: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            assert!(
                have.contains(&want.as_str()),
                "TERN_REQUIRE_ISA={want}, available: {have:?}"
            );
        }
    }

    #[test]
    fn every_kernel_matches_the_reference_and_the_portable_kernel() {
        // (packing, rows, cols, group, wide): group-128 scales take the one-scale kernels.
        for (p, rows, cols, group, wide) in [
            (Packing::Q2_0, 7, 64, 64, false),
            (Packing::Q2_0, 37, 320, 64, false),
            (Packing::Q2_0, 11, 384, 128, true),
            (Packing::PQ2_0, 19, 384, 128, true),
        ] {
            for (store, mul) in [
                (ScaleStore::Byte, 1.0),
                (ScaleStore::Byte, 37.0),
                (ScaleStore::F32, 1.0),
            ] {
                let (buf, _) = packed_times(rows, cols, p, group, mul);
                let m = PackedMatrix::with_scales(&buf, rows, cols, p, store).unwrap();
                let byte = matches!(&m.scales, Scales::Byte(_));
                assert_eq!(byte, store == ScaleStore::Byte, "{p:?} {cols} x{mul}");
                assert_eq!(m.wide, wide, "{p:?} group {group}");
                kernels_match_the_reference(&m);
            }
        }
    }

    fn kernels_match_the_reference(m: &PackedMatrix) {
        for act in [ActQuant::None, ActQuant::PerToken] {
            kernels_match_the_reference_with(&m.clone().with_act_quant(act));
        }
    }

    fn kernels_match_the_reference_with(m: &PackedMatrix) {
        let (p, rows, cols) = (m.scale_format(), m.rows, m.cols);
        let per_token = m.act_quant == ActQuant::PerToken;
        {
            // 9 tokens: the activations are quantized in parallel (8 or more rows); 6, 9, 13 and
            // 15 end in token tiles of every size (of 4; of 8 on AVX2 per token, with 2, 3 and
            // 12); 17 and 40 leave partial AMX tiles of 16; 6 and 8 run AMX's paired tiles.
            for n in [1, 2, 3, 6, 8, 9, 12, 13, 15, 17, 40] {
                let x = input(n, cols);
                let xq = QuantizedRows::new(&x, n, cols, m.sbs, ActOrder::Plain, per_token);
                let reference = matmul_reference(m, &x, n);
                let portable = m.matmul_with(Isa::Portable, &x, n);
                // Each activation is off by at most half the step of its quantization block.
                let bound = |i: usize, r: usize| -> f32 {
                    let (w, step) = (m.row(r), xq.row(i).lanes);
                    (0..cols)
                        .map(|j| w[j].abs() * step_of(step, j) / 2.0)
                        .sum::<f32>()
                        * 1.001
                        + 1e-6
                };
                for isa in Isa::available() {
                    let y = m.matmul_with(isa, &x, n);
                    for (k, ((a, r), q)) in y.iter().zip(&reference).zip(&portable).enumerate() {
                        let (i, row) = (k / rows, k % rows);
                        let at = format!(
                            "{isa:?} {p:?} {:?} [{rows},{cols}] n {n} token {i} row {row}",
                            m.act_quant
                        );
                        assert!(
                            (a - r).abs() <= bound(i, row),
                            "{at}: {a} vs reference {r} (bound {})",
                            bound(i, row)
                        );
                        // Summation order: relative to the terms' magnitude, not the result's.
                        let terms: f32 = m
                            .row(row)
                            .iter()
                            .zip(&x[i * cols..])
                            .map(|(w, v)| (w * v).abs())
                            .sum();
                        assert!(
                            (a - q).abs() <= 1e-5 * (1.0 + q.abs()) + 2e-6 * terms,
                            "{at}: {a} vs portable {q}"
                        );
                    }
                }
            }
        }
    }

    /// Every vector quantizer gives the plain loop's codes, steps and corrections bit for bit
    /// (ties of x / step at .5 included: they round away from zero), on a row with a partial
    /// last group, a zero group and a non-finite one.
    #[test]
    fn vector_quantizers_equal_the_plain_loop() {
        let cols = 200; // 6 whole groups and one of 8
        let mut x = input(1, cols);
        // Group 1 (values 32..64, all within +-1 but these): max 127/64, so its values scale
        // by exactly 64 and these two land on ties, where half-to-even would differ.
        x[33] = 127.0 / 64.0;
        x[37] = 62.5 / 64.0;
        x[38] = -2.5 / 64.0;
        x[64..96].fill(0.0);
        x[100] = f32::INFINITY;
        // Per token, a row whose largest value is 127 has step 1 exactly: its halves are ties
        // for every quantizer (per-32 steps are multiples of an inexact unit and never are).
        let ties: Vec<f32> = (0..cols)
            .map(|i| {
                if i == 5 {
                    127.0
                } else {
                    (i as f32 - 100.0) * 1.25 + 0.5
                }
            })
            .collect();
        let sbs = cols.div_ceil(SB);
        type Quantizer = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], &mut [i16], bool) -> f32;
        for (per_token, x) in [(false, &x), (true, &x), (true, &ties)] {
            let run = |f: Quantizer| {
                let mut q = vec![0i8; sbs * SB];
                let (mut l, mut c) = (vec![0f32; sbs * 2 * LANES], vec![0f32; sbs * 2]);
                let mut m = vec![0i16; sbs * SB / GROUP];
                let unit = f(x, &mut q, &mut l, &mut c, &mut m, per_token);
                (q, l, c, m, unit)
            };
            let plain = run(quantize_row_body);
            // Only x86-64 adds a quantizer to the list.
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut fast: Vec<(&str, Quantizer)> = vec![("dispatched", quantize_row)];
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                fast.push(("avx2", avx2_quantizer));
            }
            for (name, f) in fast {
                let fast = run(f);
                assert_eq!(plain.0, fast.0, "{name}: codes, per_token {per_token}");
                assert_eq!(plain.1, fast.1, "{name}: steps, per_token {per_token}");
                assert_eq!(
                    plain.2, fast.2,
                    "{name}: corrections, per_token {per_token}"
                );
                assert_eq!(
                    plain.3, fast.3,
                    "{name}: step multiples, per_token {per_token}"
                );
                assert_eq!(plain.4, fast.4, "{name}: unit, per_token {per_token}");
            }
        }
    }

    /// The AVX2 quantizer as a safe function (only called where the CPU has AVX2).
    #[cfg(target_arch = "x86_64")]
    fn avx2_quantizer(
        x: &[f32],
        q: &mut [i8],
        l: &mut [f32],
        c: &mut [f32],
        m: &mut [i16],
        per_token: bool,
    ) -> f32 {
        assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: the CPU has AVX2 (asserted above).
        unsafe { quantize_row_avx2(x, q, l, c, m, per_token) }
    }

    /// Every order moves each value of every super-block to the one position [`ActOrder::at`]
    /// gives it, no two to the same place. (That these are the orders the kernels' planes
    /// read is the kernel tests' part: a step lane or multiple in another order fails them.)
    #[test]
    fn act_orders_move_every_value_once() {
        let plain: Vec<i8> = (0..2 * SB).map(|i| (i as i32 - 128) as i8).collect();
        for order in [ActOrder::Plain, ActOrder::Chunks256, ActOrder::Chunks512] {
            let mut q = plain.clone();
            order.apply(&mut q);
            let mut seen = [false; SB];
            for (g, c, r) in (0..SB).map(|i| (i / 32, i / 8 % 4, i % 8)) {
                let to = order.at(g, c, r);
                assert!(to < SB && !seen[to], "{order:?}: position {to}");
                seen[to] = true;
                for sb in [0, SB] {
                    assert_eq!(q[sb + to], plain[sb + 32 * g + 8 * c + r], "{order:?}");
                }
            }
        }
    }

    /// Per token: every nonzero finite group takes the row's one step `max / 127` (multiple 1,
    /// the unit itself); zero and non-finite groups still read as zero.
    #[test]
    fn per_token_steps_are_one_per_row() {
        let amax = [3.0f32, 1e-3, 0.0, f32::NAN, 127.0, f32::INFINITY];
        let (mut steps, mut m) = ([0f32; 6], [0i16; 6]);
        let unit = group_steps(&amax, &mut steps, &mut m, true);
        assert_eq!(unit, 1.0);
        assert_eq!(steps, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(m, [1, 1, 0, 0, 1, 0]);
    }

    /// Every group's step is its integer multiple of the row's unit, covers the group's
    /// absmax (no int8 code beyond 127) and exceeds absmax / 127 by less than one unit; zero
    /// and non-finite groups read as zero, and a row too small for a normal unit reads as zero.
    #[test]
    fn group_steps_are_exact_multiples_of_the_unit() {
        let amax = [
            3.0f32,
            1e-3,
            0.0,
            2.5e-9,
            f32::NAN,
            127.0,
            f32::INFINITY,
            126.99,
        ];
        let (mut steps, mut m) = ([0f32; 8], [0i16; 8]);
        let unit = group_steps(&amax, &mut steps, &mut m, false);
        assert_eq!(unit, 127.0 / 127.0 / MULT_MAX);
        for g in 0..amax.len() {
            if amax[g] == 0.0 || !amax[g].is_finite() {
                assert_eq!((steps[g], m[g]), (0.0, 0), "group {g}");
                continue;
            }
            assert_eq!(steps[g], m[g] as f32 * unit, "group {g}: exact multiple");
            assert!(
                (amax[g] / steps[g]).round() <= 127.0,
                "group {g}: int8 range"
            );
            assert!(
                steps[g] - amax[g] / 127.0 < unit * 1.0001,
                "group {g}: at most one unit over"
            );
            assert!(m[g] >= 1, "group {g}");
        }
        assert_eq!(m[5], 32767, "the largest group takes the whole i16 range");
        let tiny = [1e-33f32, 5e-34];
        let unit = group_steps(&tiny, &mut steps[..2], &mut m[..2], false);
        assert!(!unit.is_normal());
        assert_eq!((steps[0], steps[1], m[0], m[1]), (0.0, 0.0, 0, 0));
    }

    /// Several matrices on one input (one quantization, one parallel region) give exactly what
    /// each gives alone; matrices whose scale layouts differ run one by one.
    #[test]
    fn matmul_many_equals_one_matrix_at_a_time() {
        let (_, a) = packed(37, 384, Packing::Q2_0, 128);
        let (_, b) = packed(5, 384, Packing::PQ2_0, 128);
        let (_, c) = packed(64, 384, Packing::Q2_0, 64);
        for n in [1, 6] {
            let x = input(n, 384);
            for mats in [vec![&a, &b], vec![&a, &c, &b]] {
                for isa in Isa::available() {
                    let many = matmul_many_with(isa, &mats, &x, n);
                    assert_eq!(many.len(), mats.len());
                    for (m, y) in mats.iter().zip(&many) {
                        assert_eq!(*y, m.matmul_with(isa, &x, n), "{isa:?} n {n}");
                    }
                }
            }
        }
    }

    /// A token's outputs are the same bit for bit whether it runs alone (the decode kernels) or
    /// in a batch (the tile kernels), per 32 and per token: what lets batched greedy decoding
    /// equal each sequence decoded alone.
    /// The tile kernel's joint reduction of eight accumulators adds each in the same tree as
    /// `_mm512_reduce_add_ps` (what the one-token kernel uses): equal bit for bit, on values
    /// spread over 40 octaves so any other order would round differently.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn joint_reduction_equals_eight_reductions_bit_for_bit() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        #[target_feature(enable = "avx2,avx512f")]
        unsafe fn check(vals: &[f32]) {
            let v: [__m512; 8] = std::array::from_fn(|i| _mm512_loadu_ps(vals[16 * i..].as_ptr()));
            let mut got = [0f32; 8];
            _mm256_storeu_ps(got.as_mut_ptr(), super::x86::z::reduce8(v));
            for (i, g) in got.iter().enumerate() {
                let want = _mm512_reduce_add_ps(v[i]);
                assert_eq!(g.to_bits(), want.to_bits(), "vector {i}: {g} vs {want}");
            }
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let vals: Vec<f32> = (0..128)
                .map(|_| rng.gen_range(-1.0f32..1.0) * 2f32.powi(rng.gen_range(-20..20)))
                .collect();
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { check(&vals) };
        }
    }

    #[test]
    fn a_token_alone_equals_it_in_a_batch() {
        for (p, cols, group) in [
            (Packing::PQ2_0, 384, 128),
            (Packing::Q2_0, 320, 64),
            (Packing::PQ2_0, 2560, 128),
        ] {
            let (_, m) = packed(37, cols, p, group);
            for act in [ActQuant::None, ActQuant::PerToken] {
                let m = m.clone().with_act_quant(act);
                // Every tile size (1-4 tokens; 1-8 on AVX2 per token) and parallel quantization.
                for n in 2..=9 {
                    let x = input(n, cols);
                    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Amx) {
                        let batch = m.matmul_with(isa, &x, n);
                        for i in 0..n {
                            let alone = m.matmul_with(isa, &x[i * cols..(i + 1) * cols], 1);
                            assert_eq!(
                                alone,
                                batch[i * m.rows..(i + 1) * m.rows],
                                "{isa:?} {act:?} {p:?} cols {cols} n {n} token {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The integer kernel is exact given its quantized inputs: against an f64 sum over the
    /// dequantized int8 activations and the ternary weights.
    #[test]
    fn integer_dot_products_are_exact_on_quantized_inputs() {
        for (cols, group) in [(320, 64), (384, 128)] {
            integer_dots_exact(cols, group);
        }
    }

    fn integer_dots_exact(cols: usize, group: usize) {
        for act in [ActQuant::None, ActQuant::PerToken] {
            for isa in Isa::available() {
                integer_dots_exact_with(cols, group, act, isa);
            }
        }
    }

    fn integer_dots_exact_with(cols: usize, group: usize, act: ActQuant, isa: Isa) {
        let (rows, n) = (5, 2);
        let (_, m) = packed(rows, cols, Packing::Q2_0, group);
        let m = m.with_act_quant(act);
        let x = input(n, cols);
        let per_token = act == ActQuant::PerToken;
        let xq = QuantizedRows::new(&x, n, cols, m.sbs, ActOrder::Plain, per_token);
        let y = m.matmul_with(isa, &x, n);
        for i in 0..n {
            let XRow { q, lanes: s, .. } = xq.row(i);
            let xd: Vec<f64> = (0..cols)
                .map(|j| q[j] as f64 * step_of(s, j) as f64)
                .collect();
            for r in 0..rows {
                let want: f64 = m.row(r).iter().zip(&xd).map(|(w, v)| *w as f64 * v).sum();
                assert!(
                    (y[i * rows + r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{isa:?} {act:?} token {i} row {r}"
                );
            }
        }
    }
}
