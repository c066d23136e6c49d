//! The 2-bit ternary codec of GGUF Q2_0 (ggml type 42) and PQ2_0 (type 142, PrismML).
//!
//! A block is `{ f16 d; u8 qs[B/4] }` for B = 64 (Q2_0, 18 bytes) or B = 128 (PQ2_0, 34 bytes).
//! Element j of a block has code `q = (qs[j/4] >> 2*(j%4)) & 3` and value `(q - 1) * d`:
//! code 0 = -1, 1 = 0, 2 = +1 (3 = +2 is never written by tern). Blocks run along the
//! contiguous (input) dimension of each row. A group-128 scale is written into both 64-blocks of
//! its group, so Q2_0 holds a group-128 model losslessly (only the scale is rounded to f16).

use crate::error::{Error, Result};
use half::f16;

/// ggml type id of Q2_0 in stock llama.cpp.
pub const GGML_Q2_0: u32 = 42;
/// ggml type id of PQ2_0 in PrismML's llama.cpp fork.
pub const GGML_PQ2_0: u32 = 142;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// ggml type 42, 64-weight blocks.
    Q2_0,
    /// ggml type 142 (PrismML fork), 128-weight blocks.
    PQ2_0,
}

impl Packing {
    pub fn block(self) -> usize {
        match self {
            Packing::Q2_0 => 64,
            Packing::PQ2_0 => 128,
        }
    }
    pub fn block_bytes(self) -> usize {
        2 + self.block() / 4
    }
    /// The ggml type id of this packing in GGUF files.
    pub fn ggml_type(self) -> u32 {
        match self {
            Packing::Q2_0 => GGML_Q2_0,
            Packing::PQ2_0 => GGML_PQ2_0,
        }
    }
    /// The packing of a ggml type id, when it is one of the two ternary types.
    pub fn from_ggml_type(ggml_type: u32) -> Option<Self> {
        [Packing::Q2_0, Packing::PQ2_0]
            .into_iter()
            .find(|p| p.ggml_type() == ggml_type)
    }
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block() * self.block_bytes()
    }
}

/// Checks that a `[rows, cols]` weight with groups of `group` can be packed losslessly.
pub fn check_packable(name: &str, cols: usize, group: usize, p: Packing) -> Result<()> {
    let b = p.block();
    if !cols.is_multiple_of(b) {
        return Err(Error::Msg(format!(
            "{name}: row length {cols} is not a multiple of the {b}-weight {p:?} block"
        )));
    }
    if !group.is_multiple_of(b) {
        return Err(Error::Msg(format!(
            "{name}: group size {group} is not a multiple of the {b}-weight {p:?} block, so its scales cannot be \
             written losslessly (use group_size {b} or a multiple, or --format f16)"
        )));
    }
    Ok(())
}

/// Packs one row: `codes` in {-1, 0, 1}, `scales` one per group of `group`.
pub fn pack_row(codes: &[i8], scales: &[f32], group: usize, p: Packing, out: &mut Vec<u8>) {
    let b = p.block();
    for (bi, block) in codes.chunks(b).enumerate() {
        let d = f16::from_f32(scales[bi * b / group]);
        out.extend_from_slice(&d.to_bits().to_le_bytes());
        let mut qs = vec![0u8; b / 4];
        for (j, &t) in block.iter().enumerate() {
            qs[j / 4] |= ((t + 1) as u8 & 3) << (2 * (j % 4));
        }
        out.extend_from_slice(&qs);
    }
}

/// Unpacks one row of `cols` weights into (codes, per-block f16 scales as f32).
pub fn unpack_row(bytes: &[u8], cols: usize, p: Packing) -> (Vec<i8>, Vec<f32>) {
    let b = p.block();
    let mut codes = Vec::with_capacity(cols);
    let mut scales = Vec::with_capacity(cols / b);
    for blk in bytes.chunks(p.block_bytes()).take(cols / b) {
        scales.push(f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32());
        for j in 0..b {
            codes.push((((blk[2 + j / 4] >> (2 * (j % 4))) & 3) as i8) - 1);
        }
    }
    (codes, scales)
}

/// Dequantizes one packed row (the reference for the packed matmul kernel).
pub fn dequantize_row(bytes: &[u8], cols: usize, p: Packing) -> Vec<f32> {
    let (codes, scales) = unpack_row(bytes, cols, p);
    codes
        .iter()
        .enumerate()
        .map(|(j, &t)| t as f32 * scales[j / p.block()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_llama_cpp_bit_layout() {
        let codes: Vec<i8> = (0..256).map(|i| ((i * 7 % 3) as i8) - 1).collect();
        let scales = [0.5f32, 0.125];
        for p in [Packing::Q2_0, Packing::PQ2_0] {
            let mut buf = Vec::new();
            pack_row(&codes, &scales, 128, p, &mut buf);
            assert_eq!(buf.len(), p.row_bytes(256));
            let (c, s) = unpack_row(&buf, 256, p);
            assert_eq!(c, codes);
            let per_block = 128 / p.block();
            assert!(s
                .iter()
                .enumerate()
                .all(|(i, &x)| x == scales[i / per_block]));
        }
        // First byte of qs holds elements 0..4, element 0 in the low bits: codes -1,0,1,-1
        // -> 2-bit values 0,1,2,0 -> 0b00_10_01_00.
        let mut buf = Vec::new();
        pack_row(
            &[-1, 0, 1, -1].repeat(16),
            &[1.0],
            64,
            Packing::Q2_0,
            &mut buf,
        );
        assert_eq!(&buf[..3], &[0x00, 0x3c, 0b0010_0100]);
        assert!(check_packable("w", 96, 128, Packing::Q2_0).is_err());
        assert!(check_packable("w", 256, 32, Packing::Q2_0).is_err());
        assert!(check_packable("w", 256, 128, Packing::Q2_0).is_ok());
    }
}
