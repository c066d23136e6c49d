//! Matrix multiply straight from packed 2-bit ternary weights (GGUF Q2_0 / PQ2_0 blocks), for
//! inference from an exported file without a dense f32 copy of the weights.
//!
//! `y[n, rows] = x[n, cols] @ W^T` where each row of W is a run of blocks `{f16 d, 2-bit codes}`.
//! Per block: the codes are expanded once through a 256-entry table (one byte -> four values in
//! {-1, 0, +1}), every input vector takes a dot product with them (adds and subtracts: the
//! multiplications by -1/0/+1 vectorize), and the block's scale multiplies the sum once.
//! Parallel over output rows. Memory: the packed bytes plus one block of expanded codes per
//! thread. Reference: [`matmul_reference`] (dequantize the whole matrix, then a dense product).
//!
//! On a GPU the same layout maps to one warp per output row (or tile of rows), each lane
//! expanding a byte of codes with the table in shared memory, and a warp reduction per block.

use crate::quant::codec::{dequantize_row, Packing};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Byte -> its four codes as -1.0 / 0.0 / +1.0 (code 3 = +2 is mapped to +2 for fidelity).
const LUT: [[f32; 4]; 256] = {
    let mut t = [[0f32; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            t[b][k] = (((b >> (2 * k)) & 3) as i32 - 1) as f32;
            k += 1;
        }
        b += 1;
    }
    t
};

/// A `[rows, cols]` ternary matrix in packed blocks, borrowing a shared buffer (the GGUF file).
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    buf: Arc<Vec<u8>>,
    start: usize,
    pub rows: usize,
    pub cols: usize,
    pub packing: Packing,
}

impl PackedMatrix {
    pub fn new(
        buf: Arc<Vec<u8>>,
        start: usize,
        rows: usize,
        cols: usize,
        packing: Packing,
    ) -> crate::Result<Self> {
        let need = rows * packing.row_bytes(cols);
        if !cols.is_multiple_of(packing.block()) || start + need > buf.len() {
            return Err(crate::Error::Msg(format!(
                "packed matrix [{rows}, {cols}] ({packing:?}) does not fit its buffer of {} bytes at {start}",
                buf.len()
            )));
        }
        Ok(Self {
            buf,
            start,
            rows,
            cols,
            packing,
        })
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.packing.row_bytes(self.cols)
    }

    fn row_bytes(&self, r: usize) -> &[u8] {
        let rb = self.packing.row_bytes(self.cols);
        &self.buf[self.start + r * rb..self.start + (r + 1) * rb]
    }

    /// Row `r` dequantized (embedding lookup).
    pub fn row(&self, r: usize) -> Vec<f32> {
        dequantize_row(self.row_bytes(r), self.cols, self.packing)
    }

    /// `x: [n, cols]` row-major -> `[n, rows]` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "input length");
        let b = self.packing.block();
        let bb = self.packing.block_bytes();
        let cols = self.cols;
        let mut yt = vec![0f32; self.rows * n];
        yt.par_chunks_mut(n).enumerate().for_each(|(r, out)| {
            for (bi, blk) in self.row_bytes(r).chunks_exact(bb).enumerate() {
                let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                if d == 0.0 {
                    continue;
                }
                for (i, o) in out.iter_mut().enumerate() {
                    let xs = &x[i * cols + bi * b..i * cols + (bi + 1) * b];
                    // Four lanes, one table entry (four codes) per byte: no intermediate buffer,
                    // so the compiler keeps everything in vector registers.
                    let mut acc = [0f32; 4];
                    for (byte, x4) in blk[2..].iter().zip(xs.chunks_exact(4)) {
                        let t = &LUT[*byte as usize];
                        for k in 0..4 {
                            acc[k] += t[k] * x4[k];
                        }
                    }
                    *o += d * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
                }
            }
        });
        let mut y = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for i in 0..n {
                y[i * self.rows + r] = yt[r * n + i];
            }
        }
        y
    }
}

/// Plain reference: dequantize every row, then a dense product.
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
    use crate::quant::codec::pack_row;

    #[test]
    fn packed_matmul_equals_dequantize_then_dense() {
        for p in [Packing::Q2_0, Packing::PQ2_0] {
            let (rows, cols, n) = (37, 256, 5);
            let mut buf = vec![0u8; 3]; // a non-zero start offset
            for r in 0..rows {
                let codes: Vec<i8> = (0..cols)
                    .map(|j| (((r * 31 + j * 17) % 3) as i8) - 1)
                    .collect();
                let scales = [0.01 * (r + 1) as f32, 0.5];
                pack_row(&codes, &scales, 128, p, &mut buf);
            }
            let m = PackedMatrix::new(Arc::new(buf), 3, rows, cols, p).unwrap();
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let (a, b) = (m.matmul(&x, n), matmul_reference(&m, &x, n));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(u, v)| (u - v).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{p:?}: {worst}");
        }
        assert!(PackedMatrix::new(Arc::new(vec![0; 10]), 0, 2, 64, Packing::Q2_0).is_err());
    }
}
