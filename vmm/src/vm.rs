//! One VM: KVM handles, RAM, vCPUs and the operations the VMM protocol exposes on them.
//!
//! Every operation returns either its reply or an [`ErrorReply`] saying why not, so the
//! control server only translates. Operations are serialized by one lock; they are rare and
//! each is short, apart from `pause`, which waits for the vCPUs to leave KVM_RUN.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline::bitmap::PageBitmap;
use faultline::layout::BackingKind;
use faultline::sys::uffd::{self, Userfaultfd};
use faultline::trap::Backend;
use faultline::trap::kvm_userfault::UserfaultBitmap;
use faultline::vmm_protocol::PROTOCOL_VERSION;
use faultline::vmm_protocol::messages::{
    Capability, CapabilityName, ErrorCode, ErrorReply, HelloReply, KvmUserfaultArmReply,
    SavedState, TrapRejoinReply, UffdMode, UffdRegisterReply, VcpuState, VcpuStatus, VmState,
    VmStatus,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::accounting::Accounting;
use crate::boot;
use crate::memory::{GuestMemory, MemoryError};
use crate::ram_map::RamMap;
use crate::state::{self, Meta, VcpuState as KvmVcpuState};
use crate::userfault::UserfaultTrap;
use crate::vcpu::{self, RunControl, Vcpu};

/// The answer to `trap_rejoin`: the reply, its descriptors, the pages not yet valid (the
/// reply's binary part), and whether the requesting connection becomes the event channel.
pub struct Rejoin {
    pub reply: TrapRejoinReply,
    pub fds: Vec<OwnedFd>,
    pub invalid: PageBitmap,
    pub takes_events: bool,
}

pub const VMM_NAME: &str = concat!("faultline-vmm/", env!("CARGO_PKG_VERSION"));

pub struct VmConfig {
    pub id: String,
    pub vcpus: u32,
    pub ram: RamMap,
    pub backing: BackingKind,
    pub incoming: bool,
    /// The program and its arguments; ignored in incoming mode.
    pub program: Vec<u8>,
    pub args: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot set up vCPU {index}: {what}: {source}")]
    Vcpu {
        index: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
}

struct Ops {
    restored: bool,
    /// The vCPUs were allowed to run at least once in this process.
    ran: bool,
    /// The userfaultfd RAM is registered with; kept so a dying sidecar cannot release the
    /// registration (its waiting faults would then be filled with zero pages).
    uffd: Option<Userfaultfd>,
    fenced: bool,
    dirty_log: bool,
    shutdown: bool,
    run_since: Option<Instant>,
    run_total: Duration,
}

pub struct Vm {
    id: String,
    incoming: bool,
    // Field order is drop order: vCPU threads stop (Drop) before the VM fd closes and the
    // memory is unmapped.
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Vcpu>>,
    control: Arc<RunControl>,
    accounting: Arc<Accounting>,
    vm_fd: VmFd,
    memory: GuestMemory,
    _kvm: Kvm,
    msr_indices: Vec<u32>,
    dirty_log_cap: Capability,
    uffd_cap: Capability,
    userfault_cap: Capability,
    userfault: Arc<UserfaultTrap>,
    ops: Mutex<Ops>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

impl Vm {
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let ram_size = config.ram.size();
        let memory = GuestMemory::new(&vm_fd, config.backing, config.ram)?;
        memory.set_memslots(&vm_fd, false, None)?;
        let dirty_log_cap = probe_dirty_log(&vm_fd, &memory);
        let userfault_cap = if config.incoming {
            probe_kvm_userfault(&vm_fd, &memory)
        } else {
            Capability::unavailable(
                CapabilityName::KvmUserfault,
                "only a VMM started with --incoming arms KVM Userfault",
            )
        };
        let uffd_cap = if config.incoming {
            probe_userfaultfd(&memory)
        } else {
            Capability::unavailable(
                CapabilityName::Userfaultfd,
                "only a VMM started with --incoming hands out a userfaultfd",
            )
        };

        let msr_indices = match kvm.get_msr_index_list() {
            Ok(list) => list.as_slice().to_vec(),
            Err(e) => {
                tracing::warn!("KVM_GET_MSR_INDEX_LIST failed ({e}); MSRs will not be saved");
                Vec::new()
            }
        };

        if !config.incoming {
            boot::write_boot_image(
                memory.mapping(),
                memory.map(),
                &config.program,
                &config.args,
            )?;
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Vcpu {
                index: 0,
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let e = |what| {
                move |source| VmError::Vcpu {
                    index,
                    what,
                    source,
                }
            };
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(e("KVM_CREATE_VCPU"))?;
            if !config.incoming {
                fd.set_cpuid2(&crate::cpuid::for_vcpu(&cpuid, index))
                    .map_err(e("KVM_SET_CPUID2"))?;
                let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
                fd.set_sregs(&boot::long_mode_sregs(sregs))
                    .map_err(e("KVM_SET_SREGS"))?;
                fd.set_regs(&boot::entry_regs(
                    index,
                    config.vcpus,
                    ram_size,
                    config.args.len(),
                ))
                .map_err(e("KVM_SET_REGS"))?;
            }
            vcpus.push(Arc::new(Vcpu {
                index: index as usize,
                fd: Mutex::new(fd),
            }));
        }

        vcpu::install_kick_handler().map_err(VmError::Signal)?;
        let initial = if config.incoming {
            VcpuState::Incoming
        } else {
            VcpuState::Paused
        };
        let control = Arc::new(RunControl::new(vcpus.len(), initial));
        let accounting = Arc::new(Accounting::new(vcpus.len()));
        let userfault = Arc::new(UserfaultTrap::new(vcpus.len()));
        let threads = vcpus
            .iter()
            .map(|v| {
                vcpu::spawn(
                    v.clone(),
                    control.clone(),
                    accounting.clone(),
                    userfault.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::Thread)?;

        Ok(Self {
            id: config.id,
            incoming: config.incoming,
            threads,
            vcpus,
            control,
            accounting,
            vm_fd,
            memory,
            _kvm: kvm,
            msr_indices,
            dirty_log_cap,
            uffd_cap,
            userfault_cap,
            userfault,
            ops: Mutex::new(Ops {
                restored: false,
                ran: false,
                uffd: None,
                fenced: false,
                dirty_log: false,
                shutdown: false,
                run_since: None,
                run_total: Duration::ZERO,
            }),
        })
    }

    fn ops(&self) -> MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn state_locked(&self, ops: &Ops) -> VmState {
        if ops.fenced {
            return VmState::Fenced;
        }
        let states = self.control.states();
        if states.contains(&VcpuState::Incoming) {
            VmState::Incoming
        } else if states
            .iter()
            .all(|s| matches!(s, VcpuState::Halted | VcpuState::Failed))
        {
            VmState::Halted
        } else if self.control.is_running() {
            VmState::Running
        } else {
            VmState::Paused
        }
    }

    pub fn state(&self) -> VmState {
        self.state_locked(&self.ops())
    }

    pub fn shutdown_requested(&self) -> bool {
        self.ops().shutdown
    }

    /// Blocks until something about the vCPUs changes, or `timeout`.
    pub fn wait_for_change(&self, timeout: Duration) {
        self.control.wait_for_change(timeout);
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn hello(&self) -> (HelloReply, Vec<BorrowedFd<'_>>) {
        let ops = self.ops();
        let reply = HelloReply {
            protocol: PROTOCOL_VERSION,
            vmm: VMM_NAME.to_string(),
            vm_id: self.id.clone(),
            vcpus: self.vcpus.len() as u32,
            incoming: self.incoming,
            state: self.state_locked(&ops),
            layout: self.memory.layout(),
            capabilities: vec![
                self.dirty_log_cap.clone(),
                self.uffd_cap.clone(),
                self.userfault_cap.clone(),
                Capability::available(CapabilityName::SaveState),
                match (self.incoming, ops.restored) {
                    (true, false) => Capability::available(CapabilityName::RestoreState),
                    (true, true) => Capability::unavailable(
                        CapabilityName::RestoreState,
                        "a state was already restored",
                    ),
                    (false, _) => Capability::unavailable(
                        CapabilityName::RestoreState,
                        "the VMM was not started with --incoming",
                    ),
                },
            ],
        };
        (reply, vec![self.memory.fd().as_fd()])
    }

    /// Starts the vCPUs of a freshly booted VM (not in incoming mode).
    pub fn start(&self) {
        let mut ops = self.ops();
        self.control.set_ready(&[]);
        self.control.resume();
        ops.run_since = Some(Instant::now());
        ops.ran = true;
    }

    pub fn pause(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        self.control.pause(&self.threads);
        if let Some(since) = ops.run_since.take() {
            ops.run_total += since.elapsed();
        }
        Ok(self.state_locked(&ops))
    }

    pub fn resume(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        match self.state_locked(&ops) {
            VmState::Fenced => Err(err(
                ErrorCode::InvalidState,
                "this VM is fenced: its hand-over was committed and it must never run again",
            )),
            VmState::Incoming => Err(err(
                ErrorCode::InvalidState,
                "no state has been restored yet; send restore_state first",
            )),
            VmState::Halted => Ok(VmState::Halted),
            VmState::Running => Ok(VmState::Running),
            VmState::Paused => {
                self.control.resume();
                ops.run_since = Some(Instant::now());
                ops.ran = true;
                Ok(VmState::Running)
            }
        }
    }

    pub fn fence(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if self.state_locked(&ops) == VmState::Running {
            return Err(err(
                ErrorCode::InvalidState,
                "pause the VM before fencing it",
            ));
        }
        ops.fenced = true;
        Ok(VmState::Fenced)
    }

    pub fn request_shutdown(&self) -> VmState {
        let mut ops = self.ops();
        ops.shutdown = true;
        let state = self.state_locked(&ops);
        drop(ops);
        self.control.notify();
        state
    }

    pub fn save_state(&self) -> Result<(SavedState, Vec<u8>), ErrorReply> {
        let ops = self.ops();
        match self.state_locked(&ops) {
            VmState::Running => {
                return Err(err(
                    ErrorCode::InvalidState,
                    "pause the VM before saving its state",
                ));
            }
            VmState::Incoming => {
                return Err(err(
                    ErrorCode::InvalidState,
                    "an incoming VM has no state to save yet",
                ));
            }
            VmState::Paused | VmState::Fenced | VmState::Halted => {}
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| KvmVcpuState::save(v.index, &v.lock(), &self.msr_indices))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
        let states = self.control.states();
        let blob = state::VmState {
            meta: Meta {
                vmm: VMM_NAME.to_string(),
                vm_id: self.id.clone(),
                vcpus: self.vcpus.len(),
                ram_size: self.memory.size(),
                halted: states.iter().map(|s| *s == VcpuState::Halted).collect(),
                accounting: self.accounting.snapshot(),
            },
            vcpus,
        }
        .encode();
        let info = SavedState {
            format: state::FORMAT.to_string(),
            version: state::VERSION,
            bytes: blob.len() as u64,
        };
        Ok((info, blob))
    }

    pub fn restore_state(&self, blob: &[u8]) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if !self.incoming {
            return Err(err(
                ErrorCode::InvalidState,
                "restore_state is only accepted by a VMM started with --incoming",
            ));
        }
        if ops.restored {
            return Err(err(ErrorCode::InvalidState, "a state was already restored"));
        }
        let decoded = state::VmState::decode(blob)
            .map_err(|e| err(ErrorCode::BadRequest, format!("state blob rejected: {e}")))?;
        if decoded.meta.vcpus != self.vcpus.len() {
            return Err(err(
                ErrorCode::BadRequest,
                state::StateError::VcpuCount {
                    theirs: decoded.meta.vcpus,
                    ours: self.vcpus.len(),
                }
                .to_string(),
            ));
        }
        if decoded.meta.ram_size != self.memory.size() {
            return Err(err(
                ErrorCode::BadRequest,
                state::StateError::RamSize {
                    theirs: decoded.meta.ram_size,
                    ours: self.memory.size(),
                }
                .to_string(),
            ));
        }
        // The vCPUs have never run, so a failure part-way leaves nothing that a later, valid
        // restore would not overwrite: the VM stays incoming.
        for (v, s) in self.vcpus.iter().zip(&decoded.vcpus) {
            s.restore(v.index, &v.lock())
                .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
        }
        self.accounting.restore(&decoded.meta.accounting);
        self.control.set_ready(&decoded.meta.halted);
        ops.restored = true;
        tracing::info!(source = %decoded.meta.vm_id, "state restored; VM paused until resume");
        Ok(self.state_locked(&ops))
    }

    pub fn dirty_log_start(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if !self.dirty_log_cap.available {
            return Err(err(
                ErrorCode::Unavailable,
                self.dirty_log_cap.reason.clone().unwrap_or_default(),
            ));
        }
        if !ops.dirty_log {
            self.memory
                .set_memslots(&self.vm_fd, true, None)
                .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
            ops.dirty_log = true;
        }
        Ok(self.state_locked(&ops))
    }

    pub fn dirty_log_collect(&self) -> Result<PageBitmap, ErrorReply> {
        let ops = self.ops();
        if !ops.dirty_log {
            return Err(err(ErrorCode::InvalidState, "dirty logging is not started"));
        }
        let words = self
            .memory
            .collect_dirty(&self.vm_fd)
            .map_err(|e| err(ErrorCode::Failed, format!("KVM_GET_DIRTY_LOG failed: {e}")))?;
        let mut bitmap = PageBitmap::new(self.memory.pages());
        let region = PageBitmap::from_words(words, self.memory.pages())
            .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
        bitmap.splice(0, &region);
        Ok(bitmap)
    }

    pub fn dirty_log_stop(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if ops.dirty_log {
            self.memory
                .set_memslots(&self.vm_fd, false, None)
                .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
            ops.dirty_log = false;
        }
        Ok(self.state_locked(&ops))
    }

    fn require_fresh_incoming(&self, ops: &Ops, op: &str) -> Result<(), ErrorReply> {
        if !self.incoming {
            return Err(err(
                ErrorCode::InvalidState,
                format!("{op} is only accepted by a VMM started with --incoming"),
            ));
        }
        if ops.ran {
            return Err(err(
                ErrorCode::InvalidState,
                format!("{op} is only accepted before the VM first runs"),
            ));
        }
        Ok(())
    }

    pub fn userfaultfd_register(
        &self,
        mode: UffdMode,
    ) -> Result<(UffdRegisterReply, std::os::fd::OwnedFd), ErrorReply> {
        let mut ops = self.ops();
        self.require_fresh_incoming(&ops, "userfaultfd_register")?;
        if ops.uffd.is_some() {
            return Err(err(ErrorCode::InvalidState, "RAM is already registered"));
        }
        let backing = self.memory.backing();
        let (features, mode_bits) = uffd_parameters(backing, mode)?;
        let uffd =
            Userfaultfd::new(features).map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
        let start = self.memory.mapping().as_ptr() as u64;
        let ioctls = uffd
            .register(start, self.memory.size(), mode_bits)
            .map_err(|e| {
                err(
                    ErrorCode::Unavailable,
                    format!("registering the {backing} RAM mapping failed: {e}"),
                )
            })?;
        let handed = uffd.as_fd().try_clone_to_owned().map_err(|e| {
            err(
                ErrorCode::Failed,
                format!("cannot duplicate the userfaultfd: {e}"),
            )
        })?;
        ops.uffd = Some(uffd);
        tracing::info!(?mode, "RAM registered with userfaultfd");
        Ok((
            UffdRegisterReply {
                mode,
                features,
                ioctls,
            },
            handed,
        ))
    }

    pub fn userfaultfd_disarm(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if let Some(uffd) = ops.uffd.take() {
            let start = self.memory.mapping().as_ptr() as u64;
            if let Err(e) = uffd.unregister(start, self.memory.size()) {
                ops.uffd = Some(uffd);
                return Err(err(ErrorCode::Failed, e.to_string()));
            }
            tracing::info!("RAM unregistered from userfaultfd");
        }
        Ok(self.state_locked(&ops))
    }

    /// Arms KVM Userfault on RAM with every page marked. `events` (the requesting connection)
    /// becomes the channel userfault events go out on. With `host_accesses`, the RAM mapping is
    /// also registered with a new userfaultfd in minor mode and its page-table entries dropped,
    /// so that KVM's and this process's own accesses to a page wait for it as vCPU accesses do.
    /// Returns the reply, the bitmap memfd and that userfaultfd.
    pub fn kvm_userfault_arm(
        &self,
        events: faultline::vmm_protocol::conn::Connection,
        host_accesses: bool,
    ) -> Result<(KvmUserfaultArmReply, OwnedFd, Option<OwnedFd>), ErrorReply> {
        let mut ops = self.ops();
        self.require_fresh_incoming(&ops, "kvm_userfault_arm")?;
        if !self.userfault_cap.available {
            return Err(err(
                ErrorCode::Unavailable,
                self.userfault_cap.reason.clone().unwrap_or_default(),
            ));
        }
        if self.userfault.current().is_some() {
            return Err(err(
                ErrorCode::InvalidState,
                "KVM Userfault is already armed",
            ));
        }
        if host_accesses && ops.uffd.is_some() {
            return Err(err(
                ErrorCode::InvalidState,
                "RAM is already registered with userfaultfd",
            ));
        }
        let host = if host_accesses {
            Some(self.register_host_accesses()?)
        } else {
            None
        };
        let pages = self.memory.pages();
        let bitmap = UserfaultBitmap::create_shared(pages)
            .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
        let handed = dup_fd(
            bitmap
                .shared_fd()
                .ok_or_else(|| err(ErrorCode::Failed, "the bitmap is not shared"))?,
            "bitmap fd",
        )?;
        let handed_uffd = match &host {
            Some(uffd) => Some(dup_fd(uffd.as_fd(), "userfaultfd")?),
            None => None,
        };
        // Turning the flag on zaps the memslot's mappings, so no page stays mapped unmarked.
        self.memory
            .set_memslots(&self.vm_fd, ops.dirty_log, Some(bitmap.user_addr()))
            .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
        self.userfault.arm(bitmap, events, self.memory.layout());
        ops.uffd = host;
        tracing::info!(pages, host_accesses, "KVM Userfault armed");
        Ok((
            KvmUserfaultArmReply {
                pages,
                header_bytes: faultline::trap::kvm_userfault::SHARED_HEADER as u64,
                host_accesses,
            },
            handed,
            handed_uffd,
        ))
    }

    /// The host-access half of the KVM Userfault trap: the RAM mapping registered in minor
    /// mode, then every page-table entry of it dropped (a page mapped here never faults, and
    /// pages written before, by a boot or an earlier pass, must not be read unchecked).
    fn register_host_accesses(&self) -> Result<Userfaultfd, ErrorReply> {
        let backing = self.memory.backing();
        if backing == BackingKind::Anon {
            return Err(err(
                ErrorCode::Unavailable,
                "trapping host accesses needs shared RAM (memfd or guest_memfd): anonymous RAM \
                 has no second mapping to install pages through",
            ));
        }
        let (features, bits) = uffd_parameters(backing, UffdMode::Minor)?;
        let uffd =
            Userfaultfd::new(features).map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
        let start = self.memory.mapping().as_ptr() as u64;
        uffd.register(start, self.memory.size(), bits).map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!(
                    "registering the {backing} RAM mapping in minor mode failed ({e}): this kernel \
                     cannot trap KVM's own accesses to {backing} memory"
                ),
            )
        })?;
        self.memory
            .mapping()
            .discard(0, self.memory.size() as usize)
            .map_err(|e| {
                err(
                    ErrorCode::Failed,
                    format!("cannot drop the RAM mapping's page-table entries: {e}"),
                )
            })?;
        Ok(uffd)
    }

    /// Turns KVM Userfault off: the memslot's flag first, then the trap (waking any vCPU still
    /// waiting), then the host-access userfaultfd, if any (unregistering wakes its waiters).
    pub fn kvm_userfault_disarm(&self) -> Result<VmState, ErrorReply> {
        let mut ops = self.ops();
        if let Some(armed) = self.userfault.current() {
            self.memory
                .set_memslots(&self.vm_fd, ops.dirty_log, None)
                .map_err(|e| err(ErrorCode::Failed, e.to_string()))?;
            self.userfault.disarm();
            tracing::info!(
                still_marked = armed.bitmap.count_marked(),
                "KVM Userfault disarmed"
            );
            if let Some(uffd) = ops.uffd.take() {
                let start = self.memory.mapping().as_ptr() as u64;
                if let Err(e) = uffd.unregister(start, self.memory.size()) {
                    ops.uffd = Some(uffd);
                    return Err(err(ErrorCode::Failed, e.to_string()));
                }
            }
        }
        Ok(self.state_locked(&ops))
    }

    /// What a restarted receiver needs to take over the armed trap; see [`Rejoin`].
    pub fn trap_rejoin(&self) -> Result<Rejoin, ErrorReply> {
        let ops = self.ops();
        if !self.incoming {
            return Err(err(
                ErrorCode::InvalidState,
                "trap_rejoin is only accepted by a VMM started with --incoming",
            ));
        }
        let pages = self.memory.pages();
        let waiting_vcpus = self.userfault.waiting();
        if let Some(armed) = self.userfault.current() {
            let mut fds = vec![dup_fd(
                armed
                    .bitmap
                    .shared_fd()
                    .ok_or_else(|| err(ErrorCode::Failed, "the bitmap is not shared"))?,
                "bitmap fd",
            )?];
            if let Some(host) = &ops.uffd {
                fds.push(dup_fd(host.as_fd(), "host-access userfaultfd")?);
            }
            let invalid = armed.bitmap.marked();
            let reply = TrapRejoinReply {
                trap: Backend::KvmUserfault,
                pages,
                invalid: invalid.count(),
                header_bytes: faultline::trap::kvm_userfault::SHARED_HEADER as u64,
                host_accesses: ops.uffd.is_some(),
                waiting_vcpus,
            };
            return Ok(Rejoin {
                reply,
                fds,
                invalid,
                takes_events: true,
            });
        }
        let Some(uffd) = &ops.uffd else {
            return Err(err(
                ErrorCode::InvalidState,
                "no trap is armed: nothing to rejoin",
            ));
        };
        // Under missing mode a page is valid exactly when it is present: installed, or written
        // before the registration and not discarded since.
        let resident = self
            .memory
            .mapping()
            .resident()
            .map_err(|e| err(ErrorCode::Failed, format!("cannot tell present pages: {e}")))?;
        let mut invalid = PageBitmap::new(pages);
        for (page, r) in resident.iter().enumerate().take(pages as usize) {
            if r & 1 == 0 {
                invalid.set(page as u64);
            }
        }
        let reply = TrapRejoinReply {
            trap: Backend::Userfaultfd,
            pages,
            invalid: invalid.count(),
            header_bytes: 0,
            host_accesses: false,
            waiting_vcpus,
        };
        Ok(Rejoin {
            reply,
            fds: vec![dup_fd(uffd.as_fd(), "userfaultfd")?],
            invalid,
            takes_events: false,
        })
    }

    /// After a rejoin has been answered: wakes every thread blocked in a userfaultfd fault
    /// on RAM, so that each faults again and the new receiver reads the event (the old one
    /// may have read it and died).
    pub fn wake_uffd_waiters(&self) {
        let ops = self.ops();
        if let Some(uffd) = &ops.uffd {
            let start = self.memory.mapping().as_ptr() as u64;
            if let Err(e) = uffd.wake(start, self.memory.size()) {
                tracing::warn!("waking userfaultfd waiters after a rejoin failed: {e}");
            }
        }
    }

    /// The KVM Userfault trap, for handing its event channel over.
    pub fn userfault(&self) -> &UserfaultTrap {
        &self.userfault
    }

    pub fn discard(&self, blob: &[u8]) -> Result<VmState, ErrorReply> {
        let ops = self.ops();
        self.require_fresh_incoming(&ops, "discard")?;
        let pages = PageBitmap::from_le_bytes(blob, self.memory.pages())
            .map_err(|e| err(ErrorCode::BadRequest, format!("discard bitmap: {e}")))?;
        let mut discarded = 0u64;
        for (first, count) in pages.runs() {
            self.memory
                .discard(first * PAGE, count * PAGE)
                .map_err(|e| err(ErrorCode::Failed, format!("discarding pages failed: {e}")))?;
            discarded += count;
        }
        tracing::debug!(discarded, "pages discarded");
        Ok(self.state_locked(&ops))
    }

    pub fn status(&self) -> VmStatus {
        let ops = self.ops();
        let states = self.control.states();
        let errors = self.control.errors();
        let heartbeats = self.accounting.heartbeats();
        let snapshot = self.accounting.snapshot();
        let waits = self.userfault.waits();
        let run = ops.run_total + ops.run_since.map(|s| s.elapsed()).unwrap_or_default();
        VmStatus {
            vm_id: self.id.clone(),
            state: self.state_locked(&ops),
            heartbeats: heartbeats.clone(),
            failures: snapshot.failures,
            failed_pages: snapshot.failed_pages,
            vcpu_status: states
                .iter()
                .enumerate()
                .map(|(i, s)| VcpuStatus {
                    index: i as u32,
                    state: *s,
                    heartbeats: heartbeats[i],
                    progress: snapshot.progress[i],
                    status_word: snapshot.status_words[i],
                    error: errors[i].clone(),
                    waiting: waits.get(i).copied().flatten(),
                })
                .collect(),
            dirty_log_active: ops.dirty_log,
            run_ms: run.as_millis() as u64,
        }
    }

    /// Stops the vCPU threads for good and waits for them.
    pub fn stop(&mut self) {
        self.control.exit(&self.threads);
        let mut ops = self.ops();
        if let Some(since) = ops.run_since.take() {
            ops.run_total += since.elapsed();
        }
        drop(ops);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

const PAGE: u64 = faultline::layout::PAGE_SIZE;

/// A descriptor of ours to hand over (the receiver gets its own reference).
fn dup_fd(fd: BorrowedFd<'_>, what: &str) -> Result<OwnedFd, ErrorReply> {
    fd.try_clone_to_owned().map_err(|e| {
        err(
            ErrorCode::Failed,
            format!("cannot duplicate the {what}: {e}"),
        )
    })
}

/// The userfaultfd features and register mode for a backing and mode.
fn uffd_parameters(backing: BackingKind, mode: UffdMode) -> Result<(u64, u64), ErrorReply> {
    match (backing, mode) {
        (BackingKind::Anon, UffdMode::Missing) => Ok((0, uffd::MODE_MISSING)),
        (BackingKind::Memfd | BackingKind::GuestMemfd, UffdMode::Missing) => {
            Ok((uffd::FEATURE_MISSING_SHMEM, uffd::MODE_MISSING))
        }
        (BackingKind::Memfd | BackingKind::GuestMemfd, UffdMode::Minor) => {
            Ok((uffd::FEATURE_MINOR_SHMEM, uffd::MODE_MINOR))
        }
        (BackingKind::Anon, UffdMode::Minor) => Err(err(
            ErrorCode::Unavailable,
            "minor faults need shared memory; anonymous RAM supports missing mode only",
        )),
    }
}

/// Whether this kernel lets RAM of this backing be registered with userfaultfd, found by
/// registering and unregistering it (missing mode; minor too for shared memory).
fn probe_userfaultfd(memory: &GuestMemory) -> Capability {
    let name = CapabilityName::Userfaultfd;
    let backing = memory.backing();
    let modes: &[UffdMode] = match backing {
        BackingKind::Anon => &[UffdMode::Missing],
        _ => &[UffdMode::Missing, UffdMode::Minor],
    };
    let start = memory.mapping().as_ptr() as u64;
    let mut failures = Vec::new();
    for &mode in modes {
        let attempt = uffd_parameters(backing, mode)
            .map_err(|e| e.message)
            .and_then(|(features, bits)| {
                let u = Userfaultfd::new(features).map_err(|e| e.to_string())?;
                u.register(start, memory.size(), bits)
                    .map_err(|e| e.to_string())?;
                u.unregister(start, memory.size())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = attempt {
            failures.push(format!("{mode:?}: {e}"));
        }
    }
    Capability {
        name: name.as_str().into(),
        available: failures.len() < modes.len(),
        reason: (!failures.is_empty()).then(|| failures.join("; ")),
    }
}

/// Whether KVM accepts `KVM_MEM_USERFAULT` on the RAM memslot, found by setting it (with an
/// empty bitmap) and clearing it again before any vCPU runs.
fn probe_kvm_userfault(vm: &VmFd, memory: &GuestMemory) -> Capability {
    let bitmap = UserfaultBitmap::new(memory.pages());
    probe_memslot_flag(
        vm,
        memory,
        CapabilityName::KvmUserfault,
        "KVM_MEM_USERFAULT",
        false,
        Some(bitmap.user_addr()),
    )
}

/// Dirty logging needs KVM to accept `KVM_MEM_LOG_DIRTY_PAGES` on the RAM memslot; KVM
/// refuses it on guest_memfd memslots.
fn probe_dirty_log(vm: &VmFd, memory: &GuestMemory) -> Capability {
    probe_memslot_flag(
        vm,
        memory,
        CapabilityName::DirtyLog,
        "KVM_MEM_LOG_DIRTY_PAGES",
        true,
        None,
    )
}

/// Probes a memslot flag by setting it on the RAM memslots and clearing it again, before any
/// vCPU runs.
fn probe_memslot_flag(
    vm: &VmFd,
    memory: &GuestMemory,
    name: CapabilityName,
    flag: &str,
    log_dirty: bool,
    userfault_bitmap: Option<u64>,
) -> Capability {
    match memory.set_memslots(vm, log_dirty, userfault_bitmap) {
        Ok(()) => {
            if let Err(e) = memory.set_memslots(vm, false, None) {
                tracing::warn!("turning the {name} probe off failed: {e}");
            }
            Capability::available(name)
        }
        Err(e) => Capability::unavailable(
            name,
            format!(
                "KVM refused {flag} on the {} RAM memslot: {}",
                memory.backing(),
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.to_string())
            ),
        ),
    }
}
