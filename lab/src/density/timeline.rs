//! Host memory over a run: a thread that samples `MemAvailable` every
//! [`PERIOD`] while one strategy and reclaim mode runs, for the
//! `host_memory_over_time.svg` plot and `report.json`'s `timeline`.

use crate::host;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time between two samples.
pub const PERIOD: Duration = Duration::from_millis(250);

/// At most this many samples are kept (an hour at [`PERIOD`]); later ones
/// are dropped, so a long run cannot grow the runner without bound.
pub const MAX_SAMPLES: usize = 14_400;

/// A running sampler; [`Sampler::stop`] ends it and hands back the samples.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(f64, i64)>>>,
}

impl Sampler {
    /// Starts sampling `MemAvailable` as a drop from `baseline` bytes, with
    /// times in seconds since `epoch`. If the thread cannot start, the run
    /// goes on without a timeline.
    pub fn start(epoch: Instant, baseline: u64) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("density-timeline".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let mut samples = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    if let Ok(m) = host::meminfo() {
                        if samples.len() < MAX_SAMPLES {
                            samples.push((epoch.elapsed().as_secs_f64(), baseline as i64 - m.available as i64));
                        }
                    }
                    std::thread::park_timeout(PERIOD);
                }
                samples
            })
            .ok();
        Sampler { stop, handle }
    }

    /// Ends the sampler and returns its samples, oldest first.
    pub fn stop(mut self) -> Vec<(f64, i64)> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => {
                h.thread().unpark();
                h.join().unwrap_or_default()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_samples_until_stopped() {
        let epoch = Instant::now();
        let s = Sampler::start(epoch, host::meminfo().unwrap().available);
        std::thread::sleep(PERIOD * 2);
        let samples = s.stop();
        assert!(!samples.is_empty());
        assert!(samples.windows(2).all(|w| w[0].0 <= w[1].0), "{samples:?}");
        assert!(samples.iter().all(|(t, _)| *t >= 0.0 && *t < epoch.elapsed().as_secs_f64()));
    }
}
