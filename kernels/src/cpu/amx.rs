//! Matrix products with bf16 weights on Intel AMX tiles. One `tdpbf16ps` multiplies a 16 x 32
//! bf16 tile by a 32 x 16 one into 16 x 16 f32 sums: several times the f32 AVX-512 rate of the
//! same core (`tandem bench kernels`). Weights stay in the checkpoint's row-major bf16, read in
//! place; the activations are rounded to bf16 as they are packed for the tiles, and every sum is
//! kept in f32, as torch's bf16 matmuls do.
//!
//! Both products a linear layer needs run here: `x · Wᵀ` (forward) and `dy · W` (the input
//! gradient). The tile unit takes its right operand in "VNNI" layout, pairs of consecutive
//! reduction elements side by side, so each product packs the operand that is cheap to pack
//! (the activations, or a strip of the weight) and reads the other as it lies.

use std::arch::asm;

use half::bf16;
use rayon::prelude::*;

use super::multiversion;

/// Reduction elements per tile step: a tile row holds 32 bf16 (64 bytes).
const STEP: usize = 32;
/// Rows (and f32 columns) of a tile.
const TILE: usize = 16;
/// Bytes of one packed right-hand tile: 16 rows of 16 bf16 pairs.
const TILE_BYTES: usize = 1024;

/// Whether the CPU has AMX-TILE and AMX-BF16 and Linux lets this process use the tiles (a
/// process asks for the tile data state once, before its first tile instruction).
pub(super) fn granted() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes only whether this
        // process may use the tile registers.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Whether `x · Wᵀ` takes a weight whose rows are `k` long: whole tile steps of 32.
pub(super) fn fits(k: usize) -> bool {
    k.is_multiple_of(STEP)
}

/// `dst[m×n] = x[m×k] · w[n×k]ᵀ`, `w` row-major bf16. `false` (and `dst` untouched) when `k`
/// does not [`fits`]: the weight's rows are read in whole tile steps.
///
/// Computed as `yᵀ = W · xᵀ`: the weight is the left operand, read where it lies, and only `x`
/// is packed.
pub(super) fn matmul_xwt(
    dst: &mut [f32],
    x: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    threads: usize,
) -> bool {
    assert!(dst.len() >= m * n && x.len() >= m * k && w.len() >= n * k, "amx: operands too small");
    if !fits(k) || m == 0 || n == 0 {
        return false;
    }
    let (blocks, steps) = (m.div_ceil(TILE), k / STEP);
    let xp = pack_row_pairs(x, m, k, blocks, threads);
    let out = SharedRows { ptr: dst.as_mut_ptr(), cols: n };
    // Rows of x go in chunks of 128 whose packed tiles every task then reads from its cache;
    // each task takes 32 weight rows (read where they lie) and writes their 32 columns of
    // `dst` for the chunk's rows.
    const WIDTH: usize = 2 * TILE;
    const CHUNK: usize = 8;
    for c0 in (0..blocks).step_by(CHUNK) {
        let chunk = (blocks - c0).min(CHUNK);
        let rows = chunk * TILE;
        let task = |t: usize| {
            let j0 = t * WIDTH;
            let width = (n - j0).min(WIDTH);
            // A tile reads 16 whole rows: a last group of fewer is copied out, zero-padded.
            let padded: Vec<bf16>;
            let wt = if width.is_multiple_of(TILE) {
                &w[j0 * k..(j0 + width) * k]
            } else {
                padded = [&w[j0 * k..(j0 + width) * k], &vec![bf16::ZERO; (width.next_multiple_of(TILE) - width) * k]]
                    .concat();
                &padded[..]
            };
            // yᵀ of these weight rows for the chunk: `[32, rows]`. With one weight tile the
            // second A tile repeats the first and writes the same sums to the same place;
            // likewise the second B tile for an odd last block of x.
            let mut yt = vec![0.0f32; WIDTH * rows];
            let second = if width > TILE { TILE } else { 0 };
            let base = yt.as_mut_ptr();
            let c = |a: usize, b: usize| base.wrapping_add(a * rows + b * TILE);
            let _tiles = Tiles::configure();
            for b0 in (0..chunk).step_by(2) {
                let b1 = (b0 + 1).min(chunk - 1);
                let xp_block = |b: usize| xp[(c0 + b) * steps * TILE_BYTES / 4..].as_ptr();
                // SAFETY: every A tile reads 16 rows of k elements inside `wt`, every B tile
                // `steps` packed tiles inside `xp`, every C tile 16 rows of 16 inside `yt`
                // (`[32, rows]`); `steps >= 1`; the tiles are configured.
                unsafe {
                    product_2x2(
                        [c(0, b0), c(0, b1), c(second, b0), c(second, b1)],
                        rows * 4,
                        false,
                        [wt.as_ptr(), wt[second * k..].as_ptr()],
                        k * 2,
                        [xp_block(b0), xp_block(b1)],
                        steps,
                    )
                };
            }
            for i in 0..rows.min(m - c0 * TILE) {
                // SAFETY: row c0·16 + i < m; columns j0..j0 + width are this task's alone.
                let d = unsafe { out.row(c0 * TILE + i, j0, width) };
                d.iter_mut().enumerate().for_each(|(jj, d)| *d = yt[jj * rows + i]);
            }
        };
        let tasks = n.div_ceil(WIDTH);
        if threads > 1 && rows * n * k >= 1 << 18 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
    true
}

/// The row-major `[_, cols]` result that parallel tasks write, each in columns of its own.
struct SharedRows {
    ptr: *mut f32,
    cols: usize,
}

// SAFETY: tasks write disjoint elements (the callers' promise in `row`).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// Elements `j0..j0 + width` of row `i`.
    ///
    /// # Safety
    /// They lie inside the result, and no other task reads or writes them while this lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, j0: usize, width: usize) -> &mut [f32] {
        debug_assert!(j0 + width <= self.cols);
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.cols + j0), width) }
    }
}

/// `dst[m×k] = dy[m×n] · w[n×k]`, `w` row-major bf16: the input gradient of a linear layer.
/// Any shape: the packing pads every operand to whole tiles.
///
/// `dy` is the left operand (rounded to bf16, its columns padded to a multiple of 32); each task
/// packs the strip of the weight its 32 output columns read, 256 weight rows at a time, keeps
/// its sums in tiles of a `[rows, 32]` buffer of its own between strips, and then writes its
/// columns of `dst`.
pub(super) fn matmul_xw(dst: &mut [f32], dy: &[f32], w: &[bf16], (m, n, k): (usize, usize, usize), threads: usize) {
    assert!(dst.len() >= m * k && dy.len() >= m * n && w.len() >= n * k, "amx: operands too small");
    if m == 0 || k == 0 {
        return;
    }
    let (blocks, np) = (m.div_ceil(TILE), n.next_multiple_of(STEP).max(STEP));
    let rows = blocks * TILE;
    let dyp = to_bf16_padded(dy, (m, n), (rows, np), threads);
    let out = SharedRows { ptr: dst.as_mut_ptr(), cols: k };
    const WIDTH: usize = 2 * TILE;
    /// Weight rows packed at a time: 16 KiB of packed strip, which stays in L1 while every
    /// block of dy passes over it.
    const STRIP: usize = 8 * STEP;
    let task = |t: usize| {
        let c0 = t * WIDTH;
        let width = (k - c0).min(WIDTH);
        let second = if width > TILE { 1 } else { 0 };
        let mut sums = vec![0.0f32; rows * WIDTH];
        let mut strip = vec![0u32; 2 * (STRIP / STEP) * TILE_BYTES / 4];
        let _tiles = Tiles::configure();
        for (s, r0) in (0..np).step_by(STRIP).enumerate() {
            let steps = (np - r0).min(STRIP) / STEP;
            pack_column_pairs(&mut strip, w, (n, k), r0, steps, c0);
            let half = strip.len() / 2;
            for b0 in (0..blocks).step_by(2) {
                let b1 = (b0 + 1).min(blocks - 1);
                let base = sums.as_mut_ptr();
                let c = |b: usize, j: usize| base.wrapping_add(b * TILE * WIDTH + j * TILE);
                let a = |b: usize| dyp[b * TILE * np + r0..].as_ptr();
                // SAFETY: every A tile reads 16 rows of `steps` tile steps inside `dyp`
                // (`[rows, np]`), every B tile `steps` packed tiles inside `strip`, every C
                // tile 16 rows of 16 inside `sums` (`[rows, 32]`); `steps >= 1`; the tiles are
                // configured.
                unsafe {
                    product_2x2(
                        [c(b0, 0), c(b0, second), c(b1, 0), c(b1, second)],
                        WIDTH * 4,
                        s > 0,
                        [a(b0), a(b1)],
                        np * 2,
                        [strip.as_ptr(), strip[second * half..].as_ptr()],
                        steps,
                    )
                };
            }
        }
        for i in 0..m {
            // SAFETY: row i < m; columns c0..c0 + width are this task's alone.
            let d = unsafe { out.row(i, c0, width) };
            d.copy_from_slice(&sums[i * WIDTH..i * WIDTH + width]);
        }
    };
    let tasks = k.div_ceil(WIDTH);
    if threads > 1 && m * n * k >= 1 << 18 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Two bf16 values as the tile unit reads a pair: the first in the low half.
#[inline]
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// `v` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN), as bits: the same
/// bits as `bf16::from_f32`, without its branches, so that a loop over a row vectorises.
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 { (b >> 16) | 0x40 } else { rounded }
}

multiversion! {
    /// `src` rounded to bf16, two by two: `dst[q]` is the pair `(src[2q], src[2q+1])`.
    fn round_pairs(dst: &mut [u32], src: &[f32]) {
        dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, two)| *d = bf16_bits(two[0]) | bf16_bits(two[1]) << 16);
    }
}

multiversion! {
    /// `src` rounded to bf16.
    fn round_row(dst: &mut [bf16], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = bf16::from_bits(bf16_bits(v) as u16));
    }
}

/// `x[m×k]` (f32, k a multiple of 32) as right-hand tiles of `xᵀ`: for each block of 16 rows
/// and each step of 32 along k, 16 tile rows of the 16 rows' pairs `(x[i][2p], x[i][2p+1])`,
/// rows past `m` zero.
fn pack_row_pairs(x: &[f32], m: usize, k: usize, blocks: usize, threads: usize) -> Vec<u32> {
    let (steps, pairs) = (k / STEP, k / 2);
    let mut xp = vec![0u32; blocks * steps * TILE_BYTES / 4];
    let pack = |(b, tiles): (usize, &mut [u32])| {
        // The block's rows rounded, then transposed pair by pair: pair q of row i is row
        // q % 16, column i of tile step q / 16, so `tiles[16q + i]`.
        let rows = TILE.min(m - b * TILE);
        let mut rounded = vec![0u32; rows * pairs];
        for (i, r) in rounded.chunks_exact_mut(pairs).enumerate() {
            round_pairs(r, &x[(b * TILE + i) * k..][..k]);
        }
        for (q, t) in tiles.chunks_exact_mut(TILE).enumerate() {
            t.iter_mut().zip(rounded[q..].iter().step_by(pairs)).for_each(|(t, &p)| *t = p);
        }
    };
    let per_block = steps * TILE_BYTES / 4;
    if threads > 1 && blocks > 1 {
        xp.par_chunks_mut(per_block).enumerate().for_each(pack);
    } else {
        xp.chunks_mut(per_block).enumerate().for_each(pack);
    }
    xp
}

/// `x[m×n]` rounded to bf16 into `[rows, cols]`, zero-padded.
fn to_bf16_padded(x: &[f32], (m, n): (usize, usize), (rows, cols): (usize, usize), threads: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; rows * cols];
    let convert = |(i, o): (usize, &mut [bf16])| {
        if i < m {
            round_row(&mut o[..n], &x[i * n..(i + 1) * n]);
        }
    };
    if threads > 1 && m * n >= 1 << 16 {
        out.par_chunks_mut(cols).enumerate().for_each(convert);
    } else {
        out.chunks_mut(cols).enumerate().for_each(convert);
    }
    out
}

/// Packs weight rows `r0..r0 + 32·steps` of columns `c0..c0 + 32` of `w[n×k]` as right-hand
/// tiles: `strip` holds two halves (columns `c0..c0+16` and `c0+16..c0+32`), each `steps`
/// tiles whose row p holds, per column, the pair `(w[r][c], w[r+1][c])` for `r = r0 + 32·s +
/// 2p`. Rows past `n` and columns past `k` are zero.
fn pack_column_pairs(strip: &mut [u32], w: &[bf16], (n, k): (usize, usize), r0: usize, steps: usize, c0: usize) {
    let half = strip.len() / 2;
    let row = |r: usize| if r < n { &w[r * k..(r + 1) * k] } else { &[][..] };
    for h in 0..2 {
        let cols = c0 + h * TILE;
        for (q, t) in strip[h * half..].chunks_exact_mut(TILE).take(steps * TILE).enumerate() {
            let (a, b) = (row(r0 + 2 * q), row(r0 + 2 * q + 1));
            if cols + TILE <= b.len() {
                // Both rows whole over these columns: a loop without branches, vectorised.
                let (a, b) = (&a[cols..cols + TILE], &b[cols..cols + TILE]);
                t.iter_mut().zip(a.iter().zip(b)).for_each(|(t, (&x, &y))| *t = pair(x, y));
            } else {
                let at = |r: &[bf16], c: usize| r.get(c).copied().unwrap_or(bf16::ZERO);
                t.iter_mut().enumerate().for_each(|(c, t)| *t = pair(at(a, cols + c), at(b, cols + c)));
            }
        }
    }
}

/// The tile configuration every kernel here uses: palette 1, all eight tiles 16 rows of 64
/// bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const ALL_FULL: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row of tile t (a little-endian u16)
        c[48 + t] = TILE as u8; // rows of tile t
        t += 1;
    }
    TileConfig(c)
};

/// The tiles configured on this thread while it lives; released on drop, so that a thread
/// leaves no tile state for the kernel to save on every switch.
struct Tiles;

impl Tiles {
    fn configure() -> Tiles {
        // SAFETY: only built where `Isa::Amx` was detected (the tile state is granted); the
        // configuration is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &ALL_FULL as *const TileConfig, options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the configuration made in `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The 2 x 2 block of tile products over `steps` steps of 32 along the reduction:
/// `c[2i + j] (+)= A_i · B_j`. A tile i starts at `a[i]` (16 rows of 32 bf16, rows `lda` bytes
/// apart) and moves 64 bytes a step; B tile j is `steps` packed tiles from `b[j]`, one after
/// the other. The C tiles are 16 x 16 f32 with rows `ldc` bytes apart, loaded first when
/// `accumulate` (otherwise zero); C tiles may coincide when their sums are the same.
///
/// # Safety
/// The tiles are configured ([`Tiles`]); every tile read or written lies in its allocation;
/// `steps >= 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn product_2x2(
    c: [*mut f32; 4],
    ldc: usize,
    accumulate: bool,
    a: [*const bf16; 2],
    lda: usize,
    b: [*const u32; 2],
    steps: usize,
) {
    debug_assert!(steps >= 1);
    // SAFETY (the three blocks): the caller's promise; the tile registers are ours alone (the
    // compiler never allocates them) and keep their values between the blocks.
    unsafe {
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c0} + {ldc}*1]",
                "tileloadd tmm1, [{c1} + {ldc}*1]",
                "tileloadd tmm2, [{c2} + {ldc}*1]",
                "tileloadd tmm3, [{c3} + {ldc}*1]",
                c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3], ldc = in(reg) ldc,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        asm!(
            "2:",
            // Each product issues as soon as its operands are in, so that the next loads
            // overlap the products before them.
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            steps = inout(reg) steps => _,
            lda = in(reg) lda,
            ldb = in(reg) 64usize,
            options(nostack, readonly),
        );
        asm!(
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c3} + {ldc}*1], tmm3",
            c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3], ldc = in(reg) ldc,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::{matmul_xw, matmul_xwt};
    use crate::cpu::{Isa, random};

    /// The branch-free rounding gives `bf16::from_f32`'s bits for ties, subnormals, the largest
    /// values (rounding up to infinity), infinities and NaNs, at every vector level.
    #[test]
    fn rounding_matches_half() {
        let mut v: Vec<f32> = crate::cpu::random(4096, 7);
        let specials = [0.0, -0.0, 1.0 + f32::EPSILON * 64.0, 1.0 + f32::EPSILON * 128.0, f32::MIN_POSITIVE / 3.0];
        v.extend(specials);
        v.extend([f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN]);
        v.extend((0..64u32).map(|i| f32::from_bits(0x3F80_8000 + (i << 16)))); // exact ties
        v.push(0.0); // an even count, for the pairs
        let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        for isa in Isa::available() {
            let mut row = vec![bf16::ZERO; v.len()];
            super::round_row::on(isa, &mut row, &v);
            assert!(row.iter().map(|b| b.to_bits()).eq(want.iter().copied()), "{isa:?} round_row");
            let mut pairs = vec![0u32; v.len() / 2];
            super::round_pairs::on(isa, &mut pairs, &v);
            let got: Vec<u16> = pairs.iter().flat_map(|p| [*p as u16, (p >> 16) as u16]).collect();
            assert_eq!(got, want, "{isa:?} round_pairs");
        }
    }

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| bf16::from_f32(v).to_f64()).collect()
    }

    /// Every shape class: one row, a partial and whole tiles of rows, an odd last block, weight
    /// rows short of a tile, of a pair of tiles, and several, long reductions.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 1, 32),
        (5, 17, 64),
        (16, 16, 32),
        (17, 33, 96),
        (33, 40, 32),
        (64, 100, 128),
        (3, 64, 288),
        (40, 7, 32),
        (3, 40, 1024),
        (17, 33, 544),
    ];

    fn check(what: &str, got: &[f32], want: impl Fn(usize) -> f64) {
        for (i, &g) in got.iter().enumerate() {
            let w = want(i);
            assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    /// Against an f64 reference of the same bf16-rounded operands, so that only f32 summation
    /// separates the two.
    #[test]
    fn tiles_match_a_reference_of_the_rounded_operands() {
        if Isa::detected() < Isa::Amx {
            // Where the CPU has no tiles the dispatch must say so, so that the caller widens.
            let w = vec![bf16::ONE; 32];
            assert!(!crate::cpu::matmul_bf16_weight(&mut [0.0], &[1.0; 32], &w, (1, 1, 32), true));
            return;
        }
        // Outputs start as garbage: every element must be written.
        for &(m, n, k) in &SHAPES {
            let x = random(m * k, 1);
            let w: Vec<bf16> = random(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
            let mut y = vec![f32::NAN; m * n];
            assert!(matmul_xwt(&mut y, &x, &w, (m, n, k), 2));
            let xr = round(&x);
            check(&format!("x·Wᵀ {m}x{n}x{k}"), &y, |e| {
                let (i, j) = (e / n, e % n);
                (0..k).map(|p| xr[i * k + p] * wf[j * k + p]).sum()
            });
            // dy[m×n] · W[n×k]: the same weight as the input gradient's.
            let dy = random(m * n, 4);
            let mut dx = vec![f32::NAN; m * k];
            matmul_xw(&mut dx, &dy, &w, (m, n, k), 2);
            let dyr = round(&dy);
            check(&format!("dy·W {m}x{n}x{k}"), &dx, |e| {
                let (i, p) = (e / k, e % k);
                (0..n).map(|j| dyr[i * n + j] * wf[j * k + p]).sum()
            });
        }
        // The input gradient over odd shapes and more weight rows than one packed strip.
        for &(m, n, k) in &[(1, 1, 1), (7, 300, 19), (20, 513, 33)] {
            let dy = random(m * n, 5);
            let w: Vec<bf16> = random(n * k, 6).into_iter().map(bf16::from_f32).collect();
            let mut dx = vec![f32::NAN; m * k];
            matmul_xw(&mut dx, &dy, &w, (m, n, k), 2);
            let dyr = round(&dy);
            check(&format!("dy·W {m}x{n}x{k}"), &dx, |e| {
                let (i, p) = (e / k, e % k);
                (0..n).map(|j| dyr[i * n + j] * w[j * k + p].to_f64()).sum()
            });
        }
        // A reduction that is not a whole number of tile steps is refused, `dst` untouched.
        let mut y = vec![7.0; 2];
        assert!(!matmul_xwt(&mut y, &[1.0; 2 * 40], &[bf16::ONE; 40], (2, 1, 40), 1));
        assert_eq!(y, [7.0, 7.0]);
    }
}
