//! Intel AMX (Advanced Matrix Extensions: Xeon Sapphire Rapids and later) from stable Rust: the
//! platform part that every AMX kernel shares. Not a kernel itself (the kernels using it sit
//! beside their references: [`crate::kernels::ternary_matmul`]'s int8 GEMM).
//!
//! - Detection: CPUID leaf 7 (AMX-TILE, AMX-INT8, AMX-BF16) and the OS's XCR0 (tile
//!   configuration and tile data state enabled).
//! - Permission: Linux refuses tile data to a process until it asks once,
//!   `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; until then the first tile
//!   instruction dies with SIGILL. The request is made once per process, before AMX is offered.
//! - [`TileConfig`]: the 64-byte palette-1 configuration `ldtilecfg` loads (rows and bytes per
//!   row of each of the 8 tile registers). Each thread that runs tiles loads one first and
//!   releases the state after (`tilerelease`), so an idle thread carries no 8 KiB of tile state.
//!
//! The tile instructions themselves are inline assembly in the kernels (the intrinsics are not
//! stable Rust, and Rust's inline assembly has no tile register class: each kernel names its
//! `tmm` registers in one `asm!` block and nothing else in the program touches them).

/// Which AMX parts this CPU has, with the OS's and Linux's permission to use them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amx {
    /// `tdpbssd` and friends: int8 x int8 -> int32.
    pub int8: bool,
    /// `tdpbf16ps`: bf16 x bf16 -> f32.
    pub bf16: bool,
}

impl Amx {
    /// Detected once per process (the permission request included).
    pub fn get() -> Amx {
        static AMX: std::sync::OnceLock<Amx> = std::sync::OnceLock::new();
        *AMX.get_or_init(detect)
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> Amx {
    use std::arch::x86_64::__cpuid_count;
    let (leaf1, leaf7) = (__cpuid_count(1, 0), __cpuid_count(7, 0));
    let tile = leaf7.edx & (1 << 24) != 0;
    let (bf16, int8) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 25) != 0);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    if !(tile && osxsave) {
        return Amx::default();
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores tile state.
    // SAFETY: OSXSAVE checked above.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (3 << 17) != 3 << 17 || !request_tile_permission() {
        return Amx::default();
    }
    Amx { int8, bf16 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> Amx {
    Amx::default()
}

/// XCR0 (the OS-enabled state components).
///
/// # Safety
/// The CPU must have OSXSAVE (CPUID.1:ECX bit 27).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
        options(nomem, nostack, preserves_flags));
    (hi as u64) << 32 | lo as u64
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when Linux grants this process
/// tile data (kernels before 5.16 lack the call and also lack AMX support).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; the kernel clobbers rcx and r11.
    unsafe {
        std::arch::asm!("syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

/// A palette-1 tile configuration (`ldtilecfg`'s 64-byte operand).
#[repr(C, align(64))]
pub struct TileConfig([u8; 64]);

impl TileConfig {
    /// Every register unused (0 rows) until [`TileConfig::set`].
    pub fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1: 8 registers of up to 16 rows x 64 bytes
        Self(c)
    }

    /// Tile register `tmm` holds `rows` rows of `bytes` bytes (at most 16 and 64).
    pub fn set(mut self, tmm: usize, rows: u8, bytes: u16) -> Self {
        assert!(
            tmm < 8 && rows <= 16 && bytes <= 64,
            "tile {tmm}: {rows} x {bytes}"
        );
        self.0[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&bytes.to_le_bytes());
        self.0[48 + tmm] = rows;
        self
    }

    /// Loads this configuration for the calling thread (zeroing every tile register). Off
    /// x86-64 it does nothing ([`Amx::get`] never reports AMX there).
    ///
    /// # Safety
    /// [`Amx::get`] must have reported AMX on this CPU (it also obtained Linux's permission).
    pub unsafe fn load(&self) {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly));
    }
}

impl Default for TileConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Returns the calling thread's tile state to its initial (unused) state (nothing off x86-64).
///
/// # Safety
/// As [`TileConfig::load`].
pub unsafe fn release() {
    #[cfg(target_arch = "x86_64")]
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

// A 16 x 16 transpose of 32-bit lanes in AVX-512 registers: AMX kernels move between row
// layouts and tile layouts with it (int8 kernel: f32 results to token rows; bf16 GEMM: pairs of
// B's rows to B tiles).
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Which output of the last round of [`transpose16`] holds column `k`: the pd unpack
/// round leaves columns 1 and 2 of each four swapped.
#[cfg(target_arch = "x86_64")]
const TRANSPOSED: [usize; 16] = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15];

/// A 16 x 16 transpose of 32-bit lanes in registers (four rounds of unpack / shuffle).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        for j in 0..2 {
            let (x, y) = (
                _mm512_castps_pd(a[4 * i + j]),
                _mm512_castps_pd(a[4 * i + j + 2]),
            );
            b[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            b[4 * i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
        }
    }
    let mut c = [_mm512_setzero_ps(); 16];
    for i in 0..2 {
        for j in 0..4 {
            c[8 * i + j] = _mm512_shuffle_f32x4::<0x88>(b[8 * i + j], b[8 * i + j + 4]);
            c[8 * i + j + 4] = _mm512_shuffle_f32x4::<0xdd>(b[8 * i + j], b[8 * i + j + 4]);
        }
    }
    let mut d = [_mm512_setzero_ps(); 16];
    for j in 0..8 {
        d[j] = _mm512_shuffle_f32x4::<0x88>(c[j], c[j + 8]);
        d[j + 8] = _mm512_shuffle_f32x4::<0xdd>(c[j], c[j + 8]);
    }
    // Token k sits in d at the position the rounds above moved it to.
    let mut out = [_mm512_setzero_ps(); 16];
    for (k, o) in out.iter_mut().enumerate() {
        *o = d[TRANSPOSED[k]];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-register transpose moves every element where a plain transpose does.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_amx_epilogue_transpose_is_a_transpose() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|j| (16 * i + j) as f32))
            .collect();
        // SAFETY: AVX-512F checked above; [f32; 16] and __m512 have the same size.
        let t: [[f32; 16]; 16] = unsafe {
            let r = std::array::from_fn(|i| {
                std::mem::transmute::<[f32; 16], std::arch::x86_64::__m512>(m[i])
            });
            std::mem::transmute(transpose16(r))
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[j][i], m[i][j], "({i}, {j})");
            }
        }
    }

    #[test]
    fn config_layout_is_what_ldtilecfg_reads() {
        let c = TileConfig::new().set(0, 16, 64).set(2, 8, 32);
        assert_eq!(c.0[0], 1);
        assert_eq!(&c.0[16..18], &64u16.to_le_bytes());
        assert_eq!(&c.0[20..22], &32u16.to_le_bytes());
        assert_eq!((c.0[48], c.0[49], c.0[50]), (16, 0, 8));
    }

    /// Where the CPU offers AMX, a configuration loads and releases without a fault (the
    /// permission request worked).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles_load_where_offered() {
        let amx = Amx::get();
        if amx.int8 || amx.bf16 {
            // SAFETY: offered (checked above).
            unsafe {
                TileConfig::new().set(0, 16, 64).load();
                release();
            }
        }
    }
}
