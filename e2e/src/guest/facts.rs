//! Kernel facts the matrix records beside the trap-backend probe, each found by trying it:
//! whether guest_memfd can be created mmap-able and initially shared, and whether a
//! guest_memfd memslot accepts dirty logging (which pre-copy of guest_memfd VMs would need), and
//! whether userfaultfd minor mode can register a guest_memfd mapping (the half of the
//! guest_memfd post-copy trap that catches KVM's own accesses).

use std::os::fd::{AsFd, AsRawFd};

use faultline::probe::errno_name;
use faultline::trap::kvm_userfault::{KVM_MEM_LOG_DIRTY_PAGES, Memslot, flag_names};

use super::testvm::TestVm;
use crate::report::Fact;

const GMEM_FACT: &str = "guest_memfd with GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED";
const DIRTY_FACT: &str = "dirty logging on a guest_memfd memslot";
const MINOR_FACT: &str = "userfaultfd minor mode on a guest_memfd mapping";

pub fn facts() -> Vec<Fact> {
    let mut all = facts_on_a_test_vm();
    all.push(Fact::from_result(
        MINOR_FACT,
        faultline::probe::probe_guest_memfd_minor(),
    ));
    all
}

fn facts_on_a_test_vm() -> Vec<Fact> {
    let fact = Fact::from_result;
    let vm = match TestVm::new() {
        Ok(vm) => vm,
        Err(e) => {
            let why = format!("no test VM: {e:#}");
            return vec![
                fact(GMEM_FACT, Err(why.clone())),
                fact(DIRTY_FACT, Err(why)),
            ];
        }
    };
    let gmem = vm.guest_memfd(2 << 20);
    let (fd, map) = match gmem {
        Ok(g) => g,
        Err(e) => {
            let why = format!("{e:#}");
            return vec![
                fact(GMEM_FACT, Err(why.clone())),
                fact(DIRTY_FACT, Err(format!("no guest_memfd: {why}"))),
            ];
        }
    };
    let slot = Memslot {
        slot: 1,
        guest_phys_addr: 1 << 30,
        memory_size: 2 << 20,
        userspace_addr: map.as_ptr() as u64,
        guest_memfd: Some((fd.as_fd().as_raw_fd() as u32, 0)),
        log_dirty_pages: true,
        userfault_bitmap: None,
    };
    debug_assert!(slot.flags() & KVM_MEM_LOG_DIRTY_PAGES != 0);
    let what = format!("KVM_SET_USER_MEMORY_REGION2({})", flag_names(slot.flags()));
    let dirty = match vm.set_memslot(&slot) {
        Ok(()) => Ok(format!("{what} = 0")),
        Err(e) => Err(format!("{what} = {}", errno_name(e))),
    };
    vec![
        fact(
            GMEM_FACT,
            Ok("KVM_CREATE_GUEST_MEMFD(GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED) = fd; mmap = ok".into()),
        ),
        fact(DIRTY_FACT, dirty),
    ]
}
