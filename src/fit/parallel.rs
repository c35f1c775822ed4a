//! The fit's independent pieces of work (candidates of a round, batches of a forward pass, the
//! sequences of a training step) run side by side on rayon's pool, one piece per thread.
//!
//! A fit of a small model is many small matrix products, too small for candle to split well:
//! its own CPU pool makes its workers spin at a barrier after every operation, which on a
//! shared machine costs more than the second thread gains. So `hopscotch fit --threads N`
//! gives candle one thread per operation (`CANDLE_NUM_THREADS=1`) and rayon `N` threads
//! (`RAYON_NUM_THREADS=N`), and the fit hands rayon whole pieces of work: each runs the
//! operations of one candidate, one batch or one training sequence from start to end on one
//! thread. The pieces'
//! results are combined in their order, so a fit gives bit-identical results at any thread
//! count. On a GPU the pieces run one after another (the device serialises them anyway).

use candle_core::Device;
use rayon::prelude::*;

/// Gives the fits of this process `threads` threads (at least 1) and returns the count: rayon's
/// pool runs that many pieces side by side, each with candle at one thread per operation, and
/// glibc's allocator keeps one heap for them and the freed tensors in it. Candle, rayon and glibc read
/// these when they first run, so call this before any fit work starts.
pub fn set_threads(threads: usize) -> usize {
    let threads = threads.max(1);
    malloc_settings();
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    threads
}

/// glibc's allocator set for a fit's tensors: one heap for every thread, and freed tensors kept
/// in it for the next ones instead of being handed back to the kernel (by default each thread
/// keeps a heap of its own, and every training step faults in fresh zeroed pages; measured in
/// docs/results.md, "Threads").
fn malloc_settings() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes the allocator's settings, before the fit's threads start
    // (only an interrupt handler's thread waits then); a setting this glibc refuses leaves its
    // default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        // -1: never trim (mallopt(3))
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// `f(0), f(1), ..., f(n - 1)`, in that order, computed side by side on rayon's pool when
/// `device` is the CPU and one after another otherwise; the first error (in rayon's order of
/// finding it) is returned instead.
pub fn map<R, E, F>(device: &Device, n: usize, f: F) -> Result<Vec<R>, E>
where
    R: Send,
    E: Send,
    F: Fn(usize) -> Result<R, E> + Sync + Send,
{
    if device.is_cpu() {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_order_and_an_error_stops_the_map() {
        let squares: Result<Vec<usize>, String> = map(&Device::Cpu, 100, |i| Ok(i * i));
        assert_eq!(
            squares.unwrap(),
            (0..100).map(|i| i * i).collect::<Vec<_>>()
        );
        let failed: Result<Vec<usize>, String> = map(&Device::Cpu, 100, |i| {
            if i == 37 {
                Err(format!("piece {i}"))
            } else {
                Ok(i)
            }
        });
        assert_eq!(failed.unwrap_err(), "piece 37");
    }
}
