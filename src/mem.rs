//! Resident memory of this process, read from /proc (Linux); `None` elsewhere.

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Peak resident set size so far (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (VmRSS), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A global-allocator wrapper that counts live heap bytes and their peak, so benchmarks and
/// tests can measure the extra memory of one operation (`reset_heap_peak`, then `heap_peak`).
/// The binary wraps mimalloc in it; one relaxed atomic add per allocation.
pub struct Counting<A>(pub A);

static HEAP_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let p = self.0.alloc(l);
        if !p.is_null() {
            let now = HEAP_NOW.fetch_add(l.size(), Relaxed) + l.size();
            HEAP_PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        self.0.dealloc(p, l);
        HEAP_NOW.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let q = self.0.realloc(p, l, new_size);
        if !q.is_null() {
            if new_size >= l.size() {
                let now = HEAP_NOW.fetch_add(new_size - l.size(), Relaxed) + new_size - l.size();
                HEAP_PEAK.fetch_max(now, Relaxed);
            } else {
                HEAP_NOW.fetch_sub(l.size() - new_size, Relaxed);
            }
        }
        q
    }
}

/// Live heap bytes (only counted when the global allocator is [`Counting`]).
pub fn heap_now() -> usize {
    HEAP_NOW.load(std::sync::atomic::Ordering::Relaxed)
}

/// Peak live heap bytes since the last [`reset_heap_peak`].
pub fn heap_peak() -> usize {
    HEAP_PEAK.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts a new peak measurement at the current live size.
pub fn reset_heap_peak() {
    HEAP_PEAK.store(heap_now(), std::sync::atomic::Ordering::Relaxed);
}
