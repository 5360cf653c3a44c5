//! What the guest has told the VMM through its ports: heartbeats, progress, status words and
//! verification failures. Updated lock-free by vCPU threads; travels with the VM state blob so
//! counts continue across a hand-over.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// How many failed page numbers are kept (the count keeps going).
pub const MAX_FAILED_PAGES: usize = 1024;

#[derive(Default)]
pub struct VcpuCounters {
    pub heartbeats: AtomicU64,
    pub progress: AtomicU32,
    pub status_word: AtomicU32,
}

pub struct Accounting {
    pub vcpus: Vec<VcpuCounters>,
    failures: AtomicU64,
    failed_pages: Mutex<Vec<u64>>,
}

/// The accounting as plain data, for the state blob.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountingSnapshot {
    pub heartbeats: Vec<u64>,
    pub progress: Vec<u32>,
    pub status_words: Vec<u32>,
    pub failures: u64,
    pub failed_pages: Vec<u64>,
}

impl Accounting {
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpus: (0..vcpus).map(|_| VcpuCounters::default()).collect(),
            failures: AtomicU64::new(0),
            failed_pages: Mutex::new(Vec::new()),
        }
    }

    pub fn heartbeat(&self, vcpu: usize, progress: u32) {
        let c = &self.vcpus[vcpu];
        c.progress.store(progress, Ordering::Relaxed);
        c.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status_word(&self, vcpu: usize, word: u32) {
        self.vcpus[vcpu].status_word.store(word, Ordering::Relaxed);
    }

    pub fn failure(&self, page: u64) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut pages = self.failed_pages.lock().unwrap_or_else(|p| p.into_inner());
        if pages.len() < MAX_FAILED_PAGES {
            pages.push(page);
        }
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn failed_pages(&self) -> Vec<u64> {
        self.failed_pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn heartbeats(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|c| c.heartbeats.load(Ordering::Relaxed))
            .collect()
    }

    pub fn snapshot(&self) -> AccountingSnapshot {
        AccountingSnapshot {
            heartbeats: self.heartbeats(),
            progress: self
                .vcpus
                .iter()
                .map(|c| c.progress.load(Ordering::Relaxed))
                .collect(),
            status_words: self
                .vcpus
                .iter()
                .map(|c| c.status_word.load(Ordering::Relaxed))
                .collect(),
            failures: self.failures(),
            failed_pages: self.failed_pages(),
        }
    }

    /// Continues from a source's accounting. The caller has checked the vCPU count matches.
    pub fn restore(&self, s: &AccountingSnapshot) {
        for (i, c) in self.vcpus.iter().enumerate() {
            c.heartbeats
                .store(s.heartbeats.get(i).copied().unwrap_or(0), Ordering::Relaxed);
            c.progress
                .store(s.progress.get(i).copied().unwrap_or(0), Ordering::Relaxed);
            c.status_word.store(
                s.status_words.get(i).copied().unwrap_or(0),
                Ordering::Relaxed,
            );
        }
        self.failures.store(s.failures, Ordering::Relaxed);
        let mut pages = self.failed_pages.lock().unwrap_or_else(|p| p.into_inner());
        *pages = s
            .failed_pages
            .iter()
            .copied()
            .take(MAX_FAILED_PAGES)
            .collect();
    }
}
