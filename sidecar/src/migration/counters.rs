//! Progress counters of one migration, updated lock-free by the engines and read by the API,
//! and the one place pages that crossed the wire are counted (on both sides).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use faultline::sidecar_api::{LatencySummary, Progress};
use faultline::sync::lock;

use super::Migration;
use crate::metrics::{Metrics, RoleLabel};

/// Fault latencies the histogram records: 1 µs to 100 s.
const LATENCY_MIN_US: u64 = 1;
const LATENCY_MAX_US: u64 = 100_000_000;
/// Significant decimal digits the histogram keeps.
const LATENCY_DIGITS: u8 = 3;

/// Pages that crossed the wire in one send or receive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub pages: u64,
    /// Of which zero-page markers.
    pub zero: u64,
    /// Bytes of whole frames on the wire (`faultline::wire::frame_len`), the same count on
    /// both sides.
    pub bytes: u64,
}

impl std::ops::AddAssign for Transferred {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.zero += o.zero;
        self.bytes += o.bytes;
    }
}

pub struct Counters {
    pub total_pages: AtomicU64,
    pub transferred_pages: AtomicU64,
    pub transferred_bytes: AtomicU64,
    pub zero_pages: AtomicU64,
    pub remaining_pages: AtomicU64,
    pub precopy_rounds: AtomicU32,
    pub reconnects: AtomicU32,
    pub faults: AtomicU64,
    dirty_rate: AtomicU64,
    bandwidth: AtomicU64,
    downtime_us: AtomicU64,
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Counters {
    pub fn new() -> Self {
        Self {
            total_pages: AtomicU64::new(0),
            transferred_pages: AtomicU64::new(0),
            transferred_bytes: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            remaining_pages: AtomicU64::new(0),
            precopy_rounds: AtomicU32::new(0),
            reconnects: AtomicU32::new(0),
            faults: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            downtime_us: AtomicU64::new(u64::MAX),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(
                    LATENCY_MIN_US,
                    LATENCY_MAX_US,
                    LATENCY_DIGITS,
                )
                .ok(),
            ),
        }
    }

    /// Sets both the total and the remaining pages once the engine knows the VM.
    pub fn set_total(&self, pages: u64) {
        self.total_pages.store(pages, Ordering::Relaxed);
        self.remaining_pages.store(pages, Ordering::Relaxed);
    }

    pub fn set_remaining(&self, pages: u64) {
        self.remaining_pages.store(pages, Ordering::Relaxed);
    }

    pub fn set_dirty_rate(&self, pages_per_sec: f64) {
        self.dirty_rate
            .store(pages_per_sec.to_bits(), Ordering::Relaxed);
    }

    pub fn set_bandwidth(&self, bytes_per_sec: f64) {
        self.bandwidth
            .store(bytes_per_sec.to_bits(), Ordering::Relaxed);
    }

    pub fn set_downtime(&self, d: Duration) {
        self.downtime_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn downtime(&self) -> Option<Duration> {
        match self.downtime_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn record_fault_latency(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(LATENCY_MIN_US, LATENCY_MAX_US);
        if let Some(h) = lock(&self.latency).as_mut() {
            let _ = h.record(us);
        }
    }

    pub fn latency(&self) -> LatencySummary {
        match lock(&self.latency).as_ref() {
            Some(h) if !h.is_empty() => LatencySummary {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            },
            _ => LatencySummary::default(),
        }
    }

    pub fn progress(&self) -> Progress {
        let r = Ordering::Relaxed;
        Progress {
            total_pages: self.total_pages.load(r),
            transferred_pages: self.transferred_pages.load(r),
            transferred_bytes: self.transferred_bytes.load(r),
            zero_pages: self.zero_pages.load(r),
            remaining_pages: self.remaining_pages.load(r),
            precopy_rounds: self.precopy_rounds.load(r),
            dirty_rate_pages_per_sec: f64::from_bits(self.dirty_rate.load(r)),
            bandwidth_bytes_per_sec: f64::from_bits(self.bandwidth.load(r)),
            faults: self.faults.load(r),
            fault_latency_us: self.latency(),
            downtime_ms: self.downtime().map(|d| d.as_secs_f64() * 1e3),
            reconnects: self.reconnects.load(r),
        }
    }
}

impl Migration {
    /// Counts pages that crossed the wire (sent by a source, received by a target), in this
    /// migration's progress and in the sidecar's metrics.
    pub fn account(&self, metrics: &Metrics, t: Transferred) {
        let c = &self.counters;
        c.transferred_pages.fetch_add(t.pages, Ordering::Relaxed);
        c.transferred_bytes.fetch_add(t.bytes, Ordering::Relaxed);
        c.zero_pages.fetch_add(t.zero, Ordering::Relaxed);
        let role = RoleLabel::of(self.role);
        metrics.pages.get_or_create(&role).inc_by(t.pages);
        metrics.bytes.get_or_create(&role).inc_by(t.bytes);
        metrics.zero_pages.get_or_create(&role).inc_by(t.zero);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_and_downtime() {
        let c = Counters::new();
        assert_eq!(c.latency(), LatencySummary::default());
        assert_eq!(c.progress().downtime_ms, None);
        for us in [100, 200, 300, 400] {
            c.record_fault_latency(Duration::from_micros(us));
        }
        // Out of range values are clamped, not dropped.
        c.record_fault_latency(Duration::ZERO);
        let l = c.latency();
        assert!(l.p50 >= 199 && l.p50 <= 201, "{l:?}");
        assert!(l.max >= 399 && l.max <= 401, "{l:?}");
        c.set_downtime(Duration::from_micros(4200));
        assert_eq!(c.progress().downtime_ms, Some(4.2));
    }
}
