//! The element types our f32 kernels read weights in: f32, or bf16 widened to f32 as it is loaded
//! (exact: a bf16 is the top half of an f32). A product that streams its weight once, as
//! decoding's LoRA deltas do, runs at the speed of memory, so bf16 halves its time.

use std::borrow::Cow;

use half::bf16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub(crate) trait Weight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// `w` in f32: borrowed when it is.
    fn widen(w: &[Self]) -> Cow<'_, [f32]> {
        Cow::Owned(w.iter().map(|v| v.to_f32()).collect())
    }

    /// The 16 elements at `p` as f32 lanes; lanes outside `mask` are zero and not read.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; the lanes in `mask` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;

    /// The 8 elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2; the 8 elements are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// The 8 elements at `p` as f32 lanes; lanes whose `mask` element is non-negative are zero
    /// and not read.
    ///
    /// # Safety
    /// The CPU has AVX2; the lanes in `mask` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8_masked(p: *const Self, mask: __m256i) -> __m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn widen(w: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(w)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's promise.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_masked(p: *const f32, mask: __m256i) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe { _mm256_maskload_ps(p, mask) }
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's promise; each 16-bit element becomes the high half of a lane.
        unsafe {
            let bits = _mm256_maskz_loadu_epi16(mask, p as *const _);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe {
            let bits = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_masked(p: *const bf16, mask: __m256i) -> __m256 {
        // AVX2 has no 16-bit masked load: the lanes one by one. Only the AVX2 kernels' last
        // partial vector of a row comes here.
        let mut lanes = [0i32; 8];
        // SAFETY: `__m256i` and `[i32; 8]` have the same size; the caller's promise for `p`.
        let on: [i32; 8] = unsafe { std::mem::transmute(mask) };
        for (l, lane) in lanes.iter_mut().enumerate() {
            if on[l] < 0 {
                *lane = (unsafe { *p.add(l) }.to_bits() as i32) << 16;
            }
        }
        // SAFETY: 8 readable lanes of a local array.
        unsafe { _mm256_castsi256_ps(_mm256_loadu_si256(lanes.as_ptr() as *const __m256i)) }
    }
}
