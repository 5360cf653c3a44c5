//! KVM Userfault in the reference VMM: the memslot armed with a bitmap shared with the
//! sidecar, the event a vCPU sends when it touches a marked page, and the wait until the
//! sidecar has installed that page and cleared its bit.
//!
//! The VMM never installs pages itself; it only reports faults and waits. If the sidecar goes
//! away, faulting vCPUs keep waiting rather than run on memory that has not arrived.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline::layout::PAGE_SIZE;
use faultline::trap::kvm_userfault::UserfaultBitmap;
use faultline::vmm_protocol::conn::Connection;
use faultline::vmm_protocol::frame::FrameKind;
use faultline::vmm_protocol::messages::Event;

/// How long a waiting vCPU sleeps before re-checking whether it should pause instead.
const WAIT_SLICE: Duration = Duration::from_millis(50);

pub struct Armed {
    pub bitmap: UserfaultBitmap,
    events: Mutex<Connection>,
    /// Set once writing an event failed, so the log says it once.
    broken: AtomicBool,
}

/// The VM's KVM Userfault state, shared with every vCPU thread.
#[derive(Default)]
pub struct UserfaultTrap {
    armed: Mutex<Option<Arc<Armed>>>,
}

impl UserfaultTrap {
    pub fn arm(&self, bitmap: UserfaultBitmap, events: Connection) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Armed {
            bitmap,
            events: Mutex::new(events),
            broken: AtomicBool::new(false),
        }));
    }

    pub fn disarm(&self) -> Option<Arc<Armed>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn current(&self) -> Option<Arc<Armed>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Called on a vCPU thread after a userfault exit at `gpa`: reports the page and waits
    /// until its bit is cleared (Ok) or until `keep_waiting` says the vCPU must stop (Ok too:
    /// KVM_RUN will fault again when it resumes). Err only for exits that make no sense.
    pub fn wait_for(
        &self,
        vcpu: usize,
        gpa: u64,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<(), String> {
        let Some(armed) = self.current() else {
            return Err(format!(
                "KVM reported a userfault at {gpa:#x} but no bitmap is armed"
            ));
        };
        let page = gpa / PAGE_SIZE;
        if page >= armed.bitmap.pages() {
            return Err(format!(
                "userfault at {gpa:#x}, outside the bitmap's {} pages",
                armed.bitmap.pages()
            ));
        }
        if !armed.bitmap.is_marked(page) {
            return Ok(()); // installed between KVM's check and ours
        }
        armed.notify(vcpu, gpa, page);
        while !armed.bitmap.wait_cleared(page, WAIT_SLICE) {
            if !keep_waiting() {
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Armed {
    fn notify(&self, vcpu: usize, gpa: u64, page: u64) {
        let event = Event::Userfault {
            vcpu: vcpu as u32,
            gpa,
            page,
        };
        let json = serde_json::to_vec(&event).unwrap_or_default();
        let mut conn = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = conn.write_frame(FrameKind::Event, 0, &json, &[], &[])
            && !self.broken.swap(true, Ordering::AcqRel)
        {
            tracing::error!("cannot report userfaults to the sidecar ({e}); faulting vCPUs wait");
        }
    }
}
