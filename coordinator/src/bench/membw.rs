//! Measures this machine's memory read bandwidth, the floor that decode is judged against: a
//! decode step must stream every weight once, so tokens/s can never beat bandwidth / bytes.
//! Every thread sums its own part of a buffer far larger than the caches; the best of several
//! passes counts.

use std::time::Instant;

/// Best read bandwidth in bytes/s over `passes` passes of a `bytes` buffer with `threads` threads.
pub fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let threads = threads.max(1);
    let chunk = n.div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..passes {
        let started = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut acc = [0.0f32; 8];
                        for c in part.chunks_exact(8) {
                            for l in 0..8 {
                                acc[l] += c[l];
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((n * 4) as f64 / secs);
    }
    best
}
