//! KVM Userfault in the reference VMM: the memslot armed with a bitmap shared with the
//! sidecar, the event a vCPU sends when it touches a marked page, and the wait until the
//! sidecar has installed that page and cleared its bit.
//!
//! The VMM never installs pages itself; it only reports faults and waits. If the sidecar goes
//! away, faulting vCPUs keep waiting rather than run on memory that has not arrived; `status`
//! shows which vCPU waits for which page and for how long.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline::layout::MemoryLayout;
use faultline::trap::kvm_userfault::UserfaultBitmap;
use faultline::vmm_protocol::conn::Connection;
use faultline::vmm_protocol::frame::FrameKind;
use faultline::vmm_protocol::messages::{Event, PageWait};

/// The longest a waiting vCPU sleeps before it re-checks whether it should pause or the trap
/// went away. Installs, pauses (the kick signal) and disarming wake it sooner; this bounds
/// only a wake that lands in the instant before the sleep.
const WAIT_SLICE: Duration = Duration::from_millis(200);

pub struct Armed {
    pub bitmap: UserfaultBitmap,
    /// RAM's regions, to turn an exit's guest-physical address into its global page.
    layout: MemoryLayout,
    events: Mutex<Connection>,
    /// Set once writing an event failed, so the log says it once.
    broken: AtomicBool,
    /// Set by `disarm`: the memslot no longer has the flag, so waiters re-enter KVM_RUN.
    disarmed: AtomicBool,
}

/// The VM's KVM Userfault state, shared with every vCPU thread.
pub struct UserfaultTrap {
    armed: Mutex<Option<Arc<Armed>>>,
    /// Per vCPU: the page it waits for and since when.
    waits: Mutex<Vec<Option<(u64, u64, Instant)>>>,
}

impl UserfaultTrap {
    pub fn new(vcpus: usize) -> Self {
        Self {
            armed: Mutex::new(None),
            waits: Mutex::new(vec![None; vcpus]),
        }
    }

    pub fn arm(&self, bitmap: UserfaultBitmap, events: Connection, layout: MemoryLayout) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Armed {
            bitmap,
            layout,
            events: Mutex::new(events),
            broken: AtomicBool::new(false),
            disarmed: AtomicBool::new(false),
        }));
    }

    /// Takes the trap down; the caller has already cleared the memslot's flag. vCPUs still
    /// waiting on marked pages are woken and re-enter KVM_RUN, which no longer traps.
    pub fn disarm(&self) -> Option<Arc<Armed>> {
        let armed = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        armed.disarmed.store(true, Ordering::SeqCst);
        armed.bitmap.wake_all();
        Some(armed)
    }

    /// Hands the trap's event channel to a receiver that restarted: `events` replaces the old
    /// channel, `reply` is written on it first (so the reply precedes every event), then the
    /// fault of every vCPU still waiting is sent again, since the old receiver may have read
    /// it and died before installing the page. Returns how many were sent again.
    pub fn rejoin(
        &self,
        events: Connection,
        reply: impl FnOnce(&mut Connection) -> std::io::Result<()>,
    ) -> std::io::Result<u32> {
        let Some(armed) = self.current() else {
            return Err(std::io::Error::other("KVM Userfault is not armed"));
        };
        let mut conn = armed.events.lock().unwrap_or_else(|p| p.into_inner());
        *conn = events;
        armed.broken.store(false, Ordering::Release);
        reply(&mut conn)?;
        let waits: Vec<(usize, u64, u64)> = self
            .waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(vcpu, w)| w.map(|(page, gpa, _)| (vcpu, gpa, page)))
            .collect();
        for &(vcpu, gpa, page) in &waits {
            write_event(&mut conn, vcpu, gpa, page)?;
        }
        Ok(waits.len() as u32)
    }

    /// How many vCPUs wait for a page now.
    pub fn waiting(&self) -> u32 {
        self.waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|w| w.is_some())
            .count() as u32
    }

    pub fn current(&self) -> Option<Arc<Armed>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What each vCPU waits for now (`None`: not waiting).
    pub fn waits(&self) -> Vec<Option<PageWait>> {
        self.waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|w| {
                w.map(|(page, gpa, since)| PageWait {
                    page,
                    gpa,
                    waited_ms: since.elapsed().as_millis() as u64,
                })
            })
            .collect()
    }

    fn set_wait(&self, vcpu: usize, wait: Option<(u64, u64, Instant)>) {
        if let Some(w) = self
            .waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(vcpu)
        {
            *w = wait;
        }
    }

    /// Called on a vCPU thread after a userfault exit at `gpa`: reports the page and waits
    /// until its bit is cleared, the trap is taken down, or `keep_waiting` says the vCPU must
    /// stop. Each of these is Ok: the vCPU re-enters KVM_RUN, which faults again if the page
    /// is still marked. Err only for an exit outside the bitmap, which makes no sense.
    pub fn wait_for(
        &self,
        vcpu: usize,
        gpa: u64,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<(), String> {
        // The exit can come from the memslot as it was just before `kvm_userfault_disarm`
        // cleared the flag: nothing is armed any more, and KVM_RUN again runs on the new
        // memslot (KVM_SET_USER_MEMORY_REGION2 returns only once no vCPU uses the old one).
        let Some(armed) = self.current() else {
            tracing::debug!(vcpu, gpa, "userfault exit after disarming; re-entering");
            return Ok(());
        };
        let Some(page) = armed
            .layout
            .page_of_gpa(gpa)
            .filter(|&p| p < armed.bitmap.pages())
        else {
            return Err(format!(
                "userfault at {gpa:#x}, outside RAM's {} regions",
                armed.layout.regions.len()
            ));
        };
        if !armed.bitmap.is_marked(page) {
            return Ok(()); // installed between KVM's check and ours
        }
        // Recorded before the event goes out, so that a `rejoin` either finds the wait and
        // sends it again or hands over the channel before this event is written.
        self.set_wait(vcpu, Some((page, gpa, Instant::now())));
        armed.notify(vcpu, gpa, page);
        while !armed.bitmap.wait_cleared(page, WAIT_SLICE) {
            if armed.disarmed.load(Ordering::SeqCst) || !keep_waiting() {
                break;
            }
        }
        self.set_wait(vcpu, None);
        Ok(())
    }
}

impl Armed {
    fn notify(&self, vcpu: usize, gpa: u64, page: u64) {
        let mut conn = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_event(&mut conn, vcpu, gpa, page)
            && !self.broken.swap(true, Ordering::AcqRel)
        {
            tracing::error!("cannot report userfaults to the sidecar ({e}); faulting vCPUs wait");
        }
    }
}

/// One `userfault` event frame: vCPU `vcpu` waits for `page` (at `gpa`).
fn write_event(conn: &mut Connection, vcpu: usize, gpa: u64, page: u64) -> std::io::Result<()> {
    let event = Event::Userfault {
        vcpu: vcpu as u32,
        gpa,
        page,
    };
    let json = serde_json::to_vec(&event).unwrap_or_default();
    conn.write_frame(FrameKind::Event, 0, &json, &[], &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    use faultline::layout::{BackingKind, PAGE_SIZE, Region};

    /// RAM of `sizes` bytes per region: the first at guest-physical 0, each next one 4 GiB
    /// further up.
    fn layout(sizes: &[u64]) -> MemoryLayout {
        let mut offset = 0;
        let regions = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let r = Region {
                    guest_phys_addr: (i as u64) << 32,
                    size,
                    backing: BackingKind::Memfd,
                    fd: 0,
                    file_offset: offset,
                    page_size: PAGE_SIZE,
                    host_addr: 0x7f00_0000_0000 + offset,
                };
                offset += size;
                r
            })
            .collect();
        MemoryLayout { regions }
    }

    fn armed_trap(pages: u64) -> (Arc<UserfaultTrap>, UserfaultBitmap, UnixStream) {
        armed_trap_with(&[pages * PAGE_SIZE])
    }

    fn armed_trap_with(sizes: &[u64]) -> (Arc<UserfaultTrap>, UserfaultBitmap, UnixStream) {
        let pages = sizes.iter().sum::<u64>() / PAGE_SIZE;
        let trap = Arc::new(UserfaultTrap::new(2));
        let bitmap = UserfaultBitmap::create_shared(pages).unwrap();
        let sidecar_view = UserfaultBitmap::open_shared(
            bitmap.shared_fd().unwrap().try_clone_to_owned().unwrap(),
            pages,
        )
        .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        trap.arm(bitmap, Connection::new(ours), layout(sizes));
        (trap, sidecar_view, theirs)
    }

    /// An exit in the second memslot names the page in the global numbering: the first
    /// region's pages come first.
    #[test]
    fn an_exit_above_the_hole_waits_on_its_global_page() {
        let (trap, sidecar, events) = armed_trap_with(&[64 * PAGE_SIZE, 128 * PAGE_SIZE]);
        let gpa = (1 << 32) + 7 * PAGE_SIZE + 0x18;
        let waiter = {
            let trap = trap.clone();
            std::thread::spawn(move || trap.wait_for(0, gpa, || true))
        };
        let mut conn = Connection::new(events.try_clone().unwrap());
        let event: Event = serde_json::from_slice(&conn.read_frame().unwrap().json).unwrap();
        assert_eq!(
            event,
            Event::Userfault {
                vcpu: 0,
                gpa,
                page: 71
            }
        );
        while sidecar.sleepers() == 0 {
            std::thread::yield_now();
        }
        sidecar.clear(71);
        sidecar.wake_page(71);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        // The hole between the regions is not RAM.
        assert!(trap.wait_for(0, 1 << 31, || true).is_err());
    }

    /// The disarm race: a vCPU exits on a marked page, `kvm_userfault_disarm` completes, and
    /// only then does the vCPU thread look for the trap. It must re-enter KVM_RUN, not fail.
    #[test]
    fn an_exit_that_finds_the_trap_already_disarmed_re_enters() {
        let (trap, _sidecar, _events) = armed_trap(64);
        // The exit at page 5 has happened (KVM_RUN returned); now the disarm wins the race.
        assert!(trap.disarm().is_some());
        assert_eq!(trap.wait_for(0, 5 * PAGE_SIZE, || true), Ok(()));
        assert!(trap.waits().iter().all(Option::is_none));
    }

    /// A vCPU already sleeping on a marked page when the trap is taken down wakes and goes on,
    /// although the page's bit is never cleared.
    #[test]
    fn disarming_releases_vcpus_waiting_on_marked_pages() {
        let (trap, sidecar, events) = armed_trap(64);
        let waiter = {
            let trap = trap.clone();
            std::thread::spawn(move || trap.wait_for(1, 9 * PAGE_SIZE + 0x10, || true))
        };
        let mut conn = Connection::new(events.try_clone().unwrap());
        let frame = conn.read_frame().unwrap();
        let event: Event = serde_json::from_slice(&frame.json).unwrap();
        assert_eq!(
            event,
            Event::Userfault {
                vcpu: 1,
                gpa: 9 * PAGE_SIZE + 0x10,
                page: 9
            }
        );
        while sidecar.sleepers() == 0 {
            std::thread::yield_now();
        }
        let waits = trap.waits();
        assert_eq!(waits[1].map(|w| w.page), Some(9));
        assert!(waits[0].is_none());
        assert!(trap.disarm().is_some());
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(sidecar.is_marked(9), "nobody installed the page");
        assert!(trap.waits()[1].is_none());
        drop(events);
    }

    #[test]
    fn an_install_ends_the_wait_and_an_exit_outside_the_bitmap_is_an_error() {
        let (trap, sidecar, _events) = armed_trap(64);
        let waiter = {
            let trap = trap.clone();
            std::thread::spawn(move || trap.wait_for(0, 3 * PAGE_SIZE, || true))
        };
        while sidecar.sleepers() == 0 {
            std::thread::yield_now();
        }
        assert!(sidecar.clear(3));
        sidecar.wake_page(3);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(trap.wait_for(0, 64 * PAGE_SIZE, || true).is_err());
    }
}
