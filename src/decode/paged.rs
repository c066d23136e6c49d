//! Paged KV cache: fixed-size blocks from one pool, a block table per sequence.
//!
//! Data layout: per layer, K and V are each one growable pool of blocks
//! `[block][kv_head][slot][head_dim]` (f32, or f16 with [`KvType::F16`]: values rounded when
//! written, widened block by block when read); a block id means the same block in every layer. A
//! sequence is a block table (`Vec<block id>`) and a length; position p lives in block
//! `table[p / B]`, slot `p % B`. Blocks carry a reference count: `fork` copies only the table
//! (prefix sharing, e.g. for beams), and the first write into a shared block copies it
//! (copy-on-write). `truncate` (rollback) drops whole blocks past the new length; freed blocks go
//! to a free list and are reused. Fresh blocks are filled with NaN on purpose: attention reads
//! only slots below each sequence's length, and the tests prove unused slots never leak in.
//!
//! Attention reads the table block by block with the online softmax (running max and sum, as in
//! `kernels::flash_attention`), so no contiguous copy of a sequence's K/V is ever made; GQA maps
//! query head h to KV head h / (H / KV).
//!
//! Complexity: appending a token writes O(layers * kv_heads * head_dim), independent of the
//! sequence length (the contiguous cache's `cat` copies the whole past every step); attention
//! for one query is O(len * head_dim). Memory: 2 * kv_heads * head_dim * 4 (f16: 2) bytes per
//! token per layer, plus at most one partly used block per sequence. On a GPU this is vLLM's
//! PagedAttention: one thread block per (sequence, head), the block table in shared memory.

use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::kernels::flash_attention::AttnFloat;
use crate::kernels::flash_attention::{add_weighted_rows, dot, exp_in_place};
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

/// Which loops [`PagedKvCache::attend_rows`] runs: the plain ones (the build's baseline, f32
/// rows only), or the explicit 256-bit (`flash_attention::ymm`: AVX2, FMA, F16C) or 512-bit
/// (`zmm`: AVX-512F) ones.
const PLAIN: u8 = 0;
#[cfg(target_arch = "x86_64")]
const YMM: u8 = 1;
#[cfg(target_arch = "x86_64")]
const ZMM: u8 = 2;

/// How [`PagedKvCache::attend_rows`] reads a block of K or V rows: as f32 (borrowed from an
/// f32 pool, or an f16 pool's values widened into a buffer), or as f16 straight from an f16
/// pool, for the explicit SIMD loops that widen as they load (a batched decode step spent 6% of
/// its time widening pages into buffers). Widening is exact, so both give the same sums.
trait KvElem: Copy {
    fn block<'a>(pool: &'a Pool, r: std::ops::Range<usize>, buf: &'a mut Vec<f32>) -> &'a [Self];

    /// `k . q`.
    ///
    /// # Safety
    /// `SIMD` [`ZMM`] only on a CPU with AVX-512F, [`YMM`] only with AVX2, FMA and F16C.
    unsafe fn dot<const SIMD: u8>(k: &[Self], q: &[f32]) -> f32;

    /// `o += sum_j p[j] v[j]`.
    ///
    /// # Safety
    /// As [`KvElem::dot`].
    unsafe fn add_weighted_rows<const SIMD: u8>(o: &mut [f32], p: &[f32], v: &[Self]);
}

impl KvElem for f32 {
    fn block<'a>(pool: &'a Pool, r: std::ops::Range<usize>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        pool.get(r, buf)
    }

    #[inline(always)]
    unsafe fn dot<const SIMD: u8>(k: &[f32], q: &[f32]) -> f32 {
        match SIMD {
            #[cfg(target_arch = "x86_64")]
            ZMM => f32::dot_avx512(k, q),
            #[cfg(target_arch = "x86_64")]
            YMM => crate::kernels::flash_attention::ymm::dot(k, q),
            _ => dot(k, q),
        }
    }

    #[inline(always)]
    unsafe fn add_weighted_rows<const SIMD: u8>(o: &mut [f32], p: &[f32], v: &[f32]) {
        match SIMD {
            #[cfg(target_arch = "x86_64")]
            ZMM => f32::add_weighted_rows_avx512(o, p, v),
            #[cfg(target_arch = "x86_64")]
            YMM => crate::kernels::flash_attention::ymm::add_weighted_rows(o, p, v),
            _ => add_weighted_rows(o, p, v),
        }
    }
}

/// f16 rows are read in place only by the explicit SIMD loops (`SIMD` [`YMM`] or [`ZMM`]).
impl KvElem for half::f16 {
    fn block<'a>(
        pool: &'a Pool,
        r: std::ops::Range<usize>,
        _buf: &'a mut Vec<f32>,
    ) -> &'a [half::f16] {
        match pool {
            Pool::F16(p) => &p[r],
            Pool::F32(_) => panic!("paged cache: f16 rows asked of an f32 pool"),
        }
    }

    #[inline(always)]
    unsafe fn dot<const SIMD: u8>(k: &[half::f16], q: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::flash_attention::{ymm, zmm};
            match SIMD {
                ZMM => return zmm::dot(k, q),
                YMM => return ymm::dot(k, q),
                _ => {}
            }
        }
        let _ = (k, q);
        unreachable!("f16 rows are widened into f32 for the plain loops")
    }

    #[inline(always)]
    unsafe fn add_weighted_rows<const SIMD: u8>(o: &mut [f32], p: &[f32], v: &[half::f16]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::flash_attention::{ymm, zmm};
            match SIMD {
                ZMM => return zmm::add_weighted_rows(o, p, v),
                YMM => return ymm::add_weighted_rows(o, p, v),
                _ => {}
            }
        }
        let _ = (o, p, v);
        unreachable!("f16 rows are widened into f32 for the plain loops")
    }
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

    /// The offset of `head`'s row for position `pos` in block `b`.
    fn slot_in(&self, b: usize, pos: usize, head: usize) -> usize {
        ((b * self.kv_heads + head) * self.block_size + pos % self.block_size) * self.head_dim
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
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            let o = self.slot_in(b, pos, h);
            self.k[layer].put(o, &k[h * hd..(h + 1) * hd]);
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
    /// softmax per row and head: each K/V block is fetched once for all the run's rows and the
    /// group's heads, not once per query (grouped-query attention, and a prompt chunk's rows,
    /// share it; an f16 block is widened as the AVX-512 loops load it, elsewhere into a buffer
    /// once per block). A row's result does not depend on which rows share its run.
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
        // The dots and updates in explicit 512-bit (AVX-512F) or 256-bit (AVX2) SIMD: attention
        // is a sixth of a batched step at a few hundred positions, and the plain loops compiled
        // for AVX2 were a seventh of 1-thread decode under TERN_ISA=avx2. An f16 cache is read
        // as f16 there, widened as the loops load it.
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let f16 = matches!(self.k[layer], Pool::F16(_));
            // SAFETY (all four): the CPU has the features each function is compiled for
            // (checked here); f16 rows only from f16 pools.
            if crate::kernels::avx512f() {
                match f16 {
                    true => unsafe { self.rows_zmm::<half::f16>(layer, seq, pos0, q, kvh, out) },
                    false => unsafe { self.rows_zmm::<f32>(layer, seq, pos0, q, kvh, out) },
                }
                return Ok(());
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                match f16 {
                    true => unsafe { self.rows_ymm::<half::f16>(layer, seq, pos0, q, kvh, out) },
                    false => unsafe { self.rows_ymm::<f32>(layer, seq, pos0, q, kvh, out) },
                }
                return Ok(());
            }
        }
        // SAFETY: the plain loops, and f32 rows read any pool.
        unsafe { self.rows::<PLAIN, f32>(layer, seq, pos0, q, kvh, out) };
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_ymm<E: KvElem>(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        self.rows::<YMM, E>(layer, seq, pos0, q, kvh, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_zmm<E: KvElem>(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        self.rows::<ZMM, E>(layer, seq, pos0, q, kvh, out)
    }

    /// [`Self::attend_rows`]'s work, its shapes already checked, reading K and V as `E`.
    ///
    /// # Safety
    /// `SIMD` other than [`PLAIN`] only from [`Self::rows_ymm`] / [`Self::rows_zmm`]; `E = f16` only
    /// with f16 pools.
    #[inline(always)]
    unsafe fn rows<const SIMD: u8, E: KvElem>(
        &self,
        layer: usize,
        seq: &Seq,
        pos0: usize,
        q: Queries,
        kvh: usize,
        out: &mut [f32],
    ) {
        let (hd, bs, g) = (self.head_dim, self.block_size, q.g);
        let rows = out.len() / (g * hd);
        let last = pos0 + rows - 1;
        let scale = 1.0 / (hd as f32).sqrt();
        // Per row and head: running max, running sum; per head this block's scores (then
        // probabilities) for the row being updated.
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows * g], vec![0f32; rows * g]);
        let mut p = vec![0f32; g * bs];
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        out.fill(0.0);
        for p0 in (0..=last).step_by(bs) {
            let base = self.slot(seq, p0, kvh);
            let nb = (last + 1 - p0).min(bs);
            // Each block's K and V are a page apart from the last block's: the hardware
            // prefetchers start cold on every one. This block's V is fetched while its scores
            // are computed, the next block's K while its values are added.
            self.v[layer].prefetch(base..base + nb * hd);
            if p0 + bs <= last {
                let next = self.slot(seq, p0 + bs, kvh);
                self.k[layer].prefetch(next..next + (last + 1 - p0 - bs).min(bs) * hd);
            }
            let kb = E::block(&self.k[layer], base..base + nb * hd, &mut kbuf);
            let vb = E::block(&self.v[layer], base..base + nb * hd, &mut vbuf);
            // Rows before this block's first position see none of it.
            for i in p0.saturating_sub(pos0)..rows {
                let n = (pos0 + i + 1 - p0).min(nb);
                let qi = &q.q[i * q.stride..i * q.stride + g * hd];
                let (mi, li) = (&mut m[i * g..(i + 1) * g], &mut l[i * g..(i + 1) * g]);
                let oi = &mut out[i * g * hd..(i + 1) * g * hd];
                for (r, kr) in kb[..n * hd].chunks_exact(hd).enumerate() {
                    for (j, q) in qi.chunks_exact(hd).enumerate() {
                        // SAFETY: SIMD only where the CPU has its features (`rows_*mm`).
                        p[j * bs + r] = E::dot::<SIMD>(kr, q) * scale;
                    }
                }
                for j in 0..g {
                    let ps = &mut p[j * bs..j * bs + n];
                    let m_new = ps.iter().copied().fold(mi[j], f32::max);
                    let f = if mi[j] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (mi[j] - m_new).exp()
                    };
                    li[j] *= f;
                    oi[j * hd..(j + 1) * hd].iter_mut().for_each(|x| *x *= f);
                    li[j] += exp_in_place(ps, m_new);
                    mi[j] = m_new;
                }
                for (j, o) in oi.chunks_exact_mut(hd).enumerate() {
                    // SAFETY: as above.
                    E::add_weighted_rows::<SIMD>(o, &p[j * bs..j * bs + n], &vb[..n * hd]);
                }
            }
        }
        for (o, l) in out.chunks_exact_mut(hd).zip(&l) {
            o.iter_mut().for_each(|x| *x /= l);
        }
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
        for h in 0..self.kv_heads {
            for p in 0..seq.len {
                let o = self.slot(seq, p, h);
                k.extend_from_slice(self.k[layer].get(o..o + hd, &mut Vec::new()));
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
        for t in [KvType::F32, KvType::F16] {
            attention_over_pages(t);
        }
    }

    fn attention_over_pages(t: KvType) {
        let (layers, kv, hd, heads, bs) = (2, 2, 8, 4, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut cache = PagedKvCache::with_type(layers, kv, hd, bs, t);
        let stored = |x: Vec<f32>| -> Vec<f32> {
            match t {
                KvType::F32 => x,
                KvType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            }
        };
        let lens = [1usize, 5, 8, 13];
        let seqs: Vec<SeqId> = lens.iter().map(|_| cache.add_seq()).collect();
        let mut truth = vec![];
        // Interleave appends (one or several tokens at a time) across sequences.
        for (&s, &len) in seqs.iter().zip(&lens) {
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
