//! The element types the fast kernels run on, raw output buffers, and per-thread
//! scratch pools.

use candle_core::WithDType;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// A float type the fast kernels support: `f32` for training, `f64` for
/// finite-difference tests.
pub(crate) trait Elem: WithDType + gemm_elem::Sealed {
    const ZERO: Self;
    const ONE: Self;

    fn is_nan(self) -> bool;

    /// The larger of two numbers, ignoring a NaN (one `maxss`, no branch).
    fn max_num(self, other: Self) -> Self;

    /// `self * a + b` with one rounding (one FMA instruction in code compiled
    /// for FMA, see [`avx2_fma`]).
    fn mul_add(self, a: Self, b: Self) -> Self;

    /// Runs `f` on this thread's pool of spare scratch vectors for `Self`, or
    /// returns `None` while the thread is being torn down.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

mod gemm_elem {
    /// Only types the `gemm` crate dispatches on may implement [`super::Elem`];
    /// `gemm::gemm` is generic over any `T: 'static` but panics on others.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

macro_rules! impl_elem {
    ($t:ty) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }

            fn max_num(self, other: Self) -> Self {
                <$t>::max(self, other)
            }

            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }

            fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
                thread_local! {
                    static POOL: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
                }
                POOL.try_with(|p| f(&mut p.borrow_mut())).ok()
            }
        }
    };
}
impl_elem!(f32);
impl_elem!(f64);

/// Set by [`crate::use_baseline_simd`]: run the baseline-compiled loops even
/// where AVX2 and FMA are available (for tests and comparisons).
pub(crate) static BASELINE_ONLY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether this CPU runs AVX2 and FMA instructions (checked once).
///
/// The crate is compiled for the baseline of its target (SSE2 on x86-64), as
/// a library must be; its hot loops are compiled a second time with AVX2
/// and FMA enabled and chosen at run time when this is true, as the `gemm`
/// crate does for its micro-kernels. Without FMA, [`Elem::mul_add`] is a
/// library call: correct, and only slow on CPUs from before 2013.
pub(crate) fn avx2_fma() -> bool {
    if BASELINE_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FLAG.get_or_init(|| {
            !crate::baseline_forced()
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How many spare vectors one thread keeps per element type. A kernel holds at
/// most three at once, so this covers nested use without hoarding memory.
const MAX_POOLED: usize = 8;

/// A scratch vector borrowed from the current thread's pool and returned to it
/// on drop, so hot loops reuse the same allocation call after call.
///
/// Its contents are whatever the previous user left behind (zeros when freshly
/// grown): every kernel either overwrites the part it reads or clears it.
pub(crate) struct Scratch<T: Elem> {
    /// Never truncated, so a vector that once grew stays initialised in full.
    buf: Vec<T>,
    len: usize,
}

impl<T: Elem> Scratch<T> {
    /// Borrows a scratch vector with exactly `len` initialised elements.
    pub(crate) fn new(len: usize) -> Self {
        // Prefer the largest spare vector so that growth happens rarely.
        let mut buf = T::with_pool(|pool| {
            let best = (0..pool.len()).max_by_key(|&i| pool[i].len());
            best.map(|i| pool.swap_remove(i))
        })
        .flatten()
        .unwrap_or_default();
        if buf.len() < len {
            // Only the newly grown tail is filled; steady-state calls skip this.
            buf.resize(len, T::ZERO);
        }
        Self { buf, len }
    }
}

impl<T: Elem> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: Elem> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

impl<T: Elem> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // During thread teardown the pool is gone and the vector is freed.
        let _ = T::with_pool(|pool| {
            if pool.len() < MAX_POOLED {
                pool.push(buf);
            }
        });
    }
}

/// An output vector that is written in place, possibly from several threads,
/// before it is ever read, so it is never zero-filled.
///
/// The vector keeps length 0 until [`Output::finish`] asserts that every
/// element has been written; until then it is only reached through raw
/// pointers, never through references to uninitialised memory.
pub(crate) struct Output<T> {
    buf: Vec<T>,
    len: usize,
}

/// A raw pointer to an [`Output`]'s memory that may cross threads. Each
/// parallel task writes a disjoint range through it.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(*mut T);

// SAFETY: `OutPtr` is only used to write disjoint ranges of one allocation from
// different rayon tasks, which is the same contract as `par_chunks_mut`.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The pointer to element `offset`.
    ///
    /// # Safety
    /// `offset` must lie within the allocation, and no two threads may write the
    /// same element.
    #[inline]
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }

    /// The elements `offset..offset + len` as uninitialised slots.
    ///
    /// # Safety
    /// The range must lie within the allocation, and no other thread may
    /// touch it while the slice lives.
    #[inline]
    pub(crate) unsafe fn slots<'a>(self, offset: usize, len: usize) -> &'a mut [MaybeUninit<T>] {
        std::slice::from_raw_parts_mut(self.0.add(offset).cast::<MaybeUninit<T>>(), len)
    }
}

impl<T: Copy> Output<T> {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            buf: Vec::with_capacity(len),
            len,
        }
    }

    pub(crate) fn ptr(&mut self) -> OutPtr<T> {
        OutPtr(self.buf.as_mut_ptr())
    }

    /// The whole buffer as uninitialised slots, for safe parallel writes.
    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.buf.spare_capacity_mut()[..self.len]
    }

    /// Declares the buffer fully written and returns it.
    ///
    /// # Safety
    /// Every one of the `len` elements must have been written through
    /// [`Output::ptr`] or [`Output::slots`].
    pub(crate) unsafe fn finish(mut self) -> Vec<T> {
        self.buf.set_len(self.len);
        self.buf
    }
}
